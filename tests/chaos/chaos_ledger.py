"""The history of a chaos run and the checks made on it.

A :class:`Ledger` records every submit and what came back: a 202 puts the job in the
ledger (it was accepted: it must never be lost); any other answer must be a SPEC error
body, and a 5xx other than 503 is a violation. A :class:`Load` task submits at a steady
rate; a :class:`History` task samples every job's status while faults happen and checks,
as it goes, that no accepted job ever disappears and that a terminal status never changes.
:func:`check` waits for the end and checks the whole run (see its docstring).

The tool is ``genq_testtools:echo``: deterministic, so each result is checked against the
bytes it must hold (``result.png`` is ``_png(seed)``; ``meta.json`` echoes the params).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from genq_testtools import _png

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")


@dataclass
class Accepted:
    id: str
    text: str
    seed: int
    at: float  # time.monotonic() when the 202 arrived


@dataclass
class Ledger:
    rng: random.Random
    accepted: dict[str, Accepted] = field(default_factory=dict)
    answers: Counter = field(default_factory=Counter)  # "202", "503 unavailable", "connect", "indeterminate", ...
    violations: list[str] = field(default_factory=list)
    # job id -> [(status, completed_at, attempts)] as sampled, deduplicated in order
    history: dict[str, list[tuple[str, str | None, int]]] = field(default_factory=dict)
    submitted: int = 0

    def violation(self, msg: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(msg)

    def record(self, r: httpx.Response, text: str, seed: int) -> None:
        if r.status_code in (200, 202):  # 200: a sync submit that ended inside its wait
            job = r.json()
            if job.get("status") not in (TERMINAL if r.status_code == 200 else ACTIVE + TERMINAL):
                self.violation(f"{r.status_code} with status {job.get('status')!r}")
            self.accepted[job["id"]] = Accepted(job["id"], text, seed, time.monotonic())
            self.answers[str(r.status_code)] += 1
            return
        try:
            body = r.json()
            ok = set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"} and body["error"]["message"]
            code = body["error"]["code"] if ok else None
        except ValueError:
            ok, code = False, None
        if not ok:
            self.violation(f"submit answered {r.status_code} without the SPEC error body: {r.text[:300]}")
        if r.status_code >= 500 and r.status_code not in (503, 507):
            self.violation(f"submit answered {r.status_code}: {r.text[:300]}")
        if "Traceback" in r.text:
            self.violation(f"a traceback in a body: {r.text[:300]}")
        self.answers[f"{r.status_code} {code}"] += 1

    def observe(self, job: dict) -> None:
        """One sample of a job's state; a terminal state, once seen, must never change."""
        seen = self.history.setdefault(job["id"], [])
        now = (job["status"], job["completed_at"], job["attempts"])
        if seen and seen[-1] == now:
            return
        if seen and seen[-1][0] in TERMINAL:
            self.violation(f"job {job['id']} left its terminal state: {seen[-1]} -> {now}")
        seen.append(now)

    def summary(self) -> str:
        final = Counter(h[-1][0] for jid, h in self.history.items() if jid in self.accepted)
        return (f"seed {getattr(self.rng, 'chaos_seed', '?')}: submitted {self.submitted}, answers {dict(self.answers)}, accepted {len(self.accepted)}, "
                f"final {dict(final)}")


class Load:
    """Submits ``echo`` jobs at a steady rate until stopped; every answer goes to the ledger.

    A request cut off after it was sent (the server died under it) is *indeterminate*: the
    job may or may not exist. It is counted but never required; a connection refused
    before sending is a plain refusal."""

    def __init__(self, ledger: Ledger, url: str, key: str, *, tool: str, rate: float, sleep: tuple[float, float],
                 slow: tuple[float, float] = (0.0, 0.0), image: str | None = None, prefix: str = "c"):
        self.ledger, self.url, self.key, self.tool, self.rate, self.sleep = ledger, url, key, tool, rate, sleep
        self.image = image  # a data: URI sent as the input of every other job
        self.slow = slow  # (fraction of jobs, their seconds of work): jobs that outlive several faults
        self.prefix = prefix
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.n = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chaos-load")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        rng = self.ledger.rng
        inflight: set[asyncio.Task] = set()
        async with httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"},
                                     timeout=httpx.Timeout(10, connect=2)) as c:
            next_at = time.monotonic()
            while not self._stop.is_set():
                self.n += 1
                text, seed = f"{self.prefix}{self.n}", rng.randrange(2**32)
                sleep = round(self.slow[1] if rng.random() < self.slow[0] else rng.uniform(*self.sleep), 3)
                inputs = {"image": self.image} if self.image and self.n % 2 else None
                t = asyncio.create_task(self._one(c, text, seed, sleep, inputs))
                inflight.add(t)
                t.add_done_callback(inflight.discard)
                next_at += 1 / self.rate
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - time.monotonic()))
            if inflight:
                await asyncio.wait(inflight, timeout=15)

    async def _one(self, c: httpx.AsyncClient, text: str, seed: int, sleep: float, inputs: dict | None) -> None:
        self.ledger.submitted += 1
        body = {"tool": self.tool, "params": {"text": text, "seed": seed, "sleep": sleep}}
        if inputs:
            body["inputs"] = inputs
        try:
            r = await c.post("/v1/jobs", json=body)
        except httpx.ConnectError:
            self.ledger.answers["connect refused"] += 1
            return
        except httpx.HTTPError as e:  # sent, then cut off or timed out: outcome unknown
            self.ledger.answers[f"indeterminate {type(e).__name__}"] += 1
            return
        self.ledger.record(r, text, seed)


async def list_all(c: httpx.AsyncClient) -> list[dict]:
    """Every job in the store (admin), oldest first."""
    jobs: list[dict] = []
    cursor = None
    while True:
        params = {"limit": 500, "order": "asc", "all": "true"}
        if cursor:
            params["cursor"] = cursor
        r = await c.get("/v1/jobs", params=params)
        r.raise_for_status()
        body = r.json()
        jobs += body["jobs"]
        cursor = body["next_cursor"]
        if not cursor:
            return jobs


class History:
    """Samples every job's state while the run goes on (skipping moments the API is down)
    and checks that each job accepted before a sample is in that sample: never lost."""

    def __init__(self, ledger: Ledger, url: str, key: str, interval: float = 0.3):
        self.ledger, self.url, self.key, self.interval = ledger, url, key, interval
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.samples = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chaos-history")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def sample(self, c: httpx.AsyncClient) -> list[dict] | None:
        t0 = time.monotonic()
        before = [a for a in self.ledger.accepted.values() if a.at < t0]
        try:
            jobs = await list_all(c)
        except (httpx.HTTPError, ValueError):
            return None
        self.samples += 1
        present = set()
        for j in jobs:
            present.add(j["id"])
            self.ledger.observe(j)
        for a in before:
            if a.id not in present:
                self.ledger.violation(f"accepted job {a.id} ({a.text}) is missing from the store")
        return jobs

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"},
                                     timeout=httpx.Timeout(10, connect=1)) as c:
            while not self._stop.is_set():
                await self.sample(c)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)


async def check(ledger: Ledger, url: str, key: str, data_dir: Path, *, timeout: float,
                allowed_failures: tuple[str, ...] = (), settle: float = 0.0, backlog=None) -> dict[str, int]:
    """The end of a run. Waits until every job in the store is terminal (failing after
    ``timeout`` seconds in which none ended), then checks, for every job that got a 202:

    - it is in the store, and its sampled history never left a terminal state;
    - it reached a terminal state: ``succeeded``, or ``failed`` with an error code in
      ``allowed_failures`` (e.g. ``worker_lost`` when its attempts all died); never
      ``cancelled`` (nobody cancels);
    - if succeeded: the result lists ``result.png`` and ``meta.json`` once each, the blob
      folder holds exactly those files (nothing half-written beside them), and both
      download intact: ``result.png`` has the bytes the tool makes from the seed (sha256,
      Content-Length and ETag), ``meta.json`` echoes this job's params;
    - nothing is left queued or running in the store — nor, if ``backlog`` (an async
      callable) is given, on the bus;
    - after ``settle`` more seconds (longer than the bus's redelivery time), nothing changed.

    Also: the SQLite file passes ``PRAGMA integrity_check``. Returns the final counts."""
    problems = list(ledger.violations)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        # `timeout` without progress: a backlog left by the faults may take a while to
        # drain on a busy machine, but it must keep draining.
        deadline = time.monotonic() + timeout
        left = None
        while True:
            try:
                jobs = await list_all(c)
            except httpx.HTTPError:
                jobs = None
            if jobs is not None:
                for j in jobs:
                    ledger.observe(j)
                active = sum(j["status"] in ACTIVE for j in jobs)
                if not active:
                    break
                if left is None or active < left:
                    left, deadline = active, time.monotonic() + timeout
            if time.monotonic() > deadline:
                stuck = Counter(j["status"] for j in jobs or [])
                problems.append(f"{timeout:.0f}s without progress and not every job ended: {dict(stuck)}; "
                                f"e.g. {[j for j in jobs or [] if j['status'] in ACTIVE][:3]}")
                break
            await asyncio.sleep(0.25)
        if settle:
            await asyncio.sleep(settle)
            again = {j["id"]: j for j in await list_all(c)}
            for j in jobs or []:
                ledger.observe(again.get(j["id"], j))
                if j["status"] in TERMINAL and j["id"] in again and \
                        (again[j["id"]]["status"], again[j["id"]]["completed_at"]) != (j["status"], j["completed_at"]):
                    problems.append(f"job {j['id']} changed after it ended: {j['status']} -> {again[j['id']]['status']}")
        by_id = {j["id"]: j for j in jobs or []}
        extra = set(by_id) - set(ledger.accepted)
        indeterminate = sum(n for k, n in ledger.answers.items() if k.startswith("indeterminate"))
        if len(extra) > indeterminate:
            problems.append(f"{len(extra)} jobs in the store that no 202 accounts for (only {indeterminate} "
                            f"submits were indeterminate): " + "; ".join(
                                f"{by_id[j]['params'].get('text')} {by_id[j]['status']} created {by_id[j]['created_at']} "
                                f"started {by_id[j]['started_at']}" for j in sorted(extra)[:5]))
        final: Counter = Counter()
        for a in ledger.accepted.values():
            job = by_id.get(a.id)
            if job is None:
                problems.append(f"accepted job {a.id} ({a.text}) is lost")
                continue
            final[job["status"]] += 1
            if job["status"] == "failed":
                code = (job["error"] or {}).get("code")
                if code not in allowed_failures:
                    problems.append(f"job {a.id} failed with {job['error']} (attempts {job['attempts']})")
                else:
                    final[f"failed {code}"] += 1
                continue
            if job["status"] != "succeeded":
                problems.append(f"job {a.id} ended {job['status']}: {job}")
                continue
            problems += await _check_result(c, job, a, data_dir)
        if backlog is not None:
            left = await backlog()
            if left:
                problems.append(f"{left} message(s) left on the bus after every job ended")
    problems += integrity(data_dir)
    assert not problems, f"{len(problems)} problem(s); {ledger.summary()}:\n" + "\n".join(problems[:40])
    return dict(final)


async def _check_result(c: httpx.AsyncClient, job: dict, a: Accepted, data_dir: Path) -> list[str]:
    out = []
    files = job["result"]["files"]
    names = [f["name"] for f in files]
    if sorted(names) != ["meta.json", "result.png"]:
        return [f"job {a.id} result files {names}"]
    if job["result"]["seed"] != a.seed:
        out.append(f"job {a.id} result seed {job['result']['seed']} != {a.seed}")
    folder = data_dir / "blobs" / "jobs" / a.id / "results"
    on_disk = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if on_disk != ["meta.json", "result.png"]:
        out.append(f"job {a.id} result folder holds {on_disk}")
    f = {x["name"]: x for x in files}
    png = await c.get(f["result.png"]["url"])
    want = _png(a.seed)
    digest = hashlib.sha256(want).hexdigest()
    if png.status_code != 200 or hashlib.sha256(png.content).hexdigest() != digest:
        out.append(f"job {a.id} result.png: {png.status_code}, {len(png.content)} bytes, not the tool's output")
    elif int(png.headers["content-length"]) != len(want) or f["result.png"]["size_bytes"] != len(want):
        out.append(f"job {a.id} result.png length: header {png.headers['content-length']}, listed {f['result.png']['size_bytes']}")
    elif png.headers.get("etag") != f'"{digest[:32]}"':
        out.append(f"job {a.id} result.png ETag {png.headers.get('etag')}")
    meta = await c.get(f["meta.json"]["url"])
    try:
        params = json.loads(meta.content)["params"]
        if params.get("text") != a.text or params.get("seed") != a.seed:
            out.append(f"job {a.id} meta.json holds another job's params: {params}")
    except (ValueError, KeyError):
        out.append(f"job {a.id} meta.json unreadable: {meta.status_code} {meta.content[:100]!r}")
    return out


def integrity(data_dir: Path) -> list[str]:
    db = data_dir / "genq.db"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        result = con.execute("PRAGMA integrity_check").fetchall()
    finally:
        con.close()
    return [] if result == [("ok",)] else [f"SQLite integrity_check: {result[:5]}"]
