"""The helm binary the chart tests run: ``GENQ_HELM_BIN``, or the one ``build-helm.sh``
caches for the current go.mod (built here on first use when Go is on PATH).

Missing helm skips the chart tests, unless ``GENQ_K8S_REQUIRED=1`` (CI), where it fails
them, as the control-plane fixture does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-helm.sh"


def helm_path() -> Path | None:
    env = os.environ.get("GENQ_HELM_BIN")
    if env:
        path = Path(env)
    else:
        if shutil.which(os.environ.get("GO", "go")) is None:
            return None
        try:
            out = subprocess.run([str(BUILD_SCRIPT), "--print-path"], check=True, capture_output=True, text=True, timeout=60)
        except (subprocess.SubprocessError, OSError):
            return None
        path = Path(out.stdout.strip())
    return path if path.is_file() and os.access(path, os.X_OK) else None


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    path = helm_path()
    if path is None and shutil.which(os.environ.get("GO", "go")) is not None and not os.environ.get("GENQ_HELM_BIN"):
        print("building helm from its Go module (once) …", flush=True)
        subprocess.run([str(BUILD_SCRIPT)], check=True, timeout=3600)
        path = helm_path()
    if path is None:
        reason = "helm not built and no Go toolchain: run tests/helm/build-helm.sh (or set GENQ_HELM_BIN)"
        if os.environ.get("GENQ_K8S_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def run_helm(helm_bin: Path, *args: str, kubeconfig: Path | None = None, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Run helm with its own cache/config folders (never the user's) and no KUBE* variables
    of the caller's environment; ``kubeconfig`` names the cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
    home = Path(os.environ.get("TMPDIR", "/tmp")) / "genq-helm-home"
    env.update(HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"), HELM_DATA_HOME=str(home / "data"))
    if kubeconfig is not None:
        args = (*args, "--kubeconfig", str(kubeconfig))
    r = subprocess.run([str(helm_bin), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"helm {' '.join(args)} exited with {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def chart_with_nats_stub(chart: Path, dest: Path) -> Path:
    """A copy of ``chart`` with a stand-in for its NATS dependency in charts/: helm refuses
    to render a chart whose dependency is missing, even a disabled one, and no chart
    repository is reachable here. The stand-in renders nothing."""
    import yaml

    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    dep = next(d for d in meta["dependencies"] if d["name"] == "nats")
    copy = dest / chart.name
    shutil.copytree(chart, copy)
    stub = copy / "charts" / "nats"
    stub.mkdir(parents=True)
    (stub / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "nats", "version": dep["version"].replace(".x", ".0"),
        "description": "test stand-in for the official NATS chart (renders nothing)"}))
    return copy
