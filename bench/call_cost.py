"""What one tiny text-to-image call costs on each of genq's code paths, in CPU time, on
one pinned vCPU: the finest instrument here for issue #3's platform efficiency.

    python bench/call_cost.py [--pairs 40] [--chunk 5] [--cpu 0] [--steps 8] [--size 64]

This machine's two vCPUs change speed independently, by up to 40 % within seconds
(BENCHMARKS §4, seventh session), so whole-run rounds cannot resolve a 1–2 % effect. This
script pins everything to one vCPU. It alternates chunks of ``--chunk`` calls in a random
order each pair, and times CPU (thread time, or the child's ``schedstat``), not wall time.
It prints each side's median ratio to the bare call and the quartiles. The sides:

- ``bare``: the pipeline called in this process, as a user's loop does;
- ``bare in inference mode``: the same, in ``torch.inference_mode``;
- ``other process``: the same bare loop in another process (process identity alone);
- ``tool on a thread``: genq's ``TextToImageTool.run`` in this process (its own pipeline,
  cancel checks, step callback, inference mode);
- ``tool in its process``: genq's ``ProcessTool``, the child's main-thread CPU per call
  (its frames and pickling included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BareLoop, workdir  # noqa: E402

def pin(pid: int, cpu: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def main_thread_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0])


async def run(a: argparse.Namespace, model: Path, work: Path) -> dict[str, list[float]]:
    import torch
    from diffusers import AutoPipelineForText2Image

    from genq.tools import ToolSpec
    from genq.worker.tools import build_tool
    from genq.worker.tools.base import CancelToken, ToolCall

    torch.set_num_threads(1)
    pipe = AutoPipelineForText2Image.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    spec = ToolSpec.model_validate({"tool": {"kind": "textToImage", "name": "t2i"}, "model": str(model),
                                    "options": {"device": "cpu", "dtype": "float32", "threads": 1}})
    thread_tool = build_tool(spec, isolation="thread")
    thread_tool.load(None)
    process_tool = build_tool(spec, slots=1, isolation="process")
    await process_tool.aload()
    child = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_child_of(int(p), os.getpid()))
    other = BareLoop(model, a.steps, a.size, work)
    try:
        for pid in (os.getpid(), child, other.pid):
            pin(pid, a.cpu)

        def call(i: int) -> ToolCall:
            return ToolCall(job_id=f"cost-{time.monotonic_ns()}", variant="default",
                            params={"prompt": f"prompt {i}", "width": a.size, "height": a.size, "steps": a.steps},
                            inputs=[], seed=i, progress=lambda *_: None, cancel=CancelToken())

        def bare(n: int, mode) -> int:
            t = time.thread_time_ns()
            for i in range(n):
                with mode():
                    pipe(f"prompt {i}", width=a.size, height=a.size, num_inference_steps=a.steps,
                         generator=torch.Generator().manual_seed(i))
            return time.thread_time_ns() - t

        async def side(name: str, n: int) -> int:
            if name == "bare":
                return bare(n, contextlib.nullcontext)
            if name == "bare in inference mode":
                return bare(n, torch.inference_mode)
            if name == "other process":
                return int(other.chunk(n)[1] * 1e9)
            if name == "tool on a thread":
                t = time.thread_time_ns()
                for i in range(n):
                    thread_tool.run(call(i))
                return time.thread_time_ns() - t
            t = main_thread_ns(child)
            for i in range(n):
                await process_tool.arun(call(i))
            return main_thread_ns(child) - t

        names = ["bare", "bare in inference mode", "other process", "tool on a thread", "tool in its process"]
        for name in names:  # warm every path once
            await side(name, 1)
        ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
        for pair in range(a.pairs):
            order = names[:]
            random.shuffle(order)
            row = {name: await side(name, a.chunk) for name in order}
            for name in names[1:]:
                ratios[name].append(row[name] / row["bare"])
            print(f"  pair {pair + 1:2d}: bare {row['bare'] / a.chunk / 1e6:6.2f} ms CPU a call | "
                  + " | ".join(f"{n} {row[n] / row['bare']:.3f}" for n in names[1:]), flush=True)
        return ratios
    finally:
        other.close()
        await process_tool.aclose()


def _is_child_of(pid: int, parent: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(stat[1]) == parent and b"genq.worker.tools.child" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--chunk", type=int, default=5, help="calls per side per pair")
    ap.add_argument("--cpu", type=int, default=0, help="the vCPU everything runs on")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    from genq.worker.tools.tiny_models import write_text_to_image

    with workdir() as work:
        model = write_text_to_image(work / "tiny-sd")
        ratios = asyncio.run(run(a, model, work))
    print(f"{a.pairs} pairs of {a.chunk}-call chunks on vCPU {a.cpu}, {a.steps} steps, {a.size} px, 1 torch thread; "
          "CPU per call, median ratio to the bare call [quartiles]:")
    for name, r in ratios.items():
        q = statistics.quantiles(r, n=4)
        print(f"  {name:24s} {statistics.median(r):.3f}  [{q[0]:.3f} {q[2]:.3f}]")


if __name__ == "__main__":
    main()
