"""Small python tools the tests register (``tool.entrypoint: genq_testtools:<name>``)."""

from __future__ import annotations

import io
import json
import os
import random
import time
from pathlib import Path

from PIL import Image

from genq.worker.tools.base import OutputFile, ToolError, ToolResult


def _png(seed: int, size: int = 16) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def echo(params, inputs, progress, cancel):
    """Returns a PNG made from the seed, and a JSON of what it got. ``sleep`` seconds of
    work in 20 steps (cancellable); ``fail_times``: fail the first N attempts (state in
    ``GENQ_TEST_STATE``); ``crash_once``: kill this process on the first attempt; ``tail``: seconds of work
    after the last step; ``pad_mb``:
    one more result file of that many MiB (slow to write)."""
    seed = params.get("seed", 0)
    state = Path(os.environ.get("GENQ_TEST_STATE", "/tmp")) / f"echo-{params.get('text', '')}"
    if params.get("crash_once") and not state.with_suffix(".crashed").exists():
        state.with_suffix(".crashed").write_text("1")
        os._exit(137)
    if params.get("fail_times"):
        n = int(state.read_text()) if state.exists() else 0
        state.write_text(str(n + 1))
        if n < params["fail_times"]:
            raise RuntimeError(f"planned failure {n + 1}")
    steps = 20
    sleep = float(params.get("sleep", 0))
    for i in range(steps):
        if sleep:
            if cancel.wait(sleep / steps):
                cancel.raise_if_cancelled()
        progress((i + 1) / steps, i + 1, steps)
    if params.get("tail"):  # work after the last step (a VAE decode)
        cancel.wait(float(params["tail"]))
    if params.get("bad"):
        raise ToolError("this input cannot be processed", code="invalid_request")
    meta = {"params": params, "inputs": [[f.name, f.content_type, len(f.data)] for f in inputs]}
    pad = [OutputFile("pad.bin", "application/octet-stream", bytes(params["pad_mb"] << 20))] if params.get("pad_mb") else []
    return ToolResult(
        files=[OutputFile("result.png", "image/png", _png(seed)), OutputFile("meta.json", "application/json", json.dumps(meta).encode()),
               *pad],
        seed=seed,
        metrics={"steps": steps},
    )


def noop(params, inputs, progress, cancel):
    return ToolResult(files=[], seed=None)


def stubborn(params, inputs, progress, cancel):
    """Ignores its cancel token (for the deadline test at the housekeeping level)."""
    time.sleep(float(params.get("sleep", 1)))
    return ToolResult(files=[OutputFile("x.txt", "text/plain", b"x")])
