"""Low-level helpers on a ``sqlite3`` connection: statements, SQLite errors as the ports'
failures, work handed off the loop, and the checkpointer thread that copies the WAL back
into the database file (the only fsync of that file) away from the event loop."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genq.ports import PortError, StorageFull, Unavailable

from .schema import _NEXT_REV

# The package's name, as before the split into modules: log records read the same.
log = logging.getLogger("genq.adapters.sqlite")

#: Seconds between the checkpointer thread's passive checkpoints. Between two, the WAL
#: holds about that many seconds of writes (a few MB at a few hundred jobs a second); a
#: write after a complete checkpoint starts the WAL over from its beginning.
CHECKPOINT_INTERVAL = 1.0
#: A WAL larger than this (a reader held an old snapshot, so passive passes could not
#: finish) gets a TRUNCATE checkpoint, which waits for readers; the same size caps what the
#: WAL file keeps on disk after it starts over (``journal_size_limit``).
WAL_LIMIT_BYTES = 64 * 1024 * 1024


def _write_stream_seqs(conn: sqlite3.Connection, notes: list[tuple[str, int]]) -> None:
    """Many jobs' stream positions in one write (as a compare-and-set would: version and
    revision bumped)."""
    conn.executemany(
        f"UPDATE jobs SET stream_seq = ?, version = version + 1, rev = {_NEXT_REV} "
        "WHERE id = ? AND status = 'queued' AND stream_seq IS NULL",
        [(seq, job_id) for job_id, seq in notes],
    )


def _fetch(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...] | dict[str, Any]) -> list[sqlite3.Row]:
    # fetchall: a statement stepped to its end is reset at once, so a write commits here
    # (autocommit) and a read lets go of its WAL snapshot.
    return conn.execute(sql, args).fetchall()


def _script(conn: sqlite3.Connection, sql: str) -> None:
    conn.executescript(sql)


async def _off_loop(fn: Callable[[], None]) -> None:
    try:
        await asyncio.to_thread(fn)
    except RuntimeError:  # the loop's executor is shut down already (interpreter exit)
        fn()


def _is_busy(e: sqlite3.OperationalError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_BUSY
    return "database is locked" in str(e)  # pragma: no cover - Python always sets the code


def _port_error(e: sqlite3.Error) -> PortError:
    """A failed transaction as the store's callers know failures: full, or unavailable."""
    if isinstance(e, sqlite3.OperationalError) and _is_full(e):
        return StorageFull(str(e))
    return Unavailable(f"job store: the transaction failed: {e}")


def _is_full(e: sqlite3.OperationalError) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "disk is full" in str(e)


class _Checkpointer(threading.Thread):
    """Copies the WAL back into the database file every ``interval`` seconds, on its own
    connection and thread, so the fsync this takes never happens on the event loop (the
    loop's connection has auto-checkpoint off)."""

    def __init__(self, path: Path, interval: float):
        super().__init__(name=f"genq-sqlite-checkpoint-{path.name}", daemon=True)
        self.path = path
        self.wal = Path(f"{path}-wal")
        self.interval = interval
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            while not self._stop_event.wait(self.interval):
                self.checkpoint(conn)
        finally:
            conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            size = self.wal.stat().st_size
        except FileNotFoundError:
            return
        # PASSIVE never waits and never blocks a writer; TRUNCATE (a WAL that passive
        # passes could not empty) waits for readers and holds writers off meanwhile, who
        # back off asynchronously.
        mode = "TRUNCATE" if size > WAL_LIMIT_BYTES else "PASSIVE"
        try:
            conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.Error as e:
            log.debug("checkpoint of %s: %s", self.path, e)
