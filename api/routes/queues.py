"""``/v1/queues``: per-tool queue statistics."""

from __future__ import annotations

from typing import Any

from fastapi import Depends

from genq.api import routing
from genq.api.auth import Principal
from genq.api.deps import principal, service
from genq.api.errors import not_found
from genq.api.schemas import QueueStats
from genq.api.service import JobService
from genq.tools import ToolSpec

router = routing.router(prefix="/v1/queues", tags=["queues"])


async def queue_stats(svc: JobService, spec: ToolSpec) -> dict[str, Any]:
    counts = await svc.rt.store.counts(spec.name)
    slots = await svc.live_slots(spec.name)
    avg = await svc.avg_duration(spec.name)
    return {
        "tool": spec.name,
        "label": spec.display_label,
        "max_concurrent": spec.capacity,
        "workers": -(-slots // spec.concurrency_per_worker),
        "active": counts.running,
        "queued": counts.queued,
        "max_queued": spec.max_queued,
        "completed": counts.succeeded,
        "failed": counts.failed,
        "avg_duration_seconds": None if avg is None else round(avg, 3),
    }


@router.get("", response_model=dict[str, list[QueueStats]])
async def list_queues(_: Principal = Depends(principal), svc: JobService = Depends(service)) -> Any:
    return {"queues": [await queue_stats(svc, spec) for spec in svc.rt.registry]}


@router.get("/{tool}", response_model=QueueStats)
async def get_queue(tool: str, _: Principal = Depends(principal), svc: JobService = Depends(service)) -> Any:
    spec = svc.rt.registry.get(tool)
    if spec is None:
        raise not_found("tool")
    return await queue_stats(svc, spec)
