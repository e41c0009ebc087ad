"""``SQLiteStore``: the connection, group commit and WAL sync, the dispatch-order index
that follows other processes' writes, and the job methods. The row codecs, the
compare-and-set and the side tables live in the neighbouring modules of this package."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from sortedcontainers import SortedList

from genq.cursor import decode_cursor, encode_cursor
from genq.models import MUTABLE_FIELDS, Job, Status
from genq.ports import JobFilter, JobStore, Page, StorageFull, ToolCounts, Unavailable

from .cas import _cas, _evolved
from .connection import (
    CHECKPOINT_INTERVAL,
    WAL_LIMIT_BYTES,
    _Checkpointer,
    _fetch,
    _is_busy,
    _is_full,
    _off_loop,
    _port_error,
    _script,
    _write_stream_seqs,
)
from .records import _Records
from .schema import _NEXT_REV, SCHEMA, _deadline_at, _encode_data, _row_to_job

# The package's name, as before the split into modules: log records read the same.
log = logging.getLogger("genq.adapters.sqlite")

T = TypeVar("T")

#: Longest a write by another process may take to show in positions and queue counts.
SYNC_INTERVAL = 0.05
#: Jobs whose last committed state a store keeps as its compare-and-set's first guess
#: (``SQLiteStore._remember``): more than the jobs a process has in flight at once.
RECENT_JOBS = 4096
#: How long the stream positions of just-published jobs (:meth:`SQLiteStore.note_stream_seq`)
#: wait to be written together, in one transaction.
NOTE_DELAY = 0.05
#: Longest a statement waits, in all, for a write lock held by another process (a
#: ``genq worker`` on the same file) before it fails: the old ``busy_timeout``. The wait is
#: an async backoff, so the loop keeps serving meanwhile.
BUSY_TIMEOUT = 10.0
#: Pauses between tries of a statement refused with SQLITE_BUSY: SQLite's own busy
#: handler's schedule (ms 1, 2, 5, 10, ... 100), then 100 ms until ``BUSY_TIMEOUT``.
_BUSY_BACKOFF = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.025, 0.025, 0.05, 0.05, 0.1)


class _QueueIndex:
    """Queued jobs per tool in dispatch order, plus running counts; follows ``rev``."""

    def __init__(self) -> None:
        self.rev = 0
        self.queued: dict[str, SortedList] = {}
        self.keys: dict[str, tuple[str, tuple[int, int, str]]] = {}
        self.running: dict[str, set[str]] = {}

    def apply(self, job_id: str, tool: str, status: str, prank: int, seq: int) -> None:
        old = self.keys.pop(job_id, None)
        if old is not None:
            self.queued[old[0]].discard(old[1])
        if status == Status.QUEUED.value:
            key = (prank, seq, job_id)
            self.queued.setdefault(tool, SortedList()).add(key)
            self.keys[job_id] = (tool, key)
        run = self.running.setdefault(tool, set())
        if status == Status.RUNNING.value:
            run.add(job_id)
        else:
            run.discard(job_id)

    def forget(self, job_id: str) -> None:
        old = self.keys.pop(job_id, None)
        if old is not None:
            self.queued[old[0]].discard(old[1])
        for run in self.running.values():
            run.discard(job_id)


class SQLiteStore(_Records, JobStore):
    """Jobs, keys, idempotency records and worker liveness in one SQLite file."""

    def __init__(self, path: Path, *, checkpoint_interval: float | None = CHECKPOINT_INTERVAL):
        """``checkpoint_interval`` None: no checkpointer thread (the WAL only grows)."""
        self.path = Path(path)
        self.checkpoint_interval = checkpoint_interval
        self._db: sqlite3.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._index = _QueueIndex()
        self._sync_lock = asyncio.Lock()
        self._last_sync = 0.0
        self._notes: dict[str, int] = {}
        self._notes_task: asyncio.Task[None] | None = None
        #: The open transaction this loop iteration's writes join (``_write_grouped``).
        self._group: asyncio.Future[None] | None = None
        #: The last committed state seen of recent jobs, oldest first (``_remember``).
        self._recent: dict[str, Job] = {}
        #: WAL fsyncs (``_durable``): whether one is under way, and the one callers that
        #: committed meanwhile wait for.
        self._flushing = False
        self._flush_next: asyncio.Future[None] | None = None
        self._flushed_once = False

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread off only so close() can run on a thread; every statement runs
        # on the thread that awaits the store's methods (the event loop's).
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
        db.row_factory = sqlite3.Row
        self._db = db
        try:
            # WAL: readers never block the writer. synchronous=NORMAL is crash-safe for the
            # process (kill -9 loses nothing committed); an OS crash or power cut can lose
            # the last transactions, except those that waited for ``_durable``: a job's
            # acceptance. A lost later write (a start, a success) is a job that runs again.
            # No auto-checkpoint: it would run (and fsync) inside a commit on the loop.
            await self._run(_script, """
                PRAGMA journal_mode=WAL;
                PRAGMA synchronous=NORMAL;
                PRAGMA busy_timeout=0;
                PRAGMA wal_autocheckpoint=0;
                PRAGMA foreign_keys=ON;
            """ + f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES};")
            await self._run(_script, SCHEMA)
            await self._sync(full=True)
        except BaseException:
            self._db = None
            db.close()
            raise
        if self.checkpoint_interval is not None:
            self._checkpointer = _Checkpointer(self.path, self.checkpoint_interval)
            self._checkpointer.start()

    async def close(self) -> None:
        task, self._notes_task = self._notes_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._notes and self._db is not None:
            await self._write_notes()
        if self._group is not None:
            self._commit_group()
        db, self._db = self._db, None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            await _off_loop(self._checkpointer.join)  # a pass under way ends first
            self._checkpointer = None
        if db is not None:
            # The last connection to close checkpoints the WAL (an fsync): not on the loop.
            await _off_loop(db.close)

    async def ping(self) -> None:
        try:
            await self._rows("SELECT 1")
        except Unavailable:
            raise
        except Exception as e:  # pragma: no cover - only on a broken file
            raise Unavailable(f"job store: {e}") from e

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise Unavailable("job store is closed")
        return self._db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on this thread. Refused with SQLITE_BUSY (another
        process holds the write lock), it is tried again after a pause, up to
        ``BUSY_TIMEOUT``: the loop serves other requests meanwhile, where SQLite's busy
        timeout would hold the whole thread. For reads and the start-up scripts; writes go
        through ``_write_grouped``."""
        deadline: float | None = None
        pauses = itertools.chain(_BUSY_BACKOFF, itertools.repeat(_BUSY_BACKOFF[-1]))
        while True:
            try:
                return fn(self._conn, *args)
            except sqlite3.OperationalError as e:
                if _is_full(e):
                    raise StorageFull(str(e)) from e
                if not _is_busy(e):
                    raise
                now = time.monotonic()
                deadline = deadline or now + BUSY_TIMEOUT
                if now >= deadline:
                    raise
            await asyncio.sleep(next(pauses))

    async def _write(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return await self._write_grouped(_fetch, sql, tuple(args))

    async def _write_grouped(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` in the transaction every write of this loop iteration
        shares, committed in one go at the next iteration; returns once that commit is
        done, so a caller still publishes or answers only what is on disk.

        Group commit: the submits and compare-and-sets in flight together cost one commit
        instead of one each. An INSERT with its own commit wrote 10 pages (the row and its
        9 indexes, 40 KB) to the WAL; sixteen in one transaction share their pages, 5 KB
        each, and take 31 µs instead of 70 (BENCHMARKS.md §5). Each ``fn`` runs inside a
        savepoint: one that fails leaves the others' writes alone. A refused BEGIN (another
        process holds the write lock) is tried again by ``_run``, after an async pause."""

        def begin(conn: sqlite3.Connection) -> bool:
            if self._group is not None:  # another write opened it while this one waited
                return False
            conn.execute("BEGIN IMMEDIATE")
            return True

        if await self._run(begin):
            loop = asyncio.get_running_loop()
            self._group = loop.create_future()
            loop.call_soon(self._commit_group)
        conn = self._conn
        group = self._group
        conn.execute("SAVEPOINT genq_write")
        try:
            result = fn(conn, *args)
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK TO genq_write")
                conn.execute("RELEASE genq_write")
            elif self._group is group:
                # SQLite rolled the whole transaction back (a full disk, an I/O error): the
                # writes that joined it before this one are gone too, and hear so.
                self._group = None
                if not group.done():
                    group.set_exception(_port_error(e) if isinstance(e, sqlite3.Error) else e)
                    group.exception()
            if isinstance(e, sqlite3.OperationalError) and _is_full(e):
                raise StorageFull(str(e)) from e
            raise
        conn.execute("RELEASE genq_write")
        await asyncio.shield(group)
        return result

    async def _durable(self) -> None:
        """Return once everything this connection committed so far is on disk: an fdatasync
        of the WAL (what ``synchronous=FULL`` does inside every commit), in a thread, off
        the loop. Callers that commit while one runs share the next one, so concurrent
        submits cost one fsync, not one each. Only acceptances wait for it (``create``):
        what a client was told is stored survives a power cut."""
        fut = self._flush_next
        if fut is None:
            fut = self._flush_next = asyncio.get_running_loop().create_future()
            if not self._flushing:
                self._start_flush()
        await asyncio.shield(fut)

    def _start_flush(self) -> None:
        fut, self._flush_next = self._flush_next, None
        self._flushing = True
        wal, first = f"{self.path}-wal", not self._flushed_once

        def flush() -> None:
            try:
                fd = os.open(wal, os.O_RDONLY)
            except FileNotFoundError:  # checkpointed and removed: the database file holds it
                return
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if first:  # the WAL's own name in its folder, once (SQLite made the file)
                fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._flushed_once = True

        def done(t: asyncio.Future[None]) -> None:
            self._flushing = False
            e = t.exception() if not t.cancelled() else asyncio.CancelledError()
            if not fut.done():
                if e is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(Unavailable(f"job store: could not sync to disk: {e}"))
                    fut.exception()  # retrieved: a waiter that was cancelled leaves no warning
            if self._flush_next is not None:
                self._start_flush()

        loop = asyncio.get_running_loop()
        try:
            task = loop.run_in_executor(None, flush)
        except RuntimeError:  # the executor is shut down (interpreter exit): sync here
            task = loop.create_future()
            try:
                flush()
                task.set_result(None)
            except Exception as e:
                task.set_exception(e)
        task.add_done_callback(done)

    def _commit_group(self) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        db = self._db
        try:
            if db is None:
                raise Unavailable("job store is closed")
            db.execute("COMMIT")
        except Exception as e:
            if db is not None and db.in_transaction:
                with contextlib.suppress(Exception):
                    db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                e = _port_error(e)
            if not group.done():
                group.set_exception(e)
                group.exception()  # retrieved: a waiter that was cancelled leaves no warning
            return
        if not group.done():
            group.set_result(None)

    async def _rows(self, sql: str, args: Iterable[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        return await self._run(_fetch, sql, args if isinstance(args, dict) else tuple(args))

    def _note(self, job: Job | None) -> Job | None:
        """Apply this process's own write, committed, to the index at once (rows read by a
        later sync are applied again, harmlessly: a row only ever shows its latest state)."""
        if job is not None:
            self._index.apply(job.id, job.tool, job.status.value, job.priority.rank, job.seq)
            self._remember(job)
        return job

    def _remember(self, job: Job) -> None:
        """Keep ``job`` as the compare-and-set's first guess of its row (``_cas``). Only
        committed states: every write bumps the version, so a committed (id, version) is
        one row content forever, where a state a rolled-back transaction showed is not."""
        recent = self._recent
        recent.pop(job.id, None)
        recent[job.id] = job
        if len(recent) > RECENT_JOBS:
            del recent[next(iter(recent))]

    async def _sync(self, full: bool = False) -> None:
        """Bring the dispatch-order index up to date with writes by other processes.

        Own writes are applied as they happen (``_note``), so the table is read at most
        every ``SYNC_INTERVAL`` seconds: another process's writes (a ``genq worker`` on the
        same file) show up in positions and counts within that time."""
        if not full and time.monotonic() - self._last_sync < SYNC_INTERVAL:
            return
        async with self._sync_lock:
            self._last_sync = time.monotonic()
            if full:
                # The top revision first: a write landing between the two reads is read
                # again by the next sync rather than missed.
                top = await self._rows("SELECT COALESCE(MAX(rev), 0) AS r FROM jobs")
                rows = await self._rows(
                    "SELECT id, tool, status, prank, seq, rev FROM jobs WHERE status IN ('queued','running')"
                )
                index = _QueueIndex()
                for r in rows:
                    index.apply(r["id"], r["tool"], r["status"], r["prank"], r["seq"])
                index.rev = top[0]["r"]
                self._index = index
                return
            rows = await self._rows(
                "SELECT id, tool, status, prank, seq, rev FROM jobs WHERE rev > ? ORDER BY rev", (self._index.rev,)
            )
            for r in rows:
                self._index.apply(r["id"], r["tool"], r["status"], r["prank"], r["seq"])
                self._index.rev = r["rev"]

    # -- jobs --------------------------------------------------------------------------
    async def create(self, job: Job) -> Job:
        rows = await self._write(
            f"""
            INSERT INTO jobs (id, owner, tool, variant, priority, prank, status, seq, version, rev,
                created_at, started_at, completed_at, expires_at, heartbeat_at, deadline_at,
                stream_seq, attempts, progress, seed, worker, data)
            VALUES (?, ?, ?, ?, ?, ?, ?,
                (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), 1,
                {_NEXT_REV},
                ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            RETURNING seq
            """,
            (
                job.id, job.owner, job.tool, job.variant, job.priority.value, job.priority.rank,
                job.status.value, job.created_at, job.started_at, job.completed_at, job.expires_at,
                job.heartbeat_at, _deadline_at(job), job.stream_seq, job.attempts, job.progress,
                job.seed, job.worker, _encode_data(job),
            ),
        )
        created = self._note(_evolved(job, seq=rows[0][0], version=1))
        try:
            await self._durable()  # accepted means on disk
        except Unavailable:
            with contextlib.suppress(Exception):  # not accepted: not left to run either
                await self.delete(job.id)
            raise
        # The row is the job as given plus what the INSERT assigned: no need to read it back.
        return created

    async def get(self, job_id: str, *, fresh: bool = False) -> Job | None:
        rows = await self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = _row_to_job(rows[0])
        if self._group is None:  # else the read may show this connection's uncommitted writes
            self._remember(job)
        return job

    async def transition(
        self,
        job_id: str,
        expect: Iterable[Status],
        *,
        version: int | None = None,
        guard: Callable[[Job], bool] | None = None,
        requeue: bool = False,
        **changes: Any,
    ) -> Job | None:
        expect = [Status(s).value for s in expect]
        return await self._cas(job_id, expect, version, guard, requeue, changes)

    async def update(
        self, job_id: str, *, version: int | None = None, guard: Callable[[Job], bool] | None = None, **changes: Any
    ) -> Job | None:
        return await self._cas(job_id, None, version, guard, False, changes)

    async def _cas(
        self,
        job_id: str,
        expect: list[str] | None,
        version: int | None,
        guard: Callable[[Job], bool] | None,
        requeue: bool,
        changes: dict[str, Any],
    ) -> Job | None:
        bad = set(changes) - MUTABLE_FIELDS
        if bad:
            raise ValueError(f"cannot change {sorted(bad)}")
        # Read, check and write with no await between them.
        return self._note(await self._write_grouped(
            _cas, job_id, expect, version, guard, requeue, changes, self._recent.get(job_id)))

    def note_stream_seq(self, job_id: str, seq: int) -> bool:
        """Record where a just-published, still queued job sits in the stream, a moment
        later: the positions noted within ``NOTE_DELAY`` go in one transaction, where an
        ``update(stream_seq=...)`` per submit was a commit of its own (a fifth of the store's
        writes per job). Until then the job reads as not yet published, which matters only
        after a crash: housekeeping republishes such a job 5 s after its creation under the
        same message id, JetStream drops the copy and answers with this position. A job that
        moved on meanwhile (a worker started it, noting the position itself) is left alone."""
        self._notes[job_id] = seq
        if self._notes_task is None:
            self._notes_task = asyncio.get_running_loop().create_task(self._notes_after(NOTE_DELAY))
        return True

    async def _notes_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._notes_task = None
        await self._write_notes()

    async def _write_notes(self) -> None:
        notes, self._notes = self._notes, {}
        try:
            await self._write_grouped(_write_stream_seqs, list(notes.items()))
        except Exception as e:
            log.warning("could not record the stream position of %d job(s) (%s); housekeeping republishes them",
                        len(notes), e)

    async def delete(self, job_id: str) -> None:
        self._recent.pop(job_id, None)
        await self._write("DELETE FROM jobs WHERE id = ?", (job_id,))
        async with self._sync_lock:
            self._index.forget(job_id)

    async def list(self, flt: JobFilter, *, limit: int, cursor: str | None, order: str) -> Page:
        where, args = [], []
        if flt.owner is not None:
            where.append("owner = ?")
            args.append(flt.owner)
        if flt.status is not None:
            where.append("status = ?")
            args.append(flt.status.value)
        if flt.tool is not None:
            where.append("tool = ?")
            args.append(flt.tool)
        if flt.created_after is not None:
            where.append("created_at > ?")
            args.append(flt.created_after)
        if flt.created_before is not None:
            where.append("created_at < ?")
            args.append(flt.created_before)
        total_rows = await self._rows(
            f"SELECT COUNT(*) AS n FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''}", args
        )
        desc = order == "desc"
        page_where, page_args = list(where), list(args)
        if cursor:
            page_where.append("id < ?" if desc else "id > ?")
            page_args.append(decode_cursor(cursor))
        rows = await self._rows(
            f"SELECT * FROM jobs {'WHERE ' + ' AND '.join(page_where) if page_where else ''} "
            f"ORDER BY id {'DESC' if desc else 'ASC'} LIMIT ?",
            (*page_args, limit + 1),
        )
        jobs = [_row_to_job(r) for r in rows[:limit]]
        next_cursor = encode_cursor(jobs[-1].id) if len(rows) > limit else None
        return Page(jobs=jobs, next_cursor=next_cursor, total=total_rows[0]["n"])

    async def position(self, job: Job) -> int | None:
        await self._sync()
        entry = self._index.keys.get(job.id)
        if entry is None:
            return None
        tool, key = entry
        return self._index.queued[tool].bisect_left(key) + 1

    async def counts(self, tool: str) -> ToolCounts:
        await self._sync()
        rows = await self._rows(
            "SELECT status, COUNT(*) AS n FROM jobs WHERE tool = ? AND status IN ('succeeded','failed','cancelled') GROUP BY status",
            (tool,),
        )
        done = {r["status"]: r["n"] for r in rows}
        return ToolCounts(
            queued=len(self._index.queued.get(tool, ())),
            running=len(self._index.running.get(tool, ())),
            succeeded=done.get("succeeded", 0),
            failed=done.get("failed", 0),
            cancelled=done.get("cancelled", 0),
        )

    async def queued_count(self, tool: str) -> int:
        await self._sync()
        return len(self._index.queued.get(tool, ()))

    async def owner_active(self, owner: str) -> int:
        rows = await self._rows("SELECT COUNT(*) AS n FROM jobs WHERE owner = ? AND status = 'queued'", (owner,))
        return rows[0]["n"]

    async def recent_durations(self, tool: str, limit: int = 50) -> list[float]:
        rows = await self._rows(
            """SELECT completed_at - started_at AS d FROM jobs
               WHERE tool = ? AND status = 'succeeded' AND started_at IS NOT NULL
               ORDER BY completed_at DESC LIMIT ?""",
            (tool, limit),
        )
        return [r["d"] for r in rows if r["d"] is not None]

    async def due(self, now: float, *, heartbeat_before: float, unpublished_before: float, limit: int = 500) -> list[Job]:
        rows = await self._rows(
            """
            SELECT * FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= :now
            UNION
            SELECT * FROM jobs WHERE status = 'running' AND (deadline_at <= :now OR heartbeat_at < :hb)
            UNION
            -- Left to itself the planner walks every queued job (jobs_status_hb): 3 ms a
            -- pass under a 20,000-job backlog; the partial index holds only the unpublished.
            SELECT * FROM jobs INDEXED BY jobs_unpublished
            WHERE status = 'queued' AND stream_seq IS NULL AND created_at < :unpub
            LIMIT :limit
            """,
            {"now": now, "hb": heartbeat_before, "unpub": unpublished_before, "limit": limit},
        )
        return [_row_to_job(r) for r in rows]
