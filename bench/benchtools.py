"""Python tools the benchmarks register (``tool.entrypoint: benchtools:<name>``).

The bench scripts put this folder on the server's ``PYTHONPATH``."""

from __future__ import annotations

import time

from genq.worker.tools.base import ToolResult


def noop(params, inputs, progress, cancel):
    """Does nothing: the submit benchmark measures the platform, not a tool."""
    return ToolResult(files=[], seed=None)


def stamp(params, inputs, progress, cancel):
    """Records the wall-clock time it was called; the dispatch benchmark reads it back
    from ``result.metrics.t_start`` (same machine, same clock as ``created_at``)."""
    t = time.time()
    return ToolResult(files=[], seed=None, metrics={"t_start": t})


def png(params, inputs, progress, cancel):
    """Returns a small PNG (the soak downloads it; retention deletes it): the result-file
    path of a real tool without a model."""
    import io

    from PIL import Image

    from genq.worker.tools.base import OutputFile

    n = int(params.get("n", 0))
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (n % 256, (n // 256) % 256, 7)).save(buf, "PNG")
    progress(1.0, 1, 1)
    return ToolResult(files=[OutputFile("result.png", "image/png", buf.getvalue())], seed=n)


PARAMS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"n": {"type": "integer", "minimum": 0}, "text": {"type": "string", "maxLength": 100}},
}
