"""Submit throughput: ``POST /v1/jobs`` on the real embedded genq vs a bare FastAPI endpoint.

Both servers run as their own process (uvicorn + httptools, same event loop), driven by
the same async httpx load generator: ``--concurrency`` clients on keep-alive connections
send ``--requests`` JSON submits per round; rounds alternate bare/genq so drift in a noisy
machine hits both. genq runs ``genq up``'s stack (nats-server with fsync'd JetStream,
SQLite, local blobs, housekeeping) and a no-op python tool whose worker runs the jobs as
they arrive (``genq (full)``); a second genq instance with that worker stopped
(``genq (api only)``) isolates the front door. Limits are raised out of the way.

    python bench/submit_throughput.py [--requests 2000] [--concurrency 16] [--rounds 3]

Target: genq (full) / bare >= 0.5 (median req/s over the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import AUTH, cpu_seconds, machine, median, pct, python_tool, self_cpu, start_bare, start_genq, workdir  # noqa: E402

TARGET = 0.5


async def load(url: str, total: int, concurrency: int, offset: int = 0) -> dict:
    """``total`` POSTs from ``concurrency`` clients; req/s, latencies, statuses."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    lat: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(total))

    async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=limits, timeout=60) as client:
        async def one_client() -> None:
            for i in counter:
                t = time.perf_counter()
                r = await client.post("/v1/jobs", json={"tool": "noop", "params": {"n": offset + i}})
                lat.append(time.perf_counter() - t)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        # Open every connection before the clock starts.
        await asyncio.gather(*(client.get("/healthz") for _ in range(concurrency)))
        c0 = self_cpu()
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        ccpu = self_cpu() - c0
    return {"rps": total / wall, "wall": wall, "p50": pct(lat, 50), "p99": pct(lat, 99), "statuses": statuses,
            "client_cpu": ccpu / wall}


async def measure(servers: dict, args: argparse.Namespace) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in servers}
    for name, srv in servers.items():  # warm-up: imports, caches, connections, JIT-free but lazy paths
        await load(srv.url, args.warmup, args.concurrency, offset=10_000_000)
    for rnd in range(args.rounds):
        for name, srv in servers.items():
            s0 = cpu_seconds(srv.pid)
            res = await load(srv.url, args.requests, args.concurrency, offset=rnd * args.requests)
            res["server_cpu"] = (cpu_seconds(srv.pid) - s0) / res["wall"]
            results[name].append(res)
            bad = {k: v for k, v in res["statuses"].items() if k != 202}
            print(f"  round {rnd + 1} {name:<16} {res['rps']:8.0f} req/s   p50 {res['p50'] * 1e3:6.1f} ms   "
                  f"p99 {res['p99'] * 1e3:6.1f} ms   server CPU {res['server_cpu']:.2f} cores   "
                  f"client CPU {res['client_cpu']:.2f}" + (f"   NON-202: {bad}" if bad else ""), flush=True)
            if bad:
                raise SystemExit(f"{name}: unexpected statuses {bad}; see the server log")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="requests per round and server")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="server event loop (both servers); auto: what genq up picks, uvloop where installed")
    p.add_argument("--no-api-only", action="store_true", help="skip the genq instance with its worker stopped")
    p.add_argument("--profile", type=Path, help="profile the genq (full) server with pyinstrument; text to this file")
    args = p.parse_args()

    print(f"submit throughput: {args.rounds} rounds x {args.requests} POST /v1/jobs, {args.concurrency} concurrent "
          f"clients, server loop {args.loop}; {machine()}")
    config = {"tools": [python_tool("noop", "benchtools:noop")]}
    with workdir() as work:
        servers = {"bare": start_bare(work, loop=args.loop),
                   "genq (full)": start_genq(work, config, loop=args.loop, profile=args.profile, name="genq-full")}
        if not args.no_api_only:
            servers["genq (api only)"] = start_genq(work, config, loop=args.loop, stop_workers="noop", name="genq-api")
        try:
            results = asyncio.run(measure(servers, args))
        finally:
            for srv in servers.values():
                srv.stop()

    med = {name: median([r["rps"] for r in rs]) for name, rs in results.items()}
    print("\nmedian over rounds:")
    cpu_per_req = {}
    for name, rs in results.items():
        # CPU per request of the server's whole process tree (genq: + nats-server), in ms:
        # a capacity figure that does not depend on who saturated first.
        cpu_per_req[name] = median([r["server_cpu"] / r["rps"] * 1e3 for r in rs])
        print(f"  {name:<16} {med[name]:8.0f} req/s   p50 {median([r['p50'] for r in rs]) * 1e3:6.1f} ms   "
              f"p99 {median([r['p99'] for r in rs]) * 1e3:6.1f} ms   server CPU {median([r['server_cpu'] for r in rs]):.2f} cores"
              f"   {cpu_per_req[name]:.2f} ms CPU/request   client CPU {median([r['client_cpu'] for r in rs]):.2f}")
    if median([r["client_cpu"] for r in results["bare"]]) > 0.9:
        print("  note: the load generator used a full core against bare, so bare's req/s is the client's ceiling, "
              "not the server's")
    ratio = med["genq (full)"] / med["bare"]
    print(f"\nratio genq (full) / bare = {ratio:.2f}   target >= {TARGET}: {'MET' if ratio >= TARGET else 'MISSED'}")
    if "genq (api only)" in med:
        print(f"ratio genq (api only) / bare = {med['genq (api only)'] / med['bare']:.2f}")
    for name in cpu_per_req:
        if name != "bare":
            print(f"server CPU per request {name} / bare = {cpu_per_req[name] / cpu_per_req['bare']:.1f}x")
    if args.profile:
        print(f"profile of the genq (full) server: {args.profile}")


if __name__ == "__main__":
    main()
