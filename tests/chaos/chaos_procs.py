"""genq's roles as child processes for the reliability suite: ``genq api``, ``genq operator``
and ``genq worker`` against one data folder and one nats-server (the cluster's shape on one
machine), each started, killed and stopped by its pid.

``genq up`` as a child is :class:`helpers.GenqUp`; the environment is
:func:`helpers.genq_env` (short timings, this folder's tools on ``PYTHONPATH``).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from genq.adapters.nats import NatsBus
from genq.adapters.nats_server import EmbeddedNats, free_port
from helpers import echo_spec, eventually, genq_env

ACK_WAIT = 3.0  # genq_env's GENQ_ACK_WAIT_SECONDS: a dead worker's job is redelivered after this


def chaos_tool(name: str = "chaos", **kw) -> dict:
    """The deterministic echo tool (named ``chaos`` unless told); a high queue limit so the
    steady load is never refused for being too much."""
    return echo_spec(name, "genq_testtools:echo", **{"label": "Chaos", "maxQueued": 5000, **kw})


def write_config(path: Path, *tools: dict) -> Path:
    path.write_text(yaml.safe_dump({"tools": list(tools)}))
    return path


async def backlog(nats_url: str, tool: str) -> int:
    """Messages of ``tool`` still pending or unacknowledged on the jobs stream."""
    bus = NatsBus(nats_url, name="chaos-check")
    await bus.connect()
    try:
        return await bus.backlog(tool)
    finally:
        await bus.close()


class Proc:
    """One genq CLI role as a child process (cwd outside the repo, output to a log file)."""

    def __init__(self, tmp: Path, name: str, args: list[str], env: dict[str, str]):
        self.name = name
        self.log_path = tmp / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "genq.cli", *args], env=env, cwd=tmp, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, tail: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready_line(self) -> bool:
        return " ready" in self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"{self.name} did not stop on SIGTERM:\n{self.log()}") from None
        return self.proc.returncode


class Cluster:
    """nats-server + ``genq api`` + ``genq operator`` on one data folder; workers added
    with :meth:`worker`. Everything is stopped by :meth:`stop`, whatever happened."""

    def __init__(self, tmp: Path, config: Path):
        self.tmp = tmp
        self.data = tmp / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.nats = EmbeddedNats(self.data / "nats")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        self.env: dict[str, str] = {}
        self.n_workers = 0

    async def start(self) -> None:
        nats_url = await asyncio.to_thread(self.nats.start)
        (self.data / "nats.url").write_text(nats_url)
        self.env = {**genq_env(self.tmp), "GENQ_NATS_URL": nats_url, "GENQ_DATA_DIR": str(self.data),
                    "GENQ_CONFIG": str(self.config), "GENQ_PORT": str(self.port)}
        api = self.spawn("api", ["api"])
        self.spawn("operator", ["operator"])

        async def ready() -> bool:
            assert api.alive(), f"genq api exited:\n{api.log()}"
            try:
                async with httpx.AsyncClient(timeout=1) as c:
                    return (await c.get(f"{self.url}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(ready, 30, "genq api to be ready")

    def spawn(self, name: str, args: list[str]) -> Proc:
        p = Proc(self.tmp, name, args, self.env)
        self.procs.append(p)
        return p

    def worker(self, tool: str, slots: int) -> Proc:
        self.n_workers += 1
        return self.spawn(f"worker-{self.n_workers}", ["worker", "--tool", tool, "--slots", str(slots)])

    async def backlog(self, tool: str) -> int:
        return await backlog(self.nats.url, tool)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.alive():
                try:
                    p.terminate(10)
                except AssertionError:
                    pass
        self.nats.stop()
