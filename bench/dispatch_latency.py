"""Dispatch latency: submit → the tool is called, with an idle worker.

One genq (the real embedded stack in its own process) with a python tool ``stamp``
(one worker slot) that records ``time.time()`` the moment it is called and returns it
in ``result.metrics.t_start``. Jobs are submitted one at a time; the client waits for
each to finish (first poll 30 ms after the 202, then every 5 ms) and pauses a few ms so
the worker is idle again before the next. Afterwards the exact ``created_at`` and
``started_at`` floats are read from the SQLite file (the API rounds them to ms).

    python bench/dispatch_latency.py [--jobs 300]

Reported (p50/p99/max):
  * created_at → tool called   (the job record is made → the tool runs; the headline)
  * POST sent → tool called    (client clock just before the request; same machine)
  * created_at → started_at    (the worker's queued→running compare-and-set)
Targets: p50 <= 5 ms, p99 <= 20 ms (created_at → tool called).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import AUTH, machine, pct, python_tool, start_genq, workdir  # noqa: E402

from genq import constants  # noqa: E402

P50_TARGET_MS, P99_TARGET_MS = 5.0, 20.0


async def run_jobs(url: str, n: int, gap: float) -> list[dict]:
    out = []
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
        await c.get("/healthz")
        for i in range(n):
            t_send = time.time()
            r = await c.post("/v1/jobs", json={"tool": "stamp", "params": {"n": i}})
            t_resp = time.time()
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            await asyncio.sleep(0.03)
            deadline = time.monotonic() + 10
            while True:
                job = (await c.get(f"/v1/jobs/{job_id}")).json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"job {job_id} did not finish: {job}")
                await asyncio.sleep(0.005)
            assert job["status"] == "succeeded", job
            out.append({"id": job_id, "t_send": t_send, "t_resp": t_resp, "t_start": job["result"]["metrics"]["t_start"]})
            await asyncio.sleep(gap)
    return out


def line(name: str, ms: list[float], target: bool = False) -> str:
    p50, p99 = pct(ms, 50), pct(ms, 99)
    s = f"  {name:<28} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   max {max(ms):6.2f} ms"
    if target:
        s += (f"   targets p50<={P50_TARGET_MS:g} {'MET' if p50 <= P50_TARGET_MS else 'MISSED'}, "
              f"p99<={P99_TARGET_MS:g} {'MET' if p99 <= P99_TARGET_MS else 'MISSED'}")
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--gap", type=float, default=0.01, help="pause after each job so the worker is idle again")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--profile", type=Path, help="profile the genq server with pyinstrument; text to this file")
    args = p.parse_args()
    print(f"dispatch latency: {args.jobs} sequential jobs (+{args.warmup} warm-up), idle worker, "
          f"server loop {args.loop}; {machine()}")
    config = {"tools": [python_tool("stamp", "benchtools:stamp")]}
    with workdir() as work:
        srv = start_genq(work, config, loop=args.loop, profile=args.profile)
        try:
            asyncio.run(run_jobs(srv.url, args.warmup, args.gap))
            jobs = asyncio.run(run_jobs(srv.url, args.jobs, args.gap))
            db = sqlite3.connect(f"file:{srv.data_dir / constants.DB_FILE}?mode=ro", uri=True)
            rows = {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, created_at, started_at FROM jobs")}
            db.close()
        finally:
            srv.stop()

    created_to_tool = [(j["t_start"] - rows[j["id"]][0]) * 1e3 for j in jobs]
    send_to_tool = [(j["t_start"] - j["t_send"]) * 1e3 for j in jobs]
    created_to_started = [(rows[j["id"]][1] - rows[j["id"]][0]) * 1e3 for j in jobs]
    post_rtt = [(j["t_resp"] - j["t_send"]) * 1e3 for j in jobs]
    before_202 = sum(1 for j in jobs if j["t_start"] < j["t_resp"])
    print(f"\n{len(jobs)} jobs:")
    print(line("created_at -> tool called", created_to_tool, target=True))
    print(line("POST sent -> tool called", send_to_tool))
    print(line("created_at -> started_at", created_to_started))
    print(line("POST round trip (202)", post_rtt))
    print(f"  tool called before the client had the 202: {before_202}/{len(jobs)}")
    if args.profile:
        print(f"profile of the genq server: {args.profile}")


if __name__ == "__main__":
    main()
