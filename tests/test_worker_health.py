"""A worker's probes: /healthz while it lives, /readyz only with its model loaded and the
bus reachable (what the operator's worker Deployment points its probes at)."""

from __future__ import annotations

import asyncio

import httpx

from genq.adapters.nats_server import free_port
from genq.worker.health import HealthServer


async def test_health_and_readiness(live):
    worker = next(w for w in live.emb.workers if w.name == "echo")
    await asyncio.wait_for(worker.loaded.wait(), 30)
    port = free_port()
    server = HealthServer(worker, port, host="127.0.0.1")
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            assert (await c.get("/healthz")).json()["worker"] == worker.id
            metrics = await c.get("/metrics")  # what a PodMonitor scrapes in the cluster
            assert metrics.status_code == 200 and 'genq_model_load_seconds_count{tool="echo"}' in metrics.text
            ready = await c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"] == {"model": "ok", "bus": "ok"}
            live.emb.nats.kill()
            down = await c.get("/readyz")
            assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable"
            assert (await c.get("/healthz")).status_code == 200  # alive, just not ready
            live.emb.nats.start()
            for _ in range(100):
                if (await c.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await c.get("/readyz")).status_code == 200
    finally:
        await server.stop()
