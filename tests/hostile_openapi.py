"""Schemathesis over genq's whole OpenAPI document, as a function both hostile suites call:
tests/test_hostile_schemathesis.py (a ``genq up`` process) and tests/test_k8s_hostile_json.py
(``genq api`` on a real kube-apiserver).

Every operation of ``/openapi.json`` — routes added later included, since the document is
read at run time — gets requests generated from its schema, both valid (positive) and
schema-violating (negative) ones, with a mix of credentials: the admin key, a user key, an
unknown key and none. The answer is never a 5xx, every 4xx is the SPEC error body
(``{"error": {code, message, details}}`` with the code that goes with the status), every
2xx matches the schema and content type the spec documents for it.

Jobs that exist (one succeeded, one queued behind long ones, one failed) are also fed in
as ``job_id`` so the routes past the lookup (result, events, cancel, retry) are fuzzed too,
not only their 404. Generation is derandomized (same requests every run, no flaky CI); set
``GENQ_FUZZ_SEED`` to explore other ones.
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from dataclasses import dataclass, field

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, response_schema_conformance

from hostile import error_body_problem


@dataclass
class Budget:
    """How many examples to generate. ``examples``: per operation and generation mode
    (small operations such as ``/healthz`` run out of distinct inputs early, so the total
    is what is checked); ``body``: per body media type (multipart bodies cost ~100 ms each
    to generate); ``real_id``: per job route and real job id."""

    min_requests: int
    examples: int = 130
    body: dict = field(default_factory=lambda: {"multipart/form-data": 40, "application/json": 70})
    real_id: int = 15


@dataclass
class Outcome:
    count: collections.Counter
    statuses: collections.Counter
    problems: list[str]
    per_op: dict[str, int]
    elapsed: float


def real_jobs(url: str, admin: str, wait: float = 20) -> dict[str, str]:
    """A succeeded, a failed and a queued job of the admin key (the ``echo`` tool with 2
    slots: two long jobs hold them, a third waits): real ids to fuzz with."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=wait + 10) as c:
        done = c.post("/v1/jobs", json={"tool": "echo", "params": {"seed": 1}, "wait": wait}).json()
        failed = c.post("/v1/jobs", json={"tool": "echo", "params": {"bad": True}, "wait": wait}).json()
        for _ in range(2):
            c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 60}})
        queued = c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 60}}).json()
        assert done["status"] == "succeeded" and failed["status"] == "failed", (done, failed)
        return {"succeeded": done["id"], "failed": failed["id"], "queued": queued["id"]}


def fuzz(url: str, admin: str, user_key: str, real: dict[str, str], budget: Budget) -> Outcome:
    """Run schemathesis over every operation; the caller asserts on the outcome
    (``check``)."""
    spec = httpx.get(f"{url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=url)

    # Who calls: mostly the admin (reaches every route's logic), a user key (403 on admin
    # routes, 404 on the admin's jobs), an unknown key and none (401).
    identities = itertools.cycle(
        [{"Authorization": f"Bearer {admin}"}] * 12 + [{"X-API-Key": user_key}] * 4
        + [{"Authorization": "Bearer gq_not_a_key"}, {"X-API-Key": "\u00e9" * 10}] + [{}] * 2)
    session = requests.Session()
    count: collections.Counter = collections.Counter()
    statuses: collections.Counter = collections.Counter()
    problems: list[str] = []

    def call(case) -> None:
        who = next(identities)
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in ("authorization", "x-api-key")}
        headers.update(who)
        case.headers = headers
        try:
            t0 = time.perf_counter()
            r = case.call(session=session, timeout=15)
            count["call_ms"] += int((time.perf_counter() - t0) * 1000)
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
        for media_type in [b.media_type for b in op.body] or [None]:
            n = budget.body.get(media_type, budget.examples)
            run(op.as_strategy(GenerationMode.POSITIVE, media_type=media_type), n)
            # A path parameter that is any string cannot be violated: negative mode only
            # where there is a query or a body to break.
            if list(op.query) or media_type is not None:
                run(op.as_strategy(GenerationMode.NEGATIVE, media_type=media_type), n)
        if "{job_id}" in op.path:
            for state, job_id in real.items():
                if op.path.endswith("/events") and state == "queued":
                    continue  # an event stream stays open until the job ends
                run(op.as_strategy(path_parameters={"job_id": job_id}), budget.real_id)
        per_op[name] = count["requests"] - before
        print(f"{time.monotonic() - t0:6.1f}s {per_op[name]:5d} {name}", flush=True)
    # Should a schema change leave the total short, more rounds of fresh examples on the
    # operations with the most to vary (a query or a body) make it up.
    rich = [r.ok() for r in schema.get_all_operations() if list(r.ok().query) or list(r.ok().body)]
    for extra_round in range(1, 6):
        if count["requests"] >= budget.min_requests:
            break
        for op in rich:
            for media_type in [b.media_type for b in op.body] or [None]:
                run(op.as_strategy(GenerationMode.NEGATIVE, media_type=media_type), budget.examples // 2, extra_round)
        print(f"{time.monotonic() - t0:6.1f}s extra round {extra_round}: {count['requests']} requests", flush=True)
    out = Outcome(count, statuses, problems, per_op, time.monotonic() - t0)
    print(f"\nschemathesis: {count['requests']} requests in {out.elapsed:.1f}s "
          f"({count['requests'] / out.elapsed:.0f}/s), {count['unsendable']} not sendable by the client, calls {count['call_ms']} ms")
    print("statuses:", dict(sorted(statuses.items())))
    for name, n in per_op.items():
        print(f"  {n:5d}  {name}")
    return out


def check(out: Outcome, budget: Budget) -> None:
    assert not out.problems, f"{len(out.problems)} bad answers, first ones:\n" + "\n".join(out.problems[:15])
    assert out.count["requests"] >= budget.min_requests, out.per_op
    # every operation of the document was tried, so a route added later is fuzzed too
    assert all(n > 0 for n in out.per_op.values()), out.per_op
    assert not any(s >= 500 for s in out.statuses)
