"""``/healthz`` (alive), ``/readyz`` (store, bus, object storage reachable), ``/metrics``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from genq.api import routing
from genq.api.errors import body

router = routing.router(tags=["health"])


@router.get("/healthz")
async def healthz() -> Any:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> Any:
    rt = request.app.state.runtime
    checks = {"store": rt.store.ping, "bus": rt.bus.ping, "object_storage": rt.blobs.ping}
    results: dict[str, str] = {}
    for name, ping in checks.items():
        try:
            await asyncio.wait_for(ping(), 2.0)
            results[name] = "ok"
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            results[name] = f"unavailable: {type(e).__name__}"
    if all(v == "ok" for v in results.values()):
        return {"status": "ready", "checks": results}
    failed = [k for k, v in results.items() if v != "ok"]
    return JSONResponse(body("unavailable", f"Not ready: {', '.join(failed)} unreachable.", {"checks": results}),
                        status_code=503)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    rt = request.app.state.runtime
    svc = request.app.state.service
    m = rt.metrics
    for spec in rt.registry:
        try:
            counts = await rt.store.counts(spec.name)
            m.queued.labels(spec.name).set(counts.queued)
            m.running.labels(spec.name).set(counts.running)
            m.workers.labels(spec.name).set(await svc.live_slots(spec.name))
        except Exception:  # noqa: BLE001 - metrics must render even when the store is down
            pass
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
