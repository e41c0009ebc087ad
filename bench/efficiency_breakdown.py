"""Where platform efficiency's gap (issue #3, ``pipeline_efficiency.py``) sits: the same tiny
text-to-image call, timed three ways in one run, in interleaved chunks.

    python bench/efficiency_breakdown.py [--chunk 25] [--pairs 12] [--steps 8] [--size 64]

Three things stay loaded at once: the bare loop (its own process, driven chunk by chunk
over a pipe), genq's tool process (``ProcessTool``) driven alone by this script's asyncio
loop (no API, NATS or SQLite; progress frames go to a no-op), and the full embedded genq
(REST submit → result). Each pair runs one chunk of each side, in an order that flips
every pair, so the machine's drift (±10 % within minutes here) hits every side alike. Per
chunk:

- bare: the mean pipeline call;
- tool alone: the mean of the tool's own ``pipeline_seconds``, one call after another;
- tool alone, pipelined: the same, each call sent when the last begins its last step (as
  the worker hands the next job over), so the child gets its next run mid-call;
- genq: the mean ``pipeline_seconds`` of its jobs, and the completion-to-completion cycle.

Printed: each pair's ratios to bare and the medians of the paired ratios. A genq call
slower than the tool-alone call is the cost of running beside genq's control plane; a
cycle longer than genq's call is the cost between jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ADMIN, BareLoop, median, start_genq, workdir  # noqa: E402
from pipeline_efficiency import _ts  # noqa: E402

async def genq_chunk(client, n: int, steps: int, size: int) -> tuple[float, float]:
    ids = []
    for i in range(n):
        body = {"tool": "t2i", "params": {"prompt": f"prompt {i}", "width": size, "height": size, "steps": steps, "seed": i}}
        async with client.post("/v1/jobs", json=body) as r:
            assert r.status == 202, await r.text()
            ids.append((await r.json())["id"])
    while True:  # one slot, FIFO: the last submitted ends last
        async with client.get(f"/v1/jobs/{ids[-1]}") as r:
            if (await r.json())["status"] in ("succeeded", "failed", "cancelled"):
                break
        await asyncio.sleep(0.1)
    jobs = []
    for job_id in ids:
        async with client.get(f"/v1/jobs/{job_id}") as r:
            job = await r.json()
        assert job["status"] == "succeeded", job
        jobs.append(job)
    done = sorted(_ts(j["completed_at"]) for j in jobs)
    call = sum(1000 * j["result"]["metrics"]["pipeline_seconds"] for j in jobs) / n
    return call, 1000 * (done[-1] - done[0]) / (n - 1)


async def tool_chunk(tool, n: int, steps: int, size: int) -> float:
    from genq.worker.tools.base import CancelToken, ToolCall

    total = 0.0
    for i in range(n):
        call = ToolCall(job_id=f"alone-{time.monotonic_ns()}", variant="default",
                        params={"prompt": f"prompt {i}", "width": size, "height": size, "steps": steps},
                        inputs=[], seed=i, progress=lambda *a: None, cancel=CancelToken())
        total += 1000 * (await tool.arun(call)).metrics["pipeline_seconds"]
    return total / n


async def tool_chunk_pipelined(tool, n: int, steps: int, size: int) -> float:
    """As the worker does: the next call is sent when the running one begins its last step."""
    from genq.worker.tools.base import CancelToken, ToolCall, in_last_step

    total = 0.0
    tasks = []
    for i in range(n):
        last = asyncio.Event()

        def progress(f, s=None, t=None, last=last):
            if in_last_step(s, t):
                last.set()

        call = ToolCall(job_id=f"pipe-{time.monotonic_ns()}", variant="default",
                        params={"prompt": f"prompt {i}", "width": size, "height": size, "steps": steps},
                        inputs=[], seed=i, progress=progress, cancel=CancelToken())
        task = asyncio.ensure_future(tool.arun(call))
        tasks.append(task)
        waiter = asyncio.ensure_future(last.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
    for t in tasks:
        total += 1000 * (await t).metrics["pipeline_seconds"]
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk", type=int, default=25, help="calls per chunk")
    ap.add_argument("--pairs", type=int, default=12, help="chunks of each side")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    import aiohttp

    from genq.tools import ToolSpec
    from genq.worker.tools import build_tool
    from genq.worker.tools.tiny_models import write_text_to_image

    with workdir() as work:
        model = write_text_to_image(work / "tiny-sd")
        options = {"device": "cpu", "dtype": "float32", "threads": 1}
        server = start_genq(work, {"tools": [{"tool": {"kind": "textToImage", "name": "t2i"}, "model": str(model),
                                              "maxWorkers": 1, "maxQueued": 100_000, "options": options}]})
        try:
            bare = BareLoop(model, a.steps, a.size, work)
        except BaseException:
            server.stop()
            raise
        rows: list[dict[str, float]] = []

        def bare_chunk(n: int) -> float:
            return 1000 * bare.chunk(n)[0] / n  # the mean call, ms

        async def run() -> None:
            spec = ToolSpec.model_validate({"tool": {"kind": "textToImage", "name": "t2i"}, "model": str(model),
                                            "options": options})
            tool = build_tool(spec, slots=1, isolation="process")
            await tool.aload()
            try:
                await tool_chunk(tool, 2, a.steps, a.size)
                async with aiohttp.ClientSession(server.url, headers={"Authorization": f"Bearer {ADMIN}"},
                                                 timeout=aiohttp.ClientTimeout(total=300)) as client:
                    await genq_chunk(client, 5, a.steps, a.size)
                    for pair in range(a.pairs):
                        row: dict[str, float] = {}
                        for side in ("bare", "tool", "pipe", "genq") if pair % 2 == 0 else ("genq", "pipe", "tool", "bare"):
                            if side == "bare":
                                row["bare"] = bare_chunk(a.chunk)
                            elif side == "tool":
                                row["tool"] = await tool_chunk(tool, a.chunk, a.steps, a.size)
                            elif side == "pipe":
                                row["pipe"] = await tool_chunk_pipelined(tool, a.chunk, a.steps, a.size)
                            else:
                                row["genq"], row["cycle"] = await genq_chunk(client, a.chunk, a.steps, a.size)
                        rows.append(row)
                        print(f"  pair {pair + 1:2d}: bare call {row['bare']:6.2f} ms | tool alone {row['tool'] / row['bare']:.3f}"
                              f" | pipelined {row['pipe'] / row['bare']:.3f} | genq call {row['genq'] / row['bare']:.3f}, cycle {row['cycle'] / row['bare']:.3f}  (x bare)",
                              flush=True)
            finally:
                await tool.aclose()

        try:
            asyncio.run(run())
        finally:
            bare.close()
            server.stop()

    def ratio(key: str) -> float:
        return median([r[key] / r["bare"] for r in rows])

    print(f"{a.pairs} pairs of {a.chunk}-call chunks, {a.steps} steps, {a.size} px, 1 torch thread; "
          "medians of the paired ratios to the bare call:")
    print(f"  tool's process alone, pipeline call   {ratio('tool'):.3f}")
    print(f"  the same, next call sent at the last step {ratio('pipe'):.3f}")
    print(f"  genq, the same call                   {ratio('genq'):.3f}")
    print(f"  genq, completion to completion        {ratio('cycle'):.3f}")
    print(f"  efficiency (bare / genq cycle)        {1 / ratio('cycle'):.3f}")


if __name__ == "__main__":
    main()
