"""The ``python`` tool kind: a user's callable, ``package.module:function``.

The callable receives ``(params, inputs, progress, cancel)`` — validated params, a list of
:class:`~genq.worker.tools.base.InputFile`, a progress reporter and a cancellation token —
and returns a :class:`~genq.worker.tools.base.ToolResult`, a list of
:class:`~genq.worker.tools.base.OutputFile`, or a dict ``{"files": [...], "seed": ..,
"metrics": {..}}``. Plain functions run in a worker thread; ``async def`` ones run on the
worker's event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

from genq.tools import ToolSpec
from genq.worker.tools.base import OutputFile, Tool, ToolCall, ToolError, ToolResult


def resolve(entrypoint: str) -> Any:
    module_name, _, attr = entrypoint.partition(":")
    module = importlib.import_module(module_name)
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"{entrypoint} is not callable")
    return fn


def to_result(value: Any, call: ToolCall) -> ToolResult:
    if isinstance(value, ToolResult):
        return value
    if isinstance(value, list | tuple):
        return ToolResult(files=list(value), seed=call.seed)
    if isinstance(value, dict):
        files = [f if isinstance(f, OutputFile) else OutputFile(**f) for f in value.get("files", [])]
        return ToolResult(files=files, seed=value.get("seed", call.seed), metrics=value.get("metrics") or {})
    if value is None:
        return ToolResult(files=[], seed=call.seed)
    raise ToolError(f"the tool returned {type(value).__name__}; expected ToolResult, list of OutputFile or dict")


class PythonTool(Tool):
    def __init__(self, spec: ToolSpec):
        self.spec = spec
        self.fn = resolve(spec.tool.entrypoint or "")
        self.is_async = inspect.iscoroutinefunction(self.fn)

    def load(self, variant: str | None = None) -> None:
        loader = getattr(self.fn, "load", None)  # the user's callable may bring a loader
        if callable(loader):
            loader(variant)

    def run(self, call: ToolCall) -> ToolResult:
        """In a thread (or a child process's): an ``async def`` callable gets its own loop."""
        if self.is_async:
            return asyncio.run(self.arun(call))
        return to_result(self.fn(call.params, call.inputs, call.progress, call.cancel), call)

    async def arun(self, call: ToolCall) -> ToolResult:
        if self.is_async:  # on the worker's event loop
            return to_result(await self.fn(call.params, call.inputs, call.progress, call.cancel), call)
        return await super().arun(call)
