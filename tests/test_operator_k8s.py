"""The operator against a real kube-apiserver + kube-controller-manager and a real NATS
JetStream: a ToolPool gets its worker Deployment, the Deployment scales with the
JetStream backlog (never below the busy workers, idle pods go first), down to zero after
the delay, status conditions are written, and deleting the pool garbage-collects it all.

No kubelet runs, so pods stay Pending; the controller manager still creates and deletes
Pod objects, which is what shows which pod a scale-in takes.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import httpx
import pytest
import yaml

from genq import constants
from genq.adapters.nats import NatsBus
from genq.adapters.nats_server import EmbeddedNats
from genq.operator import conditions, scaling
from helpers import eventually, rbac_documents
from k8s.controlplane import control_plane  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.k8s

GROUP = "/apis/genq.io/v1alpha1"
MERGE = {"Content-Type": "application/merge-patch+json"}
NOW = "2026-01-01T00:00:00Z"
DELAY = 3  # scaleDownDelaySeconds of the test pool


@pytest.fixture
def api(control_plane):  # noqa: F811
    with control_plane.client() as client:
        yield client


@pytest.fixture
def ns(api):
    name = f"genq-op-{uuid.uuid4().hex[:8]}"
    ok(api.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
    yield name
    api.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
async def bus(tmp_path):
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    b = NatsBus(server.url, name="genq-test")
    await b.connect()
    try:
        yield b
    finally:
        await b.close()
        server.stop()


class OperatorThread:
    """The operator (``operate``; no Lease) in a thread with its own event loop."""

    def __init__(self, control_plane, ns: str, nats_url: str, lease: bool = False, identity: str = "op-1",  # noqa: F811
                 scale_interval: float = 0.5):
        from genq.settings import OperatorSettings, Settings

        self.settings = Settings(
            nats_url=nats_url, ack_wait_seconds=5, kubeconfig=control_plane.kubeconfig,
            operator=OperatorSettings(
                worker_image="genq-worker:test", worker_env={"GENQ_NATS_URL": nats_url}, namespaces=[ns],
                scale_interval=scale_interval, lease_namespace=ns, lease_seconds=4, identity=identity))
        self.config = self.settings.operator
        self.lease = lease
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"operator-{identity}")

    def _run(self) -> None:
        from genq.operator import handlers

        fn = handlers.lead_and_operate if self.lease else handlers.operate
        try:
            asyncio.run(fn(self.settings, stop_flag=self.stop_flag))
        except BaseException as e:  # reported by stop()
            self.error = e

    def start(self) -> OperatorThread:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "operator did not stop"


@pytest.fixture
def operator(control_plane, ns, bus, monkeypatch):  # noqa: F811
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    op = OperatorThread(control_plane, ns, bus.url).start()
    yield op
    op.stop()
    assert op.error is None, repr(op.error)


def ok(r: httpx.Response) -> dict:
    assert r.is_success, f"{r.request.method} {r.request.url} -> {r.status_code}: {r.text}"
    return r.json()


def pool(**spec) -> dict:
    return {
        "apiVersion": "genq.io/v1alpha1", "kind": "ToolPool", "metadata": {"name": "upscale"},
        "spec": {
            "tool": {"kind": "upscale", "name": "upscale"},
            "model": "realesrgan-x4",
            "resources": {"nvidia.com/gpu": 1, "memory": "16Gi"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "nodeSelector": {"gpu": "true"},
            "minWorkers": 0, "maxWorkers": 3, "concurrencyPerWorker": 2,
            "scaleDownDelaySeconds": DELAY, "activeDeadlineSeconds": 60,
            **spec,
        },
    }


def running_job(name: str, worker: str) -> tuple[dict, dict]:
    job = {"apiVersion": "genq.io/v1alpha1", "kind": "GenerationJob", "metadata": {"name": name},
           "spec": {"tool": "upscale", "variant": "lanczos", "params": {}, "inputs": [], "owner": "key-1"}}
    status = {"status": {"worker": worker, "attempts": 1, "startTime": NOW, "conditions": [
        cond("Queued", "True", "Queued"), cond("Started", "True", "Started"), cond("Succeeded", "Unknown", "Running")]}}
    return job, status


def cond(type_: str, status: str, reason: str) -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": "", "lastTransitionTime": NOW}


def get(api, path: str) -> dict | None:
    r = api.get(path)
    return None if r.status_code == 404 else ok(r)


async def test_pool_deployment_scales_with_backlog_and_spares_busy_workers(api, ns, bus, operator):
    pools = f"{GROUP}/namespaces/{ns}/toolpools"
    dep_url = f"/apis/apps/v1/namespaces/{ns}/deployments/upscale-workers"
    owner = ok(api.post(pools, json=pool()))

    # 1. The Deployment appears, owned by the pool, built from its spec, at minWorkers.
    dep = await eventually(lambda: get(api, dep_url), what="the worker Deployment")
    assert dep["metadata"]["ownerReferences"] == [{
        "apiVersion": "genq.io/v1alpha1", "kind": "ToolPool", "name": "upscale", "uid": owner["metadata"]["uid"],
        "controller": True, "blockOwnerDeletion": True}]
    assert dep["spec"]["replicas"] == 0
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "genq-worker:test" and c["args"] == ["worker", "--tool", "upscale"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "1", "memory": "16Gi"}
    assert pod["terminationGracePeriodSeconds"] >= 60 and pod["nodeSelector"] == {"gpu": "true"}
    assert {"name": "GENQ_NATS_URL", "value": bus.url} in c["env"]
    assert get(api, f"/api/v1/namespaces/{ns}/configmaps/upscale-workers")["data"]["genq.yaml"]

    def status() -> dict:
        return get(api, f"{pools}/upscale").get("status") or {}

    def conds() -> dict:
        return {c["type"]: (c["status"], c["reason"]) for c in status().get("conditions", [])}

    await eventually(lambda: conds() == {"Ready": ("True", conditions.SCALED_TO_ZERO), "Active": ("False", conditions.IDLE)},
                     what="idle status")
    assert status()["observedGeneration"] == 1 and status()["selector"] == "genq.io/tool=upscale"

    # 2. A backlog in JetStream scales up: ceil(5 / 2) = 3 workers; more stays at maxWorkers.
    for i in range(5):
        await bus.publish_job("upscale", "normal", f"job-{i}")
    await eventually(lambda: get(api, dep_url)["spec"]["replicas"] == 3, what="scaled to 3")
    for i in range(5, 10):
        await bus.publish_job("upscale", "normal", f"job-{i}")
    await eventually(lambda: status().get("queued") == 10, what="queued 10")
    assert get(api, dep_url)["spec"]["replicas"] == 3
    assert conds()["Active"] == ("True", conditions.JOBS_QUEUED)
    assert status()["replicas"] == 3 and conds()["Ready"] == ("False", conditions.WORKERS_STARTING)

    # 3. The controller manager makes three pods; one of them runs a job (a running
    #    GenerationJob names its worker, whose id starts with the pod's hostname).
    pods_url = f"/api/v1/namespaces/{ns}/pods"

    def pods() -> list[dict]:
        return [p for p in ok(api.get(pods_url))["items"] if not p["metadata"].get("deletionTimestamp")]

    await eventually(lambda: len(pods()) == 3, what="three pods")
    busy_pod = sorted(p["metadata"]["name"] for p in pods())[1]
    job, st = running_job("job-1", f"upscale-{busy_pod}-7-abcdef")
    ok(api.post(f"{GROUP}/namespaces/{ns}/generationjobs", json=job))
    ok(api.patch(f"{GROUP}/namespaces/{ns}/generationjobs/job-1/status", headers=MERGE, json=st))

    def costs() -> dict:
        return {p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(constants.POD_DELETION_COST) for p in pods()}

    await eventually(lambda: costs()[busy_pod] == str(scaling.BUSY_COST + 1)
                     and sorted(v for k, v in costs().items() if k != busy_pod) == ["0", "0"], what="deletion costs")

    # 4. The backlog drains (every message acked): after the delay, down to the one busy
    #    worker; the ReplicaSet deletes the idle pods and keeps the busy one.
    while (d := await bus.pull("upscale")) is not None:
        await d.ack()
    drained = time.monotonic()
    await eventually(lambda: status().get("queued") == 0 and status().get("running") == 0, what="backlog drained")
    assert get(api, dep_url)["spec"]["replicas"] == 3, "scaled in before scaleDownDelaySeconds"
    await eventually(lambda: get(api, dep_url)["spec"]["replicas"] == 1, what="down to the busy worker")
    assert time.monotonic() - drained >= DELAY - 0.5
    await eventually(lambda: [p["metadata"]["name"] for p in pods()] == [busy_pod], what="only the busy pod left")
    await asyncio.sleep(DELAY + 1)
    assert get(api, dep_url)["spec"]["replicas"] == 1, "scaled below the busy workers"

    # 5. The job ends: the pool scales to zero after the delay.
    done = {"status": {"durationSeconds": 4.0, "completionTime": NOW, "conditions": [
        cond("Queued", "True", "Queued"), cond("Started", "True", "Started"), cond("Succeeded", "True", "Completed")]}}
    ok(api.patch(f"{GROUP}/namespaces/{ns}/generationjobs/job-1/status", headers=MERGE, json=done))
    await eventually(lambda: get(api, dep_url)["spec"]["replicas"] == 0, what="scaled to zero")
    await eventually(lambda: conds() == {"Ready": ("True", conditions.SCALED_TO_ZERO), "Active": ("False", conditions.IDLE)},
                     what="idle again")
    assert status()["avgDurationSeconds"] == 4.0

    reasons = {e["reason"] for e in ok(api.get(f"/api/v1/namespaces/{ns}/events"))["items"]
               if e["involvedObject"].get("kind") == "ToolPool"}
    assert {conditions.EVENT_DEPLOYMENT_CREATED, conditions.EVENT_SCALED_UP, conditions.EVENT_SCALED_DOWN} <= reasons

    # kopf's bookkeeping uses genq's prefix, not kopf.zalando.org.
    meta = get(api, f"{pools}/upscale")["metadata"]
    assert not any("kopf.zalando.org" in k for k in (meta.get("annotations") or {})), meta.get("annotations")
    assert not any("kopf.zalando.org" in f for f in meta.get("finalizers") or [])

    # 6. Deleting the pool garbage-collects its Deployment and ConfigMap.
    ok(api.delete(f"{pools}/upscale", params={"propagationPolicy": "Background"}))
    await eventually(lambda: get(api, dep_url) is None, timeout=60, what="Deployment collected")
    await eventually(lambda: get(api, f"/api/v1/namespaces/{ns}/configmaps/upscale-workers") is None, timeout=60,
                     what="ConfigMap collected")


async def test_pool_update_rolls_the_template_but_keeps_replicas(api, ns, bus, operator):
    pools = f"{GROUP}/namespaces/{ns}/toolpools"
    dep_url = f"/apis/apps/v1/namespaces/{ns}/deployments/upscale-workers"
    ok(api.post(pools, json=pool(minWorkers=2)))
    await eventually(lambda: (get(api, dep_url) or {}).get("spec", {}).get("replicas") == 2, what="minWorkers 2")
    ok(api.patch(f"{pools}/upscale", headers=MERGE, json={"spec": {"image": "my/upscaler:2", "activeDeadlineSeconds": 1200}}))

    def updated() -> bool:
        d = get(api, dep_url)
        t = d["spec"]["template"]["spec"]
        return t["containers"][0]["image"] == "my/upscaler:2" and t["terminationGracePeriodSeconds"] >= 1200
    await eventually(updated, what="template updated")
    assert get(api, dep_url)["spec"]["replicas"] == 2
    await eventually(lambda: (get(api, f"{pools}/upscale").get("status") or {}).get("observedGeneration") == 2,
                     what="observedGeneration 2")


async def test_two_operators_one_leader(api, ns, bus, control_plane, monkeypatch):  # noqa: F811
    """Two replicas with a Lease: one runs the handlers; when it stops, the other takes over."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    a = OperatorThread(control_plane, ns, bus.url, lease=True, identity="op-a").start()
    lease_url = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{constants.OPERATOR_LEASE}"
    await eventually(lambda: (get(api, lease_url) or {}).get("spec", {}).get("holderIdentity") == "op-a", what="a leads")
    b = OperatorThread(control_plane, ns, bus.url, lease=True, identity="op-b").start()
    try:
        dep_url = f"/apis/apps/v1/namespaces/{ns}/deployments/upscale-workers"
        ok(api.post(f"{GROUP}/namespaces/{ns}/toolpools", json=pool()))
        await eventually(lambda: get(api, dep_url), what="Deployment by the leader")
        await asyncio.sleep(2)
        assert get(api, lease_url)["spec"]["holderIdentity"] == "op-a"
        a.stop()  # a clean stop deletes a's Lease: b takes it at its next try, not after expiry
        await eventually(lambda: (get(api, lease_url) or {}).get("spec", {}).get("holderIdentity") == "op-b", timeout=30,
                         what="b takes over")
        await bus.publish_job("upscale", "normal", "job-x")
        await eventually(lambda: get(api, dep_url)["spec"]["replicas"] == 1, what="b scales")
    finally:
        a.stop()
        b.stop()


async def test_a_job_for_a_pool_at_zero_starts_a_worker_before_the_scalers_next_pass(api, ns, bus, control_plane,  # noqa: F811
                                                                                      monkeypatch):
    """Found on the real node: the scaler's tick was most of a cold start's platform part.
    With a 60 s scale interval, a new GenerationJob still scales its pool 0 -> 1 at once."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    op = OperatorThread(control_plane, ns, bus.url, scale_interval=60).start()
    try:
        pools = f"{GROUP}/namespaces/{ns}/toolpools"
        dep_url = f"/apis/apps/v1/namespaces/{ns}/deployments/upscale-workers"
        ok(api.post(pools, json=pool()))
        # The first pass (at once) leaves the pool at zero; the next is a minute away.
        await eventually(lambda: (get(api, f"{pools}/upscale").get("status") or {}).get("queued") == 0, what="first pass")
        assert get(api, dep_url)["spec"]["replicas"] == 0
        job = {"apiVersion": "genq.io/v1alpha1", "kind": "GenerationJob", "metadata": {"name": "job-cold"},
               "spec": {"tool": "upscale", "variant": "lanczos", "params": {}, "inputs": [], "owner": "key-1"}}
        t0 = time.monotonic()
        ok(api.post(f"{GROUP}/namespaces/{ns}/generationjobs", json=job))
        await eventually(lambda: get(api, dep_url)["spec"]["replicas"] == 1, timeout=20, what="scaled 0 -> 1")
        assert time.monotonic() - t0 < 20  # not the 60 s tick
        await eventually(lambda: any(e["reason"] == conditions.EVENT_SCALED_UP and "pool at zero" in e["message"]
                                     for e in ok(api.get(f"/api/v1/namespaces/{ns}/events"))["items"]), what="the Event")
    finally:
        op.stop()
    assert op.error is None, repr(op.error)


def apply_rbac(control_plane, name: str, ns: str, *, cluster_scoped: bool = True) -> list[dict]:  # noqa: F811
    docs = [d for d in rbac_documents(name, ns) if cluster_scoped or "namespace" in d["metadata"]]
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=genq-tests", "-f", "-",
                          input=yaml.safe_dump_all(docs))
    return docs


async def test_operator_runs_with_only_its_rbac(api, ns, bus, control_plane, monkeypatch):  # noqa: F811
    """The operator's ClusterRole (bound in the namespace) and leader-election Role are
    enough to create, scale, annotate pods, write status and Events."""
    docs = apply_rbac(control_plane, "operator", ns)
    assert {d["kind"] for d in docs} >= {"ClusterRole", "Role", "ServiceAccount"}
    user = f"op-{ns}"
    kubeconfig = control_plane.add_user(user)
    subjects = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    ok(api.post("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", json={
        "metadata": {"name": f"test-{user}"}, "subjects": subjects,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "genq-operator"}}))
    ok(api.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", json={
        "metadata": {"name": "test-leader-election"}, "subjects": subjects,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "genq-operator-leader-election"}}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    op = OperatorThread(control_plane, ns, bus.url, lease=True, identity="op-rbac")
    op.settings.kubeconfig = kubeconfig
    op.start()
    try:
        pools = f"{GROUP}/namespaces/{ns}/toolpools"
        dep_url = f"/apis/apps/v1/namespaces/{ns}/deployments/upscale-workers"
        ok(api.post(pools, json=pool()))
        await eventually(lambda: get(api, dep_url), what="Deployment")
        await bus.publish_job("upscale", "normal", "job-rbac")
        await eventually(lambda: get(api, dep_url)["spec"]["replicas"] == 1, what="scaled up")
        await eventually(lambda: [(p["metadata"].get("annotations") or {}).get(constants.POD_DELETION_COST)
                                  for p in ok(api.get(f"/api/v1/namespaces/{ns}/pods"))["items"]] == ["0"],
                         what="deletion cost patched")
        await eventually(lambda: (get(api, f"{pools}/upscale").get("status") or {}).get("queued") == 1, what="status")
        await eventually(lambda: any(e["reason"] == conditions.EVENT_SCALED_UP
                                     for e in ok(api.get(f"/api/v1/namespaces/{ns}/events"))["items"]), what="event")
        lease = get(api, f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{constants.OPERATOR_LEASE}")
        assert lease["spec"]["holderIdentity"] == "op-rbac"
    finally:
        op.stop()
        api.delete(f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/test-{user}")
    assert op.error is None, repr(op.error)


def can(control_plane, sa: str, ns: str, verb: str, resource: str) -> bool:  # noqa: F811
    resource, _, sub = resource.partition("/")
    r = control_plane.kubectl("auth", "can-i", verb, resource, "-n", ns, *([f"--subresource={sub}"] if sub else []),
                              f"--as=system:serviceaccount:{ns}:{sa}", check=False)
    return r.stdout.strip() == "yes"


def test_api_and_worker_roles_are_least_privilege(ns, control_plane):  # noqa: F811
    for name in ("api", "worker"):
        apply_rbac(control_plane, name, ns)
    # The API submits, reads, cancels and deletes jobs and reads pools.
    assert can(control_plane, "genq-api", ns, "create", "generationjobs.genq.io")
    assert can(control_plane, "genq-api", ns, "watch", "generationjobs.genq.io")
    assert can(control_plane, "genq-api", ns, "list", "toolpools.genq.io")
    assert not can(control_plane, "genq-api", ns, "patch", "toolpools.genq.io")
    assert not can(control_plane, "genq-api", ns, "create", "deployments.apps")
    assert not can(control_plane, "genq-api", ns, "update", "secrets")
    assert not can(control_plane, "genq-api", ns, "create", "pods")
    # A worker moves job status and nothing else.
    assert can(control_plane, "genq-worker", ns, "patch", "generationjobs.genq.io/status")
    assert can(control_plane, "genq-worker", ns, "get", "generationjobs.genq.io")
    assert can(control_plane, "genq-api", ns, "patch", "generationjobs.genq.io/status")
    assert not can(control_plane, "genq-api", ns, "patch", "toolpools.genq.io/status")
    assert can(control_plane, "genq-worker", ns, "create", "leases.coordination.k8s.io")
    assert not can(control_plane, "genq-worker", ns, "get", "secrets")
    assert not can(control_plane, "genq-worker", ns, "get", "configmaps")
    assert not can(control_plane, "genq-worker", ns, "create", "generationjobs.genq.io")
    assert not can(control_plane, "genq-worker", ns, "delete", "generationjobs.genq.io")
    assert not can(control_plane, "genq-worker", ns, "list", "pods")
    assert not can(control_plane, "genq-worker", ns, "get", "toolpools.genq.io")


async def test_operator_restart_converges(api, ns, bus, control_plane, monkeypatch):  # noqa: F811
    """Stop the operator; change the pool and queue work while it is down; a new operator
    picks both up (resume handler + scaler) without anything lost."""
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    pools = f"{GROUP}/namespaces/{ns}/toolpools"
    dep_url = f"/apis/apps/v1/namespaces/{ns}/deployments/upscale-workers"
    first = OperatorThread(control_plane, ns, bus.url, identity="op-1").start()
    try:
        ok(api.post(pools, json=pool()))
        await eventually(lambda: get(api, dep_url), what="Deployment")
    finally:
        first.stop()
    ok(api.patch(f"{pools}/upscale", headers=MERGE, json={"spec": {"image": "my/upscaler:3"}}))
    for i in range(3):
        await bus.publish_job("upscale", "high", f"job-{i}")
    second = OperatorThread(control_plane, ns, bus.url, identity="op-2").start()
    try:
        await eventually(lambda: get(api, dep_url)["spec"]["template"]["spec"]["containers"][0]["image"] == "my/upscaler:3",
                         what="template updated after restart")
        await eventually(lambda: get(api, dep_url)["spec"]["replicas"] == 2, what="scaled after restart")
    finally:
        second.stop()
    assert first.error is None and second.error is None
