"""Retention, deadlines, lost jobs, cancels from outside the API, deletions and
republishing, as one reconcile pass over the store.

:func:`decide` is pure: given a job and the time it says what must happen. The
:class:`Housekeeper` loop only does the I/O: it asks the store for due jobs, applies the
decision by compare-and-set, and tells workers (cancel) and storage (delete) about it.

Beside the due jobs, each pass checks a few of the longest-queued jobs against the stream
(:meth:`Housekeeper.check_stream`): a queued job whose message is gone from JetStream
(a purged stream, a restored store) is published again, so no queued job waits forever.

Neighbours: runs beside the API and the workers in every mode, with no operator in
``genq up`` (:mod:`genq.embedded`) and under the operator's leader election in a cluster
(``genq operator``); talks to the ports of a :class:`genq.runtime.Runtime` and moves
jobs only through :mod:`genq.lifecycle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Iterable

from genq import constants, lifecycle
from genq.models import Job, Status
from genq.ports import JobFilter
from genq.runtime import Runtime

log = logging.getLogger(__name__)


class Action(str, enum.Enum):
    NONE = "None"
    EXPIRE = "Expired"
    DEADLINE = "DeadlineExceeded"
    LOST = "WorkerLost"
    REPUBLISH = "Republished"
    CANCEL = "Cancelled"
    FINALIZE = "Deleted"


def last_beat(job: Job) -> float:
    """When the job's worker was last heard of."""
    return job.heartbeat_at or job.started_at or job.created_at


def decide(job: Job, now: float, *, heartbeat_stale: float, unpublished_grace: float, deadline_grace: float) -> Action:
    if job.deleting:
        return Action.FINALIZE
    if not job.active and not job.terminal:
        return Action.CANCEL
    if job.terminal:
        return Action.EXPIRE if lifecycle.expired(job, now) else Action.NONE
    if job.status is Status.RUNNING:
        if job.deadline_seconds and job.started_at is not None and job.started_at + job.deadline_seconds + deadline_grace <= now:
            return Action.DEADLINE
        if last_beat(job) < now - heartbeat_stale and job.attempts >= job.max_attempts:
            return Action.LOST
        return Action.NONE
    if job.status is Status.QUEUED and job.stream_seq is None and job.created_at < now - unpublished_grace:
        return Action.REPUBLISH
    return Action.NONE


#: The Kubernetes Event each applied action leaves on the job (reason = the action's
#: value, CamelCase): (warning?, message).
EVENTS: dict[Action, tuple[bool, str]] = {
    Action.DEADLINE: (True, "The job ran longer than its deadline of {job.deadline_seconds:g} s; its work was stopped."),
    Action.LOST: (True, "The worker running the job stopped responding with no attempt left ({job.attempts} used)."),
    Action.REPUBLISH: (False, "The job was stored but not in the stream; published it again."),
    Action.CANCEL: (False, "spec.active is false: the job was cancelled and its work stopped."),
}


class Housekeeper:
    def __init__(self, rt: Runtime):
        self.rt = rt
        s = rt.settings
        # A worker heartbeats every ack_wait/3; three missed beats plus a margin means gone.
        self.heartbeat_stale = s.ack_wait_seconds * 1.5 + 2
        self.unpublished_grace = 5.0
        self.deadline_grace = 2.0
        #: A job queued this long is checked against the stream (then every
        #: ``stream_recheck`` seconds); at most ``stream_checks`` checks per pass.
        self.stream_grace = 30.0
        self.stream_recheck = 300.0
        self.stream_checks = 50
        #: Seconds between two stream checks (each lists a page of queued jobs).
        self.stream_check_interval = 10.0
        self._stream_checked_at = 0.0
        self._checked: dict[str, float] = {}
        self._stream_cursor: str | None = None
        self._stop = asyncio.Event()

    async def run(self) -> None:
        # A store that knows when a job needs attention now (the Kubernetes store: a
        # kubectl cancel or delete seen on its watch) wakes the loop before the interval.
        wake = self.rt.store.attention
        advisories = asyncio.create_task(self.watch_max_deliveries(), name="housekeeping-max-deliveries")
        try:
            await self._loop(wake)
        finally:
            advisories.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await advisories

    async def watch_max_deliveries(self) -> None:
        """JetStream stops delivering a message after ``MaxDeliver`` deliveries. A delivery
        that never reached its compare-and-set (a worker killed between its pull and the
        claim, or while it held the next job it pulled during a last step) spent one with
        no attempt made; on the last, the job would wait behind a message no worker gets
        again: ``queued`` forever, or ``running`` (its worker died on the last delivery
        with attempts left, where a redelivery would have started the next attempt) until
        its deadline. The server's advisory names that message (it fires when the last
        delivery's ack wait ran out: no worker is heartbeating it): the job goes out as a
        new message, which a worker takes as the redelivery it replaces."""
        subject = f"{constants.MAX_DELIVERIES_ADVISORY}.{constants.JOBS_STREAM}.*"
        while not self._stop.is_set():
            try:
                sub = await self.rt.bus.subscribe(subject)
            except Exception:
                log.warning("cannot subscribe to %s; trying again", subject, exc_info=True)
                await asyncio.sleep(5)
                continue
            try:
                async for advisory in sub:
                    try:
                        await self.on_max_deliveries(int(advisory["stream_seq"]))
                    except Exception:
                        log.exception("handling %s failed", advisory)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def on_max_deliveries(self, stream_seq: int) -> bool:
        rt = self.rt
        job_id = await rt.bus.message_job_id(stream_seq)
        job = await rt.store.get(job_id) if job_id else None
        if job is None or job.terminal or job.stream_seq not in (None, stream_seq):
            return False
        if job.status is Status.RUNNING and job.attempts >= job.max_attempts:
            return False  # no attempt left: the lost-worker check fails it
        # The spent message goes first: nobody gets it again, and should the publish fail
        # the job is one whose message is gone, which the stream check republishes.
        with contextlib.suppress(Exception):
            await rt.bus.delete_message(stream_seq)
        seq = await rt.bus.publish_job(job.tool, job.priority.value, job.id, lifecycle.dedupe_id(job, stream_seq))
        if await lifecycle.apply(rt.store, job.id, lifecycle.republished(job, seq), version=job.version) is None:
            return False
        log.warning("job %s: its stream message %s reached its delivery limit unclaimed; republished as %s",
                    job.id, stream_seq, seq)
        await rt.store.record_event(job, Action.REPUBLISH.value,
                                    f"The job's stream message {stream_seq} reached its delivery limit without "
                                    "being claimed (a worker stopped between taking it and starting it); "
                                    "published it again.", warning=True)
        return True

    async def _loop(self, wake: asyncio.Event | None) -> None:
        while not self._stop.is_set():
            if wake is not None:
                wake.clear()
            try:
                await self.reconcile_once()
            except Exception:
                log.exception("housekeeping pass failed; retrying")
            waiters = [asyncio.ensure_future(self._stop.wait())]
            if wake is not None:
                waiters.append(asyncio.ensure_future(wake.wait()))
            try:
                await asyncio.wait(waiters, timeout=self.rt.settings.reconcile_interval_seconds,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()

    def stop(self) -> None:
        self._stop.set()

    async def reconcile_once(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        done: dict[str, int] = {}
        #: Running jobs whose worker went quiet with attempts left: JetStream redelivers
        #: them, unless their message is gone too (the stream's last second lost in a power
        #: cut, while the job's start was on disk); the stream check looks.
        quiet: list[Job] = []
        jobs = await self.rt.store.due(
            now, heartbeat_before=now - self.heartbeat_stale, unpublished_before=now - self.unpublished_grace
        )
        for job in jobs:
            action = decide(job, now, heartbeat_stale=self.heartbeat_stale,
                            unpublished_grace=self.unpublished_grace, deadline_grace=self.deadline_grace)
            if action is Action.NONE:
                if (job.status is Status.RUNNING and job.stream_seq is not None
                        and last_beat(job) < now - self.heartbeat_stale):
                    quiet.append(job)
                continue
            try:
                if await self._apply(job, action, now):
                    done[action.value] = done.get(action.value, 0) + 1
                    if action in EVENTS:
                        warning, message = EVENTS[action]
                        await self.rt.store.record_event(job, action.value, message.format(job=job), warning=warning)
            except Exception:
                log.exception("housekeeping: %s on job %s failed", action.value, job.id)
        try:
            missing = 0
            if now - self._stream_checked_at >= self.stream_check_interval:
                self._stream_checked_at = now
                missing = await self.check_stream(now, quiet)
        except Exception:
            log.exception("housekeeping: checking queued jobs against the stream failed")
        else:
            if missing:
                done[Action.REPUBLISH.value] = done.get(Action.REPUBLISH.value, 0) + missing
        return done

    async def check_stream(self, now: float, quiet: Iterable[Job] = ()) -> int:
        """Republish jobs whose stream message is gone: the queued jobs, oldest first, a
        page per pass, skipping the young and the recently checked, and ``quiet`` running
        jobs (their worker stopped heartbeating). A message is the job's only if it names
        the job: after a power cut the stream can hand a lost message's sequence to a new
        one. Returns how many it republished."""
        page = await self.rt.store.list(JobFilter(status=Status.QUEUED), limit=self.stream_checks * 4,
                                        cursor=self._stream_cursor, order="asc")
        self._stream_cursor = page.next_cursor
        checks = republished = 0
        for job in [*quiet, *page.jobs]:
            if checks >= self.stream_checks:
                break
            if job.stream_seq is None or (job.status is Status.QUEUED and job.created_at > now - self.stream_grace):
                continue
            if self._checked.get(job.id, 0.0) > now - self.stream_recheck:
                continue
            checks += 1
            self._checked[job.id] = now
            if await self.rt.bus.message_job_id(job.stream_seq) == job.id:
                continue
            # Dedupe by job and lost message: two housekeepers republish it once.
            seq = await self.rt.bus.publish_job(job.tool, job.priority.value, job.id,
                                                lifecycle.dedupe_id(job, job.stream_seq))
            if await lifecycle.apply(self.rt.store, job.id, lifecycle.republished(job, seq),
                                     version=job.version) is not None:
                log.warning("job %s was %s but its stream message %s was gone; republished as %s",
                            job.id, job.status.value, job.stream_seq, seq)
                await self.rt.store.record_event(job, Action.REPUBLISH.value,
                               f"The job's stream message {job.stream_seq} was gone; published it again.", warning=True)
                republished += 1
        if len(self._checked) > 100_000:
            horizon = now - self.stream_recheck
            self._checked = {k: t for k, t in self._checked.items() if t > horizon}
        return republished

    async def _apply(self, job: Job, action: Action, now: float) -> bool:
        rt = self.rt
        if action is Action.EXPIRE:
            await rt.blobs.delete_prefix(constants.job_prefix(job.id))
            await rt.store.delete(job.id)
            return True
        if action is Action.CANCEL:
            return await self._cancel(job, now, "The job was cancelled (spec.active is false).") is not None
        if action is Action.FINALIZE:
            if not job.terminal:
                await self._cancel(job, now, "The job's record was deleted.")
            await rt.blobs.delete_prefix(constants.job_prefix(job.id))
            await rt.store.delete(job.id)  # releases genq's hold on the record
            return True
        if action in (Action.DEADLINE, Action.LOST):
            if action is Action.DEADLINE:
                change = lifecycle.fail(job, now=now, code="deadline_exceeded",
                                        message=f"The job ran longer than its deadline of {job.deadline_seconds:g} seconds.")
            else:
                change = lifecycle.fail(job, now=now, code="worker_lost", message=(
                    f"The worker running this job stopped responding, {job.attempts} of {job.max_attempts} attempts used."))
            failed = await lifecycle.apply(rt.store, job.id, change, version=job.version)
            if failed is None:
                return False
            await lifecycle.announce(rt.bus, failed, stop="deadline" if action is Action.DEADLINE else "lost")
            if job.stream_seq is not None:
                await rt.bus.remove(job.stream_seq)
            rt.metrics.jobs_finished.labels(job.tool, "failed").inc()
            return True
        if action is Action.REPUBLISH:
            seq = await rt.bus.publish_job(job.tool, job.priority.value, job.id, lifecycle.dedupe_id(job))
            return await rt.store.update(job.id, version=job.version, stream_seq=seq) is not None
        return False

    async def _cancel(self, job: Job, now: float, message: str) -> Job | None:
        """Cancel a queued or running job as ``DELETE /v1/jobs/{id}`` does."""
        done = await lifecycle.cancel_job(self.rt.store, self.rt.bus, job, now=now, message=message, version=job.version)
        if done is not None:
            self.rt.metrics.jobs_finished.labels(job.tool, "cancelled").inc()
        return done

    async def recover_orphans(self, live_worker_ids: set[str]) -> int:
        """After a restart of the embedded process: hand back at once every job that a
        worker of the previous process was running (JetStream would wait ``ack_wait``)."""
        n = 0
        page_cursor: str | None = None
        while True:
            page = await self.rt.store.list(JobFilter(status=Status.RUNNING), limit=500, cursor=page_cursor, order="asc")
            for job in page.jobs:
                if job.worker in live_worker_ids:
                    continue
                if job.attempts >= job.max_attempts:
                    # Its last delivery: JetStream never delivers it again (MaxDeliver), so
                    # handed back it would stay queued forever. It ends as a lost job does.
                    n += await self._apply(job, Action.LOST, time.time())
                    continue
                back = await lifecycle.apply(self.rt.store, job.id, lifecycle.hand_back(job, refund=False),
                                             version=job.version)
                if back is None:
                    continue
                await lifecycle.announce(self.rt.bus, back)
                if job.delivery:
                    with contextlib.suppress(Exception):
                        await self.rt.bus.nak_subject(job.delivery)
                    n += 1
            if not page.next_cursor:
                return n
            page_cursor = page.next_cursor
