"""Supporting micro-benchmark: cost of the SQLite store's per-request and per-pass
queries against table size. Rows are bulk-inserted straight into the jobs table (same
schema, through ``SQLiteStore.open``), then each call is timed through the adapter.

    python bench/store_queries.py [--sizes 10000,100000]

Two tables per size: all rows ``succeeded`` (a busy tool within its retention window)
and all rows ``queued`` (a deep backlog). Shows which calls grow with the table:
``counts`` (every submit, via the queue limit check) and ``recent_durations`` (every
2 s per tool, for ETAs) with finished jobs; ``due`` (every housekeeping pass) with
queued jobs; ``create`` should stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from genq.adapters.sqlite import SQLiteStore, _encode_data
from genq.models import Job, Priority


def rows(lo: int, hi: int, status: str, now: float):
    for i in range(lo, hi):
        j = Job(id=f"J{i:09d}", owner="admin", tool="t", variant="default", priority=Priority.NORMAL, params={"n": i})
        done = status == "succeeded"
        yield (j.id, "admin", "t", "default", "normal", 1, status, i + 1, 1, i + 1, now - 10,
               now - 5 if done else None, now - 4 if done else None, now + 3600 if done else None, None, None,
               i + 1, 1 if done else 0, 1.0 if done else 0.0, None, None, _encode_data(j))


async def timed(fn, n: int = 21) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


async def one(status: str, sizes: list[int], work: Path) -> None:
    path = work / f"{status}.db"
    store = SQLiteStore(path)
    await store.open()
    db = sqlite3.connect(path)
    have = 0
    k = 0
    try:
        for size in sizes:
            now = time.time()
            db.executemany(
                "INSERT INTO jobs (id, owner, tool, variant, priority, prank, status, seq, version, rev, created_at, "
                "started_at, completed_at, expires_at, heartbeat_at, deadline_at, stream_seq, attempts, progress, seed, "
                "worker, data) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows(have, size, status, now))
            db.commit()
            have = size
            await store._sync(full=True)

            async def create() -> None:
                nonlocal k
                k += 1
                await store.create(Job(id=f"X{k:09d}", owner="other", tool="other", variant="default",
                                       priority=Priority.NORMAL, params={}))

            calls = {
                "counts(tool)": lambda: store.counts("t"),
                "recent_durations(tool)": lambda: store.recent_durations("t"),
                "due()": lambda: store.due(time.time(), heartbeat_before=time.time() - 47, unpublished_before=time.time() - 5),
                "create()": create,
            }
            for name, fn in calls.items():
                print(f"  {size:>7} {status:<9} rows   {name:<24} median {await timed(fn):7.2f} ms", flush=True)
    finally:
        db.close()
        await store.close()


async def main(sizes: list[int]) -> None:
    work = Path(tempfile.mkdtemp(prefix="genq-bench-store-"))
    try:
        for status in ("succeeded", "queued"):
            await one(status, sizes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    a = p.parse_args()
    print("store query cost vs table size (SQLite adapter, one connection)")
    asyncio.run(main([int(x) for x in a.sizes.split(",")]))
