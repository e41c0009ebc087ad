"""Tools in their own processes: one child process per worker slot.

``options.isolation``: ``process`` (the default of the diffusers kinds) or ``thread``
(the default of ``upscale``, whose backends spend their time in native calls that release
the GIL, and of ``python``, whose callables are often tiny).

Why a process: a diffusers pipeline on CPU, or on a GPU with a small model, is mostly
Python; in the worker's process it shares one GIL with the event loop and each side slows
the other (BENCHMARKS.md §4). A child has an interpreter to itself, and a crash (a
segfault, a CUDA error, an out-of-memory kill) ends the child, not the worker. A tool that
ignores its cancel token is killed ``cancelGraceSeconds`` (default 10) after the cancel.
The cost: each slot holds its own copy of the model; ``isolation: thread`` shares one.

Between two jobs, the slot sends the next job while the current one is in its last step
(``base.in_last_step``), and the child starts it the moment the current one ends; results
cross raw (``pipelines.ImageFile``) and the worker encodes them. Progress frames cost the
worker a wakeup each: every step only while the job is watched, else at most one a
``PROGRESS_FRAME_INTERVAL`` plus the last step's and the end's.

Protocol: length-prefixed pickle frames over a socketpair (both ends are genq's code).
The parent sends ``init`` (the ToolSpec), then ``load``/``run``/``watch``/``cancel``/``stop``;
the child answers ``ready``, then ``loaded``, ``progress``… and one terminal frame per
run, each naming what it answers, in the order it ran them.

Neighbours: built by :func:`genq.worker.tools.build_tool`; the worker calls the
:class:`~genq.worker.tools.base.Tool` methods ``aload``, ``arun`` and ``aclose``, which
this class overrides; the child is :mod:`genq.worker.tools.child`.
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
from genq.worker.tools.base import Cancelled, Retry, Tool, ToolCall, ToolError, ToolResult, in_last_step

log = logging.getLogger(__name__)

ISOLATIONS = ("process", "thread")
PROCESS_BY_DEFAULT = {"textToImage": "process", "imageEdit": "process"}
DEFAULT_CANCEL_GRACE_SECONDS = 10.0
#: How long a child may take to import genq and build its tool (not to load the model).
START_TIMEOUT_SECONDS = 120.0
HEADER = struct.Struct("!I")
#: Seconds between two progress frames of a job nobody watches (the worker writes a job's
#: progress to the store at most every 0.5 s).
PROGRESS_FRAME_INTERVAL = 0.25


def isolation_of(spec: ToolSpec) -> str:
    value = spec.options.get("isolation") or PROCESS_BY_DEFAULT.get(spec.kind, "thread")
    if value not in ISOLATIONS:
        raise ValueError(f"tool {spec.name}: options.isolation must be one of {', '.join(ISOLATIONS)}, not {value!r}")
    return str(value)


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class _Pending:
    __slots__ = ("call", "future")

    def __init__(self, call: ToolCall | None, future: asyncio.Future[dict[str, Any]]):
        self.call = call
        self.future = future


class _Child:
    """One child process and the socket to it. The child runs what it is sent in order;
    one task here reads its replies and routes each by ``ref`` (a job id, or a load's)."""

    def __init__(self, owner: ProcessTool, index: int):
        self.owner = owner
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        #: What the child was sent and has not answered, in the order it runs them.
        self.pending: dict[str, _Pending] = {}
        #: Jobs given to this child by ``ProcessTool.arun`` and not yet returned.
        self.assigned = 0
        #: The job the child is on has begun its last step (``in_last_step``).
        self.finishing = False
        self._loads = 0
        self._kill: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.writer is not None

    @property
    def current(self) -> str | None:
        return next(iter(self.pending), None)

    async def _send(self, msg: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.write(frame(msg))
        await self.writer.drain()

    async def _recv(self) -> dict[str, Any]:
        assert self.reader is not None
        (n,) = HEADER.unpack(await self.reader.readexactly(HEADER.size))
        return pickle.loads(await self.reader.readexactly(n))

    async def ensure(self) -> None:
        async with self._start_lock:
            if not self.alive:
                await self._start()

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
        self._read_task = asyncio.create_task(self._read(), name=f"{self.owner.spec.name}-tool{self.index}-read")
        log.info("%s: slot %d runs in process %d", self.owner.spec.name, self.index, self.proc.pid)

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._recv()
                entry = self.pending.get(msg.get("ref"))
                if entry is None:
                    continue
                if msg.get("op") == "progress":
                    if in_last_step(*msg["args"][1:]):
                        self.finishing = True
                        self.owner.notify()
                    if entry.call is not None:
                        entry.call.progress(*msg["args"])
                    continue
                del self.pending[msg["ref"]]
                self.finishing = False
                self._stop_kill_timer()
                if not entry.future.done():
                    entry.future.set_result(msg)
                self.owner.notify()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            await self._reap(from_reader=True)

    async def _reap(self, from_reader: bool = False) -> int | None:
        """Close the socket and make sure the process is gone; its exit code. Whatever
        the process was sent and did not answer ends as ``exited`` (whoever notices the
        death first, the reader or a restart, answers them)."""
        self._stop_kill_timer()
        if self._read_task is not None and not from_reader:
            self._read_task.cancel()
        self._read_task = None
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            code = await asyncio.to_thread(proc.wait)
        for entry in self.pending.values():
            if not entry.future.done():
                entry.future.set_result({"op": "exited", "code": code})
        self.pending.clear()
        self.finishing = False
        self.owner.notify()
        return code

    async def _ask(self, ref: str, msg: dict[str, Any], call: ToolCall | None) -> dict[str, Any]:
        await self.ensure()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        # From here to the send, nothing awaits: a cancel either came before (raised
        # here) or finds the job pending and reaches the child.
        if call is not None:
            call.cancel.raise_if_cancelled()
        self.pending[ref] = _Pending(call, future)
        if call is not None:
            call.cancel.on_cancel(lambda reason: loop.call_soon_threadsafe(self._cancel, ref, reason))
            msg["watched"] = call.watched.watched
            if not msg["watched"]:
                call.watched.on_set(lambda: loop.call_soon_threadsafe(self._watch, ref))
        try:
            await self._send(msg)
        except (ConnectionError, OSError):
            pass  # the reader sees the end too and answers ``exited``
        try:
            return await future
        finally:
            self.pending.pop(ref, None)

    async def load(self, variant: str) -> None:
        self._loads += 1
        ref = f"load-{self._loads}"
        reply = await self._ask(ref, {"op": "load", "ref": ref, "variant": variant}, None)
        if reply.get("op") == "exited":
            raise ToolError(f"the tool's process exited (code {reply.get('code')}) while loading {variant!r}",
                            retryable=True)
        if reply.get("op") != "loaded":
            raise _error_from(reply)

    async def run(self, call: ToolCall) -> ToolResult:
        reply = await self._ask(call.job_id, {
            "op": "run", "job_id": call.job_id, "variant": call.variant, "params": call.params,
            "seed": call.seed, "inputs": [(f.name, f.content_type, f.data) for f in call.inputs],
        }, call)
        op = reply.get("op")
        if op == "result":
            return ToolResult(files=reply["files"], seed=reply.get("seed"), metrics=reply.get("metrics") or {})
        if op == "exited":
            if call.cancel.cancelled:
                raise Cancelled(call.cancel.reason or "cancelled")
            raise ToolError(f"the tool's process exited (code {reply.get('code')}) while running the job "
                            "(a crash, or killed: out of memory?)", retryable=True)
        raise _error_from(reply)

    def _cancel(self, job_id: str, reason: str) -> None:
        """On the loop: tell the child; if the job is the one running, kill the child
        should the tool not stop within the grace period (it ignores its token, or is
        stuck in one long native call)."""
        if job_id not in self.pending or self.writer is None or self.writer.is_closing():
            return
        self.writer.write(frame({"op": "cancel", "job_id": job_id, "reason": reason}))
        if self.current == job_id and self._kill is None:
            self._kill = asyncio.get_running_loop().call_later(self.owner.cancel_grace, self._force_stop, job_id)

    def _watch(self, job_id: str) -> None:
        """On the loop: the job is watched now; its child reports every step from here."""
        if job_id in self.pending and self.writer is not None and not self.writer.is_closing():
            self.writer.write(frame({"op": "watch", "job_id": job_id}))

    def _stop_kill_timer(self) -> None:
        if self._kill is not None:
            self._kill.cancel()
            self._kill = None

    def _force_stop(self, job_id: str) -> None:
        self._kill = None
        if self.current == job_id and self.proc is not None and self.proc.poll() is None:
            log.warning("%s: job %s ignored its cancel for %.0fs; killing its process %d",
                        self.owner.spec.name, job_id, self.owner.cancel_grace, self.proc.pid)
            self.proc.kill()

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the child to exit after what it was sent; kill it after ``timeout``."""
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


class ProcessTool(Tool):
    """A tool whose ``load``/``run`` happen in child processes, one per slot."""

    #: A slot may send its next job while the last one is in its final phase (decode,
    #: output): the child starts it the moment the last one ends (see the worker).
    queues_runs = True

    def __init__(self, spec: ToolSpec, slots: int = 1):
        self.spec = spec
        self.cancel_grace = float(spec.options.get("cancelGraceSeconds", DEFAULT_CANCEL_GRACE_SECONDS))
        self._children = [_Child(self, i) for i in range(max(1, slots))]
        self._changed: asyncio.Event | None = None

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self._children if c.alive and c.pid is not None]

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _pick(self) -> _Child | None:
        """An idle child; else one whose only job is in its last step."""
        idle = [c for c in self._children if c.assigned == 0]
        if idle:
            return idle[0]
        return next((c for c in self._children if c.assigned == 1 and c.finishing), None)

    async def aload(self, variant: str | None = None) -> None:
        """Start every slot's process and load ``variant`` in each (at start, and on
        ``warm``); a process busy with a job loads after it."""
        variant = variant or self.spec.default_variant
        results = await asyncio.gather(*(c.load(variant) for c in self._children), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def arun(self, call: ToolCall) -> ToolResult:
        while (child := self._pick()) is None:
            self._changed = self._changed or asyncio.Event()
            self._changed.clear()
            await self._changed.wait()
        child.assigned += 1
        try:
            return await child.run(call)
        finally:
            child.assigned -= 1
            self.notify()

    async def aclose(self) -> None:
        await asyncio.gather(*(c.stop() for c in self._children), return_exceptions=True)
