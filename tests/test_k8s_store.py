"""The Kubernetes job store against a real kube-apiserver: GenerationJobs as jobs.

What the API, workers and housekeeping rely on, as with the SQLite store: compare-and-set
status moves (a lost race returns None; of two stores racing, exactly one wins), dispatch
order, reads that see this process's own writes at once and another process's writes
through the watch, and what ``kubectl get gjob`` shows for a job the store wrote.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from ulid import ULID

from genq.adapters.kubernetes import KubernetesKeyStore, KubernetesStore, resource_name
from genq.models import ApiKey, FileRef, Job, Priority, Status
from genq.ports import JobFilter
from helpers import eventually
from k8s.controlplane import control_plane  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.k8s


@pytest.fixture
def ns(control_plane):  # noqa: F811
    name = f"genq-store-{uuid.uuid4().hex[:8]}"
    with control_plane.client() as api:
        r = api.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        assert r.is_success, r.text
    yield name
    with control_plane.client() as api:
        api.delete(f"/api/v1/namespaces/{name}")


async def _open(control_plane, ns) -> KubernetesStore:  # noqa: F811
    store = KubernetesStore(ns, kubeconfig=control_plane.kubeconfig, uri_base="s3://genq/")
    await store.open()
    return store


@pytest.fixture
async def store(control_plane, ns):  # noqa: F811
    s = await _open(control_plane, ns)
    yield s
    await s.close()


@pytest.fixture
async def other(control_plane, ns):  # noqa: F811
    """A second store on the same namespace: another API replica or a worker pod."""
    s = await _open(control_plane, ns)
    yield s
    await s.close()


def new_job(tool: str = "echo", priority: Priority = Priority.NORMAL, **kw) -> Job:
    job_id = str(ULID())
    fields = dict(
        id=job_id, owner="key-1", tool=tool, variant="v1", priority=priority, params={"text": "hi", "nested": {"a": [1, 2]}},
        inputs=(FileRef("image.png", f"jobs/{job_id}/inputs/image.png", "image/png", 1234),),
        seed=42, max_attempts=3, deadline_seconds=30, ttl_seconds=600,
    )
    fields.update(kw)
    return Job(**fields)


async def test_create_then_read_back_at_once(store):
    job = new_job()
    created = await store.create(job)
    assert created.id == job.id and created.status is Status.QUEUED and created.version > 0 and created.seq > 0
    got = await store.get(job.id)  # no wait for the watch: own writes are in the cache
    assert got == created
    assert (got.params, got.inputs, got.seed, got.max_attempts, got.deadline_seconds, got.ttl_seconds) == (
        job.params, job.inputs, 42, 3, 30.0, 600.0)
    assert abs(got.created_at - job.created_at) < 1e-6
    assert await store.get(job.id.lower()) == created  # ids are case-insensitive, like ULIDs
    assert await store.get(str(ULID())) is None

    running = await store.transition(job.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, started_at=time.time(),
                                     heartbeat_at=time.time(), worker="w-1")
    assert running is not None and running.version > created.version
    assert await store.get(job.id) == running
    progressed = await store.update(job.id, progress=0.5, stream_seq=7, delivery="$JS.ACK.x")
    assert (await store.get(job.id)).progress == 0.5 and progressed.stream_seq == 7 and progressed.delivery == "$JS.ACK.x"


async def test_lost_races_return_none(store):
    job = await store.create(new_job())
    assert await store.transition(job.id, [Status.RUNNING], status=Status.SUCCEEDED) is None  # wrong status
    assert await store.transition(job.id, [Status.QUEUED], version=job.version + 1, status=Status.RUNNING) is None
    assert await store.transition(job.id, [Status.QUEUED], guard=lambda j: j.attempts == 5, status=Status.RUNNING) is None
    assert await store.update(str(ULID()), progress=0.1) is None  # no such job
    moved = await store.transition(job.id, [Status.QUEUED], version=job.version, status=Status.RUNNING, attempts=1)
    assert moved is not None
    # The version it was read at is gone now.
    assert await store.update(job.id, version=job.version, progress=0.2) is None
    assert (await store.get(job.id)).status is Status.RUNNING
    with pytest.raises(ValueError):
        await store.update(job.id, owner="someone-else")


async def test_two_stores_racing_exactly_one_wins(store, other):
    """Two workers got the same job (a redelivery): each moves it queued -> running guarded
    by the attempt it read; exactly one start goes through, on whichever store."""
    jobs = [await store.create(new_job()) for _ in range(10)]
    await eventually(lambda: _all_seen(other, jobs))
    for job in jobs:
        results = await asyncio.gather(*(
            s.transition(job.id, [Status.QUEUED, Status.RUNNING], guard=lambda j: j.attempts == 0,
                         status=Status.RUNNING, attempts=1, worker=w)
            for s, w in ((store, "w-a"), (other, "w-b"))
        ))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, results
        final = await store._read(resource_name(job.id))
        assert final.attempts == 1 and final.worker == winners[0].worker


async def test_stale_cache_still_decides_right(store, other):
    """A store whose cache has not yet seen another's write re-reads on its 409 and
    re-checks: it neither overwrites the newer state nor misses a valid move."""
    job = await store.create(new_job())
    await eventually(lambda: _all_seen(other, [job]))
    other.watch.task.cancel()  # freeze other's cache
    await asyncio.sleep(0.05)
    assert await store.transition(job.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, worker="w-a")
    assert (await other.get(job.id)).status is Status.QUEUED  # stale on purpose
    assert await other.transition(job.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, worker="w-b") is None
    # An update that does not care about the status goes through on the fresh copy.
    updated = await other.update(job.id, progress=0.3)
    assert updated is not None and updated.worker == "w-a" and updated.status is Status.RUNNING


async def _all_seen(s: KubernetesStore, jobs: list[Job]) -> bool:
    for j in jobs:
        got = await s.get(j.id)
        if got is None or got.version < j.version:
            return False
    return True


async def test_positions_follow_priority_then_fifo(store, other):
    order = [Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.NORMAL, Priority.HIGH, Priority.LOW]
    jobs = []
    for p in order:
        jobs.append(await store.create(new_job(tool="pos", priority=p)))
    expected = sorted(jobs, key=lambda j: (j.priority.rank, j.seq))
    assert [await store.position(j) for j in expected] == [1, 2, 3, 4, 5, 6]
    assert await store.queued_count("pos") == 6 and await store.owner_active("key-1") == 6
    # The other replica sees the same order through its watch.
    await eventually(lambda: _all_seen(other, jobs))
    assert [await other.position(j) for j in expected] == [1, 2, 3, 4, 5, 6]

    first = expected[0]
    await store.transition(first.id, [Status.QUEUED], status=Status.RUNNING, attempts=1)
    assert await store.position(first) is None
    assert [await store.position(j) for j in expected[1:]] == [1, 2, 3, 4, 5]
    counts = await store.counts("pos")
    assert (counts.queued, counts.running) == (5, 1)
    # A retry goes to the back of its priority's queue.
    await store.transition(first.id, [Status.RUNNING], status=Status.FAILED, completed_at=time.time())
    back = await store.transition(first.id, [Status.FAILED], requeue=True, status=Status.QUEUED, attempts=0)
    assert back.seq > max(j.seq for j in jobs)
    assert await store.position(back) == 2  # behind the other high job, before the normals
    await eventually(lambda: _position_is(other, back, 2))


async def _position_is(s, job, n) -> bool:
    return await s.position(job) == n


async def test_watch_cache_sees_writes_and_deletes_of_another_store(store, other):
    job = await store.create(new_job(tool="seen"))
    got = await eventually(lambda: other.get(job.id))
    assert got.status is Status.QUEUED and await other.queued_count("seen") == 1
    now = time.time()
    await store.transition(job.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, started_at=now - 2)
    done = await store.transition(job.id, [Status.RUNNING], status=Status.SUCCEEDED, completed_at=now, progress=1.0,
                                  results=(FileRef("out.png", f"jobs/{job.id}/results/out.png", "image/png", 99, "abc"),),
                                  result_meta={"seed": 7, "duration_seconds": 2.0, "metrics": {"steps_per_second": 3.5, "note": "x"}})
    seen = await eventually(lambda: _version_at_least(other, done))
    assert seen.results == done.results and seen.results[0].etag == "abc"
    assert seen.result_meta == {"seed": 7, "duration_seconds": 2.0, "metrics": {"steps_per_second": 3.5}}
    assert (await other.counts("seen")).succeeded == 1
    assert await other.recent_durations("seen") == [pytest.approx(2.0, abs=1e-3)]
    page = await other.list(JobFilter(owner="key-1", tool="seen"), limit=10, cursor=None, order="desc")
    assert [j.id for j in page.jobs] == [job.id] and page.total == 1

    await store.delete(job.id)
    assert await store.get(job.id) is None
    await eventually(lambda: _gone(other, job.id))


async def test_a_fresh_get_confirms_a_cache_miss_at_the_apiserver(store, other):
    """A worker handed a job its watch has not delivered yet reads it from the apiserver
    instead of dropping the message (seen at 10k jobs under load)."""
    other.watch.task.cancel()  # its cache stops here, as a lagging watch would
    job = await store.create(new_job(tool="lagging"))
    assert await other.get(job.id) is None
    got = await other.get(job.id, fresh=True)
    assert got is not None and got.id == job.id and got.status is Status.QUEUED
    missing = job.id[:-1] + ("0" if job.id[-1] != "0" else "1")  # (a fixed "X" was this id 1 time in 32)
    assert await other.get(missing, fresh=True) is None  # really missing: still None


async def _version_at_least(s, job):
    got = await s.get(job.id)
    return got if got is not None and got.version >= job.version else None


async def _gone(s, job_id) -> bool:
    return await s.get(job_id) is None


async def test_kubectl_shows_the_columns_for_a_stored_job(store, control_plane, ns):  # noqa: F811
    job = await store.create(new_job(tool="upscale", variant="lanczos"))
    name = resource_name(job.id)
    # A new job is one create, without status; the submit's next write (its stream
    # position) writes the first status.
    assert "status" not in control_plane.kubectl("get", "gjob", name, "-n", ns, "-o", "yaml").stdout.split("\nspec:")[0]
    assert (await store.get(job.id)).status is Status.QUEUED
    await store.update(job.id, stream_seq=1)

    def row() -> list[str]:
        out = control_plane.kubectl("get", "gjob", name, "-n", ns, "--no-headers").stdout.split()
        return out

    head = control_plane.kubectl("get", "gjob", name, "-n", ns).stdout.splitlines()[0].split()
    assert head == ["NAME", "TOOL", "VARIANT", "STATUS", "PROGRESS", "ATTEMPTS", "AGE"]
    assert row()[1:6] == ["upscale", "lanczos", "Queued", "0", "0"]
    await store.transition(job.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, started_at=time.time())
    await store.update(job.id, progress=0.25)
    assert row()[1:6] == ["upscale", "lanczos", "Running", "0.25", "1"]
    await store.transition(job.id, [Status.RUNNING], status=Status.SUCCEEDED, progress=1.0, completed_at=time.time(),
                           result_meta={"seed": 1, "duration_seconds": 0.5, "metrics": {}})
    assert row()[3:6] == ["Completed", "1", "1"]

    other_job = await store.create(new_job(tool="upscale"))
    await store.transition(other_job.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, started_at=time.time())
    await store.transition(other_job.id, [Status.RUNNING], status=Status.FAILED, completed_at=time.time(),
                           error={"code": "deadline_exceeded", "message": "too slow"})
    out = control_plane.kubectl("get", "gjob", resource_name(other_job.id), "-n", ns, "--no-headers").stdout.split()
    assert out[3] == "DeadlineExceeded"
    # The conditions carry the outcome for `kubectl describe` / `kubectl wait`.
    control_plane.kubectl("wait", "--for=condition=Succeeded=False", f"gjob/{resource_name(other_job.id)}", "-n", ns, "--timeout=10s")
    control_plane.kubectl("wait", "--for=condition=Succeeded", f"gjob/{name}", "-n", ns, "--timeout=10s")
    assert (await store.get(other_job.id)).error == {"code": "deadline_exceeded", "message": "too slow"}


async def test_due_finds_expired_overdue_silent_and_unpublished_jobs(store):
    now = time.time()
    expired = await store.create(new_job(tool="due"))
    await store.transition(expired.id, [Status.QUEUED], status=Status.CANCELLED, completed_at=now - 10, expires_at=now - 1)
    kept = await store.create(new_job(tool="due"))
    await store.transition(kept.id, [Status.QUEUED], status=Status.CANCELLED, completed_at=now, expires_at=now + 600)
    overdue = await store.create(new_job(tool="due", deadline_seconds=5))
    await store.transition(overdue.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, started_at=now - 6, heartbeat_at=now)
    silent = await store.create(new_job(tool="due", deadline_seconds=600))
    await store.transition(silent.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, started_at=now - 100, heartbeat_at=now - 100)
    healthy = await store.create(new_job(tool="due", deadline_seconds=600))
    await store.transition(healthy.id, [Status.QUEUED], status=Status.RUNNING, attempts=1, started_at=now - 1, heartbeat_at=now)
    unpublished = await store.create(new_job(tool="due", created_at=now - 60))
    published = await store.create(new_job(tool="due", created_at=now - 60))
    await store.update(published.id, stream_seq=12)

    due = {j.id for j in await store.due(now, heartbeat_before=now - 50, unpublished_before=now - 5)}
    assert due == {expired.id, overdue.id, silent.id, unpublished.id}


async def test_idempotency_records_first_writer_wins(store, other):
    first = await store.idempotency_put("key-1", "abc", "hash-1", "JOB1", time.time() + 60)
    assert first == ("hash-1", "JOB1")
    assert await other.idempotency_put("key-1", "abc", "hash-2", "JOB2", time.time() + 60) == ("hash-1", "JOB1")
    assert await other.idempotency_get("key-1", "abc") == ("hash-1", "JOB1")
    assert await other.idempotency_get("key-2", "abc") is None
    await store.idempotency_delete("key-1", "abc", "JOB2")  # not its job: kept
    assert await store.idempotency_get("key-1", "abc") == ("hash-1", "JOB1")
    await store.idempotency_delete("key-1", "abc", "JOB1")
    assert await store.idempotency_get("key-1", "abc") is None
    # An expired record is replaced.
    await store.idempotency_put("key-1", "old", "h", "J1", time.time() - 1)
    assert await store.idempotency_get("key-1", "old") is None
    assert await other.idempotency_put("key-1", "old", "h2", "J2", time.time() + 60) == ("h2", "J2")


async def test_worker_leases_and_api_keys(store, other):
    now = time.time()
    await store.worker_seen("host-1/echo-0", "echo", 2, now)
    await store.worker_seen("host-2/echo-0", "echo", 1, now - 100)
    await store.worker_seen("host-1/echo-0", "echo", 3, now)  # renewed
    assert await other.workers_alive("echo", now - 10) == 3
    assert await other.workers_alive("echo", now - 1000) == 4
    await store.worker_gone("host-1/echo-0")
    assert await other.workers_alive("echo", now - 10) == 0

    keys, keys2 = KubernetesKeyStore(store), KubernetesKeyStore(other)
    key = ApiKey(id="01ABCKEY", name="app", key_hash="f" * 64, prefix="gq_abcd", tier="premium", max_queued=5)
    await keys.create_key(key)
    assert await keys2.key_by_hash("f" * 64) == key  # a new key works at once on another replica
    assert await keys2.key_by_hash("0" * 64) is None
    assert [k.id for k in await keys2.list_keys()] == ["01ABCKEY"]
    assert await keys2.delete_key("01ABCKEY") and not await keys2.delete_key("01ABCKEY")
    assert await keys2.key_by_hash("f" * 64) is None


async def test_watch_relists_when_its_resource_version_is_gone(store, other):
    """A watch resumed from a resourceVersion the apiserver no longer has gets 410 Gone;
    the store lists again and misses nothing written meanwhile."""
    kept = await store.create(new_job(tool="gone"))
    deleted = await store.create(new_job(tool="gone"))
    await eventually(lambda: _all_seen(other, [kept, deleted]))
    other.watch.task.cancel()
    await asyncio.sleep(0.05)
    missed = await store.create(new_job(tool="gone"))
    await store.delete(deleted.id)
    relists = other.watch.relists
    other.watch.resource_version = "1"  # long compacted out of the watch cache
    other.watch.task = asyncio.create_task(other.watch.run())
    await eventually(lambda: other.get(missed.id))
    assert other.watch.relists == relists + 1 and await other.get(deleted.id) is None
    assert await other.queued_count("gone") == 2 and await other.position(missed) == 2


async def test_apiserver_outage_is_unavailable_then_recovers(store, other, control_plane):  # noqa: F811
    from genq.ports import Unavailable

    job = await store.create(new_job(tool="outage"))
    await eventually(lambda: other.get(job.id))
    control_plane.stop_process("kube-apiserver")
    try:
        with pytest.raises(Unavailable):
            await store.create(new_job(tool="outage"))
        with pytest.raises(Unavailable):
            await store.transition(job.id, [Status.QUEUED], version=job.version + 1, status=Status.RUNNING)
        with pytest.raises(Unavailable):
            await store.ping()
        # Reads are served from the cache meanwhile.
        assert (await other.get(job.id)).status is Status.QUEUED and await other.position(job) == 1
    finally:
        control_plane.start_process("kube-apiserver")
    moved = await store.transition(job.id, [Status.QUEUED], status=Status.RUNNING, attempts=1)
    assert moved is not None
    await store.ping()
    # The other store's watch came back by itself.
    await eventually(lambda: _version_at_least(other, moved), timeout=30)


async def test_a_store_opened_while_the_apiserver_is_down_waits_for_it(control_plane, ns):  # noqa: F811
    """A pod starting during an apiserver outage (or while a restarted apiserver still
    answers 429) waits for it instead of exiting into a crash-loop back-off (CI: the
    operator restarted after an outage exited 1 on a 429 from its first ToolPool list)."""
    import threading

    control_plane.stop_process("kube-apiserver")
    back = threading.Thread(target=lambda: (time.sleep(3), control_plane.start_process("kube-apiserver")))
    try:
        back.start()
        t0 = time.monotonic()
        store = await asyncio.wait_for(_open(control_plane, ns), 90)
        waited = time.monotonic() - t0
    finally:
        back.join()
        if control_plane.processes["kube-apiserver"].poll() is not None:
            control_plane.start_process("kube-apiserver")
    try:
        assert waited >= 2.5, f"opened in {waited:.1f} s, before the apiserver was back"
        job = await store.create(new_job())
        assert (await store.get(job.id)).status == Status.QUEUED
    finally:
        await store.close()
