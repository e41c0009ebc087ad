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
    if spec.kind == "textToImage":
        from genq.worker.tools.text_to_image import TextToImageTool

        return TextToImageTool(spec)
    if spec.kind == "imageEdit":
        from genq.worker.tools.image_edit import ImageEditTool

        return ImageEditTool(spec)
    raise NotImplementedError(f"tool kind {spec.kind!r} has no worker implementation in this version of genq")
