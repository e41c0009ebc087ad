"""Platform efficiency: 200 text-to-image jobs through genq (REST submit → result) against
the same 200 pipeline calls in a bare Python loop, same tiny model, same thread count,
same run. Prints jobs/s for both and the ratio (issue #3 target: genq ≥ 0.95 × bare).

    python bench/pipeline_efficiency.py [--jobs 200] [--steps 8] [--size 64] [--rounds 2]

The model is the tiny random Stable Diffusion that ``genq models tiny`` writes; both sides
load it with ``from_pretrained`` once and use one torch thread. genq runs its full
embedded stack (nats-server child, SQLite, local blobs) with one worker slot; its figure
runs from the first submit to the last job's completion, downloads excluded.

The bare loop calls the pipeline as a user would (diffusers' own ``no_grad``). genq's tools
run their calls in ``torch.inference_mode`` (``options.inferenceMode``), which is cheaper
per op; ``--like-for-like`` adds a third side each round, the bare loop in inference mode
too, and prints genq's ratio to it: the platform's own cost, without the runtime's gain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ADMIN, _tree, cpu_by_process, median, start_genq, workdir  # noqa: E402

BARE = r"""
import contextlib, json, sys, time, torch
torch.set_num_threads(1)
from diffusers import AutoPipelineForText2Image
path, jobs, steps, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mode = torch.inference_mode if sys.argv[5] == "inference" else contextlib.nullcontext
pipe = AutoPipelineForText2Image.from_pretrained(path)
pipe.set_progress_bar_config(disable=True)
pipe("warm up", width=size, height=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
calls = []
t0 = time.perf_counter()
for i in range(jobs):
    t1 = time.perf_counter()
    with mode():
        image = pipe(f"prompt {i}", width=size, height=size, num_inference_steps=steps,
                     generator=torch.Generator().manual_seed(i)).images[0]
    calls.append(time.perf_counter() - t1)
print(json.dumps({"seconds": time.perf_counter() - t0, "calls": calls}))
"""


#: Per bare round: the pipeline calls' median and mean (ms), beside genq's BREAKDOWN.
BARE_CALLS: list[dict[str, float]] = []


def run_bare(model: Path, jobs: int, steps: int, size: int, work: Path, cpus: set[int] | None = None,
             mode: str = "plain") -> float:
    out = subprocess.run([sys.executable, "-c", BARE, str(model), str(jobs), str(steps), str(size), mode],
                         capture_output=True, text=True, cwd=work, timeout=1800,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    calls = [1000 * c for c in res["calls"]]
    if mode != "plain":
        return res["seconds"]
    BARE_CALLS.append({"median": median(calls), "mean": sum(calls) / len(calls),
                       "p99": sorted(calls)[int(0.99 * (len(calls) - 1))], "max": max(calls)})
    return res["seconds"]


async def run_genq(server, jobs: int, steps: int, size: int) -> float:
    # aiohttp: a quarter of httpx's client CPU per request (BENCHMARKS §5), and the client
    # shares the machine's two cores with the pipeline.
    import aiohttp

    async with aiohttp.ClientSession(server.url, headers={"Authorization": f"Bearer {ADMIN}"},
                                     timeout=aiohttp.ClientTimeout(total=120)) as c:
        async def post(body: dict) -> dict:
            async with c.post("/v1/jobs", json=body) as r:
                assert r.status in (200, 202), await r.text()
                return await r.json()

        async def get(job_id: str) -> dict:
            async with c.get(f"/v1/jobs/{job_id}") as r:
                return await r.json()

        warm = await post({"tool": "t2i", "params": {"prompt": "warm up", "width": size, "height": size, "steps": steps, "seed": 0}, "wait": 120})
        assert warm["status"] == "succeeded", warm
        t0 = time.time()
        ids = []
        for i in range(jobs):
            job = await post({"tool": "t2i", "params": {"prompt": f"prompt {i}", "width": size, "height": size, "steps": steps, "seed": i}})
            ids.append(job["id"])
        # One slot and FIFO: the last job submitted ends last. Poll only it, rarely, so the
        # client costs the server next to nothing; check all of them afterwards.
        while (await get(ids[-1]))["status"] not in ("succeeded", "failed", "cancelled"):
            await asyncio.sleep(0.25)
        last = await get(ids[-1])
        # The server's own clock stamps completed_at (same machine): no polling granularity.
        elapsed = datetime.fromisoformat(last["completed_at"].replace("Z", "+00:00")).timestamp() - t0
        done = []
        for job_id in ids:
            job = await get(job_id)
            assert job["status"] == "succeeded", job
            done.append(job)
        BREAKDOWN.append({**breakdown(done), "first": 1000 * (min(_ts(j["completed_at"]) for j in done) - t0)})
        return elapsed


BREAKDOWN: list[dict[str, float]] = []
#: Per genq round: CPU ms per job of each process of genq's tree (the tool's, the API and
#: worker loop's, nats-server's). The client (this process) is not in it.
CPU: list[dict[str, float]] = []


def _ts(v: str) -> float:
    return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()


def breakdown(jobs: list[dict]) -> dict[str, float]:
    """Where a job's time goes on the server (medians, ms): the pipeline call itself (the
    tool's own timer) and the cycle, the time between two jobs' completions; what the
    cycle has beyond the pipeline call is what the platform costs the tool's process
    (the tool's own code around the call, the hand-over to the next job). ``running``
    is a job's started → completed: it includes the wait behind the previous job's
    decode (the next job is handed over at its last step), the decode, and the PNG
    encode and writes that overlap the next job."""
    pipeline = [1000 * j["result"]["metrics"]["pipeline_seconds"] for j in jobs]
    done = sorted(_ts(j["completed_at"]) for j in jobs)
    cycle = [1000 * (b - a) for a, b in zip(done, done[1:])]
    running = [1000 * (_ts(j["completed_at"]) - _ts(j["started_at"])) for j in jobs]
    return {"pipeline": median(pipeline), "cycle": median(cycle), "running": median(running),
            "pipeline_mean": sum(pipeline) / len(pipeline), "cycle_mean": sum(cycle) / len(cycle),
            "pipeline_p99": sorted(pipeline)[int(0.99 * (len(pipeline) - 1))],
            "cycle_p99": sorted(cycle)[int(0.99 * (len(cycle) - 1))], "cycle_max": max(cycle),
            "cycles_over_2x": sum(1 for c in cycle if c > 2 * median(cycle))}


def pin(server_pid: int, tool_cpus: set[int], other_cpus: set[int]) -> None:
    """genq's tool process(es) on ``tool_cpus``, the rest of its tree (the API and worker
    loop, nats-server) on ``other_cpus``; every thread of each."""
    for pid in _tree(server_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), tool_cpus if b"genq.worker.tools.child" in cmd else other_cpus)
        except OSError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--like-for-like", action="store_true",
                    help="a third side each round: the bare loop in torch.inference_mode, as genq's tools run "
                         "their calls; the ratio to it is the platform's own cost")
    ap.add_argument("--pin", action="store_true",
                    help="the pipeline (bare loop; genq's tool process) on the last CPU, everything else on the others")
    a = ap.parse_args()
    from genq.worker.tools.tiny_models import write_text_to_image

    with workdir() as work:
        model = write_text_to_image(work / "tiny-sd")
        config = {"tools": [{"tool": {"kind": "textToImage", "name": "t2i"}, "model": str(model), "maxWorkers": 1,
                             "maxQueued": 100_000, "options": {"device": "cpu", "dtype": "float32", "threads": 1}}]}
        server = start_genq(work, config)
        bare_s, genq_s, bare_im_s = [], [], []
        cpus = sorted(os.sched_getaffinity(0))
        tool_cpus, other_cpus = ({cpus[-1]}, set(cpus[:-1])) if a.pin and len(cpus) > 1 else (None, None)
        if other_cpus:
            os.sched_setaffinity(0, other_cpus)
        try:
            for r in range(a.rounds):
                # Odd rounds run genq first: whichever runs second does not always get the
                # machine a few seconds later (its speed drifts).
                sides = ("bare", "genq") + (("bare-im",) if a.like_for_like else ())
                for side in sides if r % 2 == 0 else sides[::-1]:
                    if side == "bare":
                        bare_s.append(run_bare(model, a.jobs, a.steps, a.size, work, tool_cpus))
                        continue
                    if side == "bare-im":
                        bare_im_s.append(run_bare(model, a.jobs, a.steps, a.size, work, tool_cpus, mode="inference"))
                        continue
                    if tool_cpus:
                        pin(server.pid, tool_cpus, other_cpus)
                    before = cpu_by_process(server.pid)
                    genq_s.append(asyncio.run(run_genq(server, a.jobs, a.steps, a.size)))
                    CPU.append({name: (sec - before.get(name, 0.0)) / a.jobs * 1e3
                                for name, sec in cpu_by_process(server.pid).items()})
                print(f"  round {r + 1}: bare {a.jobs / bare_s[-1]:6.2f} jobs/s   genq {a.jobs / genq_s[-1]:6.2f} jobs/s   "
                      f"ratio {bare_s[-1] / genq_s[-1]:.3f}"
                      + (f"   like for like {bare_im_s[-1] / genq_s[-1]:.3f}" if bare_im_s else ""), flush=True)
        finally:
            server.stop()
    b, g = median(bare_s), median(genq_s)
    # Each round's two runs are seconds apart; the machine's speed drifts between rounds
    # (a noisy neighbour), so the ratio is taken within each round, then the median.
    ratio = median([bs / gs for bs, gs in zip(bare_s, genq_s)])
    print(f"{a.jobs} jobs, {a.steps} steps, {a.size} px, 1 torch thread, median of {a.rounds} rounds:")
    print(f"  bare loop  {a.jobs / b:6.2f} jobs/s  ({1000 * b / a.jobs:.1f} ms/job)")
    print(f"  genq       {a.jobs / g:6.2f} jobs/s  ({1000 * g / a.jobs:.1f} ms/job; platform {1000 * (g - b) / a.jobs:+.1f} ms/job)")
    if BREAKDOWN:
        last = BREAKDOWN[-1]
        print(f"  genq per job (last round, medians): pipeline call {last['pipeline']:.1f} ms, cycle "
              f"{last['cycle']:.1f} ms (completion to completion; {last['cycle'] - last['pipeline']:+.1f} ms beyond "
              f"the call), started -> completed {last['running']:.1f} ms")
        print(f"  genq per job (last round, means): pipeline call {last['pipeline_mean']:.1f} ms, cycle "
              f"{last['cycle_mean']:.1f} ms (p99 {last['cycle_p99']:.1f}, max {last['cycle_max']:.1f}, "
              f"{last['cycles_over_2x']} over twice the median); first submit -> first completion {last['first']:.1f} ms")
        print("  pipeline call per round, median / mean / p99 ms, bare | genq: " + "   ".join(
            f"{b['median']:.1f}/{b['mean']:.1f}/{b['p99']:.1f} | {g['pipeline']:.1f}/{g['pipeline_mean']:.1f}/{g['pipeline_p99']:.1f}"
            for b, g in zip(BARE_CALLS, BREAKDOWN)))
    if CPU:
        names = sorted({n for c in CPU for n in c}, key=lambda n: -median([c.get(n, 0.0) for c in CPU]))
        print("  genq CPU per job by process (medians of the rounds): " + ", ".join(
            f"{n} {median([c.get(n, 0.0) for c in CPU]):.1f} ms" for n in names))
    if bare_im_s:
        like = median([bs / gs for bs, gs in zip(bare_im_s, genq_s)])
        print(f"  bare loop in inference mode {a.jobs / median(bare_im_s):6.2f} jobs/s; per round, bare plain / inference "
              + " ".join(f"{p / q:.3f}" for p, q in zip(bare_s, bare_im_s)))
        print(f"like for like (the bare loop in inference mode, as genq's tools): genq / bare = {like:.3f}")
    print(f"ratio genq / bare = {ratio:.3f} (median of the rounds' ratios)   target >= 0.95: "
          f"{'MET' if ratio >= 0.95 else 'MISSED'}")


if __name__ == "__main__":
    main()
