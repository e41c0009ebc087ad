"""Runnable tools built from a ToolSpec: the built-in kinds and the ``python`` kind."""

from __future__ import annotations

from genq.tools import ToolSpec
from genq.worker.tools.base import Tool


def build_tool(spec: ToolSpec) -> Tool:
    """The runnable tool for ``spec``; heavy imports happen here, not at module import."""
    if spec.kind == "python":
        from genq.worker.tools.python import PythonTool

        return PythonTool(spec)
    if spec.kind == "upscale":
        from genq.worker.tools.upscale import UpscaleTool

        return UpscaleTool(spec)
    raise NotImplementedError(f"tool kind {spec.kind!r} has no worker implementation in this version of genq")
