"""Fixtures: a real genq (embedded NATS JetStream, SQLite, local folder) served by uvicorn
on 127.0.0.1 with a free port, and clients for it. Every server is stopped by the fixture."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
# Converted model weights go to a per-run cache, not the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="genq-test-cache-")

from genq.adapters.nats_server import free_port  # noqa: E402
from genq.embedded import Embedded  # noqa: E402
from genq.settings import Settings  # noqa: E402
from genq.tools import registry_from_dict  # noqa: E402

ADMIN = "gq_test_admin_key_0123456789"

ECHO_PARAMS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "text": {"type": "string", "maxLength": 100},
        "seed": {"type": "integer", "minimum": 0, "maximum": 4294967295},
        "sleep": {"type": "number", "minimum": 0, "maximum": 60},
        "tail": {"type": "number", "minimum": 0, "maximum": 60},
        "fail_times": {"type": "integer", "minimum": 0, "maximum": 10},
        "crash_once": {"type": "boolean"},
        "bad": {"type": "boolean"},
        "pad_mb": {"type": "integer", "minimum": 0, "maximum": 128},
    },
}


def tools_config(**overrides) -> dict:
    echo = {
        "tool": {"kind": "python", "name": "echo", "entrypoint": "genq_testtools:echo", "params": ECHO_PARAMS, "inputs": [0, 3]},
        "label": "Echo",
        "maxWorkers": 2,
        "maxQueued": 8,
        "maxAttempts": 3,
        "activeDeadlineSeconds": 30,
        "resultTTLSeconds": 600,
    }
    echo.update(overrides.get("echo", {}))
    tools = [
        echo,
        {"tool": {"kind": "python", "name": "once", "entrypoint": "genq_testtools:echo", "params": ECHO_PARAMS, "inputs": [0, 3]},
         "maxWorkers": 1, "deleteOnDownload": True, "resultTTLSeconds": 2},
        {"tool": {"kind": "upscale", "name": "upscale"}, "maxWorkers": 1, **overrides.get("upscale", {})},
    ]
    return {"tools": tools}


def png_bytes(w: int = 24, h: int = 16, mode: str = "RGB") -> bytes:
    img = Image.new(mode, (w, h))
    for x in range(w):
        for y in range(h):
            img.putpixel((x, y), (x * 10 % 256, y * 15 % 256, 128) if mode == "RGB" else (x * 10 + y) % 256)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


async def read_events(client, job_id: str) -> list[tuple[str, dict]]:
    """Every Server-Sent Event of a job's stream, as (event name, decoded data), until the
    server closes it after the terminal status."""
    import json

    events: list[tuple[str, dict]] = []
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line[5:])))
    return events


class Live:
    """A running genq: its Embedded object, its base URL and an admin client."""

    def __init__(self, emb: Embedded, url: str):
        self.emb = emb
        self.url = url

    def client(self, key: str | None = ADMIN) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)

    async def new_key(self, **kw) -> str:
        async with self.client() as c:
            r = await c.post("/v1/keys", json={"name": kw.pop("name", "k"), **kw})
            assert r.status_code == 201, r.text
            return r.json()["key"]


async def start_live(tmp_path: Path, config: dict, **settings) -> tuple[Live, uvicorn.Server, asyncio.Task]:
    port = free_port()
    s = Settings(data_dir=tmp_path / "data", admin_key=ADMIN, port=port, ack_wait_seconds=settings.pop("ack_wait_seconds", 3),
                 drain_seconds=settings.pop("drain_seconds", 2), reconcile_interval_seconds=0.2,
                 worker_heartbeat_seconds=0.5, retry_backoff_seconds=0.2,
                 rate_premium=settings.pop("rate_premium", "100000/minute"), **settings)
    emb = Embedded(s, registry_from_dict(config))
    await emb.start()
    if not _bindable(port):  # the embedded nats-server, choosing after us, was given the same port
        port = free_port()
    server = uvicorn.Server(uvicorn.Config(emb.app(), host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    return Live(emb, f"http://127.0.0.1:{port}"), server, task


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def stop_live(live: Live, server: uvicorn.Server, task: asyncio.Task) -> None:
    server.should_exit = True
    await asyncio.wait_for(task, 15)
    await live.emb.stop(drain=2)


@pytest.fixture
async def live(tmp_path, monkeypatch, request):
    monkeypatch.setenv("GENQ_TEST_STATE", str(tmp_path))
    marker = request.node.get_closest_marker("genq")
    kw = dict(marker.kwargs) if marker else {}
    config = tools_config(**kw.pop("tools", {}))
    lv, server, task = await start_live(tmp_path, config, **kw)
    try:
        yield lv
    finally:
        await stop_live(lv, server, task)


def pytest_addoption(parser):
    group = parser.getgroup("chaos", "genq reliability suite (tests/chaos)")
    group.addoption("--long", action="store_true", default=False,
                    help="Run the reliability suite's long form (minutes per scenario).")
    group.addoption("--chaos-seed", type=int, default=None, help="Seed for the reliability suite's random choices.")


def pytest_configure(config):
    config.addinivalue_line("markers", "genq(**settings): settings for the live genq fixture")
    config.addinivalue_line("markers", "node: needs the real node (tests/k8s/node.py: root, containerd, kubelet; "
                                       "its Debian packages come from .ci/run)")
