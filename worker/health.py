"""A worker pod's probes: ``/healthz`` (the process and its event loop answer) and
``/readyz`` (the model is loaded and the bus is reachable), on their own small port, with
the worker's Prometheus metrics at ``/metrics`` (job durations, queue waits, model loads:
in the cluster only the workers see them).

The operator's worker Deployment points its startup, liveness and readiness probes here
(``GENQ_WORKER_HEALTH_PORT``); ``genq worker`` serves it when that setting is given.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from genq.worker.worker import Worker


def health_app(worker: Worker) -> Starlette:
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "worker": worker.id})

    async def readyz(_: Request) -> JSONResponse:
        checks: dict[str, str] = {"model": "ok" if worker.loaded.is_set() else "loading"}
        try:
            await asyncio.wait_for(worker.bus.ping(), 2.0)
            checks["bus"] = "ok"
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            checks["bus"] = f"unavailable: {type(e).__name__}"
        if all(v == "ok" for v in checks.values()):
            return JSONResponse({"status": "ready", "checks": checks, "busy": worker.busy})
        failed = ", ".join(k for k, v in checks.items() if v != "ok")
        return JSONResponse({"error": {"code": "unavailable", "message": f"Not ready: {failed}.", "details": {"checks": checks}}},
                            status_code=503)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)])


class HealthServer:
    """Serves :func:`health_app` in the worker's own event loop."""

    def __init__(self, worker: Worker, port: int, host: str = "0.0.0.0"):
        self.server = uvicorn.Server(uvicorn.Config(health_app(worker), host=host, port=port, log_level="warning",
                                                    lifespan="off", access_log=False))
        # The worker owns SIGTERM (it drains); uvicorn must neither take nor re-raise it.
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._task: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started and not self._task.done():
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
