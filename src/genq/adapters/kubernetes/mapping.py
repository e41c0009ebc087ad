"""Job ↔ GenerationJob: pure functions, no I/O and no Kubernetes client.

What the CRD keeps where: spec holds what was submitted (tool, variant, params, inputs,
owner, priority, activeDeadlineSeconds, ttlSecondsAfterFinished); status holds everything
that moves (conditions, attempts, progress, times, worker, results, seed, error, the
queue sequence, the stream sequence, the delivery, the heartbeat, maxAttempts), because
the status subresource ignores metadata — a field that must move atomically with the
status has to be in it. Immutable values live in annotations: the job id as the API
shows it (a ULID; the resource name is its lower case), the sub-second creation time,
and, until the first status write, the attempt budget and seed.

Neighbours: :mod:`.store` writes and reads what these build; :mod:`genq.conditions` builds
the conditions; the names are in :mod:`genq.constants`; the resource is
``crds/generationjobs.genq.io.yaml``.
"""

from __future__ import annotations

import math
import time
from typing import Any

from genq import conditions, constants
from genq.models import FileRef, Job, Priority, Status, parse_rfc3339, rfc3339

GROUP, VERSION, PLURAL = constants.API_GROUP, constants.API_VERSION, constants.GENERATIONJOB_PLURAL
API_VERSION = f"{GROUP}/{VERSION}"

#: The ``Succeeded`` condition's reason for each status: ``kubectl get gjob`` shows it.
STATUS_REASON = {
    Status.QUEUED: constants.REASON_QUEUED,
    Status.RUNNING: constants.REASON_RUNNING,
    Status.SUCCEEDED: constants.REASON_COMPLETED,
    Status.FAILED: constants.REASON_FAILED,
    Status.CANCELLED: constants.REASON_CANCELLED,
}
REASON_STATUS = {v: k for k, v in STATUS_REASON.items()} | {constants.REASON_DEADLINE_EXCEEDED: Status.FAILED}

#: A GenerationJob's own times keep microseconds (sub-second order matters to readers).
_DIGITS = 6


def resource_name(job_id: str) -> str:
    """The resource name of a job: ULIDs are case-insensitive, resource names lower case."""
    return job_id.lower()


def queue_sequence(now: float | None = None) -> int:
    """A job's place in its queue: microseconds since the epoch when it was (re)queued.
    Several API replicas need no shared counter; clock skew between them only blurs FIFO
    among jobs submitted within the skew."""
    return int((time.time() if now is None else now) * 1_000_000)


def file_to_item(f: FileRef, uri_base: str) -> dict[str, Any]:
    item: dict[str, Any] = {"name": f.name, "uri": uri_base + f.key, "contentType": f.content_type, "sizeBytes": f.size_bytes}
    if f.etag:
        item["etag"] = f.etag
    return item


def item_to_file(item: dict[str, Any], uri_base: str) -> FileRef:
    uri = item["uri"]
    if uri_base and uri.startswith(uri_base):
        key = uri[len(uri_base):]
    else:  # written with another base: the key is what follows jobs/
        i = uri.find("jobs/")
        key = uri[i:] if i >= 0 else uri
    return FileRef(item["name"], key, item.get("contentType") or "application/octet-stream", int(item.get("sizeBytes") or 0),
                   item.get("etag"))


def spec_times(job: Job) -> dict[str, Any]:
    """``ttlSecondsAfterFinished`` and ``activeDeadlineSeconds`` (None: no deadline; a
    merge patch removes it) as the spec holds them: whole seconds."""
    return {
        "ttlSecondsAfterFinished": max(0, math.ceil(job.ttl_seconds)),
        "activeDeadlineSeconds": max(1, math.ceil(job.deadline_seconds)) if job.deadline_seconds else None,
    }


def job_to_resource(job: Job, namespace: str, uri_base: str) -> dict[str, Any]:
    """The GenerationJob for a new job (metadata and spec; the status is written after)."""
    spec: dict[str, Any] = {
        "tool": job.tool,
        "variant": job.variant,
        "params": job.params,
        "inputs": [file_to_item(f, uri_base) for f in job.inputs],
        "owner": job.owner,
        "priority": job.priority.value,
        "active": True,
        **{k: v for k, v in spec_times(job).items() if v is not None},
    }
    annotations = {constants.ANNOTATION_JOB_ID: job.id, constants.ANNOTATION_CREATED_AT: repr(job.created_at),
                   constants.ANNOTATION_MAX_ATTEMPTS: str(job.max_attempts)}
    if job.seed is not None:
        annotations[constants.ANNOTATION_SEED] = str(job.seed)
    return {
        "apiVersion": API_VERSION,
        "kind": constants.GENERATIONJOB_KIND,
        "metadata": {
            "name": resource_name(job.id),
            "namespace": namespace,
            "labels": {constants.LABEL_TOOL: job.tool, constants.LABEL_MANAGED_BY: constants.MANAGED_BY},
            "annotations": annotations,
            # Created with genq's finalizer (no extra write): a `kubectl delete` of a live
            # job waits until housekeeping has stopped its work and removed its objects.
            "finalizers": [constants.JOB_FINALIZER],
        },
        "spec": spec,
    }


def needs_first_status(job: Job) -> bool:
    """Whether a new job must have its status written at once. A new queued job reads
    right without one (the annotations carry its attempt budget and seed): its first
    status write is the next update (the API's stream_seq), one write per submit saved."""
    return not (job.status is Status.QUEUED and job.stream_seq is None and not job.attempts and job.worker is None
                and not job.results and job.error is None and job.started_at is None)


def job_conditions(job: Job, generation: int) -> list[dict[str, Any]]:
    """``Queued``, ``Started`` and ``Succeeded``; the Succeeded reason is the job's status,
    as ``kubectl get gjob`` shows it."""
    queued_at = job.seq / 1_000_000 if job.seq else job.created_at
    error = job.error or {}
    reason = STATUS_REASON[job.status]
    if job.status is Status.FAILED and error.get("code") == "deadline_exceeded":
        reason = constants.REASON_DEADLINE_EXCEEDED
    queued = job.status is Status.QUEUED
    started = job.status is Status.RUNNING or (job.terminal and job.started_at is not None)
    succeeded = {Status.SUCCEEDED: conditions.TRUE, Status.FAILED: conditions.FALSE,
                 Status.CANCELLED: conditions.FALSE}.get(job.status, conditions.UNKNOWN)
    done_at = job.completed_at if job.terminal else (job.started_at if job.status is Status.RUNNING else queued_at)
    message = str(error.get("message") or "") if job.status in (Status.FAILED, Status.CANCELLED) else ""
    return [
        conditions.condition(
            constants.CONDITION_QUEUED, conditions.TRUE if queued else conditions.FALSE,
            constants.REASON_QUEUED if queued else (constants.REASON_STARTED if started else reason),
            at=queued_at if queued else (job.started_at or job.completed_at), generation=generation),
        conditions.condition(
            constants.CONDITION_STARTED, conditions.TRUE if started else conditions.FALSE,
            constants.REASON_STARTED if started else reason, at=job.started_at if started else queued_at,
            generation=generation),
        conditions.condition(constants.CONDITION_SUCCEEDED, succeeded, reason, at=done_at, generation=generation,
                             message=message),
    ]


def _result_status(job: Job) -> dict[str, Any]:
    """Seed, duration and metrics as the CRD types them."""
    st: dict[str, Any] = {}
    meta = job.result_meta or {}
    seed = meta.get("seed", job.seed) if job.result_meta else job.seed
    if isinstance(seed, int) and 0 <= seed <= 0xFFFFFFFF:
        st["seed"] = seed
    if job.result_meta is not None:
        duration = meta.get("duration_seconds")
        st["durationSeconds"] = max(0.0, float(duration)) if isinstance(duration, int | float) else 0.0
        # The CRD types metrics as numbers; anything else a tool reported is dropped.
        st["metrics"] = {str(k): v for k, v in (meta.get("metrics") or {}).items()
                         if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    if job.error:
        error = job.error
        st["error"] = {"code": str(error.get("code") or "pipeline_error")[:64], "message": str(error.get("message") or "")[:4096]}
    return st


def job_status(job: Job, generation: int, uri_base: str) -> dict[str, Any]:
    """The status subresource of ``job``: its conditions and every field that moves."""
    st: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": job_conditions(job, generation),
        "attempts": job.attempts,
        "maxAttempts": max(1, job.max_attempts),
        "progress": min(1.0, max(0.0, float(job.progress))),
        "queueSequence": job.seq,
        "results": [file_to_item(f, uri_base) for f in job.results],
    }
    for key, value in (
        ("startTime", rfc3339(job.started_at, _DIGITS)), ("completionTime", rfc3339(job.completed_at, _DIGITS)),
        ("heartbeatTime", rfc3339(job.heartbeat_at, _DIGITS)), ("expiryTime", rfc3339(job.expires_at, _DIGITS)),
        ("worker", job.worker), ("streamSequence", job.stream_seq), ("delivery", job.delivery),
    ):
        if value is not None:
            st[key] = value
    return st | _result_status(job)


def _int_or_none(s: str | None) -> int | None:
    try:
        return int(s) if s is not None else None
    except ValueError:
        return None


def resource_to_job(obj: dict[str, Any], uri_base: str) -> Job:
    """The job a GenerationJob holds; KeyError, ValueError or TypeError if it is not one
    genq can read."""
    meta, spec, st = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    ann = meta.get("annotations") or {}
    created_at = float(ann.get(constants.ANNOTATION_CREATED_AT) or parse_rfc3339(meta.get("creationTimestamp")) or 0.0)
    reason = conditions.find(st.get("conditions"), constants.CONDITION_SUCCEEDED).get("reason")
    result_meta = None
    if "durationSeconds" in st:
        result_meta = {"seed": st.get("seed"), "duration_seconds": st["durationSeconds"], "metrics": dict(st.get("metrics") or {})}
    error = st.get("error")
    return Job(
        id=ann.get(constants.ANNOTATION_JOB_ID) or meta["name"],
        owner=spec.get("owner") or "",
        tool=spec["tool"],
        variant=spec.get("variant") or "",
        priority=Priority(spec.get("priority") or "normal"),
        params=spec.get("params") or {},
        inputs=tuple(item_to_file(i, uri_base) for i in spec.get("inputs") or ()),
        status=REASON_STATUS.get(reason or "", Status.QUEUED),
        seed=st["seed"] if "seed" in st else _int_or_none(ann.get(constants.ANNOTATION_SEED)),
        progress=float(st.get("progress") or 0.0),
        attempts=int(st.get("attempts") or 0),
        max_attempts=int(st.get("maxAttempts") or ann.get(constants.ANNOTATION_MAX_ATTEMPTS) or 3),
        deadline_seconds=float(spec["activeDeadlineSeconds"]) if spec.get("activeDeadlineSeconds") else None,
        ttl_seconds=float(spec.get("ttlSecondsAfterFinished", 3600)),
        created_at=created_at,
        started_at=parse_rfc3339(st.get("startTime")),
        completed_at=parse_rfc3339(st.get("completionTime")),
        expires_at=parse_rfc3339(st.get("expiryTime")),
        heartbeat_at=parse_rfc3339(st.get("heartbeatTime")),
        worker=st.get("worker"),
        results=tuple(item_to_file(i, uri_base) for i in st.get("results") or ()),
        result_meta=result_meta,
        error={"code": error.get("code"), "message": error.get("message", "")} if error else None,
        stream_seq=st.get("streamSequence"),
        delivery=st.get("delivery"),
        seq=int(st.get("queueSequence") or queue_sequence(created_at)),
        version=int(meta.get("resourceVersion") or 0),
        active=spec.get("active", True) is not False,
        deleting=bool(meta.get("deletionTimestamp")) and constants.JOB_FINALIZER in (meta.get("finalizers") or ()),
    )
