"""Rate limits under load (SPEC §3 "Limits"): one key hammered by 50 concurrent httpx clients
for a fixed window gets the configured rate, within 10%, and every refusal is a 429
``rate_limited`` with ``Retry-After`` and ``RateLimit-*`` headers; another key of the same
tier, calling at the same time, is never limited.

The server is a real ``genq up`` process with the standard tier set to 200 requests per 5
seconds (``GENQ_RATE_STANDARD``) instead of a minute, so the 15 s window holds three periods
of the moving window and the test stays short; the limiter is the same for any period. A
moving window lets N requests through in any period P: over a window of k periods that
is k x N, the configured rate times the window. A shorter period would measure the
clients instead: a client whose request is refused can only try again one round trip
later, which is lost time in every period.
"""

from __future__ import annotations

import asyncio
import collections
import time

import httpx
import pytest

from conftest import ADMIN
from hostile import GenqProcess, error_body_problem

LIMIT, PERIOD = 200, 5  # requests per period (seconds), per key
RATE = LIMIT / PERIOD
WINDOW = 3 * PERIOD  # seconds of hammering
CLIENTS = 50
PATHS = ["/v1/jobs", "/v1/tools", "/v1/queues", "/v1/queues/echo", "/v1/jobs?status=queued"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    g = GenqProcess(tmp_path_factory.mktemp("ratelimit"), env={"GENQ_RATE_STANDARD": f"{LIMIT}/{PERIOD} seconds",
                                                               "GENQ_LOG_LEVEL": "WARNING"}).start()
    try:
        yield g
    finally:
        g.stop()


@pytest.mark.slow
async def test_rate_limit_holds_under_50_concurrent_clients(server):
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}) as adm:
        hammered = (await adm.post("/v1/keys", json={"name": "hammered", "tier": "standard"})).json()["key"]
        bystander = (await adm.post("/v1/keys", json={"name": "bystander", "tier": "standard"})).json()["key"]
    statuses: collections.Counter = collections.Counter()
    problems: list[str] = []
    accepted_at: list[float] = []
    connected = asyncio.Barrier(CLIENTS + 1)
    start = deadline = 0.0

    async def hammer(i: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {hammered}"}, timeout=30) as c:
            assert (await c.get("/healthz")).status_code == 200  # connected (not rate limited)
            await connected.wait()
            while not deadline:  # set by clock() once everyone is connected
                await asyncio.sleep(0.001)
            n = i
            while time.monotonic() < deadline:
                r = await c.get(PATHS[n % len(PATHS)])
                n += 1
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    accepted_at.append(time.monotonic())
                    assert int(r.headers["ratelimit-limit"]) == LIMIT
                elif r.status_code == 429:
                    why = error_body_problem(429, r.headers.get("content-type", ""), r.text)
                    if why or r.json()["error"]["code"] != "rate_limited":
                        problems.append(f"429 body: {why or r.text[:200]}")
                    if not (r.headers.get("retry-after", "").isdigit() and r.headers.get("ratelimit-remaining") == "0"
                            and r.headers.get("ratelimit-limit") == str(LIMIT)):
                        problems.append(f"429 headers: {dict(r.headers)}")
                else:
                    problems.append(f"{r.status_code}: {r.text[:200]}")

    async def bystand() -> int:
        """Another key of the same tier, well under its rate: never limited."""
        limited = 0
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": bystander}, timeout=30) as c:
            while not deadline:
                await asyncio.sleep(0.01)
            while time.monotonic() < deadline:
                r = await c.get("/v1/jobs")
                limited += r.status_code == 429
                await asyncio.sleep(0.2)
        return limited

    async def clock() -> None:
        nonlocal start, deadline
        await connected.wait()
        start = time.monotonic()
        deadline = start + WINDOW

    results = await asyncio.gather(clock(), *(hammer(i) for i in range(CLIENTS)), bystand())
    elapsed = time.monotonic() - start
    total = sum(statuses.values())
    accepted = statuses[200]
    # What the server let through inside the window (answers to requests still in flight
    # at the deadline are counted where they landed).
    inside = sum(1 for t in accepted_at if t <= deadline)
    expected = RATE * WINDOW
    print(f"\nrate limit {LIMIT}/{PERIOD}s, {CLIENTS} clients for {WINDOW:.0f}s (ran {elapsed:.1f}s): {total} requests "
          f"({total / elapsed:.0f}/s), {accepted} accepted ({inside} inside the window; expected {expected:.0f}), "
          f"{statuses[429]} refused with 429; accepted per second {accepted / elapsed:.1f}")
    assert not problems, problems[:5]
    assert results[-1] == 0, "the bystander key was rate limited by another key's traffic"
    assert total > 3 * expected, f"only {total} requests: the clients did not push past the limit"
    assert abs(inside - expected) <= 0.10 * expected, (
        f"{inside} requests accepted in {WINDOW:.0f}s at a configured {RATE}/s: more than 10% off {expected:.0f}")
    assert accepted <= expected * 1.10 + RATE, f"{accepted} accepted in all"


async def test_the_window_storage_answers_as_the_library_does(monkeypatch):
    """``WindowStorage`` (a deque per key) against ``limits``' own in-memory storage, both under
    the library's moving-window strategy: the same verdict and the same window numbers for
    every hit of a random run over several keys, limits, costs and gaps (a clock the test
    moves, so the two see the same instants)."""
    import random

    from limits import parse
    from limits.aio.storage import MemoryStorage
    from limits.aio.strategies import MovingWindowRateLimiter

    from genq.api.auth import WindowStorage

    now = [1_700_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    ours, theirs = MovingWindowRateLimiter(WindowStorage()), MovingWindowRateLimiter(MemoryStorage())
    items = [parse("5/10 seconds"), parse("3/second"), parse("20/minute")]
    rng = random.Random(7)
    allowed = refused = 0
    for _ in range(3000):
        now[0] += rng.choice([0.0, 0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 5.0])
        item, key, cost = rng.choice(items), rng.choice("abc"), rng.choice([1, 1, 1, 2, 4])
        verdict = await ours.hit(item, key, cost=cost)
        assert verdict == await theirs.hit(item, key, cost=cost), (item, key, cost, now[0])
        allowed += verdict
        refused += not verdict
        a, b = await ours.get_window_stats(item, key), await theirs.get_window_stats(item, key)
        assert a.remaining == b.remaining, (item, key, a, b)
        if b.remaining < item.amount:  # an empty window has no oldest hit; the reset is "now"
            assert a.reset_time == b.reset_time, (item, key, a, b)
    assert allowed > 600 and refused > 600, (allowed, refused)  # both sides of the limit were exercised


async def test_the_window_storage_keeps_no_more_than_the_window(monkeypatch):
    """A hit costs the same at any limit: the window holds the hits of its period and no
    more, and a key whose window emptied is dropped by the next sweep."""
    from limits import parse
    from limits.aio.strategies import MovingWindowRateLimiter

    from genq.api.auth import WindowStorage

    now = [1_700_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    storage = WindowStorage()
    limiter = MovingWindowRateLimiter(storage)
    busy, once = parse("100000/minute"), parse("10/minute")
    assert await limiter.hit(once, "idle")
    for _ in range(120_000):  # 1,000 a second for two minutes: the window slides
        now[0] += 0.001
        assert await limiter.hit(busy, "busy")
    [hits] = [h for k, (h, _) in storage._windows.items() if "/busy/" in k]
    assert 59_900 <= len(hits) <= 60_010, len(hits)  # the last minute's hits only
    now[0] += 30
    assert await limiter.hit(busy, "busy")
    assert 29_900 <= len(hits) <= 30_010, len(hits)  # half a minute of them left the front
    now[0] += storage.SWEEP_SECONDS
    assert await limiter.hit(busy, "busy")
    assert not any("/idle/" in k for k in storage._windows), "an emptied key outlived the sweep"
