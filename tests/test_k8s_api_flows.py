"""The reference REST flows of ``test_api_flows`` again, with the Kubernetes job store.

The same genq (embedded NATS JetStream, local files, a worker per tool, housekeeping)
with ``GENQ_STORE=kubernetes``: jobs are GenerationJobs and keys are Secrets in a fresh
namespace of the real kube-apiserver started by the ``control_plane`` fixture. Every flow
test of ``test_api_flows`` is collected here a second time, against this ``live``.
"""

from __future__ import annotations

import uuid

import pytest

from conftest import start_live, stop_live, tools_config
from k8s.controlplane import control_plane  # noqa: F401  (the session fixture)
from test_api_flows import *  # noqa: F403  (the flows, collected again here)

pytestmark = pytest.mark.k8s


@pytest.fixture
async def live(tmp_path, monkeypatch, request, control_plane):  # noqa: F811
    ns = f"genq-flows-{uuid.uuid4().hex[:8]}"
    with control_plane.client() as api:
        r = api.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        assert r.is_success, r.text
    monkeypatch.setenv("GENQ_TEST_STATE", str(tmp_path))
    marker = request.node.get_closest_marker("genq")
    kw = dict(marker.kwargs) if marker else {}
    config = tools_config(**kw.pop("tools", {}))
    lv, server, task = await start_live(tmp_path, config, store="kubernetes", kube_namespace=ns,
                                        kubeconfig=control_plane.kubeconfig, **kw)
    try:
        yield lv
    finally:
        await stop_live(lv, server, task)
        with control_plane.client() as api:
            api.delete(f"/api/v1/namespaces/{ns}")
