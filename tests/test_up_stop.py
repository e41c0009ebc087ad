"""``genq up`` stops cleanly: Ctrl-C prints genq's own lines and nothing from a library.

The demo builds tiny diffusers pipelines on its first start; done in the ``genq up``
process, that left triton's nanobind bindings printing dozens of "nanobind: leaked ..."
lines at exit. A real process, a real SIGINT, as a terminal's Ctrl-C sends it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

pytestmark = [pytest.mark.ml, pytest.mark.slow]

GENQ = str(Path(sys.executable).parent / "genq")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_on_a_first_demo_start_prints_only_genqs_lines(tmp_path):
    port = _free_port()
    env = {**os.environ, "GENQ_DATA_DIR": str(tmp_path / "data"), "GENQ_PORT": str(port)}
    env.pop("GENQ_CONFIG", None)
    # Its own process group, as a shell gives a foreground job: Ctrl-C reaches every process.
    proc = subprocess.Popen([GENQ, "up", "--demo"], env=env, cwd=tempfile.gettempdir(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "genq up did not come up"
                time.sleep(0.5)
        time.sleep(3)  # the tools load their models meanwhile
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert "genq stopped" in out, out
    assert not [line for line in out.splitlines() if "nanobind" in line or "leaked" in line], out
