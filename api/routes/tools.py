"""``/v1/tools``: what each tool takes, and ``warm`` (keep a variant loaded)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends
from fastapi.responses import JSONResponse

from genq import constants
from genq.api import routing
from genq.api.auth import Principal
from genq.api.deps import admin, principal, service
from genq.api.errors import ApiError, not_found
from genq.api.schemas import WarmRequest
from genq.api.service import JobService
from genq.tools import ToolSpec

router = routing.router(prefix="/v1/tools", tags=["tools"])


def describe(spec: ToolSpec, svc: JobService) -> dict[str, Any]:
    lo, hi = spec.input_range
    s = svc.settings
    return {
        "name": spec.name,
        "label": spec.display_label,
        "kind": spec.kind,
        "variants": [v.name for v in spec.variants],
        "default_variant": spec.default_variant,
        "params": spec.params_schema,
        "inputs": {"min_images": lo, "max_images": hi, "formats": ["image/png", "image/jpeg", "image/webp"]},
        "limits": {
            "max_concurrent": spec.capacity,
            "max_queued": spec.max_queued,
            "active_deadline_seconds": spec.active_deadline_seconds,
            "max_attempts": spec.max_attempts,
            "result_ttl_seconds": spec.result_ttl_seconds,
            "delete_on_download": spec.delete_on_download,
            "max_file_bytes": s.max_file_bytes,
            "max_pixels": s.max_pixels,
        },
    }


@router.get("")
async def list_tools(_: Principal = Depends(principal), svc: JobService = Depends(service)) -> Any:
    return {"tools": [describe(spec, svc) for spec in svc.rt.registry]}


@router.get("/{tool}")
async def get_tool(tool: str, _: Principal = Depends(principal), svc: JobService = Depends(service)) -> Any:
    spec = svc.rt.registry.get(tool)
    if spec is None:
        raise not_found("tool")
    return describe(spec, svc)


@router.post("/{tool}/warm", status_code=202)
async def warm(tool: str, req: WarmRequest, _: Principal = Depends(admin), svc: JobService = Depends(service)) -> Any:
    """Keep at least one worker with ``variant`` loaded for ``seconds`` (the "load model" call)."""
    spec = svc.rt.registry.get(tool)
    if spec is None:
        raise not_found("tool")
    variant = req.variant or spec.default_variant
    if spec.variant(variant) is None:
        raise ApiError("validation_error", f"Tool {tool!r} has no variant {variant[:63]!r}.",
                       {"field": "variant", "variants": [v.name for v in spec.variants]})
    until = time.time() + req.seconds
    await svc.rt.bus.publish(constants.warm_subject(tool), {"tool": tool, "variant": variant, "seconds": req.seconds})
    from genq.api.schemas import iso

    return JSONResponse({"tool": tool, "variant": variant, "warm_until": iso(until)}, status_code=202)
