"""The child side of :mod:`genq.worker.tools.isolated`: ``python -P -m genq.worker.tools.child FD``.

Builds the tool from the ToolSpec the worker sends (in-process, ``isolation: thread``),
then serves ``load`` and ``run`` on its main thread, one at a time, in the order they
came: the worker may send a slot's next job while the last one finishes, and it starts
the moment that one ends. Every reply names what it answers (``ref``: the job id, or the
load's). A reader thread takes the worker's frames: a ``cancel`` sets that job's token at
once (running, the pipeline stops at its next step; queued, it never starts), the rest
queue for the main thread. When the worker's end of the socket
closes (the worker exited, or was killed) the child exits too.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO

from genq.worker.tools.base import CancelToken, InputFile, Progress, Tool, ToolCall, in_last_step
from genq.worker.tools.isolated import HEADER, PROGRESS_FRAME_INTERVAL, frame

log = logging.getLogger("genq.worker.tools.child")


def _recv(f: BinaryIO) -> dict[str, Any] | None:
    import pickle

    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (n,) = HEADER.unpack(head)
    data = f.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


class _Channel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self._lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        data = frame(msg)
        with self._lock:
            self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        return _recv(self.rfile)


def _outcome(e: BaseException) -> dict[str, Any]:
    from genq.worker.tools.base import Cancelled, Retry, ToolError

    if isinstance(e, Cancelled):
        return {"op": "cancelled", "reason": str(e) or "cancelled"}
    if isinstance(e, ToolError):
        return {"op": "tool_error", "message": str(e), "code": e.code, "retryable": e.retryable}
    if isinstance(e, Retry):
        return {"op": "retry", "delay": e.delay, "message": str(e)}
    return {"op": "error", "type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()[-4000:]}


def serve(chan: _Channel) -> None:
    from genq.worker.tools import build_tool

    init = chan.recv()
    if init is None or init.get("op") != "init":
        return
    sys.path[:] = [p for p in init["sys_path"] if p]
    try:
        tool = build_tool(init["spec"], isolation="thread")
    except BaseException as e:  # a bad entrypoint, a malformed variant: the worker reports it
        chan.send(_outcome(e))
        return
    chan.send({"op": "ready", "pid": os.getpid()})
    _Server(chan, tool).serve()


class _Server:
    """The jobs sent to this child: their cancel tokens, and which someone watches. The
    reader thread (:meth:`read`) updates them as frames come; the main thread runs the
    loads and jobs queued in ``work``."""

    def __init__(self, chan: _Channel, tool: Tool):
        self.chan, self.tool = chan, tool
        self.work: queue.Queue[tuple[dict[str, Any], CancelToken | None] | None] = queue.Queue()
        self.tokens: dict[str, CancelToken] = {}
        #: Jobs sent here that someone watches: every step is reported (see ``_progress``).
        self.watched: set[str] = set()
        self.lock = threading.Lock()

    def serve(self) -> None:
        threading.Thread(target=self.read, name="genq-child-reader", daemon=True).start()
        while (item := self.work.get()) is not None:
            msg, token = item
            if msg["op"] == "load":
                self.load(msg)
            elif msg["op"] == "run" and token is not None:
                self.run(msg, token)
            else:
                self.chan.send({"op": "error", "ref": msg.get("ref"), "type": "ProtocolError",
                                "message": f"unknown op {msg['op']!r}"})

    def read(self) -> None:
        while True:
            msg = self.chan.recv()
            if msg is None:  # the worker is gone: nobody to report to
                os._exit(0)
            op = msg.get("op")
            if op == "cancel":
                with self.lock:
                    token = self.tokens.get(msg["job_id"])
                if token is not None:
                    token.cancel(msg.get("reason") or "cancelled")
            elif op == "watch":
                with self.lock:
                    if msg["job_id"] in self.tokens:  # else it ended: nothing to report
                        self.watched.add(msg["job_id"])
            elif op == "run":
                token = CancelToken()
                with self.lock:  # before it queues: a cancel or a watch may follow at once
                    self.tokens[msg["job_id"]] = token
                    if msg.get("watched"):
                        self.watched.add(msg["job_id"])
                self.work.put((msg, token))
            elif op == "stop":
                self.work.put(None)
                return
            else:
                self.work.put((msg, None))

    def load(self, msg: dict[str, Any]) -> None:
        ref = msg.get("ref")
        t0 = time.perf_counter()
        try:
            self.tool.load(msg.get("variant"))
        except BaseException as e:
            self.chan.send({**_outcome(e), "ref": ref})
        else:
            self.chan.send({"op": "loaded", "ref": ref, "seconds": time.perf_counter() - t0})

    def run(self, msg: dict[str, Any], token: CancelToken) -> None:
        ref = msg["job_id"]
        call = ToolCall(
            job_id=ref, variant=msg["variant"], params=msg["params"], inputs=[InputFile(*f) for f in msg["inputs"]],
            seed=msg["seed"], progress=self._progress(ref), cancel=token,
        )
        try:
            token.raise_if_cancelled()
            result = self.tool.run(call)
            if token.cancelled:
                self.chan.send({"op": "cancelled", "ref": ref, "reason": token.reason or "cancelled"})
            else:
                # Files as they are: an ImageFile crosses raw and is encoded by the worker.
                self.chan.send({"op": "result", "ref": ref, "files": list(result.files), "seed": result.seed,
                                "metrics": result.metrics})
        except BaseException as e:
            self.chan.send({**_outcome(e), "ref": ref})
        finally:
            with self.lock:
                self.tokens.pop(ref, None)
                self.watched.discard(ref)

    def _progress(self, ref: str) -> Progress:
        last_sent = time.monotonic()

        def progress(fraction: float, step: int | None = None, steps: int | None = None) -> None:
            # Every step while watched; else the last step's (the worker hands the next job
            # over on it), the end's, and one a PROGRESS_FRAME_INTERVAL (the store's figure).
            nonlocal last_sent
            now = time.monotonic()
            if (ref in self.watched or in_last_step(step, steps) or fraction >= 1.0
                    or now - last_sent >= PROGRESS_FRAME_INTERVAL):
                last_sent = now
                self.chan.send({"op": "progress", "ref": ref, "args": (float(fraction), step, steps)})

        return progress


def main() -> None:
    # A Ctrl-C in a terminal reaches the whole process group: the worker decides when its
    # tools stop (it drains, then closes the socket), not the keyboard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    level = getattr(logging, os.environ.get("GENQ_LOG_LEVEL", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level if isinstance(level, int) else logging.INFO,
                        format=f"%(asctime)s %(levelname)s tool[{os.getpid()}] %(name)s: %(message)s")
    sock = socket.socket(fileno=int(sys.argv[1]))
    serve(_Channel(sock))
    # Skip the interpreter's teardown: nothing is left to flush but the std streams, and
    # native extensions (triton's bindings) complain at length about objects alive at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
