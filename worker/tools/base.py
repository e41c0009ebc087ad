"""What every tool receives and returns, the errors it may raise, and :class:`Tool`,
the base every runnable tool extends.

A tool gets validated params, its inputs, a progress reporter and a cancellation token,
and returns result files plus metadata (the seed it used, metrics). Tools run in a worker
thread; they must call ``cancel.raise_if_cancelled()`` (or check ``cancel.cancelled``)
often enough that a cancel takes effect within a second.

Neighbours: the worker (:mod:`genq.worker.worker`) calls a tool only through the async
methods declared here; :func:`genq.worker.tools.build_tool` picks the subclass.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Cancelled(Exception):
    """Raised inside a tool when its job was cancelled or ran past its deadline."""


class ToolError(Exception):
    """A tool failure with a code users see in ``error.code``.

    ``retryable=False`` fails the job at once (bad input, unsupported request);
    ``retryable=True`` (the default for unexpected exceptions) retries with backoff.
    """

    def __init__(self, message: str, *, code: str = "pipeline_error", retryable: bool = False):
        super().__init__(message)
        self.code = code
        self.retryable = retryable


class Retry(Exception):
    """Ask for another attempt after ``delay`` seconds (arq's ``Retry``)."""

    def __init__(self, delay: float | None = None, message: str = "tool asked to retry"):
        super().__init__(message)
        self.delay = delay


class CancelToken:
    """Thread-safe cancellation flag shared by the worker and the running tool."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[str], None]] = []
        self.reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(reason)

    def on_cancel(self, fn: Callable[[str], None]) -> None:
        """Call ``fn(reason)`` once, on the cancelling thread, when the token is cancelled
        (at once if it already is): how a tool running elsewhere hears of it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self.reason or "cancelled")

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason or "cancelled")

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout``; True as soon as the job is cancelled."""
        return self._event.wait(timeout)


def in_last_step(step: int | None, steps: int | None) -> bool:
    """A progress report ``(fraction, step, steps)`` saying the tool has begun its last step
    (step ``steps - 1`` done): what remains is one step and the decode. The worker pulls
    the slot's next job and hands it over from here, so its claim and hand-over land
    while the tool is still busy."""
    return bool(steps) and step is not None and step >= steps - 1


class Progress(Protocol):
    def __call__(self, fraction: float, step: int | None = None, steps: int | None = None) -> None: ...


class WatchFlag:
    """Whether someone watches the job (an SSE stream is open on it): then every step's
    progress is wanted as it happens. Set by the worker, at the start or mid-run; a tool
    in its own process reports every step only while it is set, and otherwise a few (at
    most one a ``PROGRESS_FRAME_INTERVAL``, and the last step), sparing the worker a
    wakeup per step. Thread-safe; once set it stays set."""

    def __init__(self, watched: bool = False) -> None:
        self._lock = threading.Lock()
        self._set = watched
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()

    def on_set(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` once, on the setting thread, when the flag is set (at once if it
        already is)."""
        with self._lock:
            if not self._set:
                self._callbacks.append(fn)
                return
        fn()

    @property
    def watched(self) -> bool:
        return self._set


@dataclass(frozen=True)
class InputFile:
    name: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class OutputFile:
    name: str
    content_type: str
    data: bytes


class LazyFile:
    """A result file that makes its ``data`` when first read (an image still to encode):
    the worker reads it in a thread after the tool returns, beside the slot's next job
    (the diffusers tools' ``pipelines.ImageFile``)."""

    name: str
    content_type: str

    @property
    def data(self) -> bytes:
        raise NotImplementedError


@dataclass
class ToolResult:
    #: OutputFile, a :class:`LazyFile`, or anything with ``name``, ``content_type`` and ``data``.
    files: list[Any]
    seed: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolCall:
    """Everything one run of a tool gets."""

    job_id: str
    variant: str
    params: dict[str, Any]
    inputs: list[InputFile]
    seed: int | None
    progress: Progress
    cancel: CancelToken
    #: Set while someone watches the job; a tool may report fewer steps while it is not.
    watched: WatchFlag = field(default_factory=WatchFlag)


class Tool:
    """A runnable tool. A subclass writes ``load`` (once per worker, and on ``warm``) and
    ``run`` (per job); both may block, and the worker calls them in a thread through the
    async defaults below. A tool that is async by nature (one in child processes, an
    ``async def`` python tool) overrides ``aload``/``arun``/``aclose`` instead (httpx's
    transports declare their async methods the same way)."""

    #: A slot may hand the tool its next job while the current one is in its last step
    #: (the tool queues it and starts it the moment the current one ends).
    queues_runs: bool = False

    def load(self, variant: str | None = None) -> None:
        """Load ``variant`` (None: the default one) so the first run is fast."""

    def run(self, call: ToolCall) -> ToolResult:
        raise NotImplementedError(f"{type(self).__name__} runs only through arun")

    async def aload(self, variant: str | None = None) -> None:
        await asyncio.to_thread(self.load, variant)

    async def arun(self, call: ToolCall) -> ToolResult:
        return await asyncio.to_thread(self.run, call)

    async def aclose(self) -> None:
        """Release what the tool holds (child processes); the worker is stopping."""


ToolFactory = Callable[..., Tool]
