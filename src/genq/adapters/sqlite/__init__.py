"""``JobStore`` and ``KeyStore`` on SQLite: the embedded default.

WAL mode, stdlib ``sqlite3``, statements run on the caller's (the event loop's) thread:
with ``synchronous=NORMAL`` a commit is a write to the WAL without fsync, a fraction of a
millisecond, cheaper than handing the statement to another thread and waiting for the
GIL back. The loop never waits inside SQLite: its connection has no busy timeout, and a
statement refused because another process holds the write lock is retried after an
``asyncio.sleep`` backoff; the WAL is checkpointed (the only fsync of the database file)
by a thread of its own, never inside a commit on the loop.

A job's status moves only by compare-and-set (``UPDATE ... WHERE id = ? AND version = ?
RETURNING``, after checking the expectation on the row just read). Every write stamps the
row with a store-wide revision (``rev``); the in-memory dispatch-order index that answers
``position`` and queue counts in O(log n) follows the table by reading rows whose ``rev``
is newer than the last one it saw, so it stays right even when a worker in another process
writes to the same file.

Neighbours: implements :class:`genq.ports.JobStore` / :class:`genq.ports.KeyStore`; used by
the API, the worker and the housekeeping loop alike.

The package: ``store`` (:class:`SQLiteStore`: connection, group commit, index, jobs),
``records`` (idempotency, workers, keys: a mixin of the store), ``cas`` (compare-and-set),
``schema`` (tables and row codecs), ``connection`` (statement and error helpers, the
checkpointer thread).
"""

from .connection import CHECKPOINT_INTERVAL, WAL_LIMIT_BYTES
from .schema import SCHEMA
from .schema import _encode_data as _encode_data
from .store import BUSY_TIMEOUT, NOTE_DELAY, RECENT_JOBS, SYNC_INTERVAL, SQLiteStore

__all__ = [
    "BUSY_TIMEOUT", "CHECKPOINT_INTERVAL", "NOTE_DELAY", "RECENT_JOBS", "SCHEMA", "SYNC_INTERVAL",
    "WAL_LIMIT_BYTES", "SQLiteStore",
]
