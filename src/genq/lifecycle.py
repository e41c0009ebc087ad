"""The job lifecycle: every move of a job's status, in one place (arq's ``jobs.py``).

``queued → running → succeeded | failed | cancelled``; a running job goes back to
``queued`` on a retry or when handed back, and a failed or cancelled one on a user's retry.
Each move is a pure function returning a :class:`Change`: the statuses it may start from
and the fields it writes. The worker, housekeeping and the API decide *when* to move;
this module says *what* a move writes, so a field is never forgotten in one of them.

Two doors, used by everyone:

* :func:`apply` writes a change by compare-and-set (the store's ``transition``).
* :func:`announce` publishes the status event of a move that landed, after the caller
  settled the job's message. Every status change passes here exactly once: a hook that
  must see each one (webhooks, issue #18) attaches in this function.

Neighbours: talks to :mod:`genq.ports` only; the message ids it builds are read by
JetStream's duplicate window (:meth:`genq.ports.Bus.publish_job`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from genq import constants
from genq.models import ACTIVE, FileRef, Job, Status
from genq.ports import Bus, JobStore

#: The error a job cancelled by someone (a user, ``spec.active: false``) carries.
CANCELLED_MESSAGE = "The job was cancelled."


@dataclass(frozen=True)
class Change:
    """One compare-and-set write: allowed only while the job's status is in ``expect``."""

    expect: Collection[Status]
    fields: dict[str, Any] = field(default_factory=dict)
    #: The job gets a new place at the back of its queue (a user's retry).
    requeue: bool = False


# -- the moves (pure) ------------------------------------------------------------------
def start(job: Job, *, worker: str, now: float, stream_seq: int, delivery: str | None) -> Change:
    """``queued → running`` for the next attempt. ``running`` too: a redelivery of a job
    whose worker died starts the next attempt (the caller guards on ``attempts``)."""
    return Change([Status.QUEUED, Status.RUNNING], {
        "status": Status.RUNNING, "attempts": job.attempts + 1, "started_at": now, "heartbeat_at": now,
        "worker": worker, "progress": 0.0, "stream_seq": stream_seq, "delivery": delivery,
    })


def succeed(job: Job, *, now: float, results: tuple[FileRef, ...], meta: dict[str, Any]) -> Change:
    return Change([Status.RUNNING], {
        **_ended(job, now, Status.SUCCEEDED), "progress": 1.0, "results": results, "result_meta": meta, "error": None,
    })


def fail(job: Job, *, now: float, code: str, message: str) -> Change:
    return Change([Status.RUNNING], {**_ended(job, now, Status.FAILED), "error": {"code": code, "message": message}})


def cancel(job: Job, *, now: float, message: str = CANCELLED_MESSAGE) -> Change:
    """A queued or running job ends ``cancelled`` (its worker is told apart, see :func:`announce`)."""
    return Change(ACTIVE, {**_ended(job, now, Status.CANCELLED), "error": {"code": "cancelled", "message": message}})


def retry(job: Job, *, code: str, message: str) -> Change:
    """``running → queued`` after a failed attempt with attempts left; the message is
    handed back with a delay, and ``error`` says why the last attempt failed."""
    return Change([Status.RUNNING], {**_unclaimed(), "error": {"code": code, "message": message}})


def hand_back(job: Job, *, refund: bool) -> Change:
    """``running → queued``, the attempt not failed: its worker stopped. ``refund``: the
    attempt does not count (a drain is not the job's fault)."""
    fields = _unclaimed()
    if refund:
        fields["attempts"] = max(0, job.attempts - 1)
    return Change([Status.RUNNING], fields)


def requeue(job: Job, *, max_attempts: int) -> Change:
    """A user's retry: a failed or cancelled job starts over, at the back of its queue."""
    return Change([Status.FAILED, Status.CANCELLED], {
        **_unclaimed(), "status": Status.QUEUED, "attempts": 0, "error": None, "started_at": None,
        "completed_at": None, "expires_at": None, "results": (), "result_meta": None, "stream_seq": None,
        "max_attempts": max_attempts,
    }, requeue=True)


def republished(job: Job, stream_seq: int) -> Change:
    """The job's message was published again: where it now sits in the stream."""
    return Change([job.status], {"stream_seq": stream_seq})


def heartbeat(now: float) -> Change:
    return Change([Status.RUNNING], {"heartbeat_at": now})


def progress(fraction: float) -> Change:
    """Only while running: a write landing after the job's success must not take its
    progress back from 1.0."""
    return Change([Status.RUNNING], {"progress": fraction})


def expired(job: Job, now: float) -> bool:
    """A finished job past its retention: its record and files go."""
    return job.terminal and job.expires_at is not None and job.expires_at <= now


def _ended(job: Job, now: float, status: Status) -> dict[str, Any]:
    return {"status": status, "completed_at": now, "expires_at": now + job.ttl_seconds, "delivery": None}


def _unclaimed() -> dict[str, Any]:
    return {"status": Status.QUEUED, "progress": 0.0, "worker": None, "delivery": None}


# -- what goes on the wire (pure) ------------------------------------------------------
def status_event(job: Job) -> dict[str, Any]:
    """The event on ``constants.events_subject(job.id)`` when the job's status changed."""
    return {"type": "status", "id": job.id, "status": job.status.value}


def progress_event(job: Job, fraction: float, step: int | None, steps: int | None) -> dict[str, Any]:
    """The event of a running job's progress: sent only while someone watches the job."""
    return {"type": "progress", "id": job.id, "progress": fraction, "step": step, "steps": steps}


def stop_message(job: Job, reason: str) -> dict[str, Any]:
    """Tells the worker running ``job`` to stop (on ``constants.cancel_subject``)."""
    return {"id": job.id, "reason": reason}


def dedupe_id(job: Job, lost_seq: int | None = None) -> str:
    """The JetStream message id of the job's place in the queue (a user's retry is a new
    place). Republishing a message that is gone adds its sequence, so two housekeepers
    republishing the same lost message make one new one."""
    return f"{job.id}.{job.seq}" if lost_seq is None else f"{job.id}.{job.seq}.{lost_seq}"


# -- the two doors ---------------------------------------------------------------------
async def apply(
    store: JobStore, job_id: str, change: Change, *, version: int | None = None,
    guard: Callable[[Job], bool] | None = None,
) -> Job | None:
    """Write ``change`` by compare-and-set; the new job, or None when the race was lost."""
    return await store.transition(
        job_id, change.expect, version=version, guard=guard, requeue=change.requeue, **change.fields
    )


async def announce(bus: Bus, job: Job, *, stop: str | None = None) -> None:
    """Publish ``job``'s status event (best effort: a watcher also polls). ``stop``: first
    tell the worker running it to stop, with that reason (cancelled, failed by
    housekeeping). Called once for every status change that landed."""
    with contextlib.suppress(Exception):
        if stop is not None:
            await bus.publish(constants.cancel_subject(job.id), stop_message(job, stop))
        await bus.publish(constants.events_subject(job.id), status_event(job))


async def cancel_job(
    store: JobStore, bus: Bus, job: Job, *, now: float, message: str = CANCELLED_MESSAGE, version: int | None = None,
) -> Job | None:
    """Cancel a queued or running job, as ``DELETE /v1/jobs/{id}`` and ``spec.active:
    false`` both do: by compare-and-set, then its stream message goes (queued) or its
    worker stops (running). None when it had already ended."""
    done = await apply(store, job.id, cancel(job, now=now, message=message), version=version)
    if done is None:
        return None
    if job.status is Status.QUEUED and done.stream_seq is not None:
        with contextlib.suppress(Exception):
            await bus.remove(done.stream_seq)
    await announce(bus, done, stop="cancelled")
    return done
