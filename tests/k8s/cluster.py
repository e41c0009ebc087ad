"""The cluster mode's roles as local processes against the real control plane
(``controlplane.py``): ``genq api``, ``genq operator`` and a worker run as a pod would
run them (the container's command and environment, the ServiceAccounts' tokens), and a
real nats-server. Used by tests/test_k8s_cluster_mode.py and
tests/test_k8s_hostile_json.py (the ``cluster`` fixture is module-scoped in each)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from genq import constants
from genq.adapters.kubernetes import resource_name
from genq.adapters.nats_server import EmbeddedNats
from helpers import rbac_documents, wait_until

TESTS = Path(__file__).resolve().parent.parent
ADMIN = "gq_admin_cluster_mode_test_key_0123456789"
GROUP = f"/apis/{constants.API_GROUP}/{constants.API_VERSION}"
MERGE = {"Content-Type": "application/merge-patch+json"}
GENQ = str(Path(sys.executable).parent / "genq")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ok(r: httpx.Response) -> dict:
    assert r.is_success, f"{r.request.method} {r.request.url} -> {r.status_code}: {r.text}"
    return r.json()


class Proc:
    """One genq role as a process (own session, log file); stopped by PID."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path):
        self.name, self.args, self.env, self.cwd = name, args, env, cwd
        self.log = cwd / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.started_at = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        """What this process wrote since its last start (the log is kept across restarts)."""
        with open(self.log, "rb") as f:
            f.seek(self.started_at)
            return f.read().decode(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def echo_pool(**spec) -> dict:
    return {
        "apiVersion": f"{constants.API_GROUP}/{constants.API_VERSION}", "kind": "ToolPool", "metadata": {"name": "echo"},
        "spec": {
            "tool": {"kind": "python", "name": "echo", "entrypoint": "genq_testtools:echo", "inputs": [0, 3],
                     "params": {"type": "object", "additionalProperties": True}},
            "label": "Echo",
            "minWorkers": 0, "maxWorkers": 2, "concurrencyPerWorker": 2, "scaleDownDelaySeconds": 2,
            "maxAttempts": 3, "activeDeadlineSeconds": 60, "resultTTLSeconds": 600,
            **spec,
        },
    }


class Cluster:
    """The namespace, nats-server and the genq processes of one test module."""

    def __init__(self, cp, ns: str, workdir: Path):
        self.cp, self.ns, self.workdir = cp, ns, workdir
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.nats = EmbeddedNats(workdir / "nats")
        self.procs: dict[str, Proc] = {}
        self.workers: list[Proc] = []

    # -- set-up ------------------------------------------------------------------------
    def start(self) -> Cluster:
        with self.cp.client() as api:
            ok(api.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns}}))
        docs = []
        for role in ("api", "worker", "operator"):
            for d in rbac_documents(role, self.ns):
                if "namespace" not in d["metadata"]:  # cluster-scoped: one per test namespace
                    d["metadata"]["name"] = f"{d['metadata']['name']}-{self.ns}"
                    if d["kind"] == "ClusterRoleBinding":
                        d["roleRef"]["name"] = f"{d['roleRef']['name']}-{self.ns}"
                docs.append(d)
        self.cp.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=genq-tests", "-f", "-",
                        input=yaml.safe_dump_all(docs))
        self.nats.start()
        self.kubeconfigs = {role: self.cp.service_account_kubeconfig(self.ns, f"genq-{role}")
                            for role in ("api", "worker", "operator")}
        self.procs["api"] = Proc("api", [GENQ, "api", "--host", "127.0.0.1", "--port", str(self.api_port)],
                                 self.env("api", GENQ_ADMIN_KEY=ADMIN), self.workdir).start()
        self.start_operator()
        wait_until(lambda: httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200, 60,
                   f"the API to be ready:\n{self.procs['api'].tail()}")
        return self

    def env(self, role: str, **extra: str) -> dict[str, str]:
        """What the chart gives each role: the store, NATS, object storage, timings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
        env.update(
            GENQ_STORE="kubernetes", GENQ_KUBE_NAMESPACE=self.ns, GENQ_KUBECONFIG=str(self.kubeconfigs[role]),
            GENQ_NATS_URL=self.nats.url, GENQ_BLOB="local", GENQ_DATA_DIR=str(self.workdir / "data"),
            GENQ_ACK_WAIT_SECONDS="5", GENQ_RECONCILE_INTERVAL_SECONDS="0.5",
            GENQ_LOG_LEVEL="INFO", PYTHONPATH=str(TESTS), GENQ_TEST_STATE=str(self.workdir), **extra,
        )
        return env

    def start_operator(self) -> Proc:
        op = Proc("operator", [GENQ, "operator"], self.env(
            "operator", GENQ_OPERATOR_NAMESPACES=self.ns, GENQ_OPERATOR_LEASE_NAMESPACE=self.ns,
            GENQ_OPERATOR_LEASE_SECONDS="6", GENQ_OPERATOR_SCALE_INTERVAL="0.5",
            GENQ_OPERATOR_WORKER_IMAGE="genq-worker:test", GENQ_OPERATOR_WORKER_PROBES="true"), self.workdir)
        self.procs["operator"] = op.start()
        return op

    def ensure_operator(self) -> None:
        """The operator exits when it cannot renew its Lease in time (a loaded machine can
        delay it); its Deployment would start it again: so does this."""
        op = self.procs.get("operator")
        if op is not None and not op.alive():
            print(f"operator had exited ({op.proc.returncode}); restarting it:\n{op.tail(15)}")
            self.start_operator()

    def run_worker_pod(self) -> Proc:
        """What a kubelet would run for one pod of the echo pool's Deployment."""
        dep = self.get(f"/apis/apps/v1/namespaces/{self.ns}/deployments/{constants.worker_deployment_name('echo')}")
        cm = self.get(f"/api/v1/namespaces/{self.ns}/configmaps/{constants.worker_deployment_name('echo')}")
        pod = dep["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "genq-worker"
        (container,) = pod["containers"]
        mount = self.workdir / f"pod-{len(self.workers)}"
        mount.mkdir()
        for key, text in cm["data"].items():
            (mount / key).write_text(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
        for e in container["env"]:
            if "value" in e:
                env[e["name"]] = e["value"]
            elif e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace":
                env[e["name"]] = self.ns
        # The volume mount, the pod's own port, its account's token, the test tool's module.
        env["GENQ_CONFIG"] = env["GENQ_CONFIG"].replace(constants.WORKER_CONFIG_DIR, str(mount))
        env.update(GENQ_WORKER_HEALTH_PORT=str(free_port()), GENQ_KUBECONFIG=str(self.kubeconfigs["worker"]),
                   PYTHONPATH=str(TESTS), GENQ_TEST_STATE=str(self.workdir), GENQ_DRAIN_SECONDS="5")
        w = Proc(f"worker-{len(self.workers)}", [GENQ, *container["args"]], env, self.workdir).start()
        self.workers.append(w)
        port = env["GENQ_WORKER_HEALTH_PORT"]
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200, 60,
                   f"the worker to be ready:\n{w.tail()}")
        return w

    def stop(self) -> None:
        for p in [*self.workers, *self.procs.values()]:
            p.stop()
            print(f"--- {p.name} (exit {p.proc.returncode if p.proc else None}) ---\n{p.tail(60)}")
        self.nats.stop()
        with self.cp.client() as api:
            api.delete(f"/api/v1/namespaces/{self.ns}")
            for kind in ("clusterrolebindings", "clusterroles"):
                for name in ("genq-operator",):
                    api.delete(f"/apis/rbac.authorization.k8s.io/v1/{kind}/{name}-{self.ns}")

    # -- helpers -----------------------------------------------------------------------
    def get(self, path: str) -> dict | None:
        with self.cp.client() as api:
            r = api.get(path)
        return None if r.status_code == 404 else ok(r)

    def job_path(self, job_id: str) -> str:
        return f"{GROUP}/namespaces/{self.ns}/generationjobs/{resource_name(job_id)}"

    def replicas(self) -> int | None:
        dep = self.get(f"/apis/apps/v1/namespaces/{self.ns}/deployments/{constants.worker_deployment_name('echo')}")
        return None if dep is None else dep["spec"].get("replicas")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)

    def wait_job(self, c: httpx.Client, job_id: str, until=("succeeded", "failed", "cancelled"), timeout: float = 30) -> dict:
        return wait_until(lambda: (j := ok(c.get(f"/v1/jobs/{job_id}")))["status"] in until and j, timeout,
                          f"job {job_id} to reach {until}")


@pytest.fixture(scope="module")
def cluster(control_plane, tmp_path_factory):
    c = Cluster(control_plane, f"genq-cm-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("cluster-mode"))
    try:
        c.start()
        control_plane.kubectl("apply", "-n", c.ns, "-f", "-", input=yaml.safe_dump(echo_pool()))
        yield c
    finally:
        c.stop()


