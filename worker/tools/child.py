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

import asyncio
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
    from genq.worker.tools.base import CancelToken, InputFile, ToolCall, in_last_step

    init = chan.recv()
    if init is None or init.get("op") != "init":
        return
    sys.path[:] = [p for p in init["sys_path"] if p]
    spec = init["spec"]
    try:
        tool = build_tool(spec, isolation="thread")
    except BaseException as e:  # a bad entrypoint, a malformed variant: the worker reports it
        chan.send(_outcome(e))
        return
    chan.send({"op": "ready", "pid": os.getpid()})

    work: queue.Queue[tuple[dict[str, Any], Any] | None] = queue.Queue()
    tokens: dict[str, CancelToken] = {}
    #: Jobs sent here that someone watches: every step is reported (see ``progress``).
    watched: set[str] = set()
    tokens_lock = threading.Lock()

    def reader() -> None:
        while True:
            msg = chan.recv()
            if msg is None:  # the worker is gone: nobody to report to
                os._exit(0)
            op = msg.get("op")
            if op == "cancel":
                with tokens_lock:
                    token = tokens.get(msg["job_id"])
                if token is not None:
                    token.cancel(msg.get("reason") or "cancelled")
            elif op == "watch":
                with tokens_lock:
                    if msg["job_id"] in tokens:  # else it ended: nothing to report
                        watched.add(msg["job_id"])
            elif op == "run":
                token = CancelToken()
                with tokens_lock:  # before it queues: a cancel or a watch may follow at once
                    tokens[msg["job_id"]] = token
                    if msg.get("watched"):
                        watched.add(msg["job_id"])
                work.put((msg, token))
            elif op == "stop":
                work.put(None)
                return
            else:
                work.put((msg, None))

    threading.Thread(target=reader, name="genq-child-reader", daemon=True).start()
    arun = getattr(tool, "arun", None)

    while True:
        item = work.get()
        if item is None:
            return
        msg, token = item
        ref = msg.get("ref")
        if msg["op"] == "load":
            t0 = time.perf_counter()
            try:
                tool.load(msg.get("variant"))
            except BaseException as e:
                chan.send({**_outcome(e), "ref": ref})
            else:
                chan.send({"op": "loaded", "ref": ref, "seconds": time.perf_counter() - t0})
            continue
        if msg["op"] != "run":
            chan.send({"op": "error", "ref": ref, "type": "ProtocolError", "message": f"unknown op {msg['op']!r}"})
            continue
        ref = msg["job_id"]

        last_sent = [time.monotonic()]

        def progress(fraction: float, step: int | None = None, steps: int | None = None, ref: str = ref,
                     last_sent: list[float] = last_sent) -> None:
            # Every step while watched; else the last step's (the worker hands the next job
            # over on it), the end's, and one a PROGRESS_FRAME_INTERVAL (the store's figure).
            now = time.monotonic()
            if (ref in watched or in_last_step(step, steps) or fraction >= 1.0
                    or now - last_sent[0] >= PROGRESS_FRAME_INTERVAL):
                last_sent[0] = now
                chan.send({"op": "progress", "ref": ref, "args": (float(fraction), step, steps)})

        call = ToolCall(
            job_id=msg["job_id"], variant=msg["variant"], params=msg["params"],
            inputs=[InputFile(*f) for f in msg["inputs"]], seed=msg["seed"], progress=progress, cancel=token,
        )
        try:
            token.raise_if_cancelled()
            result = asyncio.run(arun(call)) if arun is not None else tool.run(call)
            if token.cancelled:
                chan.send({"op": "cancelled", "ref": ref, "reason": token.reason or "cancelled"})
            else:
                # Files as they are: an ImageFile crosses raw and is encoded by the worker.
                chan.send({"op": "result", "ref": ref, "files": list(result.files), "seed": result.seed,
                           "metrics": result.metrics})
        except BaseException as e:
            chan.send({**_outcome(e), "ref": ref})
        finally:
            with tokens_lock:
                tokens.pop(msg["job_id"], None)
                watched.discard(msg["job_id"])


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
