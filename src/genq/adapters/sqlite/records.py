"""The small tables beside the jobs: idempotency records, worker liveness and API keys.
A mixin of :class:`SQLiteStore`, kept apart because none of it touches the job index, the
compare-and-set or the stream positions; it writes through the store's grouped writes."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from genq.models import ApiKey, Job

from .schema import _row_to_key

T = TypeVar("T")


class _Records:
    """Idempotency, worker and key methods of :class:`SQLiteStore` (its public surface)."""

    if TYPE_CHECKING:  # provided by SQLiteStore
        async def _rows(self, sql: str, args: Iterable[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]: ...
        async def _write(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]: ...
        async def _write_grouped(self, fn: Callable[..., T], *args: Any) -> T: ...

    # -- idempotency --------------------------------------------------------------------
    async def idempotency_get(self, owner: str, key: str) -> tuple[str, str] | None:

        rows = await self._rows(
            "SELECT body_hash, job_id FROM idempotency WHERE owner = ? AND key = ? AND expires_at > ?",
            (owner, key, time.time()),
        )
        return (rows[0]["body_hash"], rows[0]["job_id"]) if rows else None

    async def idempotency_put(self, owner: str, key: str, body_hash: str, job_id: str, expires_at: float) -> tuple[str, str]:

        def put(conn: sqlite3.Connection) -> tuple[str, str]:
            conn.execute("DELETE FROM idempotency WHERE owner = ? AND key = ? AND expires_at <= ?", (owner, key, time.time()))
            conn.execute(
                "INSERT OR IGNORE INTO idempotency (owner, key, body_hash, job_id, expires_at) VALUES (?, ?, ?, ?, ?)",
                (owner, key, body_hash, job_id, expires_at),
            )
            rows = conn.execute("SELECT body_hash, job_id FROM idempotency WHERE owner = ? AND key = ?", (owner, key)).fetchall()
            return rows[0]["body_hash"], rows[0]["job_id"]

        return await self._write_grouped(put)

    async def idempotency_delete(self, owner: str, key: str, job_id: str) -> None:
        await self._write("DELETE FROM idempotency WHERE owner = ? AND key = ? AND job_id = ?", (owner, key, job_id))

    async def idempotency_sweep(self, now: float) -> None:
        await self._write("DELETE FROM idempotency WHERE expires_at <= ?", (now,))

    # -- workers -------------------------------------------------------------------------
    async def worker_seen(self, worker_id: str, tool: str, slots: int, now: float) -> None:
        await self._write(
            "INSERT INTO workers (id, tool, slots, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen, slots = excluded.slots",
            (worker_id, tool, slots, now),
        )

    async def worker_gone(self, worker_id: str) -> None:
        await self._write("DELETE FROM workers WHERE id = ?", (worker_id,))

    async def record_event(self, job: Job, reason: str, message: str, *, warning: bool = False) -> None:
        """No event feed on one machine: the job's status and the log say it."""

    async def workers_alive(self, tool: str, since: float) -> int:
        rows = await self._rows("SELECT COALESCE(SUM(slots), 0) AS n FROM workers WHERE tool = ? AND last_seen >= ?", (tool, since))
        return rows[0]["n"]

    # -- keys ----------------------------------------------------------------------------
    async def create_key(self, key: ApiKey) -> ApiKey:
        await self._write(
            "INSERT INTO keys (id, name, key_hash, prefix, tier, admin, max_queued, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key.id, key.name, key.key_hash, key.prefix, key.tier, int(key.admin), key.max_queued, key.created_at),
        )
        return key

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        rows = await self._rows("SELECT * FROM keys WHERE key_hash = ?", (key_hash,))
        return _row_to_key(rows[0]) if rows else None

    async def list_keys(self) -> list[ApiKey]:
        return [_row_to_key(r) for r in await self._rows("SELECT * FROM keys ORDER BY created_at")]

    async def delete_key(self, key_id: str) -> bool:
        rows = await self._write("DELETE FROM keys WHERE id = ? RETURNING id", (key_id,))
        return bool(rows)

    async def get_key(self, key_id: str) -> ApiKey | None:
        rows = await self._rows("SELECT * FROM keys WHERE id = ?", (key_id,))
        return _row_to_key(rows[0]) if rows else None
