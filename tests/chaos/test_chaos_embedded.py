"""The whole embedded process (``genq up``) under faults (issue #6).

- SIGKILLed and restarted 10 times (40 with ``--long``) while jobs arrive at a steady rate:
  every job that got a 202 ends once, with intact results.
- Paused (SIGSTOP, with its nats-server: a laptop lid closed) past a running job's deadline
  and a finished job's retention: once resumed (SIGCONT), the deadline and the retention
  are enforced at once, without waiting for timers to catch up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from chaos_ledger import History, Ledger, Load, check
from chaos_procs import ACK_WAIT, backlog, chaos_tool, write_config
from conftest import ADMIN
from genq.adapters.nats_server import free_port
from helpers import GenqUp, alive, eventually, nats_servers_for

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture
def up_factory(tmp_path):
    made: list[GenqUp] = []

    def make(*tools: dict) -> GenqUp:
        up = GenqUp(tmp_path, tmp_path / "data", write_config(tmp_path / "genq.yaml", *tools), free_port())
        made.append(up)
        return up

    yield make
    for up in made:
        if up.proc is not None and up.proc.poll() is None:
            os.kill(up.proc.pid, signal.SIGCONT)
        up.stop()
        for pid in nats_servers_for(up.data):  # never leave a server behind, even on failure
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


async def test_whole_process_sigkilled_and_restarted_under_load(up_factory, rng, faults):
    kills = faults(10, 40)
    up = up_factory(chaos_tool(maxWorkers=2, maxAttempts=3))
    ledger = Ledger(rng)
    t0 = time.monotonic()
    await asyncio.to_thread(up.start)
    # One job in ten works 4 s, so that some outlive several kills.
    load = Load(ledger, up.url, ADMIN, tool="chaos", rate=5, sleep=(0.05, 0.5), slow=(0.1, 4.0))
    history = History(ledger, up.url, ADMIN)
    load.start()
    history.start()
    restarts = []
    for _ in range(kills):
        await asyncio.sleep(rng.uniform(0.5, 2.5))
        up.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(up.proc.wait, 10)
        await asyncio.sleep(rng.uniform(0.0, 1.0))  # down for a moment: submits are refused
        restarts.append(await asyncio.to_thread(up.start))
    t_faults = time.monotonic() - t0
    await load.stop()
    nats_url = (up.data / "nats.url").read_text()
    final = await check(ledger, up.url, ADMIN, up.data, timeout=90, allowed_failures=("worker_lost",),
                        settle=ACK_WAIT + 1, backlog=lambda: backlog(nats_url, "chaos"))
    await history.stop()
    print(f"[chaos] {kills} kills of genq up in {t_faults:.0f}s (restart to ready: "
          f"{min(restarts):.1f}-{max(restarts):.1f}s); {ledger.summary()}; final {final}; total {time.monotonic() - t0:.0f}s")
    assert ledger.answers["202"] >= 2 * kills, "too little load to mean anything"


async def test_deadline_and_retention_hold_across_a_pause(up_factory):
    # Deadline 3 s (+ the housekeeping grace of 2 s), retention 4 s (another tool), and a
    # JetStream ack wait of 3 s: a pause of 9 s outlives all three.
    up = up_factory(chaos_tool(maxWorkers=2, maxAttempts=3, activeDeadlineSeconds=3),
                    chaos_tool("brief", maxWorkers=1, resultTTLSeconds=4))
    await asyncio.to_thread(up.start)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=up.url, headers=headers, timeout=10) as c:
        r = await c.post("/v1/jobs", json={"tool": "brief", "params": {"text": "short", "seed": 1}, "wait": 10})
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        short = r.json()
        r = await c.post("/v1/jobs", json={"tool": "chaos", "params": {"text": "long", "seed": 2, "sleep": 60}})
        assert r.status_code == 202, r.text
        long_id = r.json()["id"]
        await eventually(lambda: _status(c, long_id, "running"), 10, "the long job to start")

        nats_pid = int((up.data / "nats" / "nats-server.pid").read_text())
        pids = [up.proc.pid, nats_pid]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(9)
        for pid in reversed(pids):
            os.kill(pid, signal.SIGCONT)
        t_resume = time.monotonic()

        async def expired() -> bool:
            return (await c.get(f"/v1/jobs/{short['id']}")).status_code == 404

        await eventually(expired, 15, "the finished job's retention to be enforced after the pause")
        t_expired = time.monotonic() - t_resume
        assert not (up.data / "blobs" / "jobs" / short["id"]).exists(), "the expired job's files are still there"
        job = await eventually(lambda: _status(c, long_id, "failed"), 15, "the long job's deadline after the pause")
        t_deadline = time.monotonic() - t_resume
        assert job["error"]["code"] == "deadline_exceeded", job
        # It stays failed: no attempt that JetStream redelivered after the pause revives it.
        await asyncio.sleep(ACK_WAIT + 2)
        again = (await c.get(f"/v1/jobs/{long_id}")).json()
        assert (again["status"], again["completed_at"], again["error"]) == (job["status"], job["completed_at"], job["error"])
        # And the queue still works.
        r = await c.post("/v1/jobs", json={"tool": "chaos", "params": {"text": "after", "seed": 3}, "wait": 15})
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        print(f"[chaos] after a 9 s pause: retention enforced {t_expired:.1f}s and the deadline "
              f"{t_deadline:.1f}s after SIGCONT (attempts {job['attempts']})")
        assert alive(up.proc.pid)


async def _status(c: httpx.AsyncClient, job_id: str, status: str) -> dict | None:
    r = await c.get(f"/v1/jobs/{job_id}")
    return r.json() if r.status_code == 200 and r.json()["status"] == status else None
