"""Cluster mode at scale: 10,000 live GenerationJobs in one namespace of a real
kube-apiserver (+ etcd, kube-controller-manager, built from Go modules by
``tests/k8s/build-bins.sh``).

The cluster topology, each role its own process: ``genq api`` (Kubernetes store, tools
from ToolPools), ``genq operator`` (kopf handlers + housekeeping), one ``genq worker``
for the ``echo`` pool (a no-op python tool), and a nats-server. Two pools: ``echo`` (one
worker, idle) and ``bulk`` (no worker: its jobs stay queued, live GenerationJobs).

1. **Submit rate**: ``--jobs`` (10,000) ``POST /v1/jobs`` to ``bulk`` from ``--clients``
   concurrent clients: jobs/s, and p50/p99 of one submit.
2. **Status read** with all of them live: ``--gets`` ``GET /v1/jobs/{id}`` of random
   ``bulk`` jobs (position included), p50/p99 (served from the API's watch cache).
3. **Submit → running** on an idle worker: ``--probes`` sequential ``echo`` jobs;
   ``started_at - created_at`` (both stamped by genq on this machine). Target p50 <= 100 ms.
4. **Operator reconcile lag** with 10,000 jobs in its caches: ``--probes`` ``bulk`` jobs
   cancelled with ``spec.active: false`` (a merge patch, as ``kubectl patch`` sends) until
   the operator's housekeeping has written them Cancelled (seen over the watch).
   And the ToolPool scaler: the time from the first job of a new pool to its Deployment
   scaled to one replica.

    python bench/k8s_scale.py [--jobs 10000] [--clients 32] [--gets 2000] [--probes 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

import httpx
import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from _common import ADMIN, AUTH, machine, median, pct, workdir  # noqa: E402

from genq import constants  # noqa: E402
from genq.adapters.kubernetes import resource_name  # noqa: E402
from genq.adapters.nats_server import EmbeddedNats, free_port  # noqa: E402

GENQ = str(Path(sys.executable).parent / "genq")
GROUP = f"/apis/{constants.API_GROUP}/{constants.API_VERSION}"
NS = "genq-scale"
SUBMIT_TO_RUNNING_TARGET_MS = 100.0


def pool(name: str, **spec) -> dict:
    return {"apiVersion": f"{constants.API_GROUP}/{constants.API_VERSION}", "kind": "ToolPool", "metadata": {"name": name},
            "spec": {"tool": {"kind": "python", "name": name, "entrypoint": "benchtools:noop", "inputs": [0, 0],
                              "params": {"type": "object", "additionalProperties": True}},
                     "minWorkers": 0, "maxWorkers": 1, "concurrencyPerWorker": 1, "maxQueued": 1_000_000,
                     "resultTTLSeconds": 86400, "activeDeadlineSeconds": 60, **spec}}


class Roles:
    """genq api, operator and worker processes against the control plane."""

    def __init__(self, cp, work: Path, nats_url: str):
        self.cp, self.work, self.nats_url = cp, work, nats_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
        env.update(GENQ_STORE="kubernetes", GENQ_KUBE_NAMESPACE=NS, GENQ_KUBECONFIG=str(self.cp.kubeconfig),
                   GENQ_NATS_URL=self.nats_url, GENQ_DATA_DIR=str(self.work / "data"), GENQ_LOG_LEVEL="WARNING",
                   GENQ_RATE_PREMIUM="100000000/minute", GENQ_DEFAULT_KEY_MAX_QUEUED="1000000",
                   PYTHONPATH=str(BENCH), **extra)
        return env

    def spawn(self, name: str, args: list[str], **extra: str):
        import subprocess

        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115  (kept open by the child)
        p = subprocess.Popen([GENQ, *args], env=self.env(**extra), cwd=self.work, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def start(self) -> None:
        self.spawn("api", ["api", "--host", "127.0.0.1", "--port", str(self.port)], GENQ_ADMIN_KEY=ADMIN)
        self.spawn("operator", ["operator"], GENQ_OPERATOR_NAMESPACES=NS, GENQ_OPERATOR_LEASE_NAMESPACE=NS,
                   GENQ_OPERATOR_SCALE_INTERVAL="1", GENQ_OPERATOR_WORKER_IMAGE="genq-worker:bench")
        config = self.work / "echo.yaml"
        config.write_text(yaml.safe_dump({"tools": [pool("echo")["spec"]]}))
        self.spawn("worker", ["worker", "--tool", "echo", "--config", str(config)], GENQ_WORKER_HEALTH_PORT=str(free_port()))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    tools = httpx.get(f"{self.url}/v1/tools", headers=AUTH, timeout=5).json()["tools"]
                    if {t["name"] for t in tools} >= {"echo", "bulk"}:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"genq api not ready; see {self.work}/api.log")

    def stop(self) -> None:
        import signal

        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except Exception:
                p.kill()


async def fill(url: str, n: int, clients: int) -> tuple[list[str], list[float], float]:
    ids: list[str] = []
    lat: list[float] = []
    todo = iter(range(n))

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
            for i in todo:
                t = time.perf_counter()
                r = await c.post("/v1/jobs", json={"tool": "bulk", "params": {"i": i}})
                lat.append(time.perf_counter() - t)
                if r.status_code != 202:
                    raise RuntimeError(f"submit {i}: {r.status_code} {r.text}")
                ids.append(r.json()["id"])

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return ids, lat, time.perf_counter() - t0


async def status_reads(url: str, ids: list[str], n: int) -> list[float]:
    lat = []
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
        for job_id in random.sample(ids, min(n, len(ids))):
            t = time.perf_counter()
            r = await c.get(f"/v1/jobs/{job_id}")
            lat.append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["position"], r.text
    return lat


async def submit_to_running(url: str, n: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
        for i in range(n):
            r = await c.post("/v1/jobs", json={"tool": "echo", "params": {"probe": i}, "wait": 10})
            job = r.json()
            assert job["status"] == "succeeded", job
            from datetime import datetime

            ts = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()  # noqa: E731
            out.append(ts(job["started_at"]) - ts(job["created_at"]))
    return out


async def cancel_lag(cp, url: str, ids: list[str], n: int) -> list[float]:
    lags = []
    merge = {"Content-Type": "application/merge-patch+json"}
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
        with cp.client() as k:
            for job_id in random.sample(ids, n):
                t = time.perf_counter()
                r = k.patch(f"{GROUP}/namespaces/{NS}/generationjobs/{resource_name(job_id)}", headers=merge,
                            json={"spec": {"active": False}})
                assert r.is_success, r.text
                while (await c.get(f"/v1/jobs/{job_id}")).json()["status"] != "cancelled":
                    if time.perf_counter() - t > 60:
                        raise RuntimeError(f"{job_id} not cancelled after 60 s")
                    await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - t)
    return lags


def scaler_lag(cp, url: str) -> float:
    cp.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(pool("fresh")))
    dep = f"/apis/apps/v1/namespaces/{NS}/deployments/{constants.worker_deployment_name('fresh')}"
    with cp.client() as k:
        deadline = time.monotonic() + 60
        while k.get(dep).status_code != 200:  # the pool's Deployment, at zero
            assert time.monotonic() < deadline, "no Deployment for the new pool"
            time.sleep(0.1)
        while True:  # the API lists pools every few seconds
            r = httpx.post(f"{url}/v1/jobs", headers=AUTH, json={"tool": "fresh", "params": {}}, timeout=30)
            if r.status_code == 202:
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        t = time.perf_counter()
        while (k.get(dep).json()["spec"].get("replicas") or 0) < 1:
            assert time.perf_counter() - t < 60, "not scaled up"
            time.sleep(0.05)
        return time.perf_counter() - t


def ms(values: list[float]) -> str:
    return f"p50 {median(values) * 1000:7.1f} ms  p99 {pct(values, 99) * 1000:7.1f} ms  (n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--gets", type=int, default=2000)
    ap.add_argument("--probes", type=int, default=50)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = ap.parse_args()

    from k8s.controlplane import bin_dir, start

    folder = bin_dir()
    if folder is None:
        sys.exit("build the control plane first: tests/k8s/build-bins.sh")
    print(f"# cluster mode at scale — {machine()}")
    with workdir(args.keep) as work:
        cp = start(folder, work / "k8s")
        nats = EmbeddedNats(work / "nats")
        roles = None
        try:
            cp.kubectl("create", "namespace", NS)
            for name in ("echo", "bulk"):
                cp.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(pool(name)))
            nats.start()
            roles = Roles(cp, work, nats.url)
            roles.start()
            ids, submit_lat, took = asyncio.run(fill(roles.url, args.jobs, args.clients))
            print(f"submit  {len(ids)} jobs in {took:6.1f} s = {len(ids) / took:6.1f} jobs/s   {ms(submit_lat)}")
            listed = httpx.get(f"{roles.url}/v1/queues/bulk", headers=AUTH, timeout=30).json()
            print(f"live GenerationJobs queued in bulk: {listed['queued']}")
            reads = asyncio.run(status_reads(roles.url, ids, args.gets))
            print(f"status read with {len(ids)} live            {ms(reads)}")
            s2r = asyncio.run(submit_to_running(roles.url, args.probes))
            verdict = "met" if median(s2r) * 1000 <= SUBMIT_TO_RUNNING_TARGET_MS else "MISSED"
            print(f"submit -> running (idle worker)          {ms(s2r)}   target p50 <= "
                  f"{SUBMIT_TO_RUNNING_TARGET_MS:.0f} ms: {verdict}")
            lags = asyncio.run(cancel_lag(cp, roles.url, ids, args.probes))
            print(f"operator: spec.active=false -> Cancelled  {ms(lags)}")
            print(f"operator: new pool's first job -> Deployment at 1 replica: {scaler_lag(cp, roles.url):.2f} s")
        finally:
            if roles is not None:
                roles.stop()
            nats.stop()
            cp.stop()


if __name__ == "__main__":
    main()
