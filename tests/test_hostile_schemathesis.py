"""Schemathesis against genq's own OpenAPI spec, served by a real ``genq up`` process.

At least 2,000 requests over every operation of the document (tests/hostile_openapi.py
says how they are generated and checked): never a 5xx, every 4xx the SPEC error body,
every 2xx as documented, and the server still serves afterwards. The same fuzzing runs in
cluster mode in tests/test_k8s_hostile_json.py.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis

from conftest import ADMIN
from hostile import GenqProcess
from hostile_openapi import Budget, check, fuzz, real_jobs

BUDGET = Budget(min_requests=2000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    g = GenqProcess(tmp_path_factory.mktemp("schemathesis"), env={"GENQ_LOG_LEVEL": "WARNING"}).start()
    try:
        yield g
    finally:
        g.stop()


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
    real = real_jobs(server.url, ADMIN)
    check(fuzz(server.url, ADMIN, user_key, real, BUDGET), BUDGET)
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
