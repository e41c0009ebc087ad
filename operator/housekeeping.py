"""Retention, deadlines, lost jobs and republishing, as one reconcile pass over the store.

:func:`decide` is pure: given a job and the time it says what must happen. The
:class:`Housekeeper` loop only does the I/O: it asks the store for due jobs, applies the
decision by compare-and-set, and tells workers (cancel) and storage (delete) about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Any

from genq import constants
from genq.models import Job, Status
from genq.runtime import Runtime

log = logging.getLogger(__name__)


class Action(str, enum.Enum):
    NONE = "None"
    EXPIRE = "Expired"
    DEADLINE = "DeadlineExceeded"
    LOST = "WorkerLost"
    REPUBLISH = "Republished"


def decide(job: Job, now: float, *, heartbeat_stale: float, unpublished_grace: float, deadline_grace: float) -> Action:
    if job.terminal:
        return Action.EXPIRE if job.expires_at is not None and job.expires_at <= now else Action.NONE
    if job.status is Status.RUNNING:
        if job.deadline_seconds and job.started_at is not None and job.started_at + job.deadline_seconds + deadline_grace <= now:
            return Action.DEADLINE
        beat = job.heartbeat_at or job.started_at or job.created_at
        if beat < now - heartbeat_stale and job.attempts >= job.max_attempts:
            return Action.LOST
        return Action.NONE
    if job.status is Status.QUEUED and job.stream_seq is None and job.created_at < now - unpublished_grace:
        return Action.REPUBLISH
    return Action.NONE


class Housekeeper:
    def __init__(self, rt: Runtime):
        self.rt = rt
        s = rt.settings
        # A worker heartbeats every ack_wait/3; three missed beats plus a margin means gone.
        self.heartbeat_stale = s.ack_wait_seconds * 1.5 + 2
        self.unpublished_grace = 5.0
        self.deadline_grace = 2.0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.reconcile_once()
            except Exception:
                log.exception("housekeeping pass failed; retrying")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.rt.settings.reconcile_interval_seconds)

    def stop(self) -> None:
        self._stop.set()

    async def reconcile_once(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        done: dict[str, int] = {}
        jobs = await self.rt.store.due(
            now, heartbeat_before=now - self.heartbeat_stale, unpublished_before=now - self.unpublished_grace
        )
        for job in jobs:
            action = decide(job, now, heartbeat_stale=self.heartbeat_stale,
                            unpublished_grace=self.unpublished_grace, deadline_grace=self.deadline_grace)
            if action is Action.NONE:
                continue
            try:
                if await self._apply(job, action, now):
                    done[action.value] = done.get(action.value, 0) + 1
            except Exception:
                log.exception("housekeeping: %s on job %s failed", action.value, job.id)
        return done

    async def _apply(self, job: Job, action: Action, now: float) -> bool:
        rt = self.rt
        if action is Action.EXPIRE:
            await rt.blobs.delete_prefix(constants.job_prefix(job.id))
            await rt.store.delete(job.id)
            return True
        if action in (Action.DEADLINE, Action.LOST):
            if action is Action.DEADLINE:
                error = {"code": "deadline_exceeded",
                         "message": f"The job ran longer than its deadline of {job.deadline_seconds:g} seconds."}
            else:
                error = {"code": "worker_lost",
                         "message": f"The worker running this job stopped responding, {job.attempts} of {job.max_attempts} attempts used."}
            failed = await rt.store.transition(
                job.id, [Status.RUNNING], version=job.version, status=Status.FAILED, completed_at=now,
                expires_at=now + job.ttl_seconds, error=error, delivery=None,
            )
            if failed is None:
                return False
            await self._notify(job, failed.status.value, reason="deadline" if action is Action.DEADLINE else "lost")
            if job.stream_seq is not None:
                await rt.bus.remove(job.stream_seq)
            rt.metrics.jobs_finished.labels(job.tool, "failed").inc()
            return True
        if action is Action.REPUBLISH:
            seq = await rt.bus.publish_job(job.tool, job.priority.value, job.id, f"{job.id}.{job.seq}")
            return await rt.store.update(job.id, version=job.version, stream_seq=seq) is not None
        return False

    async def _notify(self, job: Job, status: str, *, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.rt.bus.publish(constants.cancel_subject(job.id), {"id": job.id, "reason": reason})
            await self.rt.bus.publish(constants.events_subject(job.id), {"type": "status", "id": job.id, "status": status})

    async def recover_orphans(self, live_worker_ids: set[str]) -> int:
        """After a restart of the embedded process: hand back at once every job that a
        worker of the previous process was running (JetStream would wait ``ack_wait``)."""
        n = 0
        page_cursor: Any = None
        from genq.ports import JobFilter

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
                back = await self.rt.store.transition(
                    job.id, [Status.RUNNING], version=job.version, status=Status.QUEUED, progress=0.0, worker=None,
                    delivery=None,
                )
                if back is not None and job.delivery:
                    with contextlib.suppress(Exception):
                        await self.rt.bus.nak_subject(job.delivery)
                    n += 1
            if not page.next_cursor:
                return n
            page_cursor = page.next_cursor
