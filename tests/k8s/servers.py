"""The servers the cluster tests run beside Kubernetes: an S3-compatible server (moto),
started on a free port of a given address and stopped by its PID. (nats-server comes from
``genq.adapters.nats_server.EmbeddedNats``.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from k8s.controlplane import free_port


def start_moto(log: Path, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    """moto's S3 server on ``host``; returns its process and URL once it answers."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    url = f"http://{host}:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto did not answer on {url}") from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


__all__ = ["free_port", "start_moto", "stop"]
