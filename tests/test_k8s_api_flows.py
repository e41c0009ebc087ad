"""The reference REST flows of ``test_api_flows`` again, with the Kubernetes job store.

The same genq (embedded NATS JetStream, local files, a worker per tool, housekeeping)
with ``GENQ_STORE=kubernetes``: jobs are GenerationJobs and keys are Secrets in a fresh
namespace of the real kube-apiserver started by the ``control_plane`` fixture. Every flow
test of ``test_api_flows`` is collected here a second time, against this ``live``.

Then what only a cluster has: a job cancelled with ``kubectl patch ... spec.active=false``
or deleted with ``kubectl delete``, and the API's cancel and retry showing in the spec.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from conftest import start_live, stop_live, tools_config
from genq import constants
from k8s.controlplane import control_plane  # noqa: F401  (the session fixture)
from test_api_flows import *  # noqa: F403  (the flows, collected again here)
from helpers import eventually, poll
from test_housekeeping import (  # noqa: F401  (collected again here)
    test_queued_job_whose_stream_message_was_lost_is_republished,
    test_stored_but_unpublished_job_is_republished,
)

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
        # GenerationJobs hold genq's finalizer: delete them while genq still runs (its
        # housekeeping releases them), then the namespace can go.
        control_plane.kubectl("delete", "generationjobs", "--all", "-n", ns, "--wait=false")
        deadline = time.monotonic() + 30
        with control_plane.client() as api:
            url = f"/apis/{constants.API_GROUP}/{constants.API_VERSION}/namespaces/{ns}/generationjobs"
            while api.get(url).json()["items"] and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            left = api.get(url).json()["items"]
        await stop_live(lv, server, task)
        assert not left, f"{len(left)} GenerationJobs not finalized by genq"
        with control_plane.client() as api:
            api.delete(f"/api/v1/namespaces/{ns}")


# -- what only the cluster mode has: kubectl as a second way in -------------------------------

MERGE = {"Content-Type": "application/merge-patch+json"}


def _job_url(live, job_id: str) -> str:
    from genq.adapters.kubernetes import resource_name

    return f"/apis/{constants.API_GROUP}/{constants.API_VERSION}/namespaces/{live.emb.rt.store.namespace}/generationjobs/{resource_name(job_id)}"


async def test_kubectl_active_false_cancels_queued_and_running_jobs(live, control_plane):  # noqa: F811
    async with live.client() as c:
        running = (await c.post("/v1/jobs", json={"tool": "once", "params": {"sleep": 30}})).json()["id"]
        queued = (await c.post("/v1/jobs", json={"tool": "once", "params": {"text": "behind"}})).json()["id"]
        await poll(c, running, until=("running",))
        seq = (await live.emb.rt.store.get(queued)).stream_seq
        assert seq is not None and await live.emb.rt.bus.has_message(seq)
        with control_plane.client() as api:
            t0 = time.monotonic()
            for jid in (queued, running):
                r = api.patch(_job_url(live, jid), headers=MERGE, json={"spec": {"active": False}})
                assert r.is_success, r.text
        for jid in (queued, running):
            done = await poll(c, jid, timeout=10)
            assert done["status"] == "cancelled", done
            assert "spec.active" in done["error"]["message"]
        # the queued one leaves the stream (housekeeping removes its message right after the
        # cancel's compare-and-set, which the poll can see first); the running one's worker
        # is free again at once
        gone = time.monotonic() + 5
        while await live.emb.rt.bus.has_message(seq):
            assert time.monotonic() < gone, f"message {seq} of the cancelled queued job is still in the stream"
            await asyncio.sleep(0.05)
        # and `kubectl describe gjob` says why (the Event is written right after the
        # message goes, so it may land a moment after the loop above ends)
        from genq.adapters.kubernetes import resource_name

        def reasons() -> set[tuple[str, str, str]]:
            with control_plane.client() as api:
                events = api.get(f"/api/v1/namespaces/{live.emb.rt.store.namespace}/events").json()["items"]
            return {(e["involvedObject"]["name"], e["reason"], e["involvedObject"]["kind"]) for e in events}

        wanted = {(resource_name(jid), "Cancelled", "GenerationJob") for jid in (queued, running)}
        await eventually(lambda: wanted <= reasons(), timeout=5, what="a Cancelled Event on each job")
        r = await c.post("/v1/jobs", json={"tool": "once", "params": {"text": "next"}, "wait": 10})
        assert r.json()["status"] == "succeeded"
        assert time.monotonic() - t0 < 8


async def test_kubectl_delete_stops_the_work_and_removes_the_objects(live, control_plane):  # noqa: F811
    async with live.client() as c:
        jid = (await c.post("/v1/jobs", json={"tool": "once", "params": {"sleep": 30}})).json()["id"]
        await poll(c, jid, until=("running",))
        blobs = live.emb.data_dir / "blobs" / "jobs" / jid
        with control_plane.client() as api:
            assert constants.JOB_FINALIZER in api.get(_job_url(live, jid)).json()["metadata"]["finalizers"]
            r = api.delete(_job_url(live, jid))
            assert r.is_success, r.text
            # held by genq's finalizer until housekeeping has stopped the work and cleaned up
            await eventually(lambda: api.get(_job_url(live, jid)).status_code == 404, 15, what="the record to go")
        assert (await c.get(f"/v1/jobs/{jid}")).status_code == 404
        assert not blobs.exists()
        r = await c.post("/v1/jobs", json={"tool": "once", "params": {"text": "after"}, "wait": 10})
        assert r.json()["status"] == "succeeded"


async def test_api_cancel_and_retry_show_in_the_spec(live, control_plane):  # noqa: F811
    async with live.client() as c:
        jid = (await c.post("/v1/jobs", json={"tool": "once", "params": {"sleep": 30}})).json()["id"]
        await poll(c, jid, until=("running",))
        assert (await c.post(f"/v1/jobs/{jid}/cancel")).json()["status"] == "cancelled"
        with control_plane.client() as api:
            assert api.get(_job_url(live, jid)).json()["spec"]["active"] is False
            r = await c.post(f"/v1/jobs/{jid}/retry")
            assert r.status_code == 202, r.text
            assert api.get(_job_url(live, jid)).json()["spec"]["active"] is True
        # and housekeeping does not cancel the retried job again
        await asyncio.sleep(1.0)
        assert (await c.get(f"/v1/jobs/{jid}")).json()["status"] in ("queued", "running")
        assert (await c.post(f"/v1/jobs/{jid}/cancel")).status_code == 200
