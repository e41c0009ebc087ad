"""The chart on the real node (tests/k8s/node.py): scale from zero, and submit → running
with a warm worker pod.

1. **Scale from zero**, ``--cycles`` times: the ``echo`` pool idle at 0 worker pods, one
   job submitted through the API's Service; the test polls the apiserver (admin client,
   ~every 20 ms) and the worker pod's health port, and splits the time from the submit's
   answer to the job running into:
     operator    the worker Deployment's replicas set to 1 (the operator's reaction)
     scheduled   the pod created by the ReplicaSet and bound to the node
     container   the kubelet and containerd started the container (sandbox, CNI, runc)
     ready       the worker process answers /readyz (its own start: imports, connects)
     claimed     the job is running (the worker pulled and claimed it)
   The platform's part is everything but ``ready`` (the container's own start and model
   load). Between cycles the pool scales back to 0.
2. **Submit → running, warm**: ``--probes`` sequential jobs on a pool with one worker
   pod up; ``started_at - created_at`` as genq stamps them; p50/p99.

    python bench/node_scale.py [--cycles 5] [--probes 100]

Needs root and the node's Debian packages (see .ci/run); builds the images if needed.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

from _common import machine, median, pct  # noqa: E402
from helm.helmbin import helm_path  # noqa: E402
from k8s import node as nodes  # noqa: E402
from k8s.node import wait_for  # noqa: E402
from k8s.release import installed  # noqa: E402

PHASES = ("operator", "scheduled", "container", "ready", "claimed")


def _parse(ts: str) -> float:
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def timeline(rel, api: httpx.Client, c: httpx.Client) -> dict[str, float]:
    """One scale-from-zero: seconds of each phase (see the module docstring)."""
    ns, tool = rel.namespace, "echo"
    dep_url = f"/apis/apps/v1/namespaces/{ns}/deployments/{tool}-workers"
    pods_url = f"/api/v1/namespaces/{ns}/pods?labelSelector=genq.io/tool={tool}"
    wait_for(lambda: api.get(dep_url).json()["spec"].get("replicas", 0) == 0 and not api.get(pods_url).json()["items"],
             300, 0.5, what="the pool at 0")
    r = c.post("/v1/jobs", json={"tool": tool, "params": {"text": "cold"}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    t0 = time.monotonic()
    seen: dict[str, float] = {}
    health = httpx.Client(timeout=0.5)
    while "claimed" not in seen:
        now = time.monotonic()
        if now - t0 > 300:
            raise AssertionError(f"no start after 300 s: {seen}")
        if "operator" not in seen and api.get(dep_url).json()["spec"].get("replicas", 0) >= 1:
            seen["operator"] = now
        pods = api.get(pods_url).json()["items"] if "operator" in seen else []
        pod = pods[0] if pods else None
        if pod is not None:
            if "scheduled" not in seen and pod["spec"].get("nodeName"):
                seen["scheduled"] = now
            running = [s for s in pod["status"].get("containerStatuses", []) if "running" in s.get("state", {})]
            if "container" not in seen and running:
                seen["container"] = now
            if "container" in seen and "ready" not in seen and pod["status"].get("podIP"):
                try:
                    if health.get(f"http://{pod['status']['podIP']}:8081/readyz").status_code == 200:
                        seen["ready"] = time.monotonic()
                except httpx.HTTPError:
                    pass
        if c.get(f"/v1/jobs/{job_id}").json()["status"] != "queued":
            seen["claimed"] = time.monotonic()
            for phase in PHASES:  # a phase polled past is as late as the next one seen
                seen.setdefault(phase, seen["claimed"])
        time.sleep(0.02)
    health.close()
    out, last = {}, t0
    for phase in PHASES:
        at = max(seen[phase], last)
        out[phase], last = at - last, at
    out["total"] = last - t0
    out["platform"] = out["total"] - out["ready"]
    return out


def warm_latencies(c: httpx.Client, probes: int) -> list[float]:
    out = []
    for i in range(probes):
        job = c.post("/v1/jobs", json={"tool": "echo", "params": {"text": f"w{i}"}, "wait": 30}).json()
        assert job["status"] == "succeeded", job
        out.append(_parse(job["started_at"]) - _parse(job["created_at"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--probes", type=int, default=100)
    args = ap.parse_args()
    missing = nodes.missing_prerequisites()
    helm = helm_path()
    if missing or helm is None:
        sys.exit(f"missing: {missing or 'helm (tests/helm/build-helm.sh)'}")
    print(machine())
    with nodes.running_node() as node, tempfile.TemporaryDirectory() as work:
        with installed(node, helm, Path(work)) as rel:
            api = node.cp.client()
            with rel.client(rel.new_key(name="bench", tier="premium", max_queued=500)) as c:
                rows = []
                for i in range(args.cycles):
                    row = timeline(rel, api, c)
                    rows.append(row)
                    print(f"cycle {i + 1}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
                print("\nscale from zero, median of", len(rows), "cycles (s):")
                for k in (*PHASES, "total", "platform"):
                    print(f"  {k:10s} {median([r[k] for r in rows]):6.2f}   (min {min(r[k] for r in rows):.2f}, max {max(r[k] for r in rows):.2f})")
                rel.kubectl("patch", "toolpool", "echo", "--type=merge", "-p", '{"spec": {"minWorkers": 1}}')
                wait_for(lambda: any(p["status"].get("phase") == "Running" for p in rel.pods("worker", "echo")), 300,
                         what="a warm worker pod")
                lat = warm_latencies(c, args.probes)
                print(f"\nsubmit -> running, warm worker pod, {len(lat)} jobs: p50 {pct(lat, 50) * 1000:.1f} ms, "
                      f"p99 {pct(lat, 99) * 1000:.1f} ms")
            api.close()


if __name__ == "__main__":
    main()
