"""Both ``JobStore`` adapters pass the same behavioural tests.

The API, the workers and housekeeping are the same code on one machine (SQLite) and in a
cluster (GenerationJobs on a real kube-apiserver): whatever they rely on must hold in
both — compare-and-set moves, dispatch order, what ``due`` finds, listing with filters,
order and cursors, idempotency records and worker liveness. Each test runs against a
fresh SQLite file and a fresh namespace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from ulid import ULID

from genq.adapters.sqlite import SQLiteStore
from genq.models import FileRef, Job, Priority, Status
from genq.ports import JobFilter, JobStore
from k8s.controlplane import control_plane  # noqa: F401  (the session fixture)

T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", pytest.param("kubernetes", marks=pytest.mark.k8s)])
async def store(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[JobStore]:
    if request.param == "sqlite":
        s: JobStore = SQLiteStore(tmp_path / "genq.db")
        await s.open()
        try:
            yield s
        finally:
            await s.close()
        return
    from genq.adapters.kubernetes import KubernetesStore

    cp = request.getfixturevalue("control_plane")
    ns = f"genq-contract-{uuid.uuid4().hex[:8]}"
    with cp.client() as api:
        r = api.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        assert r.is_success, r.text
    s = KubernetesStore(ns, kubeconfig=cp.kubeconfig, uri_base="s3://genq/")
    await s.open()
    try:
        yield s
    finally:
        await s.close()
        with cp.client() as api:
            api.delete(f"/api/v1/namespaces/{ns}")


_ids = iter(range(1, 1_000_000))


def job_id(at: float | None = None) -> str:
    """Ids that sort in the order they are made (one millisecond apart)."""
    return str(ULID.from_timestamp((at if at is not None else T0) + next(_ids) / 1000))


def new_job(tool: str = "echo", priority: Priority = Priority.NORMAL, **kw) -> Job:
    jid = kw.pop("id", None) or job_id()
    fields = dict(
        id=jid, owner="key-1", tool=tool, variant="v1", priority=priority, params={"text": "hi", "n": [1, 2]},
        inputs=(FileRef("image.png", f"jobs/{jid}/inputs/image.png", "image/png", 1234),),
        seed=42, max_attempts=3, deadline_seconds=30, ttl_seconds=600, created_at=time.time(),
    )
    fields.update(kw)
    return Job(**fields)


def submitted(job: Job) -> dict:
    """What was submitted: everything but what the store assigns."""
    return {k: v for k, v in dataclasses.asdict(job).items() if k not in ("seq", "version")}


# -- create and read ---------------------------------------------------------------------


async def test_create_assigns_place_and_version_and_reads_back(store):
    job = new_job()
    created = await store.create(job)
    assert submitted(created) == submitted(job)
    assert created.seq > 0 and created.version > 0
    assert await store.get(job.id) == created
    assert await store.get(job_id()) is None and await store.get(job_id(), fresh=True) is None


# -- compare-and-set -----------------------------------------------------------------------


async def test_transition_applies_only_when_status_version_and_guard_hold(store):
    job = await store.create(new_job())
    assert await store.transition(job.id, [Status.RUNNING], status=Status.SUCCEEDED) is None
    assert await store.transition(job.id, [Status.QUEUED], version=job.version + 1000, status=Status.RUNNING) is None
    assert await store.transition(job.id, [Status.QUEUED], guard=lambda j: j.attempts > 0, status=Status.RUNNING) is None
    assert await store.get(job.id) == job  # nothing moved

    started = await store.transition(job.id, [Status.QUEUED], version=job.version, guard=lambda j: j.attempts == 0,
                                     status=Status.RUNNING, attempts=1, worker="w-1", started_at=T0 + 1.5)
    assert started is not None
    assert (started.status, started.attempts, started.worker) == (Status.RUNNING, 1, "w-1")
    assert started.started_at == pytest.approx(T0 + 1.5, abs=1e-6)
    assert started.version != job.version
    assert await store.get(job.id) == started
    # The version it was read at has moved on: a second move from it loses.
    assert await store.transition(job.id, [Status.RUNNING], version=job.version, status=Status.FAILED) is None


async def test_update_changes_fields_but_not_the_status(store):
    job = await store.create(new_job())
    updated = await store.update(job.id, progress=0.25, stream_seq=7, heartbeat_at=T0)
    assert updated is not None and updated.status is Status.QUEUED
    assert (updated.progress, updated.stream_seq) == (0.25, 7)
    assert await store.update(job.id, version=job.version, progress=0.5) is None  # stale version
    assert await store.update(job.id, guard=lambda j: j.progress > 0.9, progress=0.5) is None
    assert (await store.get(job.id)).progress == 0.25


async def test_what_a_job_is_never_changes(store):
    job = await store.create(new_job())
    for field, value in (("owner", "someone-else"), ("tool", "other"), ("id", job_id()), ("seq", 1),
                         ("created_at", 0.0), ("variant", "v2"), ("priority", Priority.HIGH), ("params", {}),
                         ("inputs", ())):
        with pytest.raises(ValueError):
            await store.update(job.id, **{field: value})
    assert await store.get(job.id) == job


async def test_a_missing_job_moves_nowhere(store):
    missing = job_id()
    assert await store.transition(missing, [Status.QUEUED], status=Status.RUNNING) is None
    assert await store.update(missing, progress=0.5) is None


async def test_of_racing_moves_exactly_one_wins(store):
    job = await store.create(new_job())
    results = await asyncio.gather(*(
        store.transition(job.id, [Status.QUEUED], version=job.version, status=Status.RUNNING, attempts=1, worker=f"w-{i}")
        for i in range(4)
    ))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert (await store.get(job.id)).worker == winners[0].worker


async def test_retention_and_deadline_can_change(store):
    job = await store.create(new_job())
    done = await store.transition(job.id, [Status.QUEUED], status=Status.CANCELLED, completed_at=T0,
                                  expires_at=T0 + 60, ttl_seconds=60, deadline_seconds=None)
    assert done is not None and (done.ttl_seconds, done.deadline_seconds) == (60, None)
    again = await store.get(job.id)
    assert (again.status, again.ttl_seconds, again.deadline_seconds) == (Status.CANCELLED, 60, None)
    assert again.expires_at == pytest.approx(T0 + 60, abs=1e-6)


# -- dispatch order and counts -------------------------------------------------------------


async def test_positions_follow_priority_then_fifo_and_requeue_goes_to_the_back(store):
    low = await store.create(new_job(tool="pos", priority=Priority.LOW))
    n1 = await store.create(new_job(tool="pos"))
    n2 = await store.create(new_job(tool="pos"))
    high = await store.create(new_job(tool="pos", priority=Priority.HIGH))
    assert [await store.position(j) for j in (high, n1, n2, low)] == [1, 2, 3, 4]

    running = await store.transition(n1.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, worker="w")
    assert await store.position(running) is None
    back = await store.transition(n1.id, [Status.RUNNING], requeue=True, status=Status.QUEUED, worker=None)
    assert [await store.position(j) for j in (high, n2, back, low)] == [1, 2, 3, 4]

    counts = await store.counts("pos")
    assert (counts.queued, counts.running, counts.succeeded) == (4, 0, 0)
    assert await store.queued_count("pos") == 4 and await store.queued_count("other") == 0
    assert await store.owner_active("key-1") == 4 and await store.owner_active("nobody") == 0


async def test_counts_and_recent_durations_follow_finished_jobs(store):
    jobs = [await store.create(new_job(tool="dur")) for _ in range(4)]
    for i, j in enumerate(jobs[:3]):
        await store.transition(j.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, worker="w", started_at=T0 + 10 * i)
        await store.transition(j.id, [Status.RUNNING], status=Status.SUCCEEDED, completed_at=T0 + 10 * i + i + 1,
                               progress=1.0, result_meta={"seed": 1, "duration_seconds": i + 1, "metrics": {}})
    await store.transition(jobs[3].id, [Status.QUEUED], status=Status.FAILED, completed_at=T0 + 100,
                           error={"code": "pipeline_error", "message": "no"})
    counts = await store.counts("dur")
    assert (counts.queued, counts.running, counts.succeeded, counts.failed, counts.cancelled) == (0, 0, 3, 1, 0)
    assert await store.recent_durations("dur") == pytest.approx([3.0, 2.0, 1.0], abs=1e-5)  # most recent first
    assert await store.recent_durations("dur", limit=2) == pytest.approx([3.0, 2.0], abs=1e-5)
    assert await store.owner_active("key-1") == 0


# -- housekeeping -----------------------------------------------------------------------------


async def test_due_finds_expired_overdue_silent_and_unpublished_jobs(store):
    now = time.time()
    expired = await store.create(new_job(tool="due"))
    await store.transition(expired.id, [Status.QUEUED], status=Status.SUCCEEDED, completed_at=now - 20, expires_at=now - 1)
    kept = await store.create(new_job(tool="due"))
    await store.transition(kept.id, [Status.QUEUED], status=Status.SUCCEEDED, completed_at=now - 20, expires_at=now + 600)
    overdue = await store.create(new_job(tool="due", deadline_seconds=5))
    await store.transition(overdue.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, worker="w",
                           started_at=now - 10, heartbeat_at=now)
    silent = await store.create(new_job(tool="due", deadline_seconds=None))
    await store.transition(silent.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, worker="w",
                           started_at=now - 100, heartbeat_at=now - 60)
    healthy = await store.create(new_job(tool="due", deadline_seconds=None))
    await store.transition(healthy.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, worker="w",
                           started_at=now - 100, heartbeat_at=now)
    unpublished = await store.create(new_job(tool="due", created_at=now - 30))
    published = await store.create(new_job(tool="due", created_at=now - 30))
    await store.update(published.id, stream_seq=11)
    fresh = await store.create(new_job(tool="due", created_at=now))

    due = {j.id for j in await store.due(now, heartbeat_before=now - 30, unpublished_before=now - 5)}
    assert due == {expired.id, overdue.id, silent.id, unpublished.id}, (due, [kept.id, healthy.id, published.id, fresh.id])


async def test_delete_removes_the_job_everywhere(store):
    job = await store.create(new_job(tool="gone"))
    await store.delete(job.id)
    assert await store.get(job.id) is None and await store.get(job.id, fresh=True) is None
    assert await store.queued_count("gone") == 0
    assert (await store.list(JobFilter(tool="gone"), limit=10, cursor=None, order="asc")).total == 0
    await store.delete(job.id)  # gone already: no error


# -- listing ----------------------------------------------------------------------------------


async def test_list_filters_orders_and_pages_alike(store):
    base = time.time()
    mine = [await store.create(new_job(tool="a" if i % 2 else "b", created_at=base + i)) for i in range(7)]
    theirs = await store.create(new_job(tool="a", owner="key-2", created_at=base + 3.5))
    await store.transition(mine[1].id, [Status.QUEUED], status=Status.CANCELLED, completed_at=base + 10)

    async def walk(flt: JobFilter, order: str, limit: int) -> tuple[list[str], set[int]]:
        ids, totals, cursor = [], set(), None
        while True:
            page = await store.list(flt, limit=limit, cursor=cursor, order=order)
            assert len(page.jobs) <= limit
            ids += [j.id for j in page.jobs]
            totals.add(page.total)
            cursor = page.next_cursor
            if cursor is None:
                return ids, totals

    every = sorted(j.id for j in [*mine, theirs])
    assert await walk(JobFilter(), "asc", 3) == (every, {8})
    assert await walk(JobFilter(), "desc", 3) == (every[::-1], {8})
    assert await walk(JobFilter(owner="key-1"), "desc", 2) == (sorted((j.id for j in mine), reverse=True), {7})
    assert await walk(JobFilter(owner="key-2"), "asc", 5) == ([theirs.id], {1})
    assert await walk(JobFilter(tool="a"), "asc", 2) == (sorted([mine[1].id, mine[3].id, mine[5].id, theirs.id]), {4})
    assert await walk(JobFilter(status=Status.CANCELLED), "asc", 2) == ([mine[1].id], {1})
    assert await walk(JobFilter(owner="key-1", status=Status.QUEUED, tool="b"), "asc", 10) == (
        [mine[0].id, mine[2].id, mine[4].id, mine[6].id], {4})
    window = JobFilter(created_after=base + 2, created_before=base + 5)  # both bounds exclusive
    assert await walk(window, "asc", 10) == (sorted([mine[3].id, mine[4].id, theirs.id]), {3})
    # A page ends exactly at the last job: no cursor to a page that would be empty.
    page = await store.list(JobFilter(owner="key-1"), limit=7, cursor=None, order="asc")
    assert len(page.jobs) == 7 and page.next_cursor is None
    with pytest.raises(ValueError):
        await store.list(JobFilter(), limit=3, cursor="not a cursor!", order="asc")


# -- idempotency and workers -----------------------------------------------------------------


async def test_idempotency_records_first_writer_wins_and_expire(store):
    later = time.time() + 600
    assert await store.idempotency_get("key-1", "k") is None
    assert await store.idempotency_put("key-1", "k", "hash-a", "job-a", later) == ("hash-a", "job-a")
    assert await store.idempotency_put("key-1", "k", "hash-b", "job-b", later) == ("hash-a", "job-a")
    assert await store.idempotency_get("key-1", "k") == ("hash-a", "job-a")
    assert await store.idempotency_get("key-2", "k") is None  # keys are per owner
    await store.idempotency_delete("key-1", "k", "job-b")  # not its job: kept
    assert await store.idempotency_get("key-1", "k") == ("hash-a", "job-a")
    await store.idempotency_delete("key-1", "k", "job-a")
    assert await store.idempotency_get("key-1", "k") is None

    assert await store.idempotency_put("key-1", "old", "hash-a", "job-a", time.time() - 1) == ("hash-a", "job-a")
    assert await store.idempotency_get("key-1", "old") is None  # expired
    assert await store.idempotency_put("key-1", "old", "hash-b", "job-b", later) == ("hash-b", "job-b")


async def test_workers_alive_counts_slots_seen_since(store):
    now = time.time()
    await store.worker_seen("echo-host-1-aa", "echo", 2, now)
    await store.worker_seen("echo-host-2-bb", "echo", 3, now - 100)
    await store.worker_seen("other-host-1-cc", "other", 5, now)
    assert await store.workers_alive("echo", now - 10) == 2
    assert await store.workers_alive("echo", now - 200) == 5
    await store.worker_seen("echo-host-2-bb", "echo", 3, now)  # seen again
    assert await store.workers_alive("echo", now - 10) == 5
    await store.worker_gone("echo-host-1-aa")
    assert await store.workers_alive("echo", now - 10) == 3
    await store.record_event(new_job(), "Retried", "best effort, never raises")
