"""Reconciliation: the pure decisions, republishing a job that was stored but never
reached the stream (the API died between the two writes), and one whose stream message
was lost afterwards."""

from __future__ import annotations

import asyncio

from ulid import ULID

from genq.models import Job, Priority, Status
from genq.housekeeping import Action, decide
from helpers import poll

KW = dict(heartbeat_stale=10.0, unpublished_grace=5.0, deadline_grace=2.0)


def job(**kw) -> Job:
    base = dict(id="J", owner="o", tool="t", variant="v", priority=Priority.NORMAL, params={}, created_at=1000.0)
    base.update(kw)
    return Job(**base)


def test_decide():
    now = 2000.0
    assert decide(job(status=Status.SUCCEEDED, expires_at=now), now, **KW) is Action.EXPIRE
    assert decide(job(status=Status.FAILED, expires_at=now + 1), now, **KW) is Action.NONE
    running = dict(status=Status.RUNNING, started_at=now - 100, heartbeat_at=now - 1, attempts=1, max_attempts=3)
    assert decide(job(**running, deadline_seconds=97), now, **KW) is Action.DEADLINE
    assert decide(job(**running, deadline_seconds=99), now, **KW) is Action.NONE  # inside the grace
    stale = {**running, "heartbeat_at": now - 11}
    assert decide(job(**stale), now, **KW) is Action.NONE  # JetStream will redeliver it
    assert decide(job(**{**stale, "attempts": 3}), now, **KW) is Action.LOST  # no delivery left
    assert decide(job(status=Status.QUEUED, stream_seq=None, created_at=now - 6), now, **KW) is Action.REPUBLISH
    assert decide(job(status=Status.QUEUED, stream_seq=None, created_at=now - 1), now, **KW) is Action.NONE
    assert decide(job(status=Status.QUEUED, stream_seq=7, created_at=now - 60), now, **KW) is Action.NONE
    # spec.active false (kubectl) cancels a live job; a deleted record is finalized first
    assert decide(job(status=Status.RUNNING, active=False, **{k: v for k, v in running.items() if k != "status"}),
                  now, **KW) is Action.CANCEL
    assert decide(job(status=Status.QUEUED, active=False), now, **KW) is Action.CANCEL
    assert decide(job(status=Status.CANCELLED, active=False), now, **KW) is Action.NONE
    assert decide(job(status=Status.QUEUED, deleting=True), now, **KW) is Action.FINALIZE
    assert decide(job(status=Status.SUCCEEDED, deleting=True, expires_at=now + 60), now, **KW) is Action.FINALIZE


async def test_stored_but_unpublished_job_is_republished(live):
    rt = live.emb.rt
    stored = await rt.store.create(Job(id=str(ULID()), owner="admin", tool="echo", variant="default",
                                       priority=Priority.NORMAL, params={"text": "orphan", "seed": 7}, seed=7))
    live.emb.housekeeper.unpublished_grace = 0.5
    async with live.client() as c:
        done = await poll(c, stored.id, timeout=15)
        assert done["status"] == "succeeded" and done["result"]["seed"] == 7 and done["attempts"] == 1


async def test_published_job_whose_position_was_never_written_runs_once(live):
    """The API writes a job's stream position a moment after the publish (batched with
    other submits'). A crash in between leaves a published job that reads as unpublished:
    housekeeping's republish carries the submit's message id, so JetStream keeps the one
    message and answers with its position, and the job runs once."""
    from genq.lifecycle import dedupe_id

    rt = live.emb.rt
    job = await rt.store.create(Job(id=str(ULID()), owner="admin", tool="echo", variant="default",
                                    priority=Priority.NORMAL, params={"text": "crash", "seed": 5}, seed=5))
    seq = await rt.bus.publish_job(job.tool, job.priority.value, job.id, dedupe_id(job))  # ...and no position noted
    await live.emb.housekeeper._apply(job, Action.REPUBLISH, job.created_at + 10)
    async with live.client() as c:
        done = await poll(c, job.id, timeout=15)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert (await rt.store.get(job.id)).stream_seq == seq


async def test_running_job_of_a_dead_worker_with_no_attempts_left_fails(live):
    rt = live.emb.rt
    import time

    now = time.time()
    j = await rt.store.create(Job(id=str(ULID()), owner="admin", tool="echo", variant="default", priority=Priority.NORMAL,
                                  params={}, status=Status.RUNNING, attempts=3, max_attempts=3, started_at=now - 60,
                                  heartbeat_at=now - 60, worker="gone", stream_seq=999999))
    await asyncio.sleep(1.0)
    async with live.client() as c:
        done = await poll(c, j.id, timeout=10)
        assert done["status"] == "failed" and done["error"]["code"] == "worker_lost"


async def test_queued_job_whose_stream_message_was_lost_is_republished(live):
    """Stored as queued with a stream message that is not there (a purged stream, a
    restored store): housekeeping finds it gone and publishes the job again."""
    import time

    rt = live.emb.rt
    live.emb.housekeeper.stream_grace = 0.0
    live.emb.housekeeper.stream_check_interval = 0.5
    lost = await rt.store.create(Job(id=str(ULID()), owner="admin", tool="echo", variant="default", priority=Priority.NORMAL,
                                     params={"text": "lost", "seed": 11}, seed=11, created_at=time.time() - 60,
                                     stream_seq=10_000_000))
    assert lost.stream_seq == 10_000_000 and not await rt.bus.has_message(10_000_000)
    async with live.client() as c:
        done = await poll(c, lost.id, timeout=15)
    assert done["status"] == "succeeded" and done["result"]["seed"] == 11 and done["attempts"] == 1


async def test_queued_job_whose_sequence_now_holds_another_message_is_republished(live):
    """After a power cut the stream can lose its last second (it syncs every second; the
    job store holds what was accepted) and hand the lost sequences to new messages. A job
    whose sequence now holds another job's message has lost its own: it is republished."""
    import time

    rt = live.emb.rt
    live.emb.housekeeper.stream_grace = 0.0
    live.emb.housekeeper.stream_check_interval = 0.5
    # A message that stays in the stream: no tool by that name, so nobody takes it.
    other = await rt.bus.publish_job("nobody", Priority.NORMAL.value, str(ULID()))
    lost = await rt.store.create(Job(id=str(ULID()), owner="admin", tool="echo", variant="default", priority=Priority.NORMAL,
                                     params={"text": "lost", "seed": 12}, seed=12, created_at=time.time() - 60,
                                     stream_seq=other))
    assert await rt.bus.has_message(other)
    async with live.client() as c:
        done = await poll(c, lost.id, timeout=15)
    assert done["status"] == "succeeded" and done["result"]["seed"] == 12 and done["attempts"] == 1
    assert (await rt.store.get(lost.id)).stream_seq != other and await rt.bus.has_message(other)


async def test_running_job_whose_worker_went_quiet_and_whose_message_was_lost_runs_again(live):
    """A job's start reached the disk but its stream message did not (a power cut): no
    redelivery will ever come. Once its heartbeat is stale with attempts left, the stream
    check finds the message gone and republishes it; a worker starts the next attempt."""
    import time

    rt = live.emb.rt
    hk = live.emb.housekeeper
    hk.stream_check_interval = 0.5
    now = time.time()
    j = await rt.store.create(Job(id=str(ULID()), owner="admin", tool="echo", variant="default", priority=Priority.NORMAL,
                                  params={"text": "quiet", "seed": 13}, seed=13, status=Status.RUNNING, attempts=1,
                                  max_attempts=3, started_at=now - 120, heartbeat_at=now - 120, worker="gone",
                                  stream_seq=10_000_001))
    async with live.client() as c:
        done = await poll(c, j.id, timeout=20)
    assert done["status"] == "succeeded" and done["result"]["seed"] == 13 and done["attempts"] == 2


async def test_running_job_whose_message_is_still_there_is_left_to_jetstream(live):
    """A quiet running job whose message is in the stream (its redelivery waits for a free
    worker) is not republished: JetStream hands it out."""
    import time

    rt = live.emb.rt
    now = time.time()
    seq = await rt.bus.publish_job("nobody", Priority.NORMAL.value, "placeholder")
    j = await rt.store.create(Job(id=str(ULID()), owner="admin", tool="nobody", variant="default", priority=Priority.NORMAL,
                                  params={}, status=Status.RUNNING, attempts=1, max_attempts=3, started_at=now - 120,
                                  heartbeat_at=now - 120, worker="gone", stream_seq=seq))
    # The message names another job: the check republishes; naming this one, it does not.
    assert await live.emb.housekeeper.check_stream(now, [j]) == 1
    again = await rt.store.get(j.id)
    assert again.stream_seq != seq and await rt.bus.message_job_id(again.stream_seq) == j.id
    live.emb.housekeeper._checked.clear()
    assert await live.emb.housekeeper.check_stream(now, [again]) == 0
    assert (await rt.store.get(j.id)).stream_seq == again.stream_seq
