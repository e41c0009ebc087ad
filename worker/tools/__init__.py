"""Runnable tools built from a ToolSpec: the built-in kinds and the ``python`` kind."""

from __future__ import annotations

from genq.tools import ToolSpec
from genq.worker.tools.base import Tool


def build_tool(spec: ToolSpec, *, slots: int = 1, isolation: str | None = None) -> Tool:
    """The runnable tool for ``spec``; heavy imports happen here, not at module import.

    ``isolation`` (default: ``spec.options.isolation``, see :mod:`.isolated`): ``process``
    gives each of the ``slots`` its own child process running the tool; ``thread`` runs
    it in this process."""
    from genq.worker.tools.isolated import ProcessTool, isolation_of

    if (isolation or isolation_of(spec)) == "process":
        return ProcessTool(spec, slots)
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
