"""A NATS outage: /readyz and submits answer 503 while it is down; genq recovers by itself
when it is back, and jobs accepted before the outage still complete."""

from __future__ import annotations

import asyncio
import time

from helpers import assert_error, poll


async def test_nats_down_gives_503_then_recovers(live):
    async with live.client() as c:
        # echo keeps results for minutes (once's 2 s retention could delete these before
        # the count at the end on a loaded machine)
        before = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 0.5, "text": "before"}})).json()
        queued = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 0.5, "text": "queued"}})).json()
        nats = live.emb.nats
        nats.kill()
        t0 = time.monotonic()
        r = await c.get("/readyz")
        body = assert_error(r, 503, "unavailable")
        assert body["error"]["details"]["checks"]["bus"] != "ok" and body["error"]["details"]["checks"]["store"] == "ok"
        r = await c.post("/v1/jobs", json={"tool": "echo", "params": {"text": "during"}})
        assert_error(r, 503, "unavailable")
        assert time.monotonic() - t0 < 10
        # status reads keep working from the store
        assert (await c.get(f"/v1/jobs/{queued['id']}")).status_code == 200
        await asyncio.to_thread(nats.start)  # same store, same port
        for _ in range(100):
            if (await c.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await c.get("/readyz")).status_code == 200
        for j in (before, queued):
            done = await poll(c, j["id"], timeout=30)
            assert done["status"] == "succeeded", done
        r = await c.post("/v1/jobs", json={"tool": "echo", "params": {"text": "after"}, "wait": 10})
        assert r.status_code == 200 and r.json()["status"] == "succeeded"
        # the refused submit left nothing behind
        assert (await c.get("/v1/jobs", params={"limit": 500})).json()["total"] == 3
