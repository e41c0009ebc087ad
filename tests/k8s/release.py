"""genq's chart installed on the real node (``node.py``) the way the tests and the node
benchmark need it: NATS and S3 on the host at the node's address (the chart's
``nats.enabled=false`` + ``nats.url`` and ``s3.endpoint``), the images from
``build-images.sh``, the upscale pool without GPUs and an ``echo`` pool of the tests'
python tool (``tests/genq_testtools.py``) that scales from zero to three workers.

Why NATS and S3 on the host rather than in pods: the official NATS chart cannot be
fetched here, the ``nats-server`` binary genq already ships runs exactly as it would
behind a Service, and a test can stop either by its PID.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from PIL import Image

from genq.adapters.nats_server import EmbeddedNats
from helm.helmbin import chart_with_nats_stub, run_helm
from conftest import ECHO_PARAMS
from helpers import start_moto, stop_process
from k8s.node import NODE_IP, Node

ROOT = Path(__file__).resolve().parent.parent.parent
CHART = ROOT / "charts" / "genq"
RELEASE = "genq"
S3_KEY, S3_SECRET = "genq-node-key", "genq-node-secret"

def png(w: int = 24, h: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 90)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Release:
    """The installed chart: its namespace, the API Service's URL and helpers."""

    node: Node
    helm_bin: Path
    chart: Path
    namespace: str
    values: Path
    api_url: str
    nats: EmbeddedNats
    s3_url: str
    admin: str = ""

    def kubectl(self, *args: str, check: bool = True) -> str:
        return self.node.kubectl("-n", self.namespace, *args, check=check).stdout

    def get(self, kind: str, name: str = "") -> dict:
        return json.loads(self.kubectl("get", kind, *([name] if name else []), "-o", "json"))

    def helm(self, *args: str, check: bool = True) -> str:
        return run_helm(self.helm_bin, *args, "-n", self.namespace, kubeconfig=self.node.cp.kubeconfig,
                        check=check, timeout=600).stdout

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {key or self.admin}"}, timeout=30)

    def new_key(self, **body) -> str:
        with self.client() as c:
            r = c.post("/v1/keys", json={"name": body.pop("name", "node-test"), **body})
            assert r.status_code == 201, r.text
            return r.json()["key"]

    def pods(self, component: str, tool: str | None = None) -> list[dict]:
        """The component's pods that are not terminating."""
        selector = f"app.kubernetes.io/component={component}" + (f",genq.io/tool={tool}" if tool else "")
        pods = json.loads(self.kubectl("get", "pods", "-l", selector, "-o", "json"))["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def debug(self) -> str:
        return self.node.pod_logs(self.namespace)


def _values(node: Node, nats_url: str, s3_url: str) -> dict:
    def image(name: str) -> dict:
        repository, tag = node.images[name].rsplit(":", 1)
        return {"repository": repository, "tag": tag}

    small = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}}
    # No GPU here. Helm merges maps, so the chart's defaults go only when set to null.
    no_gpu = {"resources": {"nvidia.com/gpu": None, "memory": None}, "tolerations": [], "options": {"device": "cpu"}}
    return {
        "image": {"api": image("api"), "operator": image("operator"), "worker": image("worker-test"),
                  "pullPolicy": "Never"},
        "nats": {"enabled": False, "url": nats_url},
        "s3": {"endpoint": s3_url, "existingSecret": "genq-s3"},
        "api": {"resources": small},
        # The tests poll job status: premium keys, with room for it.
        "limits": {"ratePremium": "100000/minute"},
        "operator": {"resources": small},  # the chart's scaleInterval (5 s): cold starts use the watch
        "toolPools": {"upscale": {**no_gpu, "maxWorkers": 1}},
        "extraToolPools": [{
            "tool": {"kind": "python", "name": "echo", "entrypoint": "genq_testtools:echo", "params": ECHO_PARAMS,
                     "inputs": [0, 3]},
            "label": "Echo", "minWorkers": 0, "maxWorkers": 3, "concurrencyPerWorker": 1, "maxQueued": 200,
            "maxAttempts": 3, "activeDeadlineSeconds": 300, "scaleDownDelaySeconds": 5,
            "resources": {"cpu": "50m", "memory": "128Mi"},
        }],
    }


@contextlib.contextmanager
def installed(node: Node, helm_bin: Path, workdir: Path, **overrides) -> Iterator[Release]:
    """`helm install` into a fresh namespace, waiting for the pods; uninstalled after."""
    nats = EmbeddedNats(workdir / "nats", host=NODE_IP)
    nats.start()
    moto, s3_url = start_moto(workdir / "moto.log", host=NODE_IP)
    namespace = f"genq-node-{uuid.uuid4().hex[:6]}"
    chart = chart_with_nats_stub(CHART, workdir)
    values = workdir / "values.yaml"
    values.write_text(yaml.safe_dump(_merge(_values(node, nats.url, s3_url), overrides)))
    rel = Release(node, helm_bin, chart, namespace, values, "", nats, s3_url)
    try:
        node.kubectl("create", "namespace", namespace)
        rel.kubectl("create", "secret", "generic", "genq-s3",
                    f"--from-literal=AWS_ACCESS_KEY_ID={S3_KEY}", f"--from-literal=AWS_SECRET_ACCESS_KEY={S3_SECRET}")
        try:
            rel.helm("install", RELEASE, str(chart), "-f", str(values), "--wait", "--timeout", "5m")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{rel.debug()}") from None
        # The admin key the chart generated (kept across upgrades and uninstall).
        secret = rel.get("secret", f"{RELEASE}-admin-key")
        rel.admin = base64.b64decode(secret["data"]["admin-key"]).decode()
        service = rel.get("service", f"{RELEASE}-api")
        rel.api_url = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
        yield rel
    finally:
        rel.helm("uninstall", RELEASE, "--wait", "--timeout", "2m", check=False)
        node.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        stop_process(moto)
        nats.stop()




def _merge(base: dict, overrides: dict) -> dict:
    for k, v in overrides.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base
