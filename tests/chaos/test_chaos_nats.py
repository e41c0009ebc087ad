"""nats-server SIGKILLed and restarted under a steady submit load (issue #6).

Extends ``tests/test_outage.py`` (one outage, no load): here the server dies 3 times
(12 with ``--long``) at random moments while jobs arrive and run. While it is down the
API answers 503 ``unavailable`` (``/readyz`` names the bus; submits are refused with the
SPEC body, never a 500); once it is back genq recovers by itself, without a restart, and
every job that got a 202 — before, between or after the outages — ends once, intact.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from chaos_ledger import History, Ledger, Load, check
from chaos_procs import ACK_WAIT, chaos_tool
from conftest import ADMIN, start_live, stop_live
from helpers import eventually

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


async def test_nats_killed_and_restarted_under_load(tmp_path, monkeypatch, rng, faults):
    outages = faults(3, 12)
    monkeypatch.setenv("GENQ_TEST_STATE", str(tmp_path))
    live, server, task = await start_live(tmp_path, {"tools": [chaos_tool(maxWorkers=2)]}, ack_wait_seconds=ACK_WAIT)
    ledger = Ledger(rng)
    t0 = time.monotonic()
    try:
        load = Load(ledger, live.url, ADMIN, tool="chaos", rate=6, sleep=(0.05, 0.5), slow=(0.05, 3.0))
        history = History(ledger, live.url, ADMIN)
        load.start()
        history.start()
        nats = live.emb.nats
        refused_in, recovered_in = [], []
        async with live.client() as c:
            for _ in range(outages):
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                await asyncio.to_thread(nats.kill)
                t_down = time.monotonic()
                # A submit is refused with 503 and the SPEC body; /readyz names the bus.
                r = await c.post("/v1/jobs", json={"tool": "chaos", "params": {"text": "probe", "seed": 0}})
                refused_in.append(time.monotonic() - t_down)
                _assert_unavailable(r)
                r = await c.get("/readyz")
                _assert_unavailable(r)
                checks = r.json()["error"]["details"]["checks"]
                assert checks["bus"] != "ok" and checks["store"] == "ok", checks
                await asyncio.sleep(rng.uniform(0.5, 2.5))
                await asyncio.to_thread(nats.start)  # same store, same port; genq is not restarted
                t_up = time.monotonic()

                async def ready() -> bool:
                    return (await c.get("/readyz")).status_code == 200

                await eventually(ready, 20, "genq to be ready again after nats-server came back")
                recovered_in.append(time.monotonic() - t_up)
            await asyncio.sleep(rng.uniform(1.0, 2.0))
        await load.stop()
        final = await check(ledger, live.url, ADMIN, live.emb.data_dir, timeout=60, settle=ACK_WAIT + 1,
                            backlog=lambda: live.emb.rt.bus.backlog("chaos"))
        await history.stop()
        assert ledger.answers["202"] >= 10 * outages, "too little load to mean anything"
        print(f"[chaos] {outages} nats-server kills: submit refused in {max(refused_in):.2f}s at most, ready again "
              f"{min(recovered_in):.1f}-{max(recovered_in):.1f}s after it came back; {ledger.summary()}; final {final}; "
              f"total {time.monotonic() - t0:.0f}s")
    finally:
        await stop_live(live, server, task)


def _assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == "unavailable" and body["error"]["message"], body
