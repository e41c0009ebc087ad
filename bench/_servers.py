"""The two servers the benchmarks drive, each run as its own process:

    python bench/_servers.py genq --data-dir D --port P --config JSON [--settings JSON]
                                  [--stop-workers a,b] [--loop auto|asyncio|uvloop] [--profile OUT]
    python bench/_servers.py bare --port P [--loop auto|asyncio|uvloop] [--profile OUT]

``genq`` is the real embedded stack (``genq.embedded.Embedded``: nats-server child
process, SQLite, local blobs, a worker per tool, housekeeping) served by uvicorn exactly
as ``genq up`` serves it. ``bare`` is a FastAPI app with one ``POST /v1/jobs`` that
validates the same JSON body and answers 202 with a small JSON body. Both use the same
uvicorn version, HTTP implementation (httptools) and event loop (``--loop``; default the
one ``genq up`` picks: uvloop where installed). Both print ``READY <url>`` once
listening and stop cleanly on SIGUSR1 (SIGTERM also stops them, abruptly).

``--profile OUT`` wraps the process in pyinstrument (main thread, wall-clock samples)
and writes a text profile to OUT (and the raw session to OUT.pyisession) on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import BaseModel, ConfigDict, Field

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

ADMIN = "gq_bench_admin_key_0123456789abcdef"


def _uvicorn_config(app: Any, port: int) -> uvicorn.Config:
    return uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                          access_log=False, http="httptools", timeout_graceful_shutdown=5)


async def _serve(server: uvicorn.Server, url: str) -> None:
    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        print(f"READY {url}", flush=True)

    # SIGUSR1 = stop: uvicorn re-raises a captured SIGTERM/SIGINT after serving, which
    # would kill the process before the embedded stack is stopped and a profile written.
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: setattr(server, "should_exit", True))
    t = asyncio.create_task(announce())
    await server.serve()
    t.cancel()


async def run_genq(args: argparse.Namespace) -> None:
    from genq.embedded import Embedded
    from genq.settings import Settings
    from genq.tools import registry_from_dict

    settings = Settings(data_dir=Path(args.data_dir), admin_key=ADMIN, port=args.port, **json.loads(args.settings))
    if args.tracemalloc:
        # Memory by allocation site: SIGUSR2 writes a snapshot (tracemalloc-<n>.snap) next
        # to the data folder; bench/soak.py --tracemalloc compares the first and the last.
        import tracemalloc

        tracemalloc.start(12)
        shots = [0]

        def snapshot() -> None:
            shots[0] += 1
            tracemalloc.take_snapshot().dump(str(Path(args.data_dir).parent / f"tracemalloc-{shots[0]}.snap"))

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, snapshot)
    emb = Embedded(settings, registry_from_dict(json.loads(args.config)))
    await emb.start()
    stop = {s for s in args.stop_workers.split(",") if s}
    for w in emb.workers:
        if w.name in stop:
            await w.stop(0)  # jobs of this tool stay queued (real SQLite rows + JetStream messages)
    server = uvicorn.Server(_uvicorn_config(emb.app(), args.port))
    try:
        await _serve(server, f"http://127.0.0.1:{args.port}")
    finally:
        await emb.stop(drain=1)


class BareBody(BaseModel):
    """The JSON submit body (same fields as genq's ``JobCreate``)."""

    model_config = ConfigDict(extra="forbid")
    tool: str = Field(min_length=1, max_length=63)
    variant: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, str | list[str]] = Field(default_factory=dict)
    priority: str = "normal"
    wait: float = 0


def bare_app():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from ulid import ULID

    app = FastAPI()

    @app.post("/v1/jobs", status_code=202)
    async def submit(body: BareBody) -> Any:
        job_id = str(ULID())
        return JSONResponse({"id": job_id, "tool": body.tool, "status": "queued", "params": body.params},
                            status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})

    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "ok"}

    return app


async def run_bare(args: argparse.Namespace) -> None:
    server = uvicorn.Server(_uvicorn_config(bare_app(), args.port))
    await _serve(server, f"http://127.0.0.1:{args.port}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["genq", "bare"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data-dir")
    p.add_argument("--config", default='{"tools": []}')
    p.add_argument("--settings", default="{}")
    p.add_argument("--stop-workers", default="")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="auto: what genq up picks (GENQ_EVENT_LOOP's default, uvloop where installed)")
    p.add_argument("--profile")
    p.add_argument("--tracemalloc", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    coro = run_genq(args) if args.kind == "genq" else run_bare(args)

    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
    try:
        from genq import eventloop

        eventloop.run(coro, args.loop)
    finally:
        if profiler is not None:
            profiler.stop()
            Path(args.profile).write_text(profiler.output_text(unicode=True, color=False, show_all=False))
            profiler.last_session.save(args.profile + ".pyisession")  # pyinstrument --load=... to re-render


if __name__ == "__main__":
    main()
