"""Soak: steady load for minutes; the genq process's RSS and open file descriptors
must stay flat.

One genq (the real embedded stack, its own process) with the python tool
``benchtools:png`` (2 worker slots; it returns a small PNG) and a short retention
(``resultTTLSeconds`` = ``--ttl``, 60 s by default), so jobs, their result files and
their rows are created, downloaded and deleted by housekeeping all through the run: after
the first minute the data is in a steady state, and anything that still grows is a leak.

The load comes from one client process (not the server's): ``--users`` clients, each in a
loop: submit a job, poll ``GET /v1/jobs/{id}`` every 0.1 s until it ended, download its
result, ``GET /v1/queues``, pause ``--pause`` s; every ``--sse-every``-th job is followed
over ``GET /v1/jobs/{id}/events`` instead of polled.

Every ``--sample`` seconds the script reads ``VmRSS`` from ``/proc/<pid>/status`` and
counts ``/proc/<pid>/fd`` for the genq process and its nats-server child. Reported:
start/end/min/max, and the least-squares slope per minute over the whole run and over
its second half (after warm-up effects: imports, caches, SQLite's page cache, the first
retention pass), with the jobs done and errors.

    python bench/soak.py [--minutes 2]      # quick
    python bench/soak.py --long             # 30 minutes
    python bench/soak.py --minutes 10 --tracemalloc   # and what grew, by allocation site
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import AUTH, _tree, machine, python_tool, start_genq, workdir  # noqa: E402

TERMINAL = {"succeeded", "failed", "cancelled"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return sxy / sxx * 60 if sxx else float("nan")


async def _users(url: str, args: argparse.Namespace, t_end: float) -> dict[str, Any]:
    done = 0
    errors: dict[str, int] = {}

    def err(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    limits = httpx.Limits(max_connections=args.users * 2, max_keepalive_connections=args.users * 2)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=limits, timeout=30) as c:
        async def follow_sse(job_id: str) -> str | None:
            status = None
            async with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                if r.status_code != 200:
                    err(f"events {r.status_code}")
                    return None
                async for line in r.aiter_lines():
                    if line.startswith("data:") and '"status"' in line:
                        for s in TERMINAL:
                            if f'"status": "{s}"' in line or f'"status":"{s}"' in line:
                                status = s
            return status

        async def user(k: int) -> None:
            nonlocal done
            i = 0
            while time.time() < t_end:
                i += 1
                try:
                    r = await c.post("/v1/jobs", json={"tool": "png", "params": {"n": k * 1_000_000 + i}})
                    if r.status_code != 202:
                        err(f"submit {r.status_code}")
                        await asyncio.sleep(1)
                        continue
                    job_id = r.json()["id"]
                    status = None
                    if args.sse_every and i % args.sse_every == 0:
                        status = await follow_sse(job_id)
                    deadline = time.time() + 60
                    while status not in TERMINAL and time.time() < deadline:
                        await asyncio.sleep(0.1)
                        g = await c.get(f"/v1/jobs/{job_id}")
                        if g.status_code != 200:
                            err(f"status {g.status_code}")
                            break
                        status = g.json()["status"]
                    if status != "succeeded":
                        err(f"job {status}")
                        continue
                    f = await c.get(f"/v1/jobs/{job_id}/result")
                    if f.status_code != 200 or not f.content.startswith(b"\x89PNG"):
                        err(f"result {f.status_code}")
                    q = await c.get("/v1/queues")
                    if q.status_code != 200:
                        err(f"queues {q.status_code}")
                    done += 1
                except httpx.HTTPError as e:
                    err(type(e).__name__)
                await asyncio.sleep(args.pause)

        await asyncio.gather(*(user(k) for k in range(args.users)))
    return {"done": done, "errors": errors}


def _client(url: str, args: argparse.Namespace, t_end: float, out: Any) -> None:
    out.put(asyncio.run(_users(url, args, t_end)))


def report(name: str, unit: str, pts: list[tuple[float, float]]) -> str:
    vals = [v for _, v in pts]
    half = [p for p in pts if p[0] >= pts[-1][0] / 2]
    return (f"  {name:<22} start {vals[0]:8.1f} {unit}   end {vals[-1]:8.1f} {unit}   min {min(vals):8.1f}   "
            f"max {max(vals):8.1f}   slope {slope_per_minute(pts):+7.3f} {unit}/min   "
            f"second half {slope_per_minute(half):+7.3f} {unit}/min")


def _tracemalloc_growth(work: Path, top: int = 15) -> str:
    import tracemalloc

    first, last = (tracemalloc.Snapshot.load(str(work / f"tracemalloc-{n}.snap")) for n in (1, 2))
    lines = [f"  {d.size_diff / 1024:+9.1f} KiB {d.count_diff:+7d} blocks  {d.traceback.format(limit=1)[0].strip()}"
             for d in last.compare_to(first, "lineno")[:top]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=2)
    p.add_argument("--long", action="store_true", help="30 minutes")
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--pause", type=float, default=0.2)
    p.add_argument("--sse-every", type=int, default=10)
    p.add_argument("--ttl", type=int, default=60, help="resultTTLSeconds of the tool")
    p.add_argument("--sample", type=float, default=5, help="seconds between samples")
    p.add_argument("--tracemalloc", action="store_true",
                   help="trace genq's allocations; print what grew between a third of the run and its end")
    args = p.parse_args()
    minutes = 30 if args.long else args.minutes
    seconds = minutes * 60
    print(f"soak: {minutes:g} min, {args.users} users (submit, poll, download, queues, pause {args.pause:g} s), "
          f"retention {args.ttl} s; {machine()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    config = {"tools": [python_tool("png", "benchtools:png", maxWorkers=2, resultTTLSeconds=args.ttl)]}
    ctx = mp.get_context("fork")
    with workdir() as work:
        srv = start_genq(work, config, tracemalloc=args.tracemalloc)
        shots: list[float] = [seconds / 3, seconds - 1] if args.tracemalloc else []
        try:
            nats = [p for p in _tree(srv.pid) if p != srv.pid]
            nats_pid = nats[0] if nats else None
            out = ctx.Queue()
            t0 = time.time()
            t_end = t0 + seconds
            client = ctx.Process(target=_client, args=(srv.url, args, t_end, out))
            client.start()
            samples: dict[str, list[tuple[float, float]]] = {"genq RSS": [], "genq open fds": [],
                                                             "nats-server RSS": [], "nats-server open fds": []}
            next_print = t0
            while True:
                now = time.time()
                samples["genq RSS"].append((now - t0, rss_mb(srv.pid)))
                samples["genq open fds"].append((now - t0, fds(srv.pid)))
                if nats_pid:
                    samples["nats-server RSS"].append((now - t0, rss_mb(nats_pid)))
                    samples["nats-server open fds"].append((now - t0, fds(nats_pid)))
                if now >= next_print:
                    print(f"  t={now - t0:6.0f} s   genq RSS {samples['genq RSS'][-1][1]:7.1f} MB   fds "
                          f"{samples['genq open fds'][-1][1]:4.0f}   load average {os.getloadavg()[0]:.2f}", flush=True)
                    next_print = now + 60
                if shots and now - t0 >= shots[0]:
                    shots.pop(0)
                    srv.proc.send_signal(__import__("signal").SIGUSR2)
                if now >= t_end:
                    break
                time.sleep(min(args.sample, max(0.0, t_end - time.time())))
            res = out.get(timeout=120)
            client.join(30)
            rows = None
            import sqlite3

            from genq import constants

            db = sqlite3.connect(f"file:{srv.data_dir / constants.DB_FILE}?mode=ro", uri=True)
            rows = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            db.close()
            blob_files = sum(len(f) for _, _, f in os.walk(srv.data_dir / constants.BLOBS_DIR))
            if args.tracemalloc:
                time.sleep(3)  # the last snapshot is being written
                growth = _tracemalloc_growth(work)
        finally:
            srv.stop()
    print(f"\n{minutes:g} min: {res['done']} jobs done ({res['done'] / seconds:.1f}/s), errors {sum(res['errors'].values())}"
          + (f" {res['errors']}" if res["errors"] else "") + f"; at the end {rows} job rows and {blob_files} blob files "
          f"(retention {args.ttl} s)")
    for name, pts in samples.items():
        if pts:
            print(report(name, "MB" if "RSS" in name else "fds", pts))
    if args.tracemalloc:
        print(f"\ngenq's Python allocations that grew from t={seconds / 3:.0f} s to the end (tracemalloc, by line):")
        print(growth)


if __name__ == "__main__":
    main()
