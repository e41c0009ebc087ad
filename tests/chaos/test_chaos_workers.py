"""Worker processes SIGKILLed at random moments under a steady submit load (issue #6).

The cluster's shape on one machine: a nats-server, ``genq api``, ``genq operator`` and
three ``genq worker`` processes on one data folder. Each worker is SIGKILLed at a random
moment 0.1-1.5 s after it is ready and replaced by a fresh one (50 kills; 200 with ``--long``), while jobs
arrive at a steady rate. Every job that got a 202 must end once, with intact results.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from chaos_ledger import History, Ledger, Load, check
from chaos_procs import ACK_WAIT, Cluster, chaos_tool, write_config
from conftest import ADMIN
from helpers import eventually

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


async def test_worker_processes_sigkilled_under_load(tmp_path, rng, faults):
    kills = faults(50, 200)
    n_workers, slots = 3, 2
    # Five attempts: a job whose worker dies on every one of them ends failed/worker_lost.
    config = write_config(tmp_path / "genq.yaml", chaos_tool(maxAttempts=5, maxWorkers=n_workers * slots))
    cluster = Cluster(tmp_path, config)
    ledger = Ledger(rng)
    t0 = time.monotonic()
    try:
        await cluster.start()
        load = Load(ledger, cluster.url, ADMIN, tool="chaos", rate=6, sleep=(0.05, 0.6))
        history = History(ledger, cluster.url, ADMIN)
        load.start()
        history.start()
        killed = 0
        workers: list = []
        victims: set = set()

        def spawn():
            w = cluster.worker("chaos", slots)
            workers.append(w)
            return w

        async def lane() -> None:
            # One worker at a time: once it is ready, let it take jobs for a random while,
            # SIGKILL it and start the next — until the lanes have made `kills` kills. The
            # last one of each lane stays up to finish the backlog.
            nonlocal killed
            w = spawn()
            while True:
                await eventually(lambda: w.ready_line() or not w.alive(), 60, f"{w.name} to be ready", 0.05)
                await asyncio.sleep(rng.uniform(0.1, 1.5))
                assert w.alive(), f"{w.name} died by itself:\n{w.log()}"
                if killed >= kills:
                    return
                killed += 1
                victims.add(w)
                w.kill()
                w = spawn()

        await asyncio.gather(*(lane() for _ in range(n_workers)))
        t_faults = time.monotonic() - t0
        await load.stop()
        final = await check(ledger, cluster.url, ADMIN, cluster.data, timeout=90, allowed_failures=("worker_lost",),
                            settle=ACK_WAIT + 1, backlog=lambda: cluster.backlog("chaos"))
        await history.stop()
        survivors = [w for w in workers if w not in victims]
        assert len(survivors) == n_workers, len(survivors)
        for w in survivors:
            assert w.alive(), f"{w.name} died by itself:\n{w.log()}"
        print(f"[chaos] {killed} worker kills in {t_faults:.0f}s; "
              f"{ledger.summary()}; final {final}; {history.samples} history samples; "
              f"total {time.monotonic() - t0:.0f}s")
        assert ledger.answers["202"] >= kills, "too little load to mean anything"
        assert final.get("succeeded", 0) >= 0.9 * len(ledger.accepted)
    finally:
        await asyncio.to_thread(cluster.stop)
