"""How many workers a pool should run, and which pods a scale-in may take.

All pure: :func:`desired_replicas` turns the JetStream backlog into a replica count,
:func:`busy_by_pod` maps running jobs to the pods running them, and
:func:`deletion_costs` ranks pods so the ReplicaSet removes idle ones first (Kubernetes'
``controller.kubernetes.io/pod-deletion-cost``). Neighbours: :mod:`genq.operator.handlers`
feeds them what it read and applies the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from genq import constants
from genq.tools import ToolSpec

#: Deletion cost of a pod that runs jobs (plus one per job): far above an idle pod's.
BUSY_COST = 1_000_000
#: Deletion cost of an idle pod: the ReplicaSet takes these first.
IDLE_COST = 0


@dataclass(frozen=True)
class Backlog:
    """A tool's JetStream backlog: messages waiting (``queued``) and delivered but not
    acknowledged yet (``running``)."""

    queued: int
    running: int

    @property
    def total(self) -> int:
        return self.queued + self.running


def desired_replicas(
    pool: ToolSpec,
    backlog: int,
    busy: int,
    idle_since: float | None,
    now: float,
    warm_until: float = 0.0,
    *,
    current: int = 0,
) -> int:
    """Workers the pool should run.

    - ``ceil(backlog / concurrencyPerWorker)``, clamped to ``[minWorkers, maxWorkers]``;
      scale-up is immediate.
    - Scale-in waits: while fewer workers than ``current`` would do, ``idle_since`` is
      when that began (the handler keeps it); only ``scaleDownDelaySeconds`` after it does
      the count drop, so a short lull does not stop warm workers.
    - Never below ``busy`` (workers running a job), even above ``maxWorkers`` after the
      limit was lowered: those jobs finish first.
    - ``warm_until`` in the future keeps at least one worker up (a warm request).
    """
    need = math.ceil(max(0, backlog) / pool.concurrency_per_worker)
    target = min(max(need, pool.min_workers), pool.max_workers)
    if target < current:
        waited = idle_since is not None and now - idle_since >= pool.scale_down_delay_seconds
        if not waited:
            # Hold the current count (a lowered maxWorkers still applies at once).
            target = min(current, pool.max_workers)
    if warm_until > now:
        target = max(target, 1)
    return max(target, busy)


def idle_since_next(pool: ToolSpec, backlog: int, current: int, idle_since: float | None, now: float) -> float | None:
    """The new ``idle_since`` after an observation: when the pool started having more
    workers than its backlog needs, None while it needs all of them."""
    need = math.ceil(max(0, backlog) / pool.concurrency_per_worker)
    target = min(max(need, pool.min_workers), pool.max_workers)
    if target >= current:
        return None
    return now if idle_since is None else idle_since


def is_running(job: Mapping[str, Any]) -> bool:
    """A GenerationJob a worker runs now: ``Started`` True and ``Succeeded`` Unknown."""
    conds = {c.get("type"): c for c in ((job.get("status") or {}).get("conditions") or [])}
    started = conds.get(constants.CONDITION_STARTED, {}).get("status") == "True"
    return started and conds.get(constants.CONDITION_SUCCEEDED, {}).get("status", "Unknown") == "Unknown"


def pod_of_worker(worker_id: str, tool: str, pod_names: Iterable[str]) -> str | None:
    """The pod a worker id belongs to. A worker's id is ``<tool>-<hostname>-<pid>-<hex>``
    and a pod's hostname is its name."""
    best = None
    for pod in pod_names:
        if worker_id == pod or worker_id.startswith(f"{tool}-{pod}-"):
            if best is None or len(pod) > len(best):
                best = pod
    return best


def busy_by_pod(tool: str, running_workers: Iterable[str], pod_names: Iterable[str]) -> dict[str, int]:
    """Jobs each pod runs now, from the ``status.worker`` of running jobs."""
    names = list(pod_names)
    out: dict[str, int] = {}
    for worker in running_workers:
        pod = pod_of_worker(worker, tool, names) if worker else None
        if pod is not None:
            out[pod] = out.get(pod, 0) + 1
    return out


def deletion_costs(pod_names: Iterable[str], busy: Mapping[str, int]) -> dict[str, int]:
    """The ``pod-deletion-cost`` of each pod: idle pods cost nothing, a busy pod costs
    ``BUSY_COST`` plus its job count, so a scale-in takes idle pods and, if it must take
    a busy one, the least busy."""
    return {p: (BUSY_COST + busy[p]) if busy.get(p) else IDLE_COST for p in pod_names}


def cost_patches(pods: Iterable[Mapping[str, Any]], busy: Mapping[str, int]) -> dict[str, str]:
    """Pods whose ``pod-deletion-cost`` annotation must change, with the new value."""
    pods = list(pods)
    names = [p["metadata"]["name"] for p in pods]
    costs = deletion_costs(names, busy)
    out: dict[str, str] = {}
    for pod in pods:
        name = pod["metadata"]["name"]
        have = ((pod["metadata"].get("annotations") or {}).get(constants.POD_DELETION_COST))
        if have != str(costs[name]):
            out[name] = str(costs[name])
    return out
