"""The SQLite job store (the embedded default) on a real file, with real second processes.

Statements run on the event loop's thread; what that must not cost: a write lock held by
another process (a ``genq worker`` on the same data folder) never stalls the loop, and the
write lands once the lock is free; the WAL is checkpointed by a thread, never inside a
commit on the loop, and does not grow without bound. What it must keep: compare-and-set
across processes (of two processes racing for a job, exactly one wins), positions that
follow another process's writes, StorageFull on a full database, Unavailable once closed.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from ulid import ULID

from genq.adapters.sqlite import NOTE_DELAY, SYNC_INTERVAL, SQLiteStore
from genq.models import Job, Priority, Status
from genq.ports import StorageFull, Unavailable


def new_job(tool: str = "t", priority: Priority = Priority.NORMAL, **kw) -> Job:
    fields = dict(id=str(ULID()), owner="key-1", tool=tool, variant="v1", priority=priority, params={"text": "hi"},
                  max_attempts=3, deadline_seconds=30, ttl_seconds=600)
    fields.update(kw)
    return Job(**fields)


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "genq.db")
    await s.open()
    yield s
    await s.close()


async def python(cwd: Path, code: str, *args: str) -> asyncio.subprocess.Process:
    """A second Python process (cwd away from the repo root: its ``operator/`` folder
    would shadow the standard library's)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, cwd=cwd,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def expect_line(proc: asyncio.subprocess.Process, want: str, timeout: float = 30) -> None:
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if line.decode().strip() != want:
        err = await proc.stderr.read()
        raise AssertionError(f"second process said {line!r}, not {want!r}: {err.decode()[-2000:]}")


class Ticker:
    """Measures the longest time the event loop went without running a 10 ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._last = time.monotonic()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        self.worst = max(self.worst, now - self._last - 0.01)
        self._last = now

    async def stop(self) -> float:
        self._tick()  # a stall just before the stop counts too
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.worst


HOLD_WRITE_LOCK = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN IMMEDIATE")
db.execute("INSERT INTO counters (name, value) VALUES ('holder', 1)")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
print("released", flush=True)
"""


async def test_a_write_lock_held_by_another_process_does_not_stall_the_loop(store, tmp_path):
    """Another process holds SQLite's write lock for a second. Meanwhile the loop keeps
    running (a 10 ms ticker is never held up long), reads answer at once (WAL), and the
    writes wait without blocking anything, then land as soon as the lock is free."""
    queued = await store.create(new_job())
    holder = await python(tmp_path, HOLD_WRITE_LOCK, str(store.path), "1.0")
    await expect_line(holder, "locked")
    ticker = Ticker()
    await asyncio.sleep(0.05)  # ticking
    locked_at = time.monotonic()

    async def timed(coro):
        result = await coro
        return result, time.monotonic() - locked_at

    (created, t_create), (moved, t_move), (read, t_read), (position, t_position) = await asyncio.gather(
        timed(store.create(new_job())),
        timed(store.transition(queued.id, [Status.QUEUED], version=queued.version, status=Status.RUNNING, attempts=1)),
        timed(store.get(queued.id)),
        timed(store.position(queued)),
    )
    worst = await ticker.stop()
    await expect_line(holder, "released")
    assert await holder.wait() == 0

    assert worst < 0.25, f"the event loop was held up {worst * 1000:.0f} ms while another process held the write lock"
    assert read.status is Status.QUEUED and position == 1
    assert t_read < 0.5 and t_position < 0.5, f"reads took {t_read:.2f} s / {t_position:.2f} s under another's write lock"
    # The writes waited for the lock, then landed (not an error, not lost).
    assert t_create > 0.8 and t_move > 0.8, (t_create, t_move)
    assert (await store.get(created.id)) == created
    assert moved is not None and moved.status is Status.RUNNING and (await store.get(queued.id)).status is Status.RUNNING
    rows = await store._rows("SELECT value FROM counters WHERE name = 'holder'")
    assert [r["value"] for r in rows] == [1]


RACER = r"""
import asyncio, sys
from genq.adapters.sqlite import SQLiteStore
from genq.models import Status

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.open()
    ids = sys.argv[2].split(",")
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    won = 0
    for job_id in ids:
        # As a redelivered job's worker does: the start is guarded by the attempt it read.
        got = await store.transition(job_id, [Status.QUEUED, Status.RUNNING], guard=lambda j: j.attempts == 0,
                                     status=Status.RUNNING, attempts=1, worker="other-process")
        won += got is not None
    print(won, flush=True)
    await store.close()

asyncio.run(main())
"""


async def test_two_processes_racing_for_jobs_exactly_one_wins_each(store, tmp_path):
    """Two processes (the API's embedded worker and a ``genq worker``) move the same
    jobs queued -> running at the same time: every job is won exactly once, and each
    process's positions and counts follow the other's writes."""
    jobs = [await store.create(new_job(tool="race")) for _ in range(300)]
    other = await python(tmp_path, RACER, str(store.path), ",".join(j.id for j in jobs))
    await expect_line(other, "ready")
    other.stdin.write(b"go\n")
    await other.stdin.drain()
    won_here = 0
    for job in jobs:
        got = await store.transition(job.id, [Status.QUEUED, Status.RUNNING], guard=lambda j: j.attempts == 0,
                                     status=Status.RUNNING, attempts=1, worker="this-process")
        won_here += got is not None
        await asyncio.sleep(0)
    won_there = int((await asyncio.wait_for(other.stdout.readline(), 60)).decode() or "-1")
    assert await other.wait() == 0, (await other.stderr.read()).decode()[-2000:]

    assert won_here + won_there == len(jobs), (won_here, won_there)
    final = [await store.get(j.id) for j in jobs]
    assert all(j.status is Status.RUNNING and j.attempts == 1 for j in final)
    assert sum(j.worker == "this-process" for j in final) == won_here
    # The index followed the other process's writes (rev-based sync).
    await asyncio.sleep(SYNC_INTERVAL * 2)
    counts = await store.counts("race")
    assert (counts.queued, counts.running) == (0, len(jobs))


ADD_HIGH_JOB = r"""
import asyncio, sys
from genq.adapters.sqlite import SQLiteStore
from genq.models import Job, Priority

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.open()
    await store.create(Job(id=sys.argv[2], owner="key-1", tool="pos", variant="v1", priority=Priority.HIGH, params={}))
    await store.close()

asyncio.run(main())
"""


async def test_positions_follow_another_processes_writes(store, tmp_path):
    normal = await store.create(new_job(tool="pos"))
    assert await store.position(normal) == 1
    high_id = str(ULID())
    proc = await python(tmp_path, ADD_HIGH_JOB, str(store.path), high_id)
    assert await proc.wait() == 0, (await proc.stderr.read()).decode()[-2000:]
    await asyncio.sleep(SYNC_INTERVAL * 2)
    assert await store.position(normal) == 2  # the other process's high job goes first
    assert await store.queued_count("pos") == 2
    assert await store.position(await store.get(high_id)) == 1


def wal_frames(db: Path) -> int:
    """Frames in the WAL file: its size less the 32-byte header, over (24 + page size)."""
    wal = Path(f"{db}-wal")
    return max(0, (wal.stat().st_size - 32) // (24 + 4096)) if wal.exists() else 0


async def test_no_checkpoint_inside_a_commit_on_the_loop(tmp_path):
    """SQLite's auto-checkpoint (every 1000 WAL pages, an fsync of the database file)
    would run inside a commit, on the loop: it is off. Without the checkpointer thread
    the WAL only grows and the database file is never written."""
    store = SQLiteStore(tmp_path / "genq.db", checkpoint_interval=None)
    await store.open()
    try:
        assert (await store._rows("PRAGMA wal_autocheckpoint"))[0][0] == 0
        db_size = store.path.stat().st_size
        for _ in range(400):
            await store.create(new_job(params={"pad": "x" * 2000}))
        assert wal_frames(store.path) > 1200
        assert store.path.stat().st_size == db_size
    finally:
        await store.close()


async def test_the_wal_is_checkpointed_off_the_loop_and_stays_bounded(tmp_path):
    """The checkpointer thread copies the WAL into the database file; the next write then
    starts the WAL over, so rounds of writes reuse the same WAL space."""
    store = SQLiteStore(tmp_path / "genq.db", checkpoint_interval=0.1)
    await store.open()
    try:
        db_size = store.path.stat().st_size
        sizes = []
        for _ in range(4):
            for _ in range(200):
                await store.create(new_job(params={"pad": "x" * 2000}))
            sizes.append(wal_frames(store.path))
            await asyncio.sleep(0.5)  # a few checkpointer passes
        assert store.path.stat().st_size > db_size + 200 * 2000, "the checkpointer never wrote the database file"
        # 800 jobs written; the WAL holds about one round's worth, not four.
        assert max(sizes) < 2 * sizes[0], f"the WAL kept growing: {sizes} frames after each round"
    finally:
        await store.close()
    # Closed: the last connection checkpointed and removed the WAL; the data is all there.
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 800


async def test_a_full_database_is_storage_full_and_recovers(store):
    """SQLITE_FULL (here: the database at its page limit, as on a full disk) is the typed
    StorageFull the API answers 503 with; nothing half-written; writes work once there is room."""
    pages = (await store._rows("PRAGMA page_count"))[0][0]
    await store._rows(f"PRAGMA max_page_count = {pages + 8}")
    made = []
    with pytest.raises(StorageFull):
        for _ in range(200):
            made.append(await store.create(new_job(params={"pad": "x" * 8000})))
    assert made, "the limit left no room at all"
    queued = made[0]
    with pytest.raises(StorageFull):
        await store.update(queued.id, progress=0.5, result_meta={"pad": "y" * 100_000})
    assert (await store.get(queued.id)) == queued  # the failed compare-and-set changed nothing
    await store._rows("PRAGMA max_page_count = 1073741823")
    assert await store.create(new_job(params={"pad": "x" * 8000}))
    assert (await store.update(queued.id, progress=0.5)).progress == 0.5


async def test_a_closed_store_is_unavailable(tmp_path):
    store = SQLiteStore(tmp_path / "genq.db")
    await store.open()
    job = await store.create(new_job())
    await store.close()
    for call in (store.get(job.id), store.create(new_job()), store.ping(), store.counts("t"),
                 store.transition(job.id, [Status.QUEUED], status=Status.RUNNING)):
        with pytest.raises(Unavailable):
            await call
    again = SQLiteStore(tmp_path / "genq.db")
    await again.open()
    try:
        assert await again.get(job.id) == job and await again.position(job) == 1
        assert json.loads(json.dumps(job.params)) == (await again.get(job.id)).params
    finally:
        await again.close()


async def test_noted_stream_positions_are_written_together_a_moment_later(store):
    """The API notes where each published job sits in the stream; the store writes the
    notes of a moment in one transaction (as writes: version bumped), leaves a job that a
    worker started meanwhile alone (it noted its own position), and writes what is still
    pending when it closes."""
    a, b, c = [await store.create(new_job()) for _ in range(3)]
    started = await store.transition(c.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, stream_seq=33)
    for job, seq in ((a, 11), (b, 22), (c, 99)):
        store.note_stream_seq(job.id, seq)
    assert (await store.get(a.id)).stream_seq is None  # not yet
    await asyncio.sleep(NOTE_DELAY * 4)
    got = [await store.get(j.id) for j in (a, b, c)]
    assert [j.stream_seq for j in got] == [11, 22, 33]
    assert got[0] == a.evolve(stream_seq=11, version=a.version + 1) and got[2] == started
    assert await store.position(got[0]) == 1 and await store.position(got[1]) == 2

    pending = await store.create(new_job())
    store.note_stream_seq(pending.id, 44)
    await store.close()
    again = SQLiteStore(store.path)
    await again.open()
    try:
        assert (await again.get(pending.id)).stream_seq == 44
    finally:
        await again.close()


async def test_a_file_made_before_an_index_went_opens_without_it(tmp_path):
    """Existing databases open as they are; the index dropped from the schema (a prefix of
    another, only costing writes) goes from them too."""
    first = SQLiteStore(tmp_path / "genq.db")
    await first.open()
    job = await first.create(new_job())
    await first.close()
    with sqlite3.connect(tmp_path / "genq.db") as db:
        db.execute("CREATE INDEX jobs_tool_status ON jobs(tool, status)")
    db.close()
    again = SQLiteStore(tmp_path / "genq.db")
    await again.open()
    try:
        names = {r[0] for r in await again._rows("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "jobs_tool_status" not in names and "jobs_done" in names
        assert await again.get(job.id) == job and (await again.counts("t")).queued == 1
    finally:
        await again.close()


async def test_revisions_never_go_back_when_the_newest_job_is_deleted(store, tmp_path):
    """Each process's positions follow the revisions it has not read yet. Deleting the job
    holding the highest revision (an expiry after a quiet spell) must not hand that number
    out again: another process that had read it would skip the next writes (here a job
    started by a second process would stay queued in the first one's counts)."""
    other = SQLiteStore(tmp_path / "genq.db")  # the second process's view (its own connection and index)
    await other.open()
    try:
        first = await store.create(new_job())
        gone = await store.create(new_job())
        await store.transition(gone.id, [Status.QUEUED], status=Status.CANCELLED)
        await asyncio.sleep(SYNC_INTERVAL * 2)
        assert (await store.counts("t")).queued == 1  # read up to the cancel's revision
        await store.delete(gone.id)
        await other.transition(first.id, [Status.QUEUED], status=Status.RUNNING, attempts=1)
        await asyncio.sleep(SYNC_INTERVAL * 2)
        counts = await store.counts("t")
        assert (counts.queued, counts.running) == (0, 1)
        assert await store.position(first) is None
    finally:
        await other.close()


async def test_writes_in_flight_together_share_one_commit(tmp_path):
    """Group commit: submits and compare-and-sets in flight at once go in one transaction.
    Each returns only once it is committed (another connection sees it), one that fails
    loses nobody else's write, and the WAL takes a fraction of a commit per write."""
    store = SQLiteStore(tmp_path / "genq.db", checkpoint_interval=None)
    await store.open()
    try:
        await store.create(new_job())
        frames = wal_frames(store.path)
        jobs = [new_job() for _ in range(32)]
        await asyncio.gather(*(store.create(j) for j in jobs))
        per_job = (wal_frames(store.path) - frames) / len(jobs)
        assert per_job < 3, f"{per_job:.1f} WAL pages per job: each write committed alone (about 10)"
        other = sqlite3.connect(store.path)
        try:
            seen = {r[0] for r in other.execute("SELECT id FROM jobs")}
            assert {j.id for j in jobs} <= seen  # committed when create() returned

            fresh = new_job()
            won = asyncio.ensure_future(store.transition(jobs[0].id, [Status.QUEUED], status=Status.RUNNING))
            results = await asyncio.gather(store.create(jobs[1].evolve(id=jobs[1].id)), store.create(fresh),
                                           won, return_exceptions=True)
            assert isinstance(results[0], sqlite3.IntegrityError), results  # the same id again
            assert results[1].id == fresh.id and results[2].status == Status.RUNNING
            rows = dict(other.execute("SELECT id, status FROM jobs WHERE id IN (?, ?)", (fresh.id, jobs[0].id)).fetchall())
            assert rows == {fresh.id: "queued", jobs[0].id: "running"}
        finally:
            other.close()
    finally:
        await store.close()


async def test_a_compare_and_set_on_a_job_just_seen_reads_no_row_and_a_stale_guess_is_not_trusted(store, tmp_path):
    """A worker's claim and finish write a job its process just read or wrote: the
    compare-and-set tries that state first, with no SELECT. Another process's write in
    between (its own connection here) makes the guess stale: then the row decides, and
    nothing the other process wrote is lost, columns or JSON fields."""
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    job = await store.create(new_job())
    seen = await store.get(job.id)
    statements.clear()
    started = await store.transition(job.id, [Status.QUEUED], guard=lambda j: j.attempts == 0,
                                     status=Status.RUNNING, attempts=1, worker="w1")
    assert started is not None and started.version == seen.version + 1
    done = await store.transition(job.id, [Status.RUNNING], guard=lambda j: j.worker == "w1",
                                  status=Status.SUCCEEDED, result_meta={"seed": 1})
    assert done is not None and done.status is Status.SUCCEEDED
    assert not [s for s in statements if s.lstrip().upper().startswith("SELECT")], statements
    assert (await store.get(job.id)) == done

    other = SQLiteStore(tmp_path / "genq.db")  # a second process's connection
    await other.open()
    try:
        job = await store.create(new_job())
        assert await store.get(job.id) is not None
        # The other process moves the job on: a column, a JSON field, the version.
        moved = await other.transition(job.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, worker="w2",
                                       error={"code": "x", "message": "kept"})
        assert moved is not None
        statements.clear()
        # This process's guess says queued: a claim expecting queued passes on the guess,
        # misses on the row's version, and loses on the row.
        assert await store.transition(job.id, [Status.QUEUED], status=Status.RUNNING, worker="w1") is None
        # Expecting running, the guess fails the check: the row is read and decides.
        after = await store.transition(job.id, [Status.RUNNING], progress=0.5)
        assert after is not None and after.worker == "w2" and after.progress == 0.5
        assert after.error == {"code": "x", "message": "kept"} and after.version == moved.version + 1
        # The guess matches the check but not the row's version: the UPDATE misses, the row decides.
        await other.update(job.id, heartbeat_at=123.0)
        final = await store.update(job.id, result_meta={"seed": 9})
        row = await other.get(job.id)
        assert final == row and row.heartbeat_at == 123.0 and row.progress == 0.5 and row.error["message"] == "kept"
        assert sum(s.lstrip().upper().startswith("SELECT") for s in statements) >= 3
    finally:
        await other.close()


async def test_a_state_read_inside_an_open_group_is_not_kept_as_a_guess(store):
    """The connection's own reads see its uncommitted group, which a full disk can still roll
    back; such a state must not become a compare-and-set's guess (a later committed write
    could reach the same version with other contents). Only what committed is kept."""
    job = await store.create(new_job())
    assert (await store.get(job.id)).version == 1
    writing = asyncio.create_task(store.update(job.id, progress=0.5))
    await asyncio.sleep(0)  # the update has run its UPDATE and waits for the group's commit
    assert store._group is not None
    seen = await store.get(job.id)
    assert seen.version == 2 and seen.progress == 0.5  # the uncommitted write, visible here
    assert store._recent[job.id].version == 1, "a state not yet committed was kept as a guess"
    assert (await writing).version == 2
    assert store._recent[job.id].version == 2  # committed: now it is the guess


@pytest.fixture
def fdatasyncs(monkeypatch):
    """The paths ``os.fdatasync`` was called on (a spy: the real call still runs)."""
    import os

    seen: list[str] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    return seen


async def test_an_accepted_job_is_on_disk_before_create_returns_and_other_writes_do_not_wait(store, fdatasyncs):
    """``synchronous=NORMAL`` leaves commits in the page cache; the submit's record alone
    waits for an fdatasync of the WAL (a power cut must not lose a job the API accepted).
    A start, a progress or a success does not: lost, it is a job that runs again."""
    wal = f"{store.path}-wal"
    job = await store.create(new_job())
    assert fdatasyncs == [wal]
    await store.transition(job.id, [Status.QUEUED], status=Status.RUNNING, attempts=1)
    await store.update(job.id, progress=0.5)
    await store.transition(job.id, [Status.RUNNING], status=Status.SUCCEEDED, completed_at=time.time())
    assert fdatasyncs == [wal]


async def test_submits_in_flight_together_share_the_fsync(store, fdatasyncs):
    """One fdatasync covers every commit before it: 64 concurrent creates share a few (the
    one under way when they commit, then one for all who committed meanwhile), and each
    create returns only after one that started after its own commit."""
    created = await asyncio.gather(*(store.create(new_job()) for _ in range(64)))
    assert len(created) == 64 and 1 <= len(fdatasyncs) <= 3, fdatasyncs
    seen = len(fdatasyncs)
    await store.create(new_job())  # alone: its own
    assert len(fdatasyncs) == seen + 1


async def test_a_submit_whose_record_cannot_reach_the_disk_is_refused_and_not_kept(store, monkeypatch):
    """An I/O error on the fsync (a fault a test cannot cause on a healthy disk, so
    fdatasync is made to fail): create raises Unavailable, the API answers 503, and the
    row is gone, so housekeeping never runs a job the client was told failed."""
    import errno
    import os

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    job = new_job()
    with pytest.raises(Unavailable, match="sync"):
        await store.create(job)
    monkeypatch.undo()
    assert await store.get(job.id) is None
    assert (await store.create(new_job())).version == 1  # the next submit is fine
