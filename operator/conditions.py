"""ToolPool condition types, condition reasons and Event reasons, and the status builder.

Every reason is CamelCase (Kubernetes API conventions: a programmatic identifier, like
KEDA's and Kueue's). :func:`pool_status` is pure: from what the operator observed (the
Deployment, the backlog) it builds the whole ``status`` the handlers write through the
status subresource.

Neighbours: :mod:`genq.conditions` (the condition builder, shared with the job store),
:mod:`genq.operator.scaling` (the numbers), :mod:`genq.operator.handlers` (writes the
result).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from genq.conditions import set_condition

# Condition types.
READY = "Ready"
ACTIVE = "Active"

# Ready reasons.
WORKERS_READY = "WorkersReady"
WORKERS_STARTING = "WorkersStarting"
SCALED_TO_ZERO = "ScaledToZero"
DEPLOYMENT_MISSING = "DeploymentMissing"

# Active reasons.
JOBS_QUEUED = "JobsQueued"
JOBS_RUNNING = "JobsRunning"
IDLE = "Idle"
BACKLOG_UNKNOWN = "BacklogUnknown"

# Event reasons.
EVENT_DEPLOYMENT_CREATED = "DeploymentCreated"
EVENT_DEPLOYMENT_UPDATED = "DeploymentUpdated"
EVENT_SCALED_UP = "ScaledUp"
EVENT_SCALED_DOWN = "ScaledDown"
EVENT_BACKLOG_UNAVAILABLE = "BacklogUnavailable"
EVENT_RECONCILE_FAILED = "ReconcileFailed"


def pool_status(
    *,
    generation: int,
    previous: Mapping[str, Any] | None,
    desired: int,
    deployment: Mapping[str, Any] | None,
    queued: int | None,
    running: int | None,
    selector: str,
    now: float,
    avg_duration: float | None = None,
) -> dict[str, Any]:
    """The ToolPool ``status``: replicas, readyReplicas, queued, running, selector and the
    ``Ready`` / ``Active`` conditions, for ``metadata.generation`` ``generation``.

    ``queued`` / ``running`` None means the backlog could not be read (NATS down): the
    previous numbers are kept and ``Active`` is Unknown.
    """
    previous = previous or {}
    dstatus = (deployment or {}).get("status") or {}
    ready = int(dstatus.get("readyReplicas") or 0)
    conditions = previous.get("conditions") or []

    if deployment is None:
        r = ("False", DEPLOYMENT_MISSING, "The worker Deployment does not exist yet.")
    elif desired == 0:
        r = ("True", SCALED_TO_ZERO, "No work: the pool is scaled to zero; it scales up when a job is queued.")
    elif ready >= desired:
        r = ("True", WORKERS_READY, f"{ready} of {desired} workers are ready.")
    else:
        r = ("False", WORKERS_STARTING, f"{ready} of {desired} workers are ready.")
    conditions = set_condition(conditions, READY, *r, generation=generation, now=now)

    if queued is None or running is None:
        a = ("Unknown", BACKLOG_UNKNOWN, "The JetStream backlog could not be read.")
        queued = int(previous.get("queued") or 0)
        running = int(previous.get("running") or 0)
    elif queued:
        a = ("True", JOBS_QUEUED, f"{queued} jobs queued, {running} running.")
    elif running:
        a = ("True", JOBS_RUNNING, f"{running} jobs running.")
    else:
        a = ("False", IDLE, "No job is queued or running.")
    conditions = set_condition(conditions, ACTIVE, *a, generation=generation, now=now)

    status: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": desired,
        "readyReplicas": ready,
        "queued": queued,
        "running": running,
        "selector": selector,
        "conditions": conditions,
    }
    if avg_duration is not None:
        status["avgDurationSeconds"] = round(avg_duration, 3)
    elif previous.get("avgDurationSeconds") is not None:
        status["avgDurationSeconds"] = previous["avgDurationSeconds"]
    return status
