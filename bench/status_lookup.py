"""Status lookup: ``GET /v1/jobs/{id}`` of a queued job (with its position) with an
empty queue vs with 100,000 queued jobs.

Two identical genq servers (real embedded stack, each its own process, default
housekeeping interval) with a python tool ``hold`` whose worker is stopped, so its jobs
stay queued. Each gets one job submitted over HTTP. The "full" one then gets ``--fill``
more real queued jobs (SQLite rows + JetStream messages), made by this process through
the same adapters the API uses — ``store.create`` → ``bus.publish_job`` →
``store.update(stream_seq)`` — on that server's SQLite file and NATS server. Then
``--gets`` sequential GETs go to each: the lone job (position 1) on the empty server;
jobs spread evenly through the queue (positions 1 … fill+1, each once, shuffled) on the
full one, alternating between the two in blocks so noise hits both alike. Latency is
measured at the client; every answer is checked (queued, right position).

    python bench/status_lookup.py [--fill 100000] [--gets 2000]

The fill is bound by JetStream's fsync per message (``sync_interval: always``): about
800 jobs/s here, so ~2 minutes for 100k; ``--fill-budget`` caps it.

Target: p99 with the full queue <= 2x p99 with the empty queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import sys
import time
from pathlib import Path

import httpx
from ulid import ULID

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ADMIN, AUTH, BENCH_SETTINGS, machine, pct, python_tool, start_genq, workdir  # noqa: E402

from genq import constants  # noqa: E402
from genq.models import Job, Priority  # noqa: E402
from genq.runtime import build_runtime  # noqa: E402
from genq.settings import Settings  # noqa: E402
from genq.tools import registry_from_dict  # noqa: E402

TARGET = 2.0


async def gets(c: httpx.AsyncClient, ids: list[str], expect_pos: dict[str, int] | None) -> list[float]:
    lat = []
    for job_id in ids:
        t = time.perf_counter()
        r = await c.get(f"/v1/jobs/{job_id}")
        lat.append((time.perf_counter() - t) * 1e3)
        if r.status_code != 200:
            raise SystemExit(f"GET {job_id}: {r.status_code} {r.text[:200]}")
        if expect_pos is not None:
            body = r.json()
            if body["status"] != "queued" or body["position"] != expect_pos[job_id]:
                raise SystemExit(f"GET {job_id}: expected queued at {expect_pos[job_id]}, got {body['status']} {body['position']}")
    return lat


async def fill(rt, n: int, concurrency: int, budget: float) -> list[str]:
    """n real queued jobs, exactly as JobService.submit stores and publishes them. Stops
    early (and says so) after ``budget`` seconds, so the benchmark ends by itself."""
    ids: list[str] = []
    spec = rt.registry.get("hold")
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            job = Job(id=str(ULID()), owner=constants.BOOTSTRAP_ADMIN_KEY_ID, tool="hold", variant=spec.default_variant,
                      priority=Priority.NORMAL, params={"n": i}, max_attempts=spec.max_attempts,
                      deadline_seconds=spec.active_deadline_seconds, ttl_seconds=spec.result_ttl_seconds)
            job = await rt.store.create(job)
            seq = await rt.bus.publish_job("hold", job.priority.value, job.id, f"{job.id}.{job.seq}")
            await rt.store.update(job.id, stream_seq=seq)
            ids.append(job.id)

    t0 = time.perf_counter()
    step = 5000
    for lo in range(0, n, step):
        await asyncio.gather(*(one(i) for i in range(lo, min(n, lo + step))))
        done = min(n, lo + step)
        if done % 20000 == 0 or done == n:
            print(f"  filled {done:>7} jobs  ({done / (time.perf_counter() - t0):.0f} jobs/s)", flush=True)
        if done < n and time.perf_counter() - t0 > budget:
            print(f"  fill budget of {budget:g} s used up: measuring with {done} queued jobs, not {n}", flush=True)
            break
    return ids


def line(name: str, ms: list[float]) -> str:
    return f"  {name:<34} p50 {pct(ms, 50):6.2f} ms   p99 {pct(ms, 99):6.2f} ms   max {max(ms):7.2f} ms"


async def run(empty_srv, full_srv, config: dict, args: argparse.Namespace) -> tuple[list[float], list[float], dict]:
    async with httpx.AsyncClient(base_url=empty_srv.url, headers=AUTH, timeout=60) as ce, \
            httpx.AsyncClient(base_url=full_srv.url, headers=AUTH, timeout=60) as cf:
        firsts = []
        for c in (ce, cf):
            r = await c.post("/v1/jobs", json={"tool": "hold", "params": {"n": 0}})
            assert r.status_code == 202, r.text
            firsts.append(r.json()["id"])
        lone, first = firsts

        # The filler: a second process on the same SQLite file and NATS server, like a
        # second API replica would be.
        settings = Settings(data_dir=full_srv.data_dir, admin_key=ADMIN, **BENCH_SETTINGS)
        nats_url = (full_srv.data_dir / "nats.url").read_text().strip()
        rt = build_runtime(settings, registry_from_dict(config), nats_url)
        await rt.open()
        try:
            t0 = time.perf_counter()
            ids = await fill(rt, args.fill, args.fill_concurrency, args.fill_budget)
            fill_s = time.perf_counter() - t0
            backlog = await rt.bus.backlog("hold")
        finally:
            await rt.close()
        # The queue order is the store's seq (ids were appended in completion order).
        db = sqlite3.connect(f"file:{full_srv.data_dir / constants.DB_FILE}?mode=ro", uri=True)
        seqs = dict(db.execute("SELECT id, seq FROM jobs WHERE tool = 'hold' AND status = 'queued'"))
        db.close()
        order = sorted([first, *ids], key=seqs.__getitem__)
        position = {job_id: i + 1 for i, job_id in enumerate(order)}

        t = time.perf_counter()
        await gets(cf, [order[-1]], None)  # the first read brings the server's position index up to date
        first_read_ms = (time.perf_counter() - t) * 1e3
        q = (await cf.get("/v1/queues/hold")).json()
        info = {"fill_seconds": fill_s, "queued_api": q["queued"], "jetstream_pending": backlog,
                "queued_sqlite": len(seqs), "first_read_ms": first_read_ms}
        print(f"  queue now: {q['queued']} queued (API), {len(seqs)} queued rows (SQLite), {backlog} pending in "
              f"JetStream; fill took {fill_s:.1f} s", flush=True)

        k = args.gets
        sample = [order[round(i * (len(order) - 1) / (k - 1))] for i in range(k)]
        random.Random(1).shuffle(sample)
        await gets(ce, [lone] * args.warmup, None)
        await gets(cf, sample[: args.warmup], None)
        # Interleaved blocks, so the machine's noise falls on both cases alike.
        empty: list[float] = []
        full: list[float] = []
        block = max(1, k // args.blocks)
        for lo in range(0, k, block):
            ids_block = sample[lo:lo + block]
            empty += await gets(ce, [lone] * len(ids_block), {lone: 1})
            full += await gets(cf, ids_block, position)
        print(line("empty queue (position 1)", empty), flush=True)
        print(line(f"{len(order)} queued (positions 1..{len(order)})", full), flush=True)
    return empty, full, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fill", type=int, default=100_000)
    p.add_argument("--gets", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--blocks", type=int, default=10, help="the GETs alternate between the two servers in this many blocks")
    p.add_argument("--fill-concurrency", type=int, default=256)
    p.add_argument("--fill-budget", type=float, default=140, help="seconds; the fill stops early past this")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--profile", type=Path, help="profile the genq server with pyinstrument; text to this file")
    args = p.parse_args()
    print(f"status lookup: {args.gets} sequential GET /v1/jobs/{{id}} of queued jobs, empty queue vs {args.fill} queued; "
          f"server loop {args.loop}; {machine()}")
    config = {"tools": [python_tool("hold", "benchtools:noop")]}
    with workdir() as work:
        # Two identical servers (default settings except the limits; housekeeping every
        # 1 s as genq up runs it): one keeps a single queued job, the other gets the fill.
        empty_srv = start_genq(work, config, stop_workers="hold", loop=args.loop, name="genq-empty")
        try:
            full_srv = start_genq(work, config, stop_workers="hold", loop=args.loop, profile=args.profile, name="genq-full")
            try:
                empty, full, info = asyncio.run(run(empty_srv, full_srv, config, args))
            finally:
                full_srv.stop()
        finally:
            empty_srv.stop()
    ratio = pct(full, 99) / pct(empty, 99)
    print(f"\nratio p99 full / p99 empty = {ratio:.2f}   target <= {TARGET:g}: {'MET' if ratio <= TARGET else 'MISSED'}")
    print(f"(p50 ratio {pct(full, 50) / pct(empty, 50):.2f}; first read after the fill, which syncs the server's "
          f"position index, took {info['first_read_ms']:.0f} ms)")
    print(json.dumps({"empty": {"p50": pct(empty, 50), "p99": pct(empty, 99)}, "full": {"p50": pct(full, 50), "p99": pct(full, 99)},
                      **info}))
    if args.profile:
        print(f"profile of the genq server: {args.profile}")


if __name__ == "__main__":
    main()
