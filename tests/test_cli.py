"""The `genq` command as a REST client against a real genq."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile

from PIL import Image

from conftest import ADMIN, png_bytes


async def run(*args: str, key: str = ADMIN, url: str, cwd=None) -> tuple[int, str, str]:
    env = {**os.environ, "GENQ_URL": url, "GENQ_KEY": key}
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "genq.cli", *args, env=env, cwd=cwd or tempfile.gettempdir(),
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 60)
    return p.returncode, out.decode(), err.decode()


async def test_keys_submit_wait_status_jobs(live, tmp_path):
    code, out, err = await run("keys", "create", "--name", "cli-user", "--tier", "premium", url=live.url)
    assert code == 0, err
    key = json.loads(out)["key"]
    src = tmp_path / "in.png"
    src.write_bytes(png_bytes(10, 8))
    target = tmp_path / "big.png"
    code, out, err = await run("submit", "upscale", "--variant", "lanczos", "--param", "scale=2", "--image", str(src),
                               "--wait", "-o", str(target), key=key, url=live.url)
    assert code == 0, err
    assert Image.open(target).size == (20, 16)
    job_id = json.loads(err[err.index("{"):])["id"]
    code, out, _ = await run("status", job_id, key=key, url=live.url)
    assert code == 0 and json.loads(out)["status"] == "succeeded"
    code, out, _ = await run("jobs", "--status", "succeeded", key=key, url=live.url)
    assert code == 0 and job_id in out and "1 of 1" in out
    code, _, err = await run("status", job_id, key="gq_wrong", url=live.url)
    assert code == 1 and "401 unauthorized" in err


async def test_admin_lists_everyone(live):
    alice = await live.new_key(name="alice")
    async with live.client(alice) as a, live.client() as admin:
        jid = (await a.post("/v1/jobs", json={"tool": "echo"})).json()["id"]
        assert (await a.get("/v1/jobs", params={"all": "true"})).status_code == 403
        everyone = (await admin.get("/v1/jobs", params={"all": "true"})).json()
        assert jid in [j["id"] for j in everyone["jobs"]]
        assert (await admin.get(f"/v1/jobs/{jid}")).status_code == 200


async def test_models_tiny_writes_a_runnable_config(tmp_path):
    from genq.tools import load_registry

    cfg = tmp_path / "genq.yaml"
    code, out, err = await run("models", "tiny", "--dir", str(tmp_path / "m"), "--config", str(cfg), url="http://unused")
    assert code == 0, err
    registry = load_registry(cfg)
    assert {s.kind for s in registry} == {"imageEdit", "textToImage", "upscale"}
    assert (tmp_path / "m" / "tiny-sd" / "model_index.json").is_file()


async def test_a_worker_stopped_while_starting_exits_cleanly_at_once(tmp_path):
    """In a container `genq worker` is PID 1, which ignores a SIGTERM it has no handler
    for: a pod stopped during start-up ran on until its grace period (the tool's deadline)
    ended (the real node). The handler is in place before anything slow starts: here the
    start hangs on a NATS server that never answers, and SIGTERM ends it with exit 0
    (without the fix the signal's default action kills it: -15)."""
    import signal
    import socket

    from conftest import tools_config

    silent = socket.socket()  # accepts connections, never speaks NATS
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    config = tmp_path / "genq.yaml"
    import yaml

    config.write_text(yaml.safe_dump(tools_config()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "genq.cli", "worker", "--tool", "echo", "--data-dir", str(tmp_path / "data"),
        "--config", str(config), "--nats-url", f"nats://127.0.0.1:{silent.getsockname()[1]}",
        env=env, cwd=tempfile.gettempdir(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(3)  # imports done, stuck connecting
        assert p.returncode is None
        p.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(p.communicate(), 10)
    finally:
        silent.close()
        if p.returncode is None:
            p.kill()
    assert p.returncode == 0, (p.returncode, err.decode()[-2000:])
    assert b"ready" not in out
