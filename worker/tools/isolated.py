"""Tools in their own processes: one child process per worker slot.

``options.isolation`` of a tool: ``process`` (the default of the diffusers kinds,
``textToImage`` and ``imageEdit``) or ``thread`` (the default of ``upscale``, whose
Real-ESRGAN and Lanczos backends spend their time in a few large native calls that
release the GIL, and of ``python``, whose callables are often tiny and whose ``async
def`` ones want the worker's loop).

Why a process: a diffusers pipeline on CPU, or on a GPU with a small model, is mostly
Python (tens of thousands of small ops a job). In the worker's own process it shares one
GIL with the event loop (HTTP in the embedded mode, NATS, status writes, a progress event
every step), and each side slows the other (BENCHMARKS.md §4). In a child it has a core
and an interpreter to itself. And a crash is contained: a segfault, a CUDA error or an
out-of-memory kill ends the child, not the worker; the job is retried and the slot gets a
fresh child. A tool that ignores its cancel token is stopped by killing its child
``cancelGraceSeconds`` (default 10) after the cancel.

The cost: each slot loads its own copy of the model (``concurrencyPerWorker: 2`` holds
the weights twice), and inputs and results cross a local socket (a few ms for a 10 MB
PNG). Use ``isolation: thread`` to share one model between a worker's slots.

Protocol: length-prefixed pickle frames over a socketpair; the parent speaks first
(``init`` with the ToolSpec), then ``load``/``run``/``cancel``/``stop``; the child answers
``ready``, ``loaded``, ``progress``… and one terminal frame per run. Both ends are genq's
own code, so pickle is fine. The child is :mod:`genq.worker.tools.child`.

Neighbours: built by :func:`genq.worker.tools.build_tool`; the worker calls ``aload``,
``arun`` and ``aclose`` (it prefers them to the in-process ``load``/``run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import socket
import struct
import subprocess
import sys
from typing import Any

from genq.tools import ToolSpec
from genq.worker.tools.base import Cancelled, Retry, ToolCall, ToolError, ToolResult

log = logging.getLogger(__name__)

ISOLATIONS = ("process", "thread")
PROCESS_BY_DEFAULT = {"textToImage": "process", "imageEdit": "process"}
DEFAULT_CANCEL_GRACE_SECONDS = 10.0
#: How long a child may take to import genq and build its tool (not to load the model).
START_TIMEOUT_SECONDS = 120.0
HEADER = struct.Struct("!I")


def isolation_of(spec: ToolSpec) -> str:
    value = spec.options.get("isolation") or PROCESS_BY_DEFAULT.get(spec.kind, "thread")
    if value not in ISOLATIONS:
        raise ValueError(f"tool {spec.name}: options.isolation must be one of {', '.join(ISOLATIONS)}, not {value!r}")
    return str(value)


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class _Child:
    """One child process and the socket to it; runs one job at a time."""

    def __init__(self, owner: ProcessTool, index: int):
        self.owner = owner
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()
        self.job_id: str | None = None
        self._kill: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.writer is not None

    async def _send(self, msg: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.write(frame(msg))
        await self.writer.drain()

    async def _recv(self) -> dict[str, Any]:
        assert self.reader is not None
        (n,) = HEADER.unpack(await self.reader.readexactly(HEADER.size))
        return pickle.loads(await self.reader.readexactly(n))

    async def _start(self) -> None:
        await self._reap()
        parent, child = socket.socketpair()
        try:
            # -P: the parent's cwd never shadows a module (the child gets the parent's
            # sys.path in ``init`` instead, so user tools import as they do here).
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "genq.worker.tools.child", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.reader, self.writer = await asyncio.open_unix_connection(sock=parent)
        try:
            await self._send({"op": "init", "spec": self.owner.spec, "sys_path": list(sys.path), "slot": self.index})
            reply = await asyncio.wait_for(self._recv(), START_TIMEOUT_SECONDS)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as e:
            code = await self._reap()
            raise ToolError(f"the tool's process did not start (exit code {code}): {type(e).__name__}",
                            retryable=True) from e
        if reply.get("op") != "ready":
            await self._reap()
            raise _error_from(reply)
        log.info("%s: slot %d runs in process %d", self.owner.spec.name, self.index, self.proc.pid)

    async def _reap(self) -> int | None:
        """Close the socket and make sure the process is gone; its exit code."""
        if self._kill is not None:
            self._kill.cancel()
            self._kill = None
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        return await asyncio.to_thread(proc.wait)

    async def ensure(self) -> None:
        if not self.alive:
            await self._start()

    async def load(self, variant: str) -> None:
        async with self.lock:
            await self.ensure()
            await self._send({"op": "load", "variant": variant})
            try:
                reply = await self._recv()
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                code = await self._reap()
                raise ToolError(f"the tool's process exited (code {code}) while loading {variant!r}",
                                retryable=True) from e
            if reply.get("op") != "loaded":
                raise _error_from(reply)

    async def run(self, call: ToolCall) -> ToolResult:
        async with self.lock:
            await self.ensure()
            loop = asyncio.get_running_loop()
            self.job_id = call.job_id
            call.cancel.on_cancel(lambda reason: loop.call_soon_threadsafe(self._cancel, call.job_id, reason))
            try:
                await self._send({
                    "op": "run", "job_id": call.job_id, "variant": call.variant, "params": call.params,
                    "seed": call.seed, "inputs": [(f.name, f.content_type, f.data) for f in call.inputs],
                })
                while True:
                    try:
                        msg = await self._recv()
                    except (asyncio.IncompleteReadError, ConnectionError) as e:
                        code = await self._reap()
                        if call.cancel.cancelled:
                            raise Cancelled(call.cancel.reason or "cancelled") from e
                        raise ToolError(
                            f"the tool's process exited (code {code}) while running the job "
                            "(a crash, or killed: out of memory?)", retryable=True,
                        ) from e
                    op = msg.get("op")
                    if op == "progress":
                        call.progress(*msg["args"])
                    elif op == "result":
                        return ToolResult(files=msg["files"], seed=msg.get("seed"), metrics=msg.get("metrics") or {})
                    else:
                        raise _error_from(msg)
            finally:
                self.job_id = None
                if self._kill is not None:
                    self._kill.cancel()
                    self._kill = None

    def _cancel(self, job_id: str, reason: str) -> None:
        """On the loop: tell the child, and kill it if the tool has not stopped within
        the grace period (it ignores its token, or is stuck in one long native call)."""
        if self.job_id != job_id or self.writer is None or self.writer.is_closing():
            return
        self.writer.write(frame({"op": "cancel", "job_id": job_id, "reason": reason}))
        if self._kill is None:
            self._kill = asyncio.get_running_loop().call_later(self.owner.cancel_grace, self._force_stop, job_id)

    def _force_stop(self, job_id: str) -> None:
        self._kill = None
        if self.job_id == job_id and self.proc is not None and self.proc.poll() is None:
            log.warning("%s: job %s ignored its cancel for %.0fs; killing its process %d",
                        self.owner.spec.name, job_id, self.owner.cancel_grace, self.proc.pid)
            self.proc.kill()

    async def stop(self, timeout: float = 5.0) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if not self.lock.locked():  # a job still running is ended by the kill below
                await stack.enter_async_context(self.lock)
            if self.alive:
                with contextlib.suppress(Exception):
                    await self._send({"op": "stop"})
                    proc = self.proc
                    await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
            await self._reap()


def _error_from(msg: dict[str, Any]) -> Exception:
    op = msg.get("op")
    if op == "cancelled":
        return Cancelled(msg.get("reason") or "cancelled")
    if op == "tool_error":
        return ToolError(msg["message"], code=msg.get("code") or "pipeline_error", retryable=bool(msg.get("retryable")))
    if op == "retry":
        return Retry(msg.get("delay"), msg.get("message") or "tool asked to retry")
    text = f"{msg.get('type', 'Error')}: {msg.get('message', msg)}"
    if msg.get("traceback"):
        log.warning("tool process raised:\n%s", msg["traceback"])
    # An unexpected exception is retried with backoff, as it is for a tool in a thread.
    return ToolError(text[:500], retryable=True)


class ProcessTool:
    """A tool whose ``load``/``run`` happen in child processes, one per slot."""

    def __init__(self, spec: ToolSpec, slots: int = 1):
        self.spec = spec
        self.cancel_grace = float(spec.options.get("cancelGraceSeconds", DEFAULT_CANCEL_GRACE_SECONDS))
        self._children = [_Child(self, i) for i in range(max(1, slots))]
        self._free: asyncio.Queue[_Child] | None = None

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self._children if c.alive and c.pid is not None]

    def _queue(self) -> asyncio.Queue[_Child]:
        if self._free is None:
            self._free = asyncio.Queue()
            for c in self._children:
                self._free.put_nowait(c)
        return self._free

    async def aload(self, variant: str | None = None) -> None:
        """Start every slot's process and load ``variant`` in each (at start, and on
        ``warm``); a slot busy with a job loads after it."""
        variant = variant or self.spec.default_variant
        results = await asyncio.gather(*(c.load(variant) for c in self._children), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def arun(self, call: ToolCall) -> ToolResult:
        free = self._queue()
        child = await free.get()
        try:
            return await child.run(call)
        finally:
            free.put_nowait(child)

    async def aclose(self) -> None:
        await asyncio.gather(*(c.stop() for c in self._children), return_exceptions=True)
