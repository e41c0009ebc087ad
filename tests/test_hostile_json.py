"""Adversarial JSON (tests/hostile_json.py) against a real ``genq up`` process, on every
endpoint that takes JSON or form fields: the JSON submit (direct path and route), the
multipart submit's ``params`` and form fields, keys and warm.

Every answer is a 4xx with the SPEC error body (a poisoned document) or an ordinary
success, never a 5xx, always within 100 ms; a well-behaved client beside the fuzzer is
served all along; a burst of 1,000 hostile requests adds no traceback and no error line
to the log (genq logs nothing for a client's mistake); the server's memory stays put.
The figures (requests per endpoint family, statuses, the slowest answer, RSS before and
after) are printed for BENCHMARKS.md. Derandomized; ``GENQ_FUZZ_SEED`` explores others.
"""

from __future__ import annotations

import os
import time

import pytest

from conftest import ADMIN
from hostile import GenqProcess, tools
from hostile_json import FAST_SECONDS, SHAPE_TOOL, Bystander, Fuzzer, burst

FUZZ_SEED = int(os.environ.get("GENQ_FUZZ_SEED", "0"))
EXAMPLES = 500


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = tools(maxQueued=100_000)
    config["tools"].append(SHAPE_TOOL)
    # INFO, genq's default level: what an operator's log would get
    g = GenqProcess(tmp_path_factory.mktemp("hostile-json"), config=config, env={"GENQ_LOG_LEVEL": "INFO"}).start()
    try:
        yield g
    finally:
        g.stop()


def report(name: str, fuzzer: Fuzzer, elapsed: float, rss: tuple[int, int] | None = None) -> None:
    s = fuzzer.stats
    print(f"\n{name}: {sum(s.requests.values())} requests in {elapsed:.1f}s, {s.resent} resent once for time")
    for family, n in sorted(s.requests.items()):
        took, what = s.slowest.get(family, (0.0, ""))
        print(f"  {family:16s} {n:5d} requests, slowest {took * 1000:6.1f} ms ({what})")
    print("  statuses:", dict(sorted(s.statuses.items())))
    if rss:
        print(f"  server RSS {rss[0] / 1024:.1f} MiB before, {rss[1] / 1024:.1f} MiB after")


@pytest.mark.slow
def test_adversarial_json_is_refused_fast_and_the_server_serves_others(server):
    fuzzer = Fuzzer(server.url, ADMIN)
    rss_before = server.rss_kb()
    t0 = time.monotonic()
    with Bystander(server.url, ADMIN) as bystander:
        fuzzer.fuzz(EXAMPLES, FUZZ_SEED)
    elapsed = time.monotonic() - t0
    rss_after = server.rss_kb()
    report("hostile JSON", fuzzer, elapsed, (rss_before, rss_after))
    lat = sorted(bystander.latencies)
    print(f"  bystander: {len(lat)} calls, median {lat[len(lat) // 2] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")
    s = fuzzer.stats
    assert not s.problems, f"{len(s.problems)} bad answers, first ones:\n" + "\n".join(s.problems[:10])
    assert not any(code >= 500 for code in s.statuses)
    assert set(s.requests) == {"jobs-json", "jobs-json-route", "jobs-multipart", "keys", "warm"}
    assert sum(n for code, n in s.statuses.items() if 400 <= code < 500) > EXAMPLES // 2
    assert not bystander.failures, bystander.failures[:5]
    assert len(lat) > 10 and lat[len(lat) // 2] < 0.5
    # Memory: parsed documents are garbage once answered (a 100,000-key body is refused
    # before it is parsed); allow for the allocator's arenas and the jobs it accepted.
    assert rss_after - rss_before < 100 * 1024, (rss_before, rss_after)
    assert server.alive()


@pytest.mark.slow
def test_a_burst_of_1000_hostile_requests_logs_no_traceback(server):
    fuzzer = Fuzzer(server.url, ADMIN)
    before = server.log()
    rss_before = server.rss_kb()
    t0 = time.monotonic()
    requests = burst()
    for req in requests:
        fuzzer.send(req)
    elapsed = time.monotonic() - t0
    report("burst", fuzzer, elapsed, (rss_before, server.rss_kb()))
    time.sleep(0.5)  # let the server's log handler flush
    added = server.log()[len(before):]
    lines = [line for line in added.splitlines() if line.strip()]
    print(f"  log lines added: {len(lines)}")
    s = fuzzer.stats
    assert sum(s.requests.values()) == len(requests) == 1000
    assert not s.problems, f"{len(s.problems)} bad answers, first ones:\n" + "\n".join(s.problems[:10])
    assert all(400 <= code < 500 for code in s.statuses), s.statuses
    assert "Traceback" not in added and 'File "' not in added, added[-3000:]
    assert not [line for line in lines if " ERROR " in line or " CRITICAL " in line or "Exception" in line], lines[:5]
    assert len(lines) <= len(requests)  # one line at most per refused request
    assert max(took for took, _ in s.slowest.values()) <= FAST_SECONDS
