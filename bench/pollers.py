"""Many pollers, some submitters: ``GET /v1/jobs/{id}`` latency while jobs are submitted.

One genq (the real embedded stack, its own process; tool ``noop`` with ``--slots``
worker slots that run the jobs as they arrive). Two client processes, so no client
CPU sits in the server's process (both use aiohttp: httpx's AsyncClient was the
bottleneck at 200 connections):
  * submitters: ``--submitters`` clients (default 20), each on its own keep-alive
    connection, each sending ``POST /v1/jobs`` then pausing ``--submit-interval`` s;
    every new job id is handed to the pollers;
  * pollers: ``--pollers`` clients (default 200), each on its own keep-alive
    connection, each polling one job with ``GET /v1/jobs/{id}`` every
    ``--poll-interval`` s (the first poll at a random offset so the 200 do not beat in
    step); when its job has ended it takes the newest job id it has not polled yet.
No pinning: the machine has 2 cores, and the OS spreads the server process (+ its
nats-server child) and the two client processes over both. Client and server CPU are
reported so it can be seen who was busy.

Before the clients start, one job per poller is submitted, so every poller has a job to
poll from its first request. After ``--warmup`` seconds the clock starts and runs
``--seconds``. Every request's latency is measured at the client; an error is any status other than 202 (submit) or
200 (status), or a request that raised (timeout, connection).

    python bench/pollers.py [--seconds 60] [--pollers 200] [--submitters 20]
                            [--poll-interval 0.5] [--submit-interval 0.5]

Targets: 0 errors; p99 of the status GETs <= 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import queue
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import AUTH, cpu_seconds, machine, pct, python_tool, self_cpu, start_genq, workdir  # noqa: E402

P99_TARGET_MS = 20.0
TERMINAL = {"succeeded", "failed", "cancelled"}


def _session(url: str, n: int) -> aiohttp.ClientSession:
    # aiohttp, not httpx: against the same server, httpx's AsyncClient took 6 ms a
    # sequential GET (aiohttp 0.8 ms) and fell to ~60 req/s with 200 connections, so it
    # measured itself, not the server.
    return aiohttp.ClientSession(url, headers=AUTH, connector=aiohttp.TCPConnector(limit=n),
                                 timeout=aiohttp.ClientTimeout(total=30))


async def _submitters(url: str, args: argparse.Namespace, ids: Any, t_start: float, t_end: float) -> dict[str, Any]:
    lat: list[float] = []
    errors: dict[str, int] = {}
    async with _session(url, args.submitters) as c:
        async def one(k: int) -> None:
            i = 0
            while time.time() < t_end:
                t = time.perf_counter()
                job_id = err = None
                try:
                    async with c.post("/v1/jobs", json={"tool": "noop", "params": {"n": k * 10_000_000 + i}}) as r:
                        body = await r.json()
                        if r.status == 202:
                            job_id = body["id"]
                        else:
                            err = str(r.status)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    err = type(e).__name__
                dt = (time.perf_counter() - t) * 1e3
                if time.time() >= t_start:
                    lat.append(dt)
                    if err:
                        errors[err] = errors.get(err, 0) + 1
                if job_id:
                    ids.put(job_id)
                i += 1
                await asyncio.sleep(args.submit_interval)

        await asyncio.gather(*(_get(c, "/healthz") for _ in range(args.submitters)))
        c0 = self_cpu()
        await asyncio.gather(*(one(k) for k in range(args.submitters)))
        cpu = self_cpu() - c0
    return {"lat": lat, "errors": errors, "cpu": cpu}


async def _get(c: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with c.get(path) as r:
        return r.status, await r.json()


async def _pollers(url: str, args: argparse.Namespace, ids: Any, t_start: float, t_end: float) -> dict[str, Any]:
    lat: list[float] = []
    errors: dict[str, int] = {}
    fresh: list[str] = []  # ids not polled yet, newest last
    statuses: dict[str, int] = {}

    def take() -> str | None:
        while True:
            try:
                fresh.append(ids.get_nowait())
            except queue.Empty:
                break
        return fresh.pop() if fresh else None

    async with _session(url, args.pollers) as c:
        async def one() -> None:
            job_id = None
            await asyncio.sleep(random.random() * args.poll_interval)
            while time.time() < t_end:
                if job_id is None:
                    job_id = take()
                    if job_id is None:
                        await asyncio.sleep(0.05)
                        continue
                t = time.perf_counter()
                status = err = None
                try:
                    code, body = await _get(c, f"/v1/jobs/{job_id}")
                    if code == 200:
                        status = body["status"]
                    else:
                        err = str(code)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    err = type(e).__name__
                dt = (time.perf_counter() - t) * 1e3
                if time.time() >= t_start:
                    lat.append(dt)
                    if err:
                        errors[err] = errors.get(err, 0) + 1
                    if status:
                        statuses[status] = statuses.get(status, 0) + 1
                if status in TERMINAL:
                    job_id = take() or job_id  # nothing newer yet: keep polling this one
                await asyncio.sleep(args.poll_interval)

        await asyncio.gather(*(_get(c, "/healthz") for _ in range(args.pollers)))
        c0 = self_cpu()
        await asyncio.gather(*(one() for _ in range(args.pollers)))
        cpu = self_cpu() - c0
    return {"lat": lat, "errors": errors, "cpu": cpu, "statuses": statuses}


def _child(kind: str, url: str, args: argparse.Namespace, ids: Any, out: Any, t_start: float, t_end: float) -> None:
    fn = _submitters if kind == "submit" else _pollers
    out.put((kind, asyncio.run(fn(url, args, ids, t_start, t_end))))


def line(name: str, lat: list[float], errors: dict[str, int], seconds: float) -> str:
    n = len(lat)
    err = sum(errors.values())
    return (f"  {name:<7} {n:7d} requests ({n / seconds:6.0f}/s)   p50 {pct(lat, 50):6.2f} ms   p99 {pct(lat, 99):6.2f} ms   "
            f"max {max(lat):7.1f} ms   errors {err} ({err / max(n, 1) * 100:.2f} %)" + (f" {errors}" if errors else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--pollers", type=int, default=200)
    p.add_argument("--submitters", type=int, default=20)
    p.add_argument("--poll-interval", type=float, default=0.5)
    p.add_argument("--submit-interval", type=float, default=0.5)
    p.add_argument("--slots", type=int, default=2, help="worker slots of the noop tool")
    p.add_argument("--profile", type=Path, help="profile the genq server with pyinstrument; text to this file")
    args = p.parse_args()
    print(f"pollers: {args.pollers} pollers every {args.poll_interval:g} s + {args.submitters} submitters every "
          f"{args.submit_interval:g} s, {args.seconds:g} s (+{args.warmup:g} s warm-up); {machine()}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    config = {"tools": [python_tool("noop", "benchtools:noop", maxWorkers=args.slots)]}
    ctx = mp.get_context("fork")  # nothing runs in this process yet: no loop, no threads of ours
    with workdir() as work:
        srv = start_genq(work, config, profile=args.profile)
        try:
            ids, out = ctx.Queue(), ctx.Queue()
            # One job per poller before the clock starts, so no poller sits on an idle
            # connection waiting for its first id (uvicorn closes those after 5 s).
            with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
                for i in range(args.pollers):
                    r = c.post("/v1/jobs", json={"tool": "noop", "params": {"n": 900_000_000 + i}})
                    r.raise_for_status()
                    ids.put(r.json()["id"])
            t_start = time.time() + args.warmup + 0.5
            t_end = t_start + args.seconds
            procs = [ctx.Process(target=_child, args=(k, srv.url, args, ids, out, t_start, t_end)) for k in ("submit", "poll")]
            for pr in procs:
                pr.start()
            while time.time() < t_start:
                time.sleep(0.01)
            s0 = cpu_seconds(srv.pid)
            while time.time() < t_end:
                time.sleep(0.05)
            server_cpu = (cpu_seconds(srv.pid) - s0) / args.seconds
            res = dict(out.get(timeout=120) for _ in procs)
            for pr in procs:
                pr.join(30)
        finally:
            srv.stop()
    sub, pol = res["submit"], res["poll"]
    print(f"\nover {args.seconds:g} s:")
    print(line("submit", sub["lat"], sub["errors"], args.seconds))
    print(line("status", pol["lat"], pol["errors"], args.seconds))
    print(f"  statuses seen by the pollers: {pol['statuses']}")
    print(f"  CPU (cores): server (genq + nats-server) {server_cpu:.2f}   submitters {sub['cpu'] / args.seconds:.2f}   "
          f"pollers {pol['cpu'] / args.seconds:.2f}   load average {os.getloadavg()[0]:.2f}")
    errors = sum(sub["errors"].values()) + sum(pol["errors"].values())
    p99 = pct(pol["lat"], 99)
    print(f"\ntargets: 0 errors {'MET' if errors == 0 else 'MISSED'} ({errors});   "
          f"status p99 <= {P99_TARGET_MS:g} ms {'MET' if p99 <= P99_TARGET_MS else 'MISSED'} ({p99:.2f} ms)")
    if args.profile:
        print(f"profile of the genq server: {args.profile}")


if __name__ == "__main__":
    main()
