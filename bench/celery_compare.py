"""genq side by side with Celery + Redis: the same no-op jobs, the same worker concurrency.

In one run, for each round (the order alternates between rounds so drift in a noisy
machine hits every system), each system gets fresh servers, ``--warmup`` jobs that are
waited for, then ``--jobs`` jobs enqueued by one client process (this one) as fast as it
can, and run by workers with ``--concurrency`` slots in total:

  * ``genq``: the real embedded stack (``genq up``: nats-server with fsync'd JetStream,
    SQLite, local blobs, housekeeping) in its own process, with the python tool
    ``benchtools:stamp`` on ``maxWorkers = --concurrency`` slots. The client is an async
    HTTP client (aiohttp; ``--client httpx`` for httpx, which costs ~2.5x the client CPU)
    with ``--clients`` keep-alive connections sending ``POST /v1/jobs``.
  * ``genq split`` (``--split``): the same genq with its embedded worker stopped and a
    ``genq worker --tool stamp --slots N`` process beside it (the CLI's worker role against
    the running genq's data folder) — the API and the worker on their own cores.
  * ``celery/<redis mode>``: ``redis-server`` (Debian's package, started here on a free
    port) as broker and result backend, and ``celery -A celery_app worker --concurrency N``
    (prefork pool). The client calls ``send_task`` in a loop (Celery's client is
    synchronous). Redis modes (``--redis``): ``default`` (Redis' own defaults: RDB
    snapshots, no append-only file — an acknowledged enqueue can be lost on a crash),
    ``everysec`` (AOF, fsync once a second: up to ~1 s of enqueues can be lost) and
    ``always`` (AOF, fsync on every write: the durability genq has by default).

Each task/tool records ``time.time()`` when it is called. Reported per system: jobs/s end
to end (first enqueue → the last job's completion time as the system recorded it;
genq ``completed_at``, Celery ``date_done``), the client's enqueue rate, enqueue→start
latency (client clock before the call → the tool's start; same machine, same clock)
p50/p99/max, and server CPU per job (whole process trees: genq + nats-server; Celery
worker + its pool processes + redis-server).

    python bench/celery_compare.py [--jobs 20000] [--concurrency 4] [--rounds 1] [--split]
                                   [--redis default,everysec,always] [--profile OUT]

Target: genq >= 1.0x Celery's end-to-end jobs/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import AUTH, BENCH, cpu_by_process, cpu_seconds, free_port, machine, median, pct, python_tool, self_cpu, start_genq, workdir  # noqa: E402

from genq import constants  # noqa: E402

TOOL = "stamp"
REDIS_MODES = {
    "default": [],
    "everysec": ["--appendonly", "yes", "--appendfsync", "everysec"],
    "always": ["--appendonly", "yes", "--appendfsync", "always"],
}
REDIS_INSTALL = "apt-get install -y redis-server"


# -- processes ----------------------------------------------------------------------------
class Proc:
    """A child process started in its own session, stopped by its PID (then its group)."""

    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log = proc, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Pool processes left behind by a worker that did not stop in time: its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, **extra}


def start_redis(work: Path, mode: str, name: str) -> tuple[Proc, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit(f"redis-server is not installed; install Debian's package: {REDIS_INSTALL}")
    import redis

    port = free_port()
    d = work / name
    d.mkdir()
    log = work / f"{name}.log"
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--daemonize", "no",
            "--logfile", str(log), *REDIS_MODES[mode]]
    proc = Proc(subprocess.Popen(args, cwd=str(d), start_new_session=True, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL), log)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.exceptions.ConnectionError):
            if redis.Redis.from_url(url).ping():
                return proc, url
        if proc.proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"redis-server did not start; see {log}")


def start_celery_worker(work: Path, url: str, concurrency: int, name: str) -> Proc:
    ready = work / f"{name}.ready"
    log = work / f"{name}.log"
    args = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool", "prefork",
            "--concurrency", str(concurrency), "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
            "--hostname", f"{name}@%h"]
    proc = Proc(subprocess.Popen(args, cwd=str(BENCH), env=_env(BENCH_REDIS_URL=url, BENCH_READY_FILE=str(ready)),
                                 stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True), log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ready.exists():
            return proc
        if proc.proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"celery worker did not start; see {log}:\n{log.read_text()[-3000:]}")


def start_genq_worker(work: Path, data_dir: Path, config: dict[str, Any], slots: int) -> Proc:
    cfg = work / "genq-worker.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    log = work / "genq-worker.log"
    exe = Path(sys.executable).with_name("genq")
    args = [str(exe), "worker", "--tool", TOOL, "--data-dir", str(data_dir), "--config", str(cfg), "--slots", str(slots)]
    proc = subprocess.Popen(args, cwd=str(work), env=_env(GENQ_LOG_LEVEL="WARNING"), stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ready" not in line:
        Proc(proc, log).stop()
        raise RuntimeError(f"genq worker did not start; see {log}:\n{log.read_text()[-3000:]}")
    return Proc(proc, log)


# -- genq ---------------------------------------------------------------------------------
async def genq_enqueue(url: str, jobs: int, clients: int, offset: int, client: str = "aiohttp") -> dict[str, Any]:
    if client == "httpx":
        return await _genq_enqueue_httpx(url, jobs, clients, offset)
    import aiohttp

    sent: dict[str, float] = {}
    bad: dict[int, int] = {}
    counter = iter(range(jobs))
    async with aiohttp.ClientSession(url, headers=AUTH, connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=120)) as c:
        async def one() -> None:
            for i in counter:
                t = time.time()
                async with c.post("/v1/jobs", json={"tool": TOOL, "params": {"n": offset + i}}) as r:
                    body = await r.json()
                    if r.status != 202:
                        bad[r.status] = bad.get(r.status, 0) + 1
                        continue
                sent[body["id"]] = t

        async def healthz() -> None:
            async with c.get("/healthz") as r:
                await r.read()

        await asyncio.gather(*(healthz() for _ in range(clients)))
        c0 = self_cpu()
        t0 = time.time()
        await asyncio.gather(*(one() for _ in range(clients)))
        t_enq = time.time()
        ccpu = self_cpu() - c0
        if bad:
            raise SystemExit(f"genq: unexpected statuses {bad}")
        while True:  # every job finished?
            async with c.get(f"/v1/queues/{TOOL}") as r:
                q = await r.json()
            if q["queued"] == 0 and q["active"] == 0:
                break
            await asyncio.sleep(0.1)
        t_obs = time.time()
    return {"sent": sent, "t0": t0, "t_enq": t_enq, "t_obs": t_obs, "client_cpu": ccpu}


async def _genq_enqueue_httpx(url: str, jobs: int, clients: int, offset: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    sent: dict[str, float] = {}
    bad: dict[int, int] = {}
    counter = iter(range(jobs))
    async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=limits, timeout=120) as c:
        async def one() -> None:
            for i in counter:
                t = time.time()
                r = await c.post("/v1/jobs", json={"tool": TOOL, "params": {"n": offset + i}})
                if r.status_code != 202:
                    bad[r.status_code] = bad.get(r.status_code, 0) + 1
                    continue
                sent[r.json()["id"]] = t

        await asyncio.gather(*(c.get("/healthz") for _ in range(clients)))
        c0 = self_cpu()
        t0 = time.time()
        await asyncio.gather(*(one() for _ in range(clients)))
        t_enq = time.time()
        ccpu = self_cpu() - c0
        if bad:
            raise SystemExit(f"genq: unexpected statuses {bad}")
        while True:  # every job finished?
            q = (await c.get(f"/v1/queues/{TOOL}")).json()
            if q["queued"] == 0 and q["active"] == 0:
                break
            await asyncio.sleep(0.1)
        t_obs = time.time()
    return {"sent": sent, "t0": t0, "t_enq": t_enq, "t_obs": t_obs, "client_cpu": ccpu}


def genq_records(data_dir: Path, sent: dict[str, float]) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{data_dir / constants.DB_FILE}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, status, completed_at, data FROM jobs").fetchall()
    finally:
        db.close()
    out = []
    for job_id, status, completed_at, data in rows:
        if job_id not in sent:
            continue  # warm-up
        meta = json.loads(data).get("result_meta") or {}
        t_start = (meta.get("metrics") or {}).get("t_start")
        out.append({"ok": status == "succeeded", "t_send": sent[job_id], "t_start": t_start, "t_done": completed_at})
    return out


def run_genq(work: Path, args: argparse.Namespace, rnd: int, split: bool) -> dict[str, Any]:
    name = f"genq{'-split' if split else ''}-r{rnd}"
    config = {"tools": [python_tool(TOOL, "benchtools:stamp", maxWorkers=args.concurrency,
                                    options={"isolation": args.isolation})]}
    srv = start_genq(work, config, name=name, stop_workers=TOOL if split else "",
                     profile=args.profile.with_name(f"{args.profile.name}.{name}") if args.profile else None)
    procs = [srv.pid]
    worker = None
    try:
        if split:
            worker = start_genq_worker(work, srv.data_dir, config, args.concurrency)
            procs.append(worker.pid)
        if args.warmup:
            asyncio.run(genq_enqueue(srv.url, args.warmup, args.clients, offset=10_000_000, client=args.client))
        s0, by0 = sum(cpu_seconds(p) for p in procs), _by_process(procs)
        res = asyncio.run(genq_enqueue(srv.url, args.jobs, args.clients, offset=0, client=args.client))
        res["server_cpu"] = sum(cpu_seconds(p) for p in procs) - s0
        res["cpu_by"] = _by_process(procs, by0)
        res["records"] = genq_records(srv.data_dir, res.pop("sent"))
    finally:
        if worker is not None:
            worker.stop()
        srv.stop()
    return res


# -- Celery -------------------------------------------------------------------------------
def celery_enqueue(url: str, jobs: int, offset: int) -> dict[str, Any]:
    import redis

    from celery_app import make_app

    app = make_app(url)
    r = redis.Redis.from_url(url)
    sent: dict[str, float] = {}
    app.send_task("noop", args=(-1,)).get(timeout=30)  # connections and pools opened
    c0 = self_cpu()
    t0 = time.time()
    for i in range(jobs):
        t = time.time()
        sent[app.send_task("noop", args=(offset + i,)).id] = t
    t_enq = time.time()
    ccpu = self_cpu() - c0
    pending = [f"celery-task-meta-{i}" for i in sent]
    metas: dict[str, bytes] = {}
    while pending:  # every task finished?
        if r.llen("celery") == 0:
            still = []
            for k in range(0, len(pending), 2000):
                chunk = pending[k:k + 2000]
                for key, val in zip(chunk, r.mget(chunk)):
                    if val is None:
                        still.append(key)
                    else:
                        metas[key] = val
            pending = still
        if pending:
            time.sleep(0.1)
    t_obs = time.time()
    records = []
    for task_id, t_send in sent.items():
        m = json.loads(metas[f"celery-task-meta-{task_id}"])
        ok = m["status"] == "SUCCESS"
        records.append({"ok": ok, "t_send": t_send, "t_start": m["result"] if ok else None,
                        "t_done": datetime.fromisoformat(m["date_done"]).timestamp()})
    app.close()
    return {"t0": t0, "t_enq": t_enq, "t_obs": t_obs, "client_cpu": ccpu, "records": records}


def run_celery(work: Path, args: argparse.Namespace, rnd: int, mode: str) -> dict[str, Any]:
    redis_proc, url = start_redis(work, mode, f"redis-{mode}-r{rnd}")
    worker = None
    try:
        worker = start_celery_worker(work, url, args.concurrency, f"celery-{mode}-r{rnd}")
        if args.warmup:
            celery_enqueue(url, args.warmup, offset=10_000_000)
        s0, by0 = cpu_seconds(worker.pid) + cpu_seconds(redis_proc.pid), _by_process([worker.pid, redis_proc.pid])
        res = celery_enqueue(url, args.jobs, offset=0)
        res["server_cpu"] = cpu_seconds(worker.pid) + cpu_seconds(redis_proc.pid) - s0
        res["cpu_by"] = _by_process([worker.pid, redis_proc.pid], by0)
    finally:
        if worker is not None:
            worker.stop()
        redis_proc.stop()
    return res


def _by_process(pids: list[int], before: dict[str, float] | None = None) -> dict[str, float]:
    """CPU seconds per process name over the trees of ``pids``, minus ``before``."""
    now: dict[str, float] = {}
    for pid in pids:
        for name, sec in cpu_by_process(pid).items():
            now[name] = now.get(name, 0.0) + sec
    return {name: sec - (before or {}).get(name, 0.0) for name, sec in now.items()}


# -- report -------------------------------------------------------------------------------
def summarize(res: dict[str, Any], jobs: int) -> dict[str, float]:
    recs = res["records"]
    failed = sum(1 for r in recs if not r["ok"])
    done = [r for r in recs if r["ok"]]
    lat = [(r["t_start"] - r["t_send"]) * 1e3 for r in done]
    last = max(r["t_done"] for r in recs)
    e2e = last - res["t0"]
    return {
        "jobs": len(recs), "failed": failed, "missing": jobs - len(recs),
        "e2e_jps": len(done) / e2e, "e2e_s": e2e, "enq_jps": jobs / (res["t_enq"] - res["t0"]),
        "observed_s": res["t_obs"] - res["t0"],
        "p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat),
        "cpu_ms_per_job": res["server_cpu"] / jobs * 1e3, "client_cpu_ms_per_job": res["client_cpu"] / jobs * 1e3,
        "cpu_by": {name: sec / jobs * 1e3 for name, sec in res.get("cpu_by", {}).items()},
    }


def fmt(name: str, s: dict[str, float]) -> str:
    bad = f"   FAILED {s['failed']} MISSING {s['missing']}" if s["failed"] or s["missing"] else ""
    return (f"  {name:<17} e2e {s['e2e_jps']:7.0f} jobs/s ({s['e2e_s']:6.1f} s)   enqueue {s['enq_jps']:6.0f}/s   "
            f"enqueue->start p50 {s['p50']:8.1f} ms  p99 {s['p99']:8.1f} ms   "
            f"server CPU {s['cpu_ms_per_job']:.2f} ms/job   client CPU {s['client_cpu_ms_per_job']:.2f} ms/job{bad}"
            + ("\n" + " " * 20 + "server CPU by process (ms/job): "
               + ", ".join(f"{n} {v:.2f}" for n, v in sorted(s["cpu_by"].items(), key=lambda kv: -kv[1]) if v >= 0.005)
               if s.get("cpu_by") else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=20000, help="jobs per system and round (use e.g. 2000 for a quick run)")
    p.add_argument("--concurrency", type=int, default=4, help="worker slots in total, the same on every system")
    p.add_argument("--clients", type=int, default=16, help="genq: concurrent HTTP connections of the client")
    p.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp",
                   help="genq's HTTP client (the figures in BENCHMARKS.md run A/B used httpx)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--redis", default="default,everysec,always", help="Redis durability modes for Celery, in order")
    p.add_argument("--split", action="store_true", help="also run genq with its worker in a separate process")
    p.add_argument("--isolation", choices=["thread", "process"], default="thread",
                   help="genq: where the tool runs (options.isolation; process = a child process per slot, "
                        "as Celery's prefork pool)")
    p.add_argument("--only", choices=["genq", "genq-split", "celery"],
                   help="run one system only (profiling); genq-split: only genq with its worker in its own process")
    p.add_argument("--profile", type=Path, help="profile the genq server with pyinstrument; text to this file")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, data)")
    args = p.parse_args()
    modes = [m for m in args.redis.split(",") if m]
    unknown = set(modes) - set(REDIS_MODES)
    if unknown:
        raise SystemExit(f"unknown redis mode(s) {sorted(unknown)}; choose from {sorted(REDIS_MODES)}")
    if args.only in (None, "celery") and shutil.which("redis-server") is None:
        print(f"redis-server is not installed; install Debian's package: {REDIS_INSTALL}", file=sys.stderr)
        raise SystemExit(2)

    systems: list[tuple[str, Any]] = []
    if args.only in (None, "genq"):
        systems.append(("genq", lambda w, r: run_genq(w, args, r, split=False)))
    if args.only == "genq-split" or (args.only in (None, "genq") and args.split):
        systems.append(("genq split", lambda w, r: run_genq(w, args, r, split=True)))
    if args.only in (None, "celery"):
        for m in modes:
            systems.append((f"celery/{m}", lambda w, r, m=m: run_celery(w, args, r, m)))

    print(f"genq vs Celery+Redis: {args.rounds} round(s) x {args.jobs} no-op jobs per system, {args.concurrency} worker "
          f"slots each, genq client {args.client}, {args.clients} connections; {machine()}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in systems}
    with workdir(keep=args.keep) as work:
        if args.keep:
            print(f"work folder: {work}")
        for rnd in range(args.rounds):
            order = systems if rnd % 2 == 0 else systems[::-1]
            for name, run in order:
                s = summarize(run(work, rnd), args.jobs)
                results[name].append(s)
                print(f"round {rnd + 1}" + fmt(name, s) + f"   (load avg {os.getloadavg()[0]:.2f})", flush=True)

    keys = ["e2e_jps", "e2e_s", "enq_jps", "p50", "p99", "max", "cpu_ms_per_job", "client_cpu_ms_per_job", "failed", "missing"]
    med = {name: {k: median([r[k] for r in rs]) for k in keys} for name, rs in results.items()}
    print(f"\nmedian over {args.rounds} round(s):")
    for name, s in med.items():
        print(fmt(name, s))
    if "genq" in med:
        for name in med:
            if name.startswith("celery/"):
                ratio = med["genq"]["e2e_jps"] / med[name]["e2e_jps"]
                verdict = "MET" if ratio >= 1.0 else "MISSED"
                print(f"ratio genq / {name} end-to-end jobs/s = {ratio:.2f}   target >= 1.0: {verdict}")
                if "genq split" in med:
                    print(f"ratio genq split / {name} end-to-end jobs/s = {med['genq split']['e2e_jps'] / med[name]['e2e_jps']:.2f}")
    if args.profile:
        print(f"profiles of the genq servers: {args.profile}.<system>-r<round>")
    if any(s["failed"] or s["missing"] for s in med.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
