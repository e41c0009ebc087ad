"""The cluster mode end to end, each role its own process, each with only its own RBAC.

Against the real kube-apiserver + kube-controller-manager of the ``control_plane``
fixture and a real nats-server:

- ``genq api`` and ``genq operator`` run as local processes, authenticated as the
  ``genq-api`` and ``genq-operator`` ServiceAccounts (tokens from the TokenRequest API)
  bound by ``deploy/rbac``; the tools are the namespace's ToolPools (no genq.yaml).
- The operator turns the ToolPool into a ConfigMap and a worker Deployment. There is no
  kubelet, so the test runs what the pod would run: the container's command and
  environment, the ConfigMap as its mounted file, the ``genq-worker`` account's token.
- A job submitted over REST becomes a GenerationJob, that worker moves it to Succeeded
  with results, and the operator scales the Deployment up on backlog and back to zero.
- The operator SIGKILLed mid-work and started again converges: a job cancelled with
  ``kubectl`` while it was down is cancelled, its worker freed, the backlog drained, the
  Deployment scaled back down.
- The apiserver stopped for 30 s: the API answers 503 with the error body (reads of known
  jobs keep coming from the watch cache), and everything recovers without a restart.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from genq import constants
from k8s.controlplane import control_plane  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.k8s

from helpers import wait_until
from k8s.cluster import MERGE, cluster, ok  # noqa: F401  (cluster: the fixture)


def test_submit_becomes_a_generation_job_that_a_pool_worker_finishes(cluster):
    c = cluster
    # The API's tools are the namespace's ToolPools.
    with c.client() as api:
        wait_until(lambda: [t["name"] for t in ok(api.get("/v1/tools"))["tools"]] == ["echo"], 20, "the pool as a tool")
        jid = ok(api.post("/v1/jobs", json={"tool": "echo", "params": {"text": "cluster", "seed": 3}}))["id"]
        gjob = c.get(c.job_path(jid))
        assert gjob["spec"]["tool"] == "echo" and gjob["spec"]["owner"] and gjob["spec"]["active"] is True
        assert constants.JOB_FINALIZER in gjob["metadata"]["finalizers"]
        # Backlog, no worker: the operator scales the pool's Deployment up.
        wait_until(lambda: c.replicas() == 1, 30, "scale-up on backlog")
        c.run_worker_pod()
        done = c.wait_job(api, jid)
        assert done["status"] == "succeeded" and done["result"]["seed"] == 3, done
        png = api.get(done["result"]["files"][0]["url"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    status = c.get(c.job_path(jid))["status"]
    assert status["worker"].startswith("echo-") and status["seed"] == 3 and status["results"]
    out = c.cp.kubectl("get", "generationjobs", "-n", c.ns).stdout
    assert "Completed" in out and "echo" in out, out
    # Idle: back to zero after scaleDownDelaySeconds (the local worker is not a pod).
    wait_until(lambda: c.replicas() == 0, 30, "scale to zero when idle")


def test_operator_killed_mid_work_and_restarted_converges(cluster):
    c = cluster
    c.ensure_operator()
    if not c.workers or not c.workers[0].alive():
        c.run_worker_pod()
    with c.client() as api:
        slow = [ok(api.post("/v1/jobs", json={"tool": "echo", "params": {"text": f"slow{i}", "sleep": 4}}))["id"]
                for i in range(2)]
        stuck = ok(api.post("/v1/jobs", json={"tool": "echo", "params": {"text": "stuck", "sleep": 60}}))["id"]
        wait_until(lambda: c.replicas() == 2, 30, "scale-up for 3 jobs of 2 slots per worker")
        c.procs["operator"].kill()
        # While no operator runs: the API keeps taking work, kubectl cancels a job.
        more = [ok(api.post("/v1/jobs", json={"tool": "echo", "params": {"text": f"more{i}"}}))["id"] for i in range(3)]
        c.wait_job(api, stuck, until=("running", "queued"))
        with c.cp.client() as k:
            ok(k.patch(c.job_path(stuck), headers=MERGE, json={"spec": {"active": False}}))
        time.sleep(2)
        assert ok(api.get(f"/v1/jobs/{stuck}"))["status"] in ("queued", "running"), "cancelled with no operator?"
        c.start_operator()
        cancelled = c.wait_job(api, stuck, timeout=30)
        assert cancelled["status"] == "cancelled" and "spec.active" in cancelled["error"]["message"]
        for jid in slow + more:
            assert c.wait_job(api, jid, timeout=60)["status"] == "succeeded"
    wait_until(lambda: c.replicas() == 0, 40, "scale back to zero after the restart")
    lease = c.get(f"/apis/coordination.k8s.io/v1/namespaces/{c.ns}/leases/{constants.OPERATOR_LEASE}")
    assert lease["spec"]["holderIdentity"], lease


def test_apiserver_outage_of_30s_gives_503_then_recovers(cluster):
    c = cluster
    c.ensure_operator()
    if not c.workers or not c.workers[0].alive():
        c.run_worker_pod()
    with c.client() as api:
        before = ok(api.post("/v1/jobs", json={"tool": "echo", "params": {"text": "before"}, "wait": 20}))
        assert before["status"] == "succeeded"
        c.cp.stop_process("kube-apiserver")
        t0 = time.monotonic()
        try:
            codes = []
            while time.monotonic() - t0 < 30:
                r = api.post("/v1/jobs", json={"tool": "echo", "params": {"text": "during"}}, timeout=20)
                codes.append(r.status_code)
                if r.status_code != 202:
                    body = r.json()
                    assert r.status_code == 503 and body["error"]["code"] == "unavailable", r.text
                # Known jobs still read from the watch cache.
                assert ok(api.get(f"/v1/jobs/{before['id']}"))["status"] == "succeeded"
                time.sleep(1.0)
            assert codes and set(codes) == {503}, codes
            assert api.get("/readyz").status_code == 503
        finally:
            c.cp.start_process("kube-apiserver")
        # Recovery without restarting anything.
        wait_until(lambda: api.get("/readyz").status_code == 200, 60, "the API ready again")
        after = ok(api.post("/v1/jobs", json={"tool": "echo", "params": {"text": "after"}}))
        assert c.wait_job(api, after["id"], timeout=60)["status"] == "succeeded"
    # The API and the worker rode it out in place. An operator that could not renew its
    # Lease for longer than its renew deadline exits non-zero rather than risk a second
    # leader, and its Deployment starts it again: do what the Deployment would.
    assert c.procs["api"].alive() and all(w.alive() for w in c.workers), {p.name: p.tail() for p in c.procs.values()}
    op = c.procs["operator"]
    if not op.alive():
        assert op.proc.returncode not in (0, None), op.tail()
        c.start_operator()
    with c.client() as api:
        ok(api.post("/v1/jobs", json={"tool": "echo", "params": {"text": "late", "sleep": 20}}))
    wait_until(lambda: c.replicas() == 1, 60, "the operator scaling again after the outage")


def test_operator_exits_promptly_on_sigterm(cluster):
    """A rollout or node drain sends SIGTERM: the operator stops its handlers, its
    housekeeping and its Lease renewals, and exits 0, well inside the grace period (a
    successor then waits at most the Lease duration)."""
    c = cluster
    c.ensure_operator()
    op = c.procs["operator"]
    # This start's own output: after a restart the log still holds the last one's "leads".
    wait_until(lambda: "leads; starting the handlers" in op.output(), 60, "the operator to lead")
    t0 = time.monotonic()
    os.kill(op.proc.pid, signal.SIGTERM)
    op.proc.wait(30)
    assert op.proc.returncode == 0 and time.monotonic() - t0 < 15, (op.proc.returncode, op.tail())
