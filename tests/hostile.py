"""Helpers of the hostile-input suites (tests/test_hostile_*.py, tests/test_security.py,
tests/test_rate_limit.py): a real ``genq up`` in its own process, and the SPEC error-body check.

Why a process of its own and not conftest's in-process ``live`` fixture: its resident memory
(``/proc/<pid>/status`` VmRSS) and its log output are then the server's alone, the client
(schemathesis, hypothesis, 50 httpx clients) runs on the other core instead of sharing the
server's event loop and GIL, and a crash or hang of the server cannot hide in the test
process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from conftest import ADMIN, ECHO_PARAMS, TESTS
from genq.adapters.nats_server import free_port

#: Every error body of SPEC §3: exactly these keys, a known code, a status that matches.
CODES = {
    "invalid_input": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404, "method_not_allowed": 405,
    "conflict": 409, "not_ready": 409, "gone": 410, "payload_too_large": 413, "unsupported_media_type": 415,
    "validation_error": 422, "queue_full": 429, "rate_limited": 429,
}


def error_body_problem(status: int, content_type: str, text: str) -> str | None:
    """Why a 4xx answer is not the SPEC error body, or None when it is."""
    import json

    if not content_type.startswith("application/json"):
        return f"content type {content_type!r}"
    try:
        body = json.loads(text)
    except ValueError:
        return "not JSON"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return "not {'error': {...}}"
    err = body["error"]
    if set(err) != {"code", "message", "details"}:
        return f"error keys {sorted(err)}"
    if not isinstance(err["message"], str) or not err["message"].strip():
        return "empty message"
    if not isinstance(err["details"], dict):
        return "details is not an object"
    if CODES.get(err["code"]) != status:
        return f"code {err['code']!r} with status {status}"
    if "Traceback" in text or 'File "' in text:
        return "a stack trace"
    return None


def tools(**echo) -> dict:
    """echo (python, 0-3 images) and upscale (Lanczos only: decodes every accepted image
    for real, without loading torch into the server whose memory is measured)."""
    return {"tools": [
        {"tool": {"kind": "python", "name": "echo", "entrypoint": "genq_testtools:echo", "params": ECHO_PARAMS,
                  "inputs": [0, 3]},
         "label": "Echo", "maxWorkers": 2, "maxQueued": 8, "maxAttempts": 2, "activeDeadlineSeconds": 30,
         "resultTTLSeconds": 600, **echo},
        {"tool": {"kind": "upscale", "name": "upscale"}, "variants": [{"name": "lanczos"}], "maxWorkers": 1,
         "maxQueued": 1000, "resultTTLSeconds": 600},
    ]}


class GenqProcess:
    """``python -m genq.cli up`` in a child process, its output in ``<tmp>/genq.log``."""

    def __init__(self, tmp: Path, *, config: dict | None = None, env: dict[str, str] | None = None):
        self.tmp = tmp
        self.data = tmp / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "genq.log"
        (tmp / "genq.yaml").write_text(yaml.safe_dump(config or tools()))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
        self.env.update({
            "GENQ_ADMIN_KEY": ADMIN,
            "GENQ_RATE_STANDARD": "1000000/minute",
            "GENQ_RATE_PREMIUM": "1000000/minute",
            "GENQ_LOG_LEVEL": "INFO",
            "GENQ_DRAIN_SECONDS": "2",
            "GENQ_TEST_STATE": str(tmp),
            "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
            **(env or {}),
        })
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> GenqProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "genq.cli", "up", "--port", str(self.port), "--data-dir", str(self.data),
                 "--config", str(self.tmp / "genq.yaml")],
                env=self.env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"genq up exited {self.proc.returncode}:\n{self.log()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"genq up not ready in {timeout}s:\n{self.log()[-3000:]}"
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise LookupError("VmRSS")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (genq drains and stops its nats-server), SIGKILL if that takes too long."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
