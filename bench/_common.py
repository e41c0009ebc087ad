"""Shared by the bench scripts: start/stop the server processes, CPU accounting, stats."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from _servers import ADMIN  # noqa: E402


def _fast_httpcore() -> None:
    """httpcore 1.0.9 runs ``import sniffio`` on every async connection-pool event; in
    this venv sniffio is not installed (anyio 4.16 no longer pulls it in), so each call
    is a failed import that walks sys.path: ~2.5 ms of client CPU per request, which
    made the load generator, not the server, the bottleneck (~400 req/s). The load
    generator runs only on asyncio, so answer that import with a stub."""
    try:
        import sniffio  # noqa: F401
    except ImportError:
        import contextvars
        import types

        stub = types.ModuleType("sniffio")
        stub.current_async_library = lambda: "asyncio"  # type: ignore[attr-defined]
        stub.current_async_library_cvar = contextvars.ContextVar("current_async_library_cvar", default=None)  # type: ignore[attr-defined]
        stub.thread_local = types.SimpleNamespace(name=None)  # type: ignore[attr-defined]
        stub.AsyncLibraryNotFoundError = RuntimeError  # type: ignore[attr-defined]
        sys.modules["sniffio"] = stub


_fast_httpcore()

from genq.adapters.nats_server import free_port  # noqa: E402

AUTH = {"Authorization": f"Bearer {ADMIN}"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def python_tool(name: str, entrypoint: str, **pool: Any) -> dict[str, Any]:
    from benchtools import PARAMS

    return {"tool": {"kind": "python", "name": name, "entrypoint": entrypoint, "params": PARAMS, "inputs": [0, 0]},
            "maxWorkers": 1, "maxQueued": 1_000_000, "resultTTLSeconds": 86400, "activeDeadlineSeconds": 60, **pool}


#: Settings that keep the limits out of the way: premium rate limit far above any load
#: here (the admin bootstrap key is premium and has no per-key queue limit).
BENCH_SETTINGS = {"rate_premium": "100000000/minute", "default_key_max_queued": 1_000_000}


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, data_dir: Path | None, log: Path):
        self.proc, self.url, self.data_dir, self.log = proc, url, data_dir, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            if self.proc.poll() is not None:
                return
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        self.proc.kill()
        self.proc.wait(5)


def _spawn(args: list[str], log: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    logf = log.open("w")
    proc = subprocess.Popen([sys.executable, str(BENCH / "_servers.py"), *args], stdout=subprocess.PIPE, stderr=logf,
                            text=True, env=env, cwd=str(ROOT))
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY "):
            return proc, line.split()[1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"server did not start; see {log}:\n{log.read_text()[-3000:]}")


def start_genq(work: Path, config: dict[str, Any], *, settings: dict[str, Any] | None = None, stop_workers: str = "",
               loop: str = "auto", profile: Path | None = None, name: str = "genq", tracemalloc: bool = False) -> Server:
    data = work / f"{name}-data"
    port = free_port()
    args = ["genq", "--port", str(port), "--data-dir", str(data), "--config", json.dumps(config),
            "--settings", json.dumps({**BENCH_SETTINGS, **(settings or {})}), "--stop-workers", stop_workers, "--loop", loop]
    if profile:
        args += ["--profile", str(profile)]
    if tracemalloc:
        args.append("--tracemalloc")
    log = work / f"{name}.log"
    proc, url = _spawn(args, log)
    return Server(proc, url, data, log)


def start_bare(work: Path, *, loop: str = "auto", profile: Path | None = None) -> Server:
    port = free_port()
    args = ["bare", "--port", str(port), "--loop", loop]
    if profile:
        args += ["--profile", str(profile)]
    log = work / "bare.log"
    proc, url = _spawn(args, log)
    return Server(proc, url, None, log)


_BARE_LOOP = r"""
import sys, time, torch
torch.set_num_threads(1)
from diffusers import AutoPipelineForText2Image
path, steps, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = AutoPipelineForText2Image.from_pretrained(path)
pipe.set_progress_bar_config(disable=True)
pipe("warm up", width=size, height=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
print("ready", flush=True)
for line in sys.stdin:
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in range(int(line)):
        pipe(f"prompt {i}", width=size, height=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(i))
    print(time.perf_counter() - wall, time.thread_time() - cpu, flush=True)
"""


class BareLoop:
    """A bare pipeline loop (the tiny text-to-image model at ``model``, one torch thread)
    in its own process, kept loaded and driven chunk by chunk over a pipe, so a bench can
    alternate it with other sides of a comparison."""

    def __init__(self, model: Path, steps: int, size: int, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", _BARE_LOOP, str(model), str(steps), str(size)], cwd=cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready", "the bare loop did not start"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def chunk(self, n: int) -> tuple[float, float]:
        """Run ``n`` calls; their wall seconds and the loop thread's CPU seconds."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        wall, cpu = self.proc.stdout.readline().split()
        return float(wall), float(cpu)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="genq-bench-"))
    try:
        yield d
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process and its children (e.g. genq + nats-server)."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def cpu_by_process(pid: int) -> dict[str, float]:
    """user+system CPU seconds of each process in the tree of ``pid``, by its name (a
    Python process by its script or module: ``genq``, ``worker``, ``celery``)."""
    out: dict[str, float] = {}
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            name = Path(argv[0].decode(errors="replace")).name
            if name.startswith("python") and b"-m" in argv:
                name = argv[argv.index(b"-m") + 1].decode(errors="replace")  # e.g. genq.worker.tools.child
            elif name.startswith("python"):
                rest = [a.decode(errors="replace") for a in argv[1:] if a and not a.startswith(b"-")]
                name = Path(rest[0]).stem if rest else name
                name += f" {rest[1]}" if len(rest) > 1 and name in ("_servers", "celery", "genq") else ""
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def pct(values: list[float], q: float) -> float:
    """q-th percentile (0-100), nearest-rank on the sorted list."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}, no GPU"
