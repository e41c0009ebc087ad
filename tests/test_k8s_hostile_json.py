"""The hostile suites in cluster mode: ``genq api`` as its own process against the real
kube-apiserver of the ``control_plane`` fixture (jobs are GenerationJobs, keys are Secrets,
tools are the namespace's ToolPools, one pool worker runs as the pod would).

Schemathesis over the whole OpenAPI document (tests/hostile_openapi.py) and the
adversarial JSON of tests/hostile_json.py, each with fewer generated requests than in
embedded mode, and the same 1,000-request burst."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path

import pytest
import yaml

from genq import constants
from hostile_json import SHAPE_TOOL, burst_and_check, fuzz_and_check
from hostile_openapi import Budget, check, fuzz, real_jobs
from k8s.controlplane import control_plane  # noqa: F401  (the session fixture)
from helpers import wait_until as eventually
from k8s.cluster import ADMIN, Cluster, echo_pool

pytestmark = pytest.mark.k8s

EXAMPLES = 400
OPENAPI_BUDGET = Budget(min_requests=600, examples=40, body={"multipart/form-data": 15, "application/json": 25},
                        real_id=5)


def shape_pool() -> dict:
    """The pool of a tool with JSON-typed params (form fields read as JSON)."""
    pool = echo_pool()
    pool["metadata"]["name"] = "shape"
    pool["spec"]["tool"] = copy.deepcopy(SHAPE_TOOL["tool"])
    return pool


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("VmRSS")


class HostileCluster(Cluster):
    """The cluster of test_k8s_cluster_mode, with rate limits out of the way: every
    hostile request must reach the JSON checks, not stop at a 429."""

    def env(self, role: str, **extra: str) -> dict[str, str]:
        return super().env(role, GENQ_RATE_STANDARD="1000000/minute", GENQ_RATE_PREMIUM="1000000/minute", **extra)


@pytest.fixture(scope="module")
def cluster(control_plane, tmp_path_factory):  # noqa: F811
    c = HostileCluster(control_plane, f"genq-hj-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("hostile-json-k8s"))
    try:
        c.start()
        control_plane.kubectl("apply", "-n", c.ns, "-f", "-", input=yaml.safe_dump_all([echo_pool(), shape_pool()]))
        with c.client() as h:  # the API sees both pools before the fuzzing starts
            eventually(lambda: {t["name"] for t in h.get("/v1/tools").json()["tools"]} >= {"echo", "shape"}, 30, "the pools")
        deployment = f"/apis/apps/v1/namespaces/{c.ns}/deployments/{constants.worker_deployment_name('echo')}"
        eventually(lambda: c.get(deployment) is not None, 30, "the operator to make the echo pool's Deployment")
        c.run_worker_pod()  # the echo pool's worker: real jobs succeed, fail and queue
        yield c
    finally:
        c.stop()


def test_schemathesis_over_the_whole_document_against_genq_api(cluster):
    """First in the module: the jobs it needs are submitted before the JSON fuzzing's
    bystander fills the admin key's queue."""
    with cluster.client() as c:
        r = c.post("/v1/keys", json={"name": "fuzz-user"})
        assert r.status_code == 201, r.text
        user_key = r.json()["key"]
    real = real_jobs(cluster.url, ADMIN, wait=40)
    check(fuzz(cluster.url, ADMIN, user_key, real, OPENAPI_BUDGET), OPENAPI_BUDGET)
    with cluster.client() as c:
        assert c.get("/readyz").status_code == 200
        assert c.get(f"/v1/jobs/{real['succeeded']}").json()["status"] == "succeeded"
    assert cluster.procs["api"].alive()


def test_adversarial_json_against_genq_api_on_the_apiserver(cluster):
    api = cluster.procs["api"]
    fuzz_and_check(cluster.url, ADMIN, EXAMPLES, lambda: rss_kb(api.proc.pid))
    assert api.alive()


def test_a_burst_of_1000_hostile_requests_logs_no_traceback_in_cluster_mode(cluster):
    api = cluster.procs["api"]
    burst_and_check(cluster.url, ADMIN, api.output, lambda: rss_kb(api.proc.pid))
    assert api.alive()
