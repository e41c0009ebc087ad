"""genq's CRDs on a real kube-apiserver: what a cluster user and the operator rely on.

The control plane (etcd, kube-apiserver, kube-controller-manager) is built from Go
modules and started by the ``control_plane`` fixture (``tests/k8s/controlplane.py``);
the tests marked ``k8s`` are skipped when it is not built (``tests/k8s/build-bins.sh``).
"""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest
import yaml

from genq.tools import ToolSpec
from k8s.controlplane import CRDS, REPO, control_plane  # noqa: F401  (the session fixture)

k8s = pytest.mark.k8s

GROUP = "/apis/genq.io/v1alpha1"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"
MERGE = {"Content-Type": "application/merge-patch+json"}
NOW = "2026-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def api(control_plane):  # noqa: F811
    with control_plane.client() as client:
        yield client


@pytest.fixture
def ns(api, control_plane):  # noqa: F811
    """A fresh namespace per test (deleted after; the controller manager empties it)."""
    name = f"genq-test-{uuid.uuid4().hex[:8]}"
    ok(api.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
    yield name
    api.delete(f"/api/v1/namespaces/{name}")


def ok(r: httpx.Response) -> dict:
    assert r.is_success, f"{r.request.method} {r.request.url} -> {r.status_code}: {r.text}"
    return r.json()


def refused(r: httpx.Response, message: str, code: int = 422) -> None:
    """The apiserver refused the request with ``code`` and a Status naming ``message``."""
    assert r.status_code == code, f"expected {code}, got {r.status_code}: {r.text}"
    assert message in r.json()["message"], r.json()["message"]


def jobs(ns: str) -> str:
    return f"{GROUP}/namespaces/{ns}/generationjobs"


def pools(ns: str) -> str:
    return f"{GROUP}/namespaces/{ns}/toolpools"


def job(name: str = "job-1", **spec) -> dict:
    return {
        "apiVersion": "genq.io/v1alpha1",
        "kind": "GenerationJob",
        "metadata": {"name": name},
        "spec": {
            "tool": "upscale",
            "variant": "lanczos",
            "params": {"scale": 2, "nested": {"any": ["shape", 1]}},
            "inputs": [{"name": "in.png", "uri": "s3://genq/jobs/job-1/inputs/in.png", "contentType": "image/png", "sizeBytes": 1234}],
            "owner": "key-1",
            **spec,
        },
    }


def pool(name: str = "upscale", **spec) -> dict:
    return {
        "apiVersion": "genq.io/v1alpha1",
        "kind": "ToolPool",
        "metadata": {"name": name},
        "spec": {
            "tool": {"kind": "upscale", "name": name},
            "label": "Upscale",
            "variants": [{"name": "realesrgan", "weights": "realesr-animevideov3"}, {"name": "lanczos", "backend": "lanczos"}],
            "resources": {"nvidia.com/gpu": 1, "memory": "16Gi"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "maxWorkers": 3,
            **spec,
        },
    }


def condition(type_: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": NOW, "observedGeneration": 1}


# -- the CRDs themselves ------------------------------------------------------------------


@k8s
def test_crds_are_established_with_names_and_subresources(api):
    for name in ("generationjobs.genq.io", "toolpools.genq.io"):
        crd = ok(api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"))
        conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conds["Established"] == "True" and conds["NamesAccepted"] == "True", conds

    resources = {r["name"]: r for r in ok(api.get(GROUP))["resources"]}
    assert resources["generationjobs"]["shortNames"] == ["gjob"]
    assert resources["toolpools"]["shortNames"] == ["tpool"]
    assert resources["generationjobs"]["categories"] == ["genq"] == resources["toolpools"]["categories"]
    assert resources["generationjobs"]["namespaced"] and resources["toolpools"]["namespaced"]
    assert {"generationjobs/status", "toolpools/status", "toolpools/scale"} <= resources.keys()
    assert "generationjobs/scale" not in resources


@k8s
def test_kubectl_explain_shows_documented_fields(control_plane):  # noqa: F811
    out = _eventually(lambda: control_plane.kubectl("explain", "generationjob.spec").stdout)
    for field in ("tool", "variant", "params", "inputs", "owner", "priority", "active", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "webhookURL"):
        assert f"{field}\t" in out or f"{field} " in out, (field, out)
    assert "Name of the tool to run" in out
    out = control_plane.kubectl("explain", "toolpool.spec.maxWorkers").stdout
    assert "concurrency limit" in out


# -- creating resources -------------------------------------------------------------------


@k8s
def test_create_job_and_pool_with_defaults(api, ns):
    created = ok(api.post(jobs(ns), json=job()))
    assert created["spec"]["priority"] == "normal" and created["spec"]["active"] is True
    assert created["spec"]["params"] == {"scale": 2, "nested": {"any": ["shape", 1]}}  # kept as given

    p = ok(api.post(pools(ns), json=pool()))["spec"]
    # ToolSpec's defaults, applied by the apiserver.
    assert (p["minWorkers"], p["maxWorkers"], p["concurrencyPerWorker"], p["maxQueued"]) == (0, 3, 1, 100)
    assert (p["scaleDownDelaySeconds"], p["activeDeadlineSeconds"], p["maxAttempts"], p["resultTTLSeconds"]) == (300, 600, 3, 3600)
    assert p["deleteOnDownload"] is False
    assert p["variants"][1] == {"name": "lanczos", "backend": "lanczos"}


@k8s
def test_typed_schema_refuses_unknown_and_malformed_fields(api, ns):
    strict = {"fieldValidation": "Strict"}
    refused(api.post(jobs(ns), params=strict, json=job(colour="red")), 'unknown field "spec.colour"', code=400)
    refused(api.post(jobs(ns), json=job(tool="Not_A_Label")), "spec.tool")
    refused(api.post(jobs(ns), json=job(priority="urgent")), "spec.priority")
    refused(api.post(pools(ns), json=pool(resources={"memory": "lots"})), "spec.resources")
    refused(api.post(pools(ns), json=pool(maxAttempts=0)), "spec.maxAttempts")
    python = pool("mine")
    python["spec"]["tool"] = {"kind": "python", "name": "mine"}
    refused(api.post(pools(ns), json=python), "a python tool needs entrypoint")
    python["spec"]["tool"]["entrypoint"] = "mypkg.tools:run"
    ok(api.post(pools(ns), json=python))
    refused(api.post(pools(ns), json=pool("other-name") | {"metadata": {"name": "upscale"}}), "named after its tool")


@k8s
def test_pool_specs_keep_every_field_and_parse_as_tool_specs(api, ns):
    """What the operator does with a pool: read it back and parse it as genq.tools.ToolSpec.
    Nothing a user wrote is pruned, and the apiserver's defaults are ToolSpec's names."""
    specs = [
        pool()["spec"] | {"options": {"tileSize": 256, "device": "auto", "weights": "realesr-animevideov3"},
                          "variants": [{"name": "sd", "backend": "diffusers", "model": "stabilityai/stable-diffusion-x4-upscaler",
                                        "prompt": "", "steps": 25, "guidanceScale": 0, "noiseLevel": 20, "seed": 1}]},
        {"tool": {"kind": "imageEdit", "name": "edit"}, "model": "Qwen/Qwen-Image-Edit-2509", "image": "ghcr.io/genq/worker:1",
         "nodeSelector": {"nvidia.com/gpu.present": "true"}, "resources": {"nvidia.com/gpu": 1},
         "variants": [{"name": "4step", "lora": "lightx2v/Qwen-Image-Lightning", "loraWeightName": "4step.safetensors",
                       "loraScale": 1.0, "trueCfgScale": 1.0, "scheduler": {"shift": 1.0, "time_shift_type": "exponential"}}],
         "options": {"dtype": "bfloat16", "cpuOffload": True, "outputSize": "input", "maxInputPixels": 1000000}},
        {"tool": {"kind": "textToImage", "name": "sdxl"}, "variants": [{"name": "fast", "steps": 8, "cfgScale": 2.5, "sampler": "euler_a"}],
         "options": {"maxPixels": 1048576, "sizeMultiple": 8, "revision": "main", "modelVariant": "fp16", "threads": 4},
         "activeDeadlineSeconds": 120, "maxAttempts": 5, "resultTTLSeconds": 60, "deleteOnDownload": True},
        {"tool": {"kind": "python", "name": "echo", "entrypoint": "genq_testtools:echo", "inputs": [0, 3],
                  "params": {"type": "object", "additionalProperties": False, "properties": {"text": {"type": "string"}}}}},
    ]
    for spec in specs:
        name = spec["tool"]["name"]
        stored = ok(api.post(pools(ns), params={"fieldValidation": "Strict"},
                             json={"apiVersion": "genq.io/v1alpha1", "kind": "ToolPool", "metadata": {"name": name}, "spec": spec}))["spec"]
        _assert_kept(spec, stored, "spec")
        tool = ToolSpec.model_validate(stored)
        assert tool.name == name and tool.max_workers == stored["maxWorkers"] and tool.variants


def _assert_kept(sent, stored, path: str) -> None:
    if isinstance(sent, dict):
        for k, v in sent.items():
            assert k in stored, f"{path}.{k} was pruned"
            _assert_kept(v, stored[k], f"{path}.{k}")
    elif isinstance(sent, list):
        assert len(sent) == len(stored), path
        for i, (a, b) in enumerate(zip(sent, stored)):
            _assert_kept(a, b, f"{path}[{i}]")
    else:
        assert sent == stored, f"{path}: {sent!r} != {stored!r}"


def test_every_setting_the_tools_read_is_in_the_tool_pool_schema():
    """The apiserver silently prunes fields a CRD does not declare: every variant field and
    option the worker's tools read must be in the ToolPool schema (ToolSpec lets them all
    through as extras), or a pool that sets it would quietly run without it."""
    crd = yaml.safe_load((CRDS / "toolpools.genq.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    declared = {"extra": set(spec["variants"]["items"]["properties"]), "options": set(spec["options"]["properties"])}
    read: dict[str, set[str]] = {"extra": set(), "options": set()}
    for source in (REPO / "worker" / "tools").glob("*.py"):
        for obj, key in re.findall(r"\b(extra|options|opts)\.get\(\s*[\"'](\w+)[\"']", source.read_text()):
            read["extra" if obj == "extra" else "options"].add(key)
    assert read["extra"] and read["options"], "no settings found: did the tools' code change shape?"
    assert read["extra"] <= declared["extra"], f"variant fields missing from the CRD: {read['extra'] - declared['extra']}"
    assert read["options"] <= declared["options"], f"options missing from the CRD: {read['options'] - declared['options']}"


# -- printer columns ------------------------------------------------------------------------


@k8s
def test_get_columns_for_jobs_and_pools(api, ns, control_plane):  # noqa: F811
    ok(api.post(jobs(ns), json=job()))
    ok(api.patch(f"{jobs(ns)}/job-1/status", headers=MERGE, json={"status": {
        "conditions": [condition("Queued", "True", "Queued"), condition("Started", "True", "Started"),
                       condition("Succeeded", "Unknown", "Running")],
        "progress": 0.5, "attempts": 1}}))
    ok(api.post(pools(ns), json=pool(minWorkers=1)))
    ok(api.patch(f"{pools(ns)}/upscale/status", headers=MERGE, json={"status": {"readyReplicas": 1, "queued": 4, "running": 2}}))

    # The apiserver's Table rendering, which kubectl and dashboards show.
    table = ok(api.get(jobs(ns), headers={"Accept": TABLE}))
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Tool", "Variant", "Status", "Progress", "Attempts", "Age"]
    assert table["rows"][0]["cells"][:6] == ["job-1", "upscale", "lanczos", "Running", 0.5, 1]
    table = ok(api.get(pools(ns), headers={"Accept": TABLE}))
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Tool", "Min", "Max", "Ready", "Queued", "Running", "Age"]
    assert table["rows"][0]["cells"][:7] == ["upscale", "upscale", 1, 3, 1, 4, 2]

    lines = control_plane.kubectl("get", "gjob", "-n", ns).stdout.splitlines()
    assert lines[0].split() == ["NAME", "TOOL", "VARIANT", "STATUS", "PROGRESS", "ATTEMPTS", "AGE"]
    assert lines[1].split()[:6] == ["job-1", "upscale", "lanczos", "Running", "0.5", "1"]
    lines = control_plane.kubectl("get", "toolpools", "-n", ns).stdout.splitlines()
    assert lines[0].split() == ["NAME", "TOOL", "MIN", "MAX", "READY", "QUEUED", "RUNNING", "AGE"]
    assert lines[1].split()[:7] == ["upscale", "upscale", "1", "3", "1", "4", "2"]
    both = control_plane.kubectl("get", "genq", "-n", ns, "-o", "name").stdout.split()
    assert sorted(both) == ["generationjob.genq.io/job-1", "toolpool.genq.io/upscale"]


# -- CEL validation -------------------------------------------------------------------------


@k8s
def test_min_workers_above_max_workers_is_refused(api, ns):
    refused(api.post(pools(ns), json=pool(minWorkers=4, maxWorkers=3)), "minWorkers must be <= maxWorkers")
    ok(api.post(pools(ns), json=pool(minWorkers=3, maxWorkers=3)))
    refused(api.patch(f"{pools(ns)}/upscale", headers=MERGE, json={"spec": {"maxWorkers": 2}}), "minWorkers must be <= maxWorkers")
    refused(api.patch(f"{pools(ns)}/upscale", headers=MERGE, json={"spec": {"tool": {"name": "other"}}}), "immutable")
    ok(api.patch(f"{pools(ns)}/upscale", headers=MERGE, json={"spec": {"maxWorkers": 5, "minWorkers": 0}}))


@k8s
def test_job_spec_is_immutable_but_cancel_works(api, ns):
    ok(api.post(jobs(ns), json=job()))
    url = f"{jobs(ns)}/job-1"
    for change, message in [
        ({"tool": "other"}, "tool is immutable"),
        ({"variant": "realesrgan"}, "variant is immutable"),
        ({"params": {"scale": 4}}, "params are immutable"),
        ({"params": {"nested": {"any": ["shape", 2]}}}, "params are immutable"),
        ({"inputs": []}, "inputs are immutable"),
        ({"owner": "key-2"}, "owner is immutable"),
        ({"priority": "high"}, "priority is immutable"),
        ({"webhookURL": "https://example.com/hook"}, "webhookURL is immutable"),
    ]:
        refused(api.patch(url, headers=MERGE, json={"spec": change}), message)
    # Mutable: deadlines, retention, and `active` (false cancels; the API's retry sets it
    # true again).
    ok(api.patch(url, headers=MERGE, json={"spec": {"ttlSecondsAfterFinished": 60, "activeDeadlineSeconds": 30}}))
    assert ok(api.patch(url, headers=MERGE, json={"spec": {"active": False}}))["spec"]["active"] is False
    assert ok(api.patch(url, headers=MERGE, json={"spec": {"active": True}}))["spec"]["active"] is True


# -- subresources ---------------------------------------------------------------------------


@k8s
def test_status_subresource_splits_spec_from_status(api, ns):
    created = ok(api.post(jobs(ns), json=job() | {"status": {"attempts": 7}}))
    assert "status" not in created or "attempts" not in created["status"]  # status is not set on create
    url = f"{jobs(ns)}/job-1"

    # The main resource ignores status changes (and they do not bump the generation)...
    after = ok(api.patch(url, headers=MERGE, json={"status": {"attempts": 5}}))
    assert after.get("status", {}).get("attempts") is None and after["metadata"]["generation"] == 1
    # ...and /status ignores spec changes.
    after = ok(api.patch(f"{url}/status", headers=MERGE, json={
        "spec": {"ttlSecondsAfterFinished": 9},
        "status": {"attempts": 1, "worker": "w-1", "startTime": NOW, "observedGeneration": 1,
                   "conditions": [condition("Started", "True", "Started")]}}))
    assert "ttlSecondsAfterFinished" not in after["spec"] and after["status"]["attempts"] == 1
    assert after["metadata"]["generation"] == 1
    # A spec change bumps the generation, which status.observedGeneration lags behind.
    after = ok(api.patch(url, headers=MERGE, json={"spec": {"ttlSecondsAfterFinished": 9}}))
    assert after["metadata"]["generation"] == 2 and after["status"]["observedGeneration"] == 1

    # Conditions have the metav1.Condition shape.
    bad = condition("Succeeded", "True", "not camel case")
    refused(api.patch(f"{url}/status", headers=MERGE, json={"status": {"conditions": [bad]}}), "reason")
    bad = condition("Succeeded", "Maybe", "Completed")
    refused(api.patch(f"{url}/status", headers=MERGE, json={"status": {"conditions": [bad]}}), "status")
    refused(api.patch(f"{url}/status", headers=MERGE, json={"status": {"progress": 1.5}}), "progress")


@k8s
def test_scale_subresource_moves_min_workers(api, ns, control_plane):  # noqa: F811
    ok(api.post(pools(ns), json=pool(minWorkers=1)))
    ok(api.patch(f"{pools(ns)}/upscale/status", headers=MERGE, json={
        "status": {"replicas": 2, "readyReplicas": 1, "selector": "genq.io/tool=upscale"}}))
    url = f"{pools(ns)}/upscale/scale"
    scale = ok(api.get(url))
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1
    assert scale["status"] == {"replicas": 2, "selector": "genq.io/tool=upscale"}

    ok(api.patch(url, headers=MERGE, json={"spec": {"replicas": 3}}))
    assert ok(api.get(f"{pools(ns)}/upscale"))["spec"]["minWorkers"] == 3
    refused(api.patch(url, headers=MERGE, json={"spec": {"replicas": 4}}), "minWorkers must be <= maxWorkers")
    control_plane.kubectl("scale", "-n", ns, "tpool/upscale", "--replicas=0")
    assert ok(api.get(f"{pools(ns)}/upscale"))["spec"]["minWorkers"] == 0


# -- the controller manager -----------------------------------------------------------------


@k8s
def test_pool_owns_a_deployment_that_is_garbage_collected(api, ns):
    """What the operator will rely on: a Deployment owned by a ToolPool gets its
    ReplicaSet, and goes away with the pool."""
    owner = ok(api.post(pools(ns), json=pool()))
    labels = {"genq.io/tool": "upscale"}
    ok(api.post(f"/apis/apps/v1/namespaces/{ns}/deployments", json={
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "upscale-workers", "ownerReferences": [{
            "apiVersion": "genq.io/v1alpha1", "kind": "ToolPool", "name": "upscale", "uid": owner["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "worker", "image": "genq-worker:test"}]}}},
    }))
    _eventually(lambda: ok(api.get(f"/apis/apps/v1/namespaces/{ns}/replicasets"))["items"])
    _eventually(lambda: ok(api.get(f"/api/v1/namespaces/{ns}/pods"))["items"])

    ok(api.delete(f"{pools(ns)}/upscale", params={"propagationPolicy": "Background"}))
    _eventually(lambda: api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/upscale-workers").status_code == 404)


@k8s
def test_rbac_applies_to_other_users(api, ns, control_plane):  # noqa: F811
    """Users other than the admin go through RBAC (for testing the API's, operator's and
    worker's least-privilege roles)."""
    control_plane.add_user("genq-reader", groups=["genq:readers"])
    with control_plane.client("genq-reader") as reader:
        assert reader.get(jobs(ns)).status_code == 403
        ok(api.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", json={
            "metadata": {"name": "read-jobs"},
            "rules": [{"apiGroups": ["genq.io"], "resources": ["generationjobs"], "verbs": ["get", "list", "watch"]}]}))
        ok(api.post(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", json={
            "metadata": {"name": "readers"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-jobs"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "genq:readers"}]}))
        _eventually(lambda: reader.get(jobs(ns)).status_code == 200)
        assert reader.post(jobs(ns), json=job()).status_code == 403
    out = control_plane.kubectl("--kubeconfig", str(control_plane.workdir / "kubeconfig-genq-reader"), "auth", "can-i", "list", "gjob", "-n", ns)
    assert out.stdout.strip() == "yes"


@k8s
def test_apiserver_restarts_with_its_data(api, ns, control_plane):  # noqa: F811
    """The fixture can take the apiserver away and bring it back (for outage tests)."""
    ok(api.post(jobs(ns), json=job()))
    control_plane.stop_process("kube-apiserver")
    with pytest.raises(httpx.TransportError):
        api.get(f"{jobs(ns)}/job-1")
    control_plane.start_process("kube-apiserver")
    assert ok(api.get(f"{jobs(ns)}/job-1"))["spec"]["tool"] == "upscale"


def _eventually(probe, timeout: float = 60.0):
    """Poll ``probe`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {probe}")
        time.sleep(0.3)
