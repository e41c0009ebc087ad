"""Adversarial JSON (tests/hostile_json.py) against a real ``genq up`` process, on every
endpoint that takes JSON or form fields: the JSON submit (direct path and route), the
multipart submit's ``params`` and form fields, keys and warm.

Every answer is a 4xx with the SPEC error body (a poisoned document) or an ordinary
success, never a 5xx, a refusal within 100 ms; a well-behaved client beside the fuzzer is
served all along; a burst of 1,000 hostile requests adds no traceback and no error line
to the log (genq logs nothing for a client's mistake); the server's memory stays put.
The figures (requests per endpoint family, statuses, the slowest answer, RSS before and
after) are printed for BENCHMARKS.md. Derandomized; ``GENQ_FUZZ_SEED`` explores others.
The same checks run in cluster mode in tests/test_k8s_hostile_json.py.
"""

from __future__ import annotations

import pytest

from conftest import ADMIN
from hostile import GenqProcess, tools
from hostile_json import SHAPE_TOOL, burst_and_check, fuzz_and_check

EXAMPLES = 1000


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


@pytest.mark.slow
def test_adversarial_json_is_refused_fast_and_the_server_serves_others(server):
    fuzz_and_check(server.url, ADMIN, EXAMPLES, server.rss_kb)
    assert server.alive()


@pytest.mark.slow
def test_a_burst_of_1000_hostile_requests_logs_no_traceback(server):
    burst_and_check(server.url, ADMIN, server.log, server.rss_kb)
    assert server.alive()
