"""The chart on a real node: `helm install charts/genq`, and the pods start from genq's own
images (tests/k8s/build-images.sh) on a real kubelet + containerd (tests/k8s/node.py).

NATS and S3 run on the host at the node's address (tests/k8s/release.py says why). The
worker image is docker/worker.Dockerfile without the ML extra plus the tests' python tools
(tests/k8s/worker-test.Dockerfile).

Everything goes through the API's Service (its ClusterIP, reached from the host through
kube-proxy's rules), kubectl and helm: what a platform engineer sees.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from helm.helmbin import helm_bin  # noqa: F401  (the session fixture)
from k8s import node as nodes
from k8s.node import node, wait_for  # noqa: F401  (node: the session fixture)
from genq.operator import scaling
from k8s.release import RELEASE, Release, installed, png

pytestmark = [pytest.mark.node, pytest.mark.k8s]

@pytest.fixture(scope="module")
def release(node, helm_bin, tmp_path_factory) -> Iterator[Release]:  # noqa: F811
    with installed(node, helm_bin, tmp_path_factory.mktemp("node-release")) as rel:
        yield rel


def test_a_node_started_and_stopped_leaves_the_host_as_it_was():
    """Runs before the session's node (the first test of the first node module): a whole
    cycle, pods included, then firewall, links, routes, mounts, cgroups, namespaces,
    sysctls and host paths compared with before (running_node raises HostChanged)."""
    nodes.require_prerequisites()
    try:
        cm = nodes.running_node(blocking=False)
        with cm as n:
            n.kubectl("run", "cycle", "--image", n.images["pause"], "--restart=Never")
            wait_for(lambda: n.kubectl("get", "pod", "cycle", "-o", "jsonpath={.status.phase}").stdout == "Running",
                     60, what="a pod running")
    except BlockingIOError:
        pytest.fail("another node holds the machine's lock: run this test before the session's node starts")


def test_pods_ready_readyz_through_the_service_and_pools_listed(release):
    for component in ("api", "operator"):
        pods = release.pods(component)
        assert pods and all(any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"])
                            for p in pods), release.debug()
    assert len(release.pods("api")) == 2  # the chart's default replicas
    with httpx.Client(base_url=release.api_url, timeout=10) as c:
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"] == {"store": "ok", "bus": "ok", "object_storage": "ok"}
    table = release.kubectl("get", "tpool")
    header, *rows = table.splitlines()
    assert header.split() == ["NAME", "TOOL", "MIN", "MAX", "READY", "QUEUED", "RUNNING", "AGE"], table
    by_name = {r.split()[0]: r.split() for r in rows}
    assert by_name["echo"][1:4] == ["echo", "0", "3"] and by_name["upscale"][1] == "upscale", table
    # Status columns are filled by the operator (not <none>).
    wait_for(lambda: "<none>" not in release.kubectl("get", "tpool"), 60, what="tpool status columns")


# -- jobs -------------------------------------------------------------------------------------


def submit(c: httpx.Client, text: str, sleep: float = 0, **extra) -> dict:
    r = c.post("/v1/jobs", json={"tool": "echo", "params": {"text": text, "sleep": sleep, **extra}})
    assert r.status_code == 202, r.text
    return r.json()


def wait_job(c: httpx.Client, job_id: str, timeout: float = 180, status: str = "succeeded") -> dict:
    def done():
        job = c.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None
    job = wait_for(done, timeout, 0.2, what=f"job {job_id}")
    assert job["status"] == status, job
    return job


def worker_replicas(release: Release, tool: str) -> int:
    return release.get("deployment", f"{tool}-workers")["spec"].get("replicas", 0)


def running_pods(release: Release, tool: str) -> list[dict]:
    return [p for p in release.pods("worker", tool) if p["status"].get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")]


def test_a_job_scales_the_pool_from_zero_and_runs_in_a_worker_pod(release):
    wait_for(lambda: worker_replicas(release, "echo") == 0 and not release.pods("worker", "echo"), 120,
             what="echo pool at 0")
    key = release.new_key(name="from-zero", tier="premium")
    with release.client(key) as c:
        job = submit(c, "from-zero")
        done = wait_job(c, job["id"])
        r = c.get(f"/v1/jobs/{job['id']}/result")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (16, 16)
        assert int(r.headers["content-length"]) == len(r.content)
    assert done["attempts"] == 1
    # It ran in a pod of the worker image, started by the operator's scale-up.
    pods = release.pods("worker", "echo")
    assert pods and pods[0]["spec"]["containers"][0]["image"] == release.node.images["worker-test"]
    gjob = release.kubectl("get", "gjob")
    header, *rows = gjob.splitlines()
    assert header.split() == ["NAME", "TOOL", "VARIANT", "STATUS", "PROGRESS", "ATTEMPTS", "AGE"], gjob
    row = next(r.split() for r in rows if r.split()[0].endswith(job["id"].lower()) or job["id"].lower() in r)
    # STATUS is the Succeeded condition's reason (SPEC §5): Completed.
    assert row[1] == "echo" and row[3] == "Completed" and row[5] == "1", gjob


def test_a_backlog_runs_on_three_worker_pods_then_the_pool_returns_to_zero(release):
    key = release.new_key(name="backlog", tier="premium", max_queued=50)
    with release.client(key) as c:
        long = submit(c, "long", sleep=55)
        jobs = [submit(c, f"b{i}", sleep=1.5) for i in range(20)]
        peak = wait_for(lambda: len(running_pods(release, "echo")) >= 3 and 3, 180, what="3 running worker pods")
        assert peak == 3
        for _ in range(20):  # never more than maxWorkers pods
            assert len(release.pods("worker", "echo")) <= 3
            time.sleep(0.25)
        finished = [wait_job(c, j["id"]) for j in jobs]
        assert all(j["attempts"] == 1 for j in finished)
        # The backlog is gone, the long job still runs: the pool scales in around it,
        # never deleting the pod that runs it.
        assert c.get(f"/v1/jobs/{long['id']}").json()["status"] == "running"
        try:
            wait_for(lambda: worker_replicas(release, "echo") == 1, 80, what="scale-in to the long job's pod")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{release.kubectl('get', 'pods,deploy,tpool,gjob')}\n"
                                 f"{release.kubectl('logs', 'deploy/genq-operator', '--tail=60', check=False)}") from None
        long_done = wait_job(c, long["id"])
        assert long_done["attempts"] == 1, long_done
    wait_for(lambda: worker_replicas(release, "echo") == 0 and not release.pods("worker", "echo"), 180,
             what="the pool back at 0 pods")


def test_a_worker_pod_deleted_mid_job_loses_nothing(release):
    key = release.new_key(name="pod-kill", tier="premium", max_queued=50)
    with release.client(key) as c:
        victim = submit(c, "victim", sleep=20)
        others = [submit(c, f"k{i}", sleep=0.5) for i in range(6)]
        def running_on():
            job = c.get(f"/v1/jobs/{victim['id']}").json()
            return job["status"] == "running" and job
        wait_for(running_on, 180, what="the victim running")
        gjob = next(g for g in release.get("gjob")["items"] if g["metadata"]["name"].endswith(victim["id"].lower()))
        pods = [p["metadata"]["name"] for p in release.pods("worker", "echo")]
        pod = scaling.pod_of_worker(gjob["status"]["worker"], "echo", pods)
        assert pod, (gjob["status"]["worker"], pods)
        release.kubectl("delete", "pod", pod, "--grace-period=0", "--force", "--wait=false")
        done = wait_job(c, victim["id"], timeout=240)
        assert done["attempts"] >= 2, done
        assert all(wait_job(c, j["id"])["status"] == "succeeded" for j in others)
        listed = c.get("/v1/jobs", params={"limit": 100}).json()
        assert listed["total"] == 7 and {j["status"] for j in listed["jobs"]} == {"succeeded"}


def test_the_operator_pod_deleted_its_replacement_leads_and_jobs_still_run(release):
    key = release.new_key(name="operator-kill", tier="premium", max_queued=50)
    old = release.pods("operator")
    assert len(old) == 1
    release.kubectl("delete", "pod", old[0]["metadata"]["name"], "--wait=false")
    with release.client(key) as c:
        jobs = [submit(c, f"o{i}", sleep=0.2) for i in range(5)]
        def replacement():
            pods = [p for p in release.pods("operator") if p["metadata"]["uid"] != old[0]["metadata"]["uid"]]
            return pods and any(c_["type"] == "Ready" and c_["status"] == "True" for c_ in pods[0]["status"].get("conditions", []))
        wait_for(replacement, 120, what="a new operator pod")
        assert all(wait_job(c, j["id"])["status"] == "succeeded" for j in jobs)
    # The old leader released its Lease on SIGTERM: the new pod holds it.
    def holder():
        names = release.kubectl("get", "lease", "-o", "name").split()
        lease = release.get("lease", "genq-operator") if "lease.coordination.k8s.io/genq-operator" in names else {}
        return lease.get("spec", {}).get("holderIdentity", "")
    old_name = old[0]["metadata"]["name"]
    wait_for(lambda: (h := holder()) and old_name not in h, 60, what="the new operator pod holding the Lease")


def test_bad_input_through_the_service_gets_the_spec_error_and_pods_keep_serving(release):
    key = release.new_key(name="hostile", tier="premium")
    with release.client(key) as c:
        r = c.post("/v1/jobs", data={"tool": "upscale", "scale": "2"},
                   files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 100, "image/png")})
        assert r.status_code in (400, 415, 422), r.text
        assert set(r.json()) == {"error"} and r.json()["error"]["code"] in ("invalid_input", "unsupported_media_type", "validation_error")
        r = c.post("/v1/jobs", json={"tool": "echo", "params": {"nope": 1}})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text
        # The pods keep serving: a real upscale through the same Service succeeds.
        r = c.post("/v1/jobs", data={"tool": "upscale", "scale": "2", "variant": "lanczos"},
                   files={"image": ("p.png", png(), "image/png")})
        assert r.status_code == 202, r.text
        done = wait_job(c, r.json()["id"], timeout=240)
        out = Image.open(io.BytesIO(c.get(f"/v1/jobs/{done['id']}/result").content))
        assert out.size == (48, 32)
    for component in ("api", "operator"):
        assert all(cs["restartCount"] == 0 for p in release.pods(component) for cs in p["status"]["containerStatuses"])


def test_helm_upgrade_rolls_the_pods_and_uninstall_keeps_only_the_kept_objects(release):
    before = {p["metadata"]["uid"] for p in release.pods("api")}
    release.helm("upgrade", RELEASE, str(release.chart), "-f", str(release.values), "--set", "logLevel=DEBUG",
                 "--wait", "--timeout", "5m")
    after = release.pods("api")
    assert before.isdisjoint({p["metadata"]["uid"] for p in after}), "the API pods were not replaced"
    env = {e["name"]: e.get("value") for e in after[0]["spec"]["containers"][0]["env"]}
    assert env["GENQ_LOG_LEVEL"] == "DEBUG"
    with httpx.Client(base_url=release.api_url, timeout=10) as c:
        assert c.get("/readyz").status_code == 200


def test_helm_uninstall_removes_everything_but_the_admin_key_secret_and_the_crds(release):
    release.helm("uninstall", RELEASE, "--wait", "--timeout", "3m")
    def gone():
        left = release.kubectl("get", "all,serviceaccounts,roles,rolebindings,configmaps,secrets,toolpools,leases,poddisruptionbudgets",
                               "-o", "name").split()
        # Not the chart's: the namespace's defaults, the test's S3 Secret, and data made by
        # using genq (API keys are Secrets, like GenerationJobs they outlive a release).
        # Open (BENCHMARKS §10): the Leases genq writes at run time (the operator's, the
        # workers' liveness) outlive the release: uninstall removes the operator's RBAC
        # and the operator with it, so nobody deletes them. Listed, not yet asserted gone.
        left = [o for o in left if not o.startswith(("serviceaccount/default", "configmap/kube-root-ca.crt", "secret/genq-s3",
                                                     "secret/genq-key-", "lease.coordination.k8s.io/genq-"))]
        seen[:] = left
        return left == [f"secret/{RELEASE}-admin-key"] and left
    seen: list[str] = []
    try:
        wait_for(gone, 120, 1, what="everything but the admin key Secret gone")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; left: {seen}") from None
    assert not [l for l in release.node.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").stdout.split()
                if RELEASE in l and "genq" in l]
    crds = release.node.kubectl("get", "crd", "-o", "name").stdout.split()
    assert "customresourcedefinition.apiextensions.k8s.io/generationjobs.genq.io" in crds
    assert "customresourcedefinition.apiextensions.k8s.io/toolpools.genq.io" in crds
