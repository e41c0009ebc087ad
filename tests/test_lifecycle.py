"""The job lifecycle's moves, as pure functions: what each may start from and what it writes
(the worker, housekeeping and the API only decide when; ``test_api_flows`` and
``test_durability`` check the moves end to end)."""

from __future__ import annotations

from genq import lifecycle
from genq.models import ACTIVE, FileRef, Job, Priority, Status


def job(**kw) -> Job:
    base = dict(id="01JOB", owner="k1", tool="echo", variant="default", priority=Priority.NORMAL, params={},
                seq=7, ttl_seconds=3600.0)
    return Job(**{**base, **kw})


def test_start_claims_the_next_attempt_for_this_worker():
    j = job(attempts=1, status=Status.QUEUED, progress=0.4)
    c = lifecycle.start(j, worker="w1", now=100.0, stream_seq=42, delivery="$JS.ACK.x")
    assert set(c.expect) == {Status.QUEUED, Status.RUNNING} and not c.requeue
    assert c.fields == {"status": Status.RUNNING, "attempts": 2, "started_at": 100.0, "heartbeat_at": 100.0,
                        "worker": "w1", "progress": 0.0, "stream_seq": 42, "delivery": "$JS.ACK.x"}


def test_the_three_endings_stamp_completion_and_retention_and_drop_the_delivery():
    j = job(status=Status.RUNNING, ttl_seconds=60.0)
    ref = FileRef(name="out.png", key="jobs/01JOB/results/out.png", content_type="image/png", size_bytes=3)
    ok = lifecycle.succeed(j, now=10.0, results=(ref,), meta={"seed": 1})
    bad = lifecycle.fail(j, now=10.0, code="pipeline_error", message="boom")
    stop = lifecycle.cancel(j, now=10.0)
    for change, status in ((ok, Status.SUCCEEDED), (bad, Status.FAILED), (stop, Status.CANCELLED)):
        assert change.fields["status"] is status
        assert change.fields["completed_at"] == 10.0 and change.fields["expires_at"] == 70.0
        assert change.fields["delivery"] is None
    assert list(ok.expect) == [Status.RUNNING] and list(bad.expect) == [Status.RUNNING]
    assert ok.fields["progress"] == 1.0 and ok.fields["results"] == (ref,) and ok.fields["error"] is None
    assert bad.fields["error"] == {"code": "pipeline_error", "message": "boom"}
    # Cancel applies to a queued job too, and says why.
    assert set(stop.expect) == set(ACTIVE)
    assert stop.fields["error"] == {"code": "cancelled", "message": lifecycle.CANCELLED_MESSAGE}
    assert lifecycle.cancel(j, now=1.0, message="spec.active is false").fields["error"]["message"] == "spec.active is false"


def test_retry_and_hand_back_return_a_running_job_to_its_queue_unclaimed():
    j = job(status=Status.RUNNING, attempts=2, worker="w1", delivery="$JS.ACK.x")
    unclaimed = {"status": Status.QUEUED, "progress": 0.0, "worker": None, "delivery": None}
    retry = lifecycle.retry(j, code="pipeline_error", message="flaky")
    assert list(retry.expect) == [Status.RUNNING]
    assert retry.fields == {**unclaimed, "error": {"code": "pipeline_error", "message": "flaky"}}
    # A drain is not the job's fault: the attempt is given back. A dead process's is not.
    assert lifecycle.hand_back(j, refund=True).fields == {**unclaimed, "attempts": 1}
    assert lifecycle.hand_back(j, refund=False).fields == unclaimed
    assert lifecycle.hand_back(job(status=Status.RUNNING, attempts=0), refund=True).fields["attempts"] == 0


def test_a_users_retry_starts_the_job_over_at_the_back_of_its_queue():
    j = job(status=Status.FAILED, attempts=3, stream_seq=9, error={"code": "x", "message": "y"})
    c = lifecycle.requeue(j, max_attempts=5)
    assert set(c.expect) == {Status.FAILED, Status.CANCELLED} and c.requeue
    assert c.fields["status"] is Status.QUEUED and c.fields["attempts"] == 0 and c.fields["max_attempts"] == 5
    for cleared in ("error", "started_at", "completed_at", "expires_at", "result_meta", "stream_seq", "worker",
                    "delivery"):
        assert c.fields[cleared] is None, cleared
    assert c.fields["results"] == () and c.fields["progress"] == 0.0


def test_writes_that_do_not_move_the_status():
    j = job(status=Status.QUEUED)
    assert lifecycle.republished(j, 12) == lifecycle.Change([Status.QUEUED], {"stream_seq": 12})
    assert lifecycle.heartbeat(5.0) == lifecycle.Change([Status.RUNNING], {"heartbeat_at": 5.0})
    # Progress only while running: a late write must not take a success's 1.0 back.
    assert lifecycle.progress(0.5) == lifecycle.Change([Status.RUNNING], {"progress": 0.5})


def test_a_finished_job_expires_at_its_retention_time_and_an_active_one_never():
    assert lifecycle.expired(job(status=Status.SUCCEEDED, expires_at=100.0), 100.0)
    assert not lifecycle.expired(job(status=Status.SUCCEEDED, expires_at=100.0), 99.9)
    assert not lifecycle.expired(job(status=Status.FAILED, expires_at=None), 1e12)
    assert not lifecycle.expired(job(status=Status.RUNNING, expires_at=1.0), 100.0)


def test_what_goes_on_the_wire():
    j = job(status=Status.CANCELLED)
    assert lifecycle.status_event(j) == {"type": "status", "id": "01JOB", "status": "cancelled"}
    assert lifecycle.stop_message(j, "deadline") == {"id": "01JOB", "reason": "deadline"}
    # One message id per place in the queue; a lost message's republish adds its sequence,
    # so two housekeepers republishing it make one message, and a user's retry a new one.
    assert lifecycle.dedupe_id(j) == "01JOB.7"
    assert lifecycle.dedupe_id(j, 41) == "01JOB.7.41"
    assert lifecycle.dedupe_id(j.evolve(seq=8)) != lifecycle.dedupe_id(j)
