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
