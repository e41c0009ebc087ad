"""Schemathesis against genq's own OpenAPI spec, served by a real ``genq up`` process.

Every operation of ``/openapi.json`` gets requests generated from its schema, both valid
(positive) and schema-violating (negative) ones, with a mix of credentials: the admin key,
a user key, an unknown key and none. At least 2,000 requests per run; the answer is never a
5xx, every 4xx is the SPEC error body (``{"error": {code, message, details}}`` with the code
that goes with the status), every 2xx matches the schema and content type the spec
documents for it, and the server still serves afterwards.

Jobs that exist (one succeeded, one queued behind a long one, one failed) are also fed in
as ``job_id`` so the routes past the lookup (result, events, cancel, retry) are fuzzed too,
not only their 404. Generation is derandomized (same requests every run, no flaky CI); set
``GENQ_FUZZ_SEED`` to explore other ones.
"""

from __future__ import annotations

import collections
import itertools
import os
import time

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, response_schema_conformance

from conftest import ADMIN
from hostile import GenqProcess, error_body_problem

MIN_REQUESTS = 2000
#: Examples per operation and generation mode; small operations (``/healthz``) run out of
#: distinct inputs early, so the total is checked, not this.
EXAMPLES = 130
#: Per body media type: multipart bodies cost ~100 ms each to generate.
EXAMPLES_BODY = {"multipart/form-data": 40, "application/json": 70}
#: Examples of the job routes with each real job id (only ``{name}`` still varies).
EXAMPLES_REAL_ID = 15


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    g = GenqProcess(tmp_path_factory.mktemp("schemathesis"), env={"GENQ_LOG_LEVEL": "WARNING"}).start()
    try:
        yield g
    finally:
        g.stop()


def _jobs(url: str) -> dict[str, str]:
    """A succeeded, a failed and a queued job of the admin key: real ids to fuzz with."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as c:
        done = c.post("/v1/jobs", json={"tool": "echo", "params": {"seed": 1}, "wait": 20}).json()
        failed = c.post("/v1/jobs", json={"tool": "echo", "params": {"bad": True}, "wait": 20}).json()
        # echo has 2 workers: two long jobs hold them, a third waits in the queue
        for _ in range(2):
            c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 60}})
        queued = c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 60}}).json()
        assert done["status"] == "succeeded" and failed["status"] == "failed", (done, failed)
        return {"succeeded": done["id"], "failed": failed["id"], "queued": queued["id"]}


def test_openapi_references_all_resolve(server):
    """Every ``$ref`` points at a component that exists: an unresolvable one made schemathesis
    (and any generated client) drop the JSON body of ``POST /v1/jobs``."""
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    refs: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"], ref
    op = schemathesis.openapi.from_dict(spec)["/v1/jobs"]["POST"]
    assert sorted(b.media_type for b in op.body) == ["application/json", "multipart/form-data"]


@pytest.mark.slow
def test_generated_requests_never_5xx_and_errors_are_the_spec_body(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as c:
        user_key = c.post("/v1/keys", json={"name": "fuzz-user"}).json()["key"]
        spec = c.get("/openapi.json").json()
    real = _jobs(server.url)
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=server.url)

    # Who calls: mostly the admin (reaches every route's logic), a user key (403 on admin
    # routes, 404 on the admin's jobs), an unknown key and none (401).
    identities = itertools.cycle(
        [{"Authorization": f"Bearer {ADMIN}"}] * 12 + [{"X-API-Key": user_key}] * 4
        + [{"Authorization": "Bearer gq_not_a_key"}, {"X-API-Key": "\u00e9" * 10}] + [{}] * 2)
    session = requests.Session()
    count = collections.Counter()
    statuses = collections.Counter()
    problems: list[str] = []

    def call(case) -> None:
        who = next(identities)
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in ("authorization", "x-api-key")}
        headers.update(who)
        case.headers = headers
        try:
            _t = time.perf_counter()
            r = case.call(session=session, timeout=15)
            count["call_ms"] += int((time.perf_counter() - _t) * 1000)
        except requests.exceptions.InvalidHeader:
            count["unsendable"] += 1  # requests refuses to send it (e.g. a newline in a header)
            return
        except (requests.ConnectionError, requests.Timeout) as e:
            problems.append(f"{case.method} {case.formatted_path}: no answer ({e!r}); {case.as_curl_command()[:300]}")
            return
        count["requests"] += 1
        statuses[r.status_code] += 1
        text = r.content.decode("utf-8", "replace")
        if r.status_code >= 500:
            problems.append(f"{case.method} {case.formatted_path} -> {r.status_code} {text[:200]}; {case.as_curl_command()[:400]}")
        elif r.status_code >= 400:
            why = error_body_problem(r.status_code, (r.headers.get("content-type") or [""])[0], text)
            if why:
                problems.append(f"{case.method} {case.formatted_path} -> {r.status_code} not the SPEC body ({why}): "
                                f"{text[:200]}; {case.as_curl_command()[:400]}")
        else:  # a success matches what the spec documents for it
            try:
                case.validate_response(r, checks=[response_schema_conformance, content_type_conformance])
            except BaseException as e:  # noqa: BLE001 - schemathesis raises a FailureGroup
                problems.append(f"{case.method} {case.formatted_path} -> {r.status_code} not as documented: {str(e)[:400]}")

    fuzz_seed = int(os.environ.get("GENQ_FUZZ_SEED", "0"))

    def run(strategy, examples: int, extra_round: int = 0) -> None:
        @seed(fuzz_seed * 1000 + extra_round)
        @settings(max_examples=examples, deadline=None, database=None, derandomize=fuzz_seed == 0 and not extra_round,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def one(case):
            call(case)

        try:
            one()
        except Unsatisfiable:
            count["unsatisfiable"] += 1  # nothing to violate (no parameters, no body)

    t0 = time.monotonic()
    per_op: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        name = f"{op.method.upper()} {op.path}"
        before = count["requests"]
        media_types = [b.media_type for b in op.body] or [None]
        for media_type in media_types:
            n = EXAMPLES_BODY.get(media_type, EXAMPLES)
            run(op.as_strategy(GenerationMode.POSITIVE, media_type=media_type), n)
            # A path parameter that is any string cannot be violated: negative mode only
            # where there is a query or a body to break.
            if list(op.query) or media_type is not None:
                run(op.as_strategy(GenerationMode.NEGATIVE, media_type=media_type), n)
        if "{job_id}" in op.path:
            for state, job_id in real.items():
                if op.path.endswith("/events") and state == "queued":
                    continue  # an event stream stays open until the job ends
                run(op.as_strategy(path_parameters={"job_id": job_id}), EXAMPLES_REAL_ID)
        per_op[name] = count["requests"] - before
        print(f"{time.monotonic() - t0:6.1f}s {per_op[name]:5d} {name}", flush=True)
    # Should a schema change leave the total short, more rounds of fresh examples on the
    # operations with the most to vary (a query or a body) make it up.
    rich = [r.ok() for r in schema.get_all_operations() if list(r.ok().query) or list(r.ok().body)]
    for extra_round in range(1, 6):
        if count["requests"] >= MIN_REQUESTS:
            break
        for op in rich:
            for media_type in [b.media_type for b in op.body] or [None]:
                run(op.as_strategy(GenerationMode.NEGATIVE, media_type=media_type), EXAMPLES // 2, extra_round)
        print(f"{time.monotonic() - t0:6.1f}s extra round {extra_round}: {count['requests']} requests", flush=True)
    elapsed = time.monotonic() - t0

    print(f"\nschemathesis: {count['requests']} requests in {elapsed:.1f}s "
          f"({count['requests'] / elapsed:.0f}/s), {count['unsendable']} not sendable by the client, calls {count['call_ms']} ms")
    print("statuses:", dict(sorted(statuses.items())))
    for name, n in per_op.items():
        print(f"  {n:5d}  {name}")
    assert not problems, f"{len(problems)} bad answers, first ones:\n" + "\n".join(problems[:15])
    assert count["requests"] >= MIN_REQUESTS, per_op
    assert not any(s >= 500 for s in statuses)
    # still serving, and the real jobs are intact
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10) as c:
        assert c.get("/readyz").status_code == 200
        assert c.get(f"/v1/jobs/{real['succeeded']}").json()["status"] == "succeeded"
        r = c.post("/v1/jobs", json={"tool": "upscale", "variant": "lanczos", "params": {"scale": 2},
                                     "inputs": {"image": _tiny_png_uri()}, "wait": 20})
        assert r.status_code in (200, 429), r.text  # 429: the fuzzer may have filled the queue
    assert server.alive()


def _tiny_png_uri() -> str:
    from conftest import data_uri, png_bytes

    return data_uri(png_bytes())
