"""What the test modules share: REST checks, waiting, ``genq up`` as a child process,
RBAC documents and image samples. Test modules import from here (or from ``conftest``,
which holds the fixtures), never from each other (nats.py's ``tests/utils.py``)."""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import random
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from conftest import ADMIN, ECHO_PARAMS, TESTS

TERMINAL = ("succeeded", "failed", "cancelled")
#: ``genq_env``'s GENQ_DRAIN_SECONDS: how long a stopping child gives its running jobs.
DRAIN_SECONDS = 5

# -- the REST API ---------------------------------------------------------------------------


async def poll(c, job_id: str, until=TERMINAL, timeout: float = 20) -> dict:
    """The job once its status is in ``until``; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        r = await c.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job['status']}"
        await asyncio.sleep(0.05)


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body

# -- waiting ----------------------------------------------------------------------------------
#: What a probe may raise while the thing it waits for is not there yet.
_NOT_YET = (AssertionError, KeyError, TypeError, httpx.HTTPError)


async def eventually(probe, timeout: float = 30.0, what: str = "", interval: float = 0.1):
    """``probe()`` (a plain or an async function) again until it returns something true,
    within ``timeout`` seconds; that value. A probe that raises counts as not yet."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
        except _NOT_YET as e:
            last = e
        await asyncio.sleep(interval)
    raise AssertionError(f"not true after {timeout} s: {what or probe} (last: {last!r})")


def wait_until(probe, timeout: float = 30.0, what: str = "", interval: float = 0.1, *, tolerate: bool = True):
    """:func:`eventually` for code with no event loop (child processes, blocking clients).
    ``tolerate=False``: an error from the probe ends the wait at once (a child that died)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except _NOT_YET as e:
            if not tolerate:
                raise
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or probe} (last: {last!r})")


# -- genq up as a child process --------------------------------------------------------------


def echo_spec(name: str, entrypoint: str, **kw) -> dict:
    return {"tool": {"kind": "python", "name": name, "entrypoint": entrypoint, "params": ECHO_PARAMS, "inputs": [0, 3]},
            "maxAttempts": 3, "activeDeadlineSeconds": 30, "resultTTLSeconds": 600, **kw}


def genq_env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update({
        "GENQ_ADMIN_KEY": ADMIN,
        "GENQ_ACK_WAIT_SECONDS": "3",
        "GENQ_DRAIN_SECONDS": str(DRAIN_SECONDS),
        "GENQ_RECONCILE_INTERVAL_SECONDS": "0.2",
        "GENQ_WORKER_HEARTBEAT_SECONDS": "0.5",
        "GENQ_RETRY_BACKOFF_SECONDS": "0.2",
        "GENQ_RATE_STANDARD": "100000/minute",
        "GENQ_RATE_PREMIUM": "100000/minute",
        "GENQ_LOG_LEVEL": "WARNING",
        "GENQ_TEST_STATE": str(state),
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
    })
    return env


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def nats_servers_for(data: Path) -> list[int]:
    """Live nats-server processes whose command line names this data folder."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"nats-server" in argv[0] and any(str(data).encode() in a for a in argv) and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


class GenqUp:
    """``python -m genq.cli up`` as a child process."""

    def __init__(self, tmp: Path, data: Path, config: Path, port: int):
        self.tmp, self.data, self.config, self.port = tmp, data, config, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> float:
        self.runs += 1
        log = open(self.tmp / f"genq-up-{self.runs}.log", "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genq.cli", "up", "--port", str(self.port), "--data-dir", str(self.data),
             "--config", str(self.config)],
            env=genq_env(self.tmp), cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()

        def ready() -> bool:
            assert self.proc.poll() is None, f"genq up exited {self.proc.returncode}:\n{self.log()}"
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 30, "genq up to be ready", 0.1, tolerate=False)
        return time.monotonic() - t0

    def log(self) -> str:
        return (self.tmp / f"genq-up-{self.runs}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- RBAC ---------------------------------------------------------------------------------------

RBAC = TESTS.parent / "deploy" / "rbac"


def rbac_documents(name: str, ns: str) -> list[dict]:
    """deploy/rbac/<name>.yaml with the release namespace `genq` replaced by ``ns``."""
    docs = [d for d in yaml.safe_load_all((RBAC / f"{name}.yaml").read_text()) if d]
    for d in docs:
        if d["metadata"].get("namespace") == "genq":
            d["metadata"]["namespace"] = ns
        for s in d.get("subjects", []):
            if s.get("namespace") == "genq":
                s["namespace"] = ns
    return docs


# -- image samples ------------------------------------------------------------------------------


def noise(mode: str, size=(64, 48), seed: int = 0) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    raw = random.Random(seed).randbytes(size[0] * size[1] * bands)
    return Image.frombytes(mode, size, raw)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(side: int = 20_000) -> bytes:
    """A real, valid 1-bit PNG of side x side black pixels, tens of KB on disk."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    co = zlib.compressobj(9)
    idat = b"".join(co.compress(row) for _ in range(side)) + co.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real baseline JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(encode(noise("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_vp8x(width: int, height: int) -> bytes:
    """A WEBP extended header declaring a width x height canvas, then a tiny lossless frame."""
    frame = encode(noise("RGB", (4, 4)), "WEBP", lossless=True)[12:]  # the VP8L chunk
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_patched(width: int, height: int, *, lossless: bool) -> bytes:
    """A real simple-format WEBP (VP8L or VP8 chunk) with its frame header patched to width x height."""
    data = bytearray(encode(noise("RGB", (16, 16)), "WEBP", lossless=lossless, quality=80))
    chunk = bytes(data[12:16])
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
        data[21:25] = (bits | (width - 1) | ((height - 1) << 14)).to_bytes(4, "little")
    elif chunk == b"VP8 ":
        data[26:30] = struct.pack("<HH", width, height)
    else:  # pragma: no cover - depends on the libwebp build
        pytest.skip(f"Pillow wrote a {chunk!r} WEBP")
    return bytes(data)


# -- servers the tests start -----------------------------------------------------------------


def start_moto(log: Path, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port of ``host``; its process and URL once it answers.
    Its cwd is the log's folder, never the repo root (./operator shadows the stdlib's)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    url = f"http://{host}:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                                cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; see {log}")
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(f"moto server did not answer on {url}; see {log}") from None
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; a no-op for one already gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
