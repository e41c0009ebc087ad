"""The Helm chart (charts/genq) with helm built from its Go module, against the real
kube-apiserver + kube-controller-manager of tests/k8s:

- `helm lint --strict` and `helm template`, with the default values and with
  charts/genq/ci/all-on-values.yaml (every optional part on);
- the RBAC the chart renders has the same rules as deploy/rbac/*.yaml;
- every rendered manifest goes through a server-side dry run with strict field
  validation, then is applied for real: the CRDs establish, the RBAC binds, the API and
  operator Deployments are accepted, the ToolPools from the values exist;
- the operator, run as a local `genq operator` with the environment of the chart's
  operator Deployment and a kubeconfig carrying its ServiceAccount token, reconciles those
  ToolPools (worker Deployments as the chart's worker ServiceAccount, status written),
  against a real nats-server and a real S3 server (moto);
- the api and worker ServiceAccounts' tokens can do what they need and nothing more.

The official NATS chart cannot be fetched here (no chart repository is reachable), so the
default values (nats.enabled: true) render with a stand-in `nats` subchart that renders
nothing; everything applied to the apiserver uses nats.enabled=false and a real URL.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from genq import constants
from genq.adapters.nats_server import EmbeddedNats
from helm.helmbin import chart_with_nats_stub, helm_bin, run_helm  # noqa: F401  (helm_bin: the session fixture)
from helpers import start_moto, stop_process
from k8s.controlplane import control_plane, free_port  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "genq"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
RELEASE = "genq"
MONITORING_CRDS = ROOT / "tests" / "helm" / "monitoring-crds.yaml"
S3_KEY, S3_SECRET = "genq-test-key", "genq-test-secret"


# -- helm --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart(tmp_path_factory) -> Path:
    """The chart with a stand-in for the NATS dependency (see chart_with_nats_stub)."""
    return chart_with_nats_stub(CHART, tmp_path_factory.mktemp("chart"))


def helm(helm_bin: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:  # noqa: F811
    return run_helm(helm_bin, *args, check=check, timeout=120)


def render(helm_bin: Path, chart: Path, namespace: str, *values: str, sets: dict[str, str] | None = None) -> list[dict]:  # noqa: F811
    args = ["template", RELEASE, str(chart), "--namespace", namespace]
    for v in values:
        args += ["-f", v]
    for k, v in (sets or {}).items():
        args += ["--set-string" if isinstance(v, str) else "--set", f"{k}={v}"]
    out = helm(helm_bin, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, component: str) -> dict:
    hits = [d for d in by_kind(docs, kind) if d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(hits) == 1, f"{len(hits)} {kind} for {component}"
    return hits[0]


def env_of(deployment: dict) -> dict[str, dict]:
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("values", ["default", "all-on", "dev"])
def test_helm_lint(helm_bin, chart, values):  # noqa: F811
    files = {"default": [], "all-on": [str(ALL_ON)], "dev": [str(CHART / "ci" / "dev-values.yaml")]}[values]
    args = ["lint", "--strict", str(chart)] + [a for f in files for a in ("-f", f)]
    r = helm(helm_bin, *args)
    assert "0 chart(s) failed" in r.stdout, r.stdout


def test_helm_version_is_stamped(helm_bin):  # noqa: F811
    want = next(ln.split()[1] for ln in (ROOT / "tests" / "helm" / "go.mod").read_text().splitlines()
                if ln.strip().startswith("helm.sh/helm/v4 "))
    assert helm(helm_bin, "version", "--short").stdout.startswith(want)


def test_template_default_values(helm_bin, chart):  # noqa: F811
    docs = render(helm_bin, chart, "genq")
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == sorted({"ClusterRole", "ClusterRoleBinding", "Deployment", "PodDisruptionBudget",
                            "Role", "RoleBinding", "Secret", "Service", "ServiceAccount", "ToolPool"})
    # Only upscale is on by default; the NATS URL is the in-release NATS chart's Service.
    assert [p["metadata"]["name"] for p in by_kind(docs, "ToolPool")] == ["upscale"]
    api = one(docs, "Deployment", "api")
    assert env_of(api)["GENQ_NATS_URL"]["value"] == "nats://genq-nats.genq.svc:4222"
    # The bootstrap admin key: generated once, kept on uninstall, read by the API only.
    secret = one(docs, "Secret", "api")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    key = base64.b64decode(secret["data"]["admin-key"]).decode()
    assert key.startswith(constants.API_KEY_PREFIX) and len(key) > 40
    assert env_of(api)["GENQ_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert "GENQ_ADMIN_KEY" not in env_of(one(docs, "Deployment", "operator"))
    # No genq.yaml: the API and operator read the tools from the ToolPools.
    assert "GENQ_CONFIG" not in env_of(api) and not by_kind(docs, "ConfigMap")
    # NOTES.txt tells how to reach the API and get the admin key.
    notes = helm(helm_bin, "install", RELEASE, str(chart), "-n", "genq", "--dry-run=client").stdout.split("NOTES:", 1)[1]
    assert "port-forward svc/genq-api 8000:80" in notes
    assert f"get secret {secret['metadata']['name']} -o jsonpath='{{.data.admin-key}}'" in notes and "/v1/keys" in notes
    # No external NATS URL and no NATS chart: a clear error.
    r = helm(helm_bin, "template", RELEASE, str(chart), "--set", "nats.enabled=false", check=False)
    assert r.returncode and "set nats.url" in r.stderr


def test_template_all_on(helm_bin, chart):  # noqa: F811
    docs = render(helm_bin, chart, "genq", str(ALL_ON))
    assert {"Ingress", "ServiceMonitor", "PodMonitor", "PrometheusRule", "HorizontalPodAutoscaler"} <= {d["kind"] for d in docs}
    pod_monitor = by_kind(docs, "PodMonitor")[0]["spec"]
    assert pod_monitor["podMetricsEndpoints"][0]["port"] == "health"  # the worker container's port (operator/resources.py)
    assert pod_monitor["selector"]["matchLabels"] == {"app.kubernetes.io/component": "worker", "app.kubernetes.io/part-of": "genq"}
    assert sorted(p["metadata"]["name"] for p in by_kind(docs, "ToolPool")) == ["image-edit", "text-to-image", "upscale", "watermark"]
    assert not by_kind(docs, "Secret"), "the admin key comes from adminKey.existingSecret"
    ingress = by_kind(docs, "Ingress")[0]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "100m"
    assert ingress["spec"]["tls"] == [{"hosts": ["genq.example.com"], "secretName": "genq-tls"}]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert len([d for d in by_kind(docs, "PodDisruptionBudget")]) == 2  # api, and operator with 2 replicas
    api, operator = one(docs, "Deployment", "api"), one(docs, "Deployment", "operator")
    assert "replicas" not in api["spec"], "the HorizontalPodAutoscaler owns the API's replicas"
    # S3 credentials reach the API and operator from the Secret, under the standard AWS
    # names (never GENQ_*, which the operator would copy into the worker Deployments in
    # clear); the workers get the Secret through envFrom.
    for dep in (api, operator):
        env = env_of(dep)
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "genq-s3", "key": "AWS_SECRET_ACCESS_KEY"}
        assert env["GENQ_S3_ENDPOINT_URL"]["value"] == "http://minio.example.svc:9000"
        assert "GENQ_S3_SECRET_ACCESS_KEY" not in env and "GENQ_S3_ACCESS_KEY_ID" not in env
    assert env_of(operator)["GENQ_OPERATOR_WORKER_ENV_SECRET"]["value"] == "genq-worker-env"
    rule = by_kind(docs, "PrometheusRule")[0]
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"GenqAPIDown", "GenqQueueBacklog", "GenqJobFailures"} <= alerts
    metric_names = {"genq_http_requests_total", "genq_queue_queued", "genq_queue_workers", "genq_queue_wait_seconds_bucket",
                    "genq_jobs_finished_total"}
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    assert all(m in exprs for m in metric_names)


def _rules(doc: dict) -> list[tuple]:
    return sorted((tuple(sorted(r.get("apiGroups", []))), tuple(sorted(r["resources"])), tuple(sorted(r["verbs"])))
                  for r in doc["rules"])


@pytest.mark.parametrize("component", ["api", "operator", "worker"])
def test_rbac_rules_match_deploy_rbac(helm_bin, chart, component):  # noqa: F811
    ours = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rbac" / f"{component}.yaml").read_text()) if d]
    docs = [d for d in render(helm_bin, chart, "genq")
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    for kind in ("Role", "ClusterRole"):
        want = sorted(_rules(d) for d in by_kind(ours, kind))
        got = sorted(_rules(d) for d in by_kind(docs, kind))
        assert got == want, f"{component} {kind} rules differ from deploy/rbac/{component}.yaml"


def test_worker_cannot_change_job_spec_by_rbac():
    """Issue 5 item 3: the worker reads jobs and writes only their status."""
    worker = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rbac" / "worker.yaml").read_text()) if d]
    rules = by_kind(worker, "Role")[0]["rules"]
    jobs = [r for r in rules if "generationjobs" in r["resources"]]
    assert jobs and all(set(r["verbs"]) <= {"get", "list", "watch"} for r in jobs)


# -- against the apiserver -----------------------------------------------------------------


class Installed:
    """The all-on chart applied to a fresh namespace of the test apiserver."""

    def __init__(self, cp, namespace: str, docs: list[dict], workdir: Path, nats_url: str, s3_url: str):
        self.cp, self.namespace, self.docs, self.workdir = cp, namespace, docs, workdir
        self.nats_url, self.s3_url = nats_url, s3_url

    def token_kubeconfig(self, service_account: str) -> Path:
        """A kubeconfig that authenticates as ``service_account`` with a bound token
        (TokenRequest), as a pod of that ServiceAccount would."""
        token = self.cp.kubectl("-n", self.namespace, "create", "token", service_account, "--duration=1h").stdout.strip()
        path = self.workdir / f"kubeconfig-{service_account}"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.cp.server,
                "certificate-authority-data": base64.b64encode(self.cp.ca_file.read_bytes()).decode()}}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": service_account, "namespace": self.namespace}}],
            "current-context": "test",
        }))
        path.chmod(0o600)
        return path

    def client(self, service_account: str) -> httpx.Client:
        token = self.cp.kubectl("-n", self.namespace, "create", "token", service_account).stdout.strip()
        return httpx.Client(base_url=self.cp.server, verify=ssl.create_default_context(cafile=str(self.cp.ca_file)), timeout=30,
                            headers={"Authorization": f"Bearer {token}"})

    def sa(self, component: str) -> str:
        return one(self.docs, "ServiceAccount", component)["metadata"]["name"]


@pytest.fixture(scope="module")
def installed(control_plane, helm_bin, chart, tmp_path_factory):  # noqa: F811
    cp = control_plane
    workdir = tmp_path_factory.mktemp("chart-install")
    nats = EmbeddedNats(workdir / "nats")
    nats.start()
    moto, s3_url = start_moto(workdir / "moto.log")
    namespace = f"genq-chart-{uuid.uuid4().hex[:6]}"
    docs: list[dict] = []
    try:
        cp.kubectl("create", "namespace", namespace)
        # What a platform engineer creates before `helm install` with these values.
        for name, data in {"genq-admin": {"key": "gq_chart-test-admin"},
                           "genq-s3": {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET},
                           "genq-worker-env": {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}}.items():
            cp.kubectl("-n", namespace, "create", "secret", "generic", name, *(f"--from-literal={k}={v}" for k, v in data.items()))
        cp.apply(MONITORING_CRDS)
        docs = render(helm_bin, chart, namespace, str(ALL_ON), sets={"nats.url": nats.url, "s3.endpoint": s3_url})
        manifest = workdir / "rendered.yaml"
        manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        # The chart's CRDs (helm installs crds/ before the templates): identical to the
        # ones the fixture applied, so this is a no-op that must still succeed.
        cp.apply(chart / "crds")
        common = ["-n", namespace, "apply", "--server-side", "--field-manager=helm", "-f", str(manifest)]
        cp.kubectl(*common[:3], "--dry-run=server", "--validate=strict", *common[3:])
        cp.kubectl(*common, "--validate=strict")
        yield Installed(cp, namespace, docs, workdir, nats.url, s3_url)
    finally:
        cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        for doc in docs:
            if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                cp.kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"], check=False)
        stop_process(moto)
        nats.stop()


def test_default_values_pass_a_strict_server_dry_run(control_plane, helm_bin, chart):  # noqa: F811
    namespace = f"genq-dry-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", namespace)
    try:
        docs = render(helm_bin, chart, namespace)
        manifest = control_plane.workdir / f"{namespace}.yaml"
        manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        r = control_plane.kubectl("-n", namespace, "apply", "--server-side", "--dry-run=server", "--validate=strict",
                                  "--field-manager=helm", "-f", str(manifest))
        assert r.stdout.count("(server dry run)") == len(docs)
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_chart_applies_and_its_objects_are_accepted(installed):
    cp, ns = installed.cp, installed.namespace
    for crd in ("generationjobs.genq.io", "toolpools.genq.io"):
        cp.kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{crd}")
    # The Deployments are accepted and the controller manager acts on them (ReplicaSets).
    for component in ("api", "operator"):
        name = one(installed.docs, "Deployment", component)["metadata"]["name"]
        deadline = time.monotonic() + 30
        while True:
            rs = yaml.safe_load(cp.kubectl("-n", ns, "get", "replicasets", "-l", f"app.kubernetes.io/component={component}", "-o", "yaml").stdout)
            if rs["items"]:
                break
            assert time.monotonic() < deadline, f"no ReplicaSet for Deployment {name}"
            time.sleep(0.5)
    # The ToolPools from the values, with the values' spec (defaults filled in by the CRD).
    pools = {p["metadata"]["name"]: p for p in yaml.safe_load(cp.kubectl("-n", ns, "get", "toolpools", "-o", "yaml").stdout)["items"]}
    assert sorted(pools) == ["image-edit", "text-to-image", "upscale", "watermark"]
    assert pools["upscale"]["spec"]["concurrencyPerWorker"] == 2
    assert pools["image-edit"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pools["text-to-image"]["spec"]["maxQueued"] == 100  # a CRD default
    # The RBAC binds: each ServiceAccount can do its core job.
    for component, verb, resource, *sub in (("api", "create", "generationjobs.genq.io"),
                                            ("operator", "create", "deployments.apps"),
                                            ("worker", "update", "generationjobs.genq.io", "--subresource=status")):
        sa = f"system:serviceaccount:{ns}:{installed.sa(component)}"
        r = cp.kubectl("-n", ns, "auth", "can-i", verb, resource, *sub, "--as", sa, check=False)
        assert r.stdout.strip() == "yes", f"{component}: can-i {verb} {resource}: {r.stdout}{r.stderr}"
    for kind in ("ServiceMonitor", "PrometheusRule", "Ingress", "HorizontalPodAutoscaler"):
        assert cp.kubectl("-n", ns, "get", kind.lower(), "-o", "name").stdout.strip()


def _job(name: str) -> dict:
    return {"apiVersion": "genq.io/v1alpha1", "kind": "GenerationJob", "metadata": {"name": name},
            "spec": {"tool": "upscale", "variant": "lanczos", "params": {"scale": 2}, "owner": "k-test",
                     "priority": "normal", "active": True, "ttlSecondsAfterFinished": 3600}}


def test_rbac_with_service_account_tokens(installed):
    ns = installed.namespace
    jobs = f"/apis/genq.io/v1alpha1/namespaces/{ns}/generationjobs"
    name = f"gj-rbac-{uuid.uuid4().hex[:6]}"
    with installed.client(installed.sa("api")) as api:
        r = api.post(jobs, json=_job(name))
        assert r.status_code == 201, r.text
        deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "sneaky"},
                      "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                          "metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
        r = api.post(f"/apis/apps/v1/namespaces/{ns}/deployments", json=deployment)
        assert r.status_code == 403, r.text
    merge = {"Content-Type": "application/merge-patch+json"}
    with installed.client(installed.sa("worker")) as worker:
        r = worker.patch(f"{jobs}/{name}/status", headers=merge, json={"status": {"progress": 0.5, "attempts": 1}})
        assert r.status_code == 200, r.text
        assert r.json()["status"]["progress"] == 0.5
        r = worker.patch(f"{jobs}/{name}", headers=merge, json={"spec": {"active": False}})
        assert r.status_code == 403, r.text
        current = worker.get(f"{jobs}/{name}").json()
        current["spec"]["priority"] = "high"
        r = worker.put(f"{jobs}/{name}", json=current)
        assert r.status_code == 403, r.text
        r = worker.post(jobs, json=_job(name + "-w"))
        assert r.status_code == 403, r.text
    installed.cp.kubectl("-n", ns, "delete", "generationjob", name, "--wait=false")


def _resolve_env(installed: Installed, deployment: dict) -> dict[str, str]:
    """The container's environment as the kubelet would build it, from the objects in
    the namespace (Secrets) and the pod's own fields."""
    out = {}
    for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in e:
            out[e["name"]] = e["value"]
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            assert src["fieldRef"]["fieldPath"] == "metadata.namespace"
            out[e["name"]] = installed.namespace
        else:
            ref = src["secretKeyRef"]
            secret = yaml.safe_load(installed.cp.kubectl("-n", installed.namespace, "get", "secret", ref["name"], "-o", "yaml").stdout)
            out[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return out


def _run_role(installed: Installed, component: str, cwd: Path, **overrides: str) -> tuple[subprocess.Popen, Path]:
    """``genq <component>`` as a local process with the environment of the chart's
    Deployment and a kubeconfig carrying its ServiceAccount's token (KUBECONFIG stands in
    for the in-cluster service account files)."""
    env = _resolve_env(installed, one(installed.docs, "Deployment", component))
    env.update(overrides)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "KUBE", "AWS_"))}
    base["KUBECONFIG"] = str(installed.token_kubeconfig(installed.sa(component)))
    log = cwd / f"{component}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([_genq(), component], cwd=cwd, env={**base, **env},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _stop(proc: subprocess.Popen, grace: float = 30) -> bool:
    """SIGTERM, as the kubelet sends; True when the process exited by itself within
    ``grace`` seconds (the pods' grace period; else it is killed, as the kubelet would)."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def _genq() -> str:
    exe = shutil.which("genq") or str(Path(sys.executable).parent / "genq")
    assert Path(exe).exists(), "the genq command is not installed"
    return exe


def test_operator_reconciles_the_toolpools_from_values(installed, tmp_path):
    cp, ns = installed.cp, installed.namespace
    proc, log = _run_role(installed, "operator", tmp_path, GENQ_OPERATOR_SCALE_INTERVAL="1")
    pools = ["image-edit", "text-to-image", "upscale", "watermark"]
    api = cp.client()
    try:
        def get(path: str) -> dict | None:
            r = api.get(path)
            return r.json() if r.status_code == 200 else None

        deadline = time.monotonic() + 90
        pending = set(pools)
        while pending:
            assert proc.poll() is None, f"genq operator exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            for tool in sorted(pending):
                status = (get(f"/apis/genq.io/v1alpha1/namespaces/{ns}/toolpools/{tool}") or {}).get("status") or {}
                dep = get(f"/apis/apps/v1/namespaces/{ns}/deployments/{constants.worker_deployment_name(tool)}")
                if dep is not None and "replicas" in status and status.get("conditions"):
                    pending.discard(tool)
            if pending:
                assert time.monotonic() < deadline, f"not reconciled: {sorted(pending)}\n{log.read_text()[-4000:]}"
                time.sleep(0.5)
        worker_sa = installed.sa("worker")
        for tool in pools:
            dep = get(f"/apis/apps/v1/namespaces/{ns}/deployments/{constants.worker_deployment_name(tool)}")
            pod = dep["spec"]["template"]["spec"]
            assert pod["serviceAccountName"] == worker_sa
            container = pod["containers"][0]
            assert container["envFrom"] == [{"secretRef": {"name": "genq-worker-env", "optional": True}}]
            wenv = {e["name"]: e.get("value") for e in container["env"]}
            assert wenv["GENQ_NATS_URL"] == installed.nats_url and wenv["GENQ_BLOB"] == "s3"
            assert not [k for k in wenv if "SECRET" in k or k.startswith("AWS_")], "no credentials in the Deployment"
            assert dep["metadata"]["ownerReferences"][0]["name"] == tool
            if tool == "watermark":
                assert container["image"] == "ghcr.io/genq/genq-worker:0.1.0"
        # minWorkers: 1 of text-to-image keeps one worker up with no backlog.
        assert get(f"/apis/genq.io/v1alpha1/namespaces/{ns}/toolpools/text-to-image")["status"]["replicas"] == 1
        text = log.read_text()
        assert "Forbidden" not in text and " 403" not in text, f"the operator hit RBAC denials:\n{text[-4000:]}"
    finally:
        api.close()
        # Known issue: in cluster mode `genq operator` does not exit on SIGTERM (kopf stops,
        # the Lease election goes on), so do not wait the pods' full grace period here.
        _stop(proc, grace=5)


def test_api_runs_with_the_chart_settings_and_its_service_account(installed, tmp_path):
    """`genq api` with the API Deployment's environment (admin key and S3 credentials from
    their Secrets, NATS, the Kubernetes store) and the API ServiceAccount's token: ready,
    the admin key creates a key (a Secret), and a submitted job becomes a GenerationJob."""
    from conftest import png_bytes

    port = free_port()
    proc, log = _run_role(installed, "api", tmp_path, GENQ_HOST="127.0.0.1", GENQ_PORT=str(port))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"genq api exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
                try:
                    ready = c.get("/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"not ready: {log.read_text()[-4000:]}"
                time.sleep(0.5)
            admin = {"Authorization": "Bearer gq_chart-test-admin"}  # the all-on values' adminKey Secret
            r = c.post("/v1/keys", headers=admin, json={"name": "chart-test"})
            assert r.status_code in (200, 201), r.text
            key = {"Authorization": f"Bearer {r.json()['key']}"}
            tools = {t["name"] for t in c.get("/v1/tools", headers=key).json()["tools"]}
            assert tools == {"image-edit", "text-to-image", "upscale", "watermark"}, "the tools are the ToolPools"
            r = c.post("/v1/jobs", headers=key, data={"tool": "upscale", "variant": "lanczos", "scale": "2"},
                       files={"image": ("in.png", png_bytes(), "image/png")})
            assert r.status_code == 202, r.text
            job = r.json()["id"]
        name = job.lower()
        obj = yaml.safe_load(installed.cp.kubectl("-n", installed.namespace, "get", "generationjob", name, "-o", "yaml").stdout)
        assert obj["spec"]["tool"] == "upscale" and obj["spec"]["variant"] == "lanczos"
        text = log.read_text()
        assert "Forbidden" not in text and " 403" not in text, f"the API hit RBAC denials:\n{text[-4000:]}"
        # No operator runs now to release the job's finalizer: let the namespace go.
        installed.cp.kubectl("-n", installed.namespace, "patch", "generationjob", name, "--type=merge",
                             "-p", '{"metadata": {"finalizers": null}}')
    finally:
        _stop(proc)
