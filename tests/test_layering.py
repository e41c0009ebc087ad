"""The layering in .importlinter holds (api/worker/operator independent, ML only in the
worker's tools), checked on a real ``pip install .`` of this checkout; and the package
imports with the standard library's ``operator`` untouched."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_and_import_contracts(tmp_path):
    target = tmp_path / "site"
    # Never start Python with the repo root as cwd: ./operator would shadow the stdlib's.
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for pkg in ("api", "worker", "operator", "adapters"):
        assert (target / "genq" / pkg / "__init__.py").exists()
    assert not (target / "operator").exists()  # never a top-level `operator`
    env = {**os.environ, "PYTHONPATH": str(target)}
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe), "--config", str(ROOT / ".importlinter")], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 8 kept, 0 broken" in r.stdout, r.stdout


def test_everything_imports_and_stdlib_operator_is_intact():
    code = (
        "import genq.api, genq.worker.worker, genq.housekeeping, genq.lifecycle, genq.cli, genq.embedded\n"
        "import operator, genq.operator\n"
        "assert hasattr(operator, 'itemgetter') and genq.operator.__name__ == 'genq.operator'\n"
        "import sys; assert 'torch' not in sys.modules, 'the API must not pull in the ML stack'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
