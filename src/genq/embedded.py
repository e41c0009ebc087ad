"""``genq up``: the API, a worker per tool, housekeeping and an embedded NATS, in one process.

Start order: NATS (child process) → adapters → hand back jobs a killed predecessor was
running → workers → housekeeping → HTTP. Stop order is the reverse, and every step is
bounded, so Ctrl-C or SIGTERM drains running jobs and leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from genq import constants
from genq.adapters.nats_server import EmbeddedNats
from genq.api import create_app
from genq.api.auth import generate_key, hash_key
from genq.models import ApiKey
from genq.housekeeping import Housekeeper
from genq.runtime import Runtime, build_runtime
from genq.settings import Settings
from genq.tools import Registry
from genq.worker.tools import build_tool
from genq.worker.worker import Worker

log = logging.getLogger("genq")

#: The cyclic GC's first threshold once the app is built (CPython's default: 700). Young
#: collections free next to nothing in genq's serving loop yet each walks the requests in
#: flight, stalling the loop (BENCHMARKS.md, "Figures behind the code's defaults").
#: Cyclic garbage is still collected, later.
GC_YOUNG_THRESHOLD = 10_000
#: How long JetStream may leave publishes unanswered on a live connection before the
#: embedded nats-server is restarted (see :meth:`Embedded._watch_nats`).
NATS_STALL_RESTART_SECONDS = 5.0
#: Free space the data folder needs before that restart: JetStream sizes its storage
#: limit from the free space when it starts, so a restart on a full disk would cap it.
NATS_RESTART_MIN_FREE_BYTES = 16 * 1024 * 1024


async def ensure_admin_key(rt: Runtime) -> str | None:
    """The generated bootstrap admin key on first start (to print once), else None."""
    if rt.settings.admin_key is not None:
        return None
    keys = {k.id for k in await rt.keys.list_keys()}
    if constants.BOOTSTRAP_ADMIN_KEY_ID in keys:
        return None
    raw = generate_key()
    await rt.keys.create_key(ApiKey(id=constants.BOOTSTRAP_ADMIN_KEY_ID, name="bootstrap-admin", key_hash=hash_key(raw),
                                    prefix=raw[:8], tier="premium", admin=True))
    return raw


class Embedded:
    """The whole single-machine genq; also used by tests to run it in-process."""

    def __init__(self, settings: Settings, registry: Registry, *, nats_url: str | None = None):
        self.settings = settings
        self.registry = registry
        self.data_dir = settings.resolved_data_dir()
        self.nats = None if (nats_url or settings.nats_url) else EmbeddedNats(Path(self.data_dir) / constants.NATS_DIR)
        self._nats_url = nats_url or settings.nats_url
        self.rt: Runtime | None = None
        self.workers: list[Worker] = []
        self.housekeeper: Housekeeper | None = None
        self._hk_task: asyncio.Task | None = None
        self.generated_admin_key: str | None = None
        self._watch_task: asyncio.Task | None = None

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.nats is not None:
            # Started from this (the main) thread on purpose: Linux's parent-death signal
            # fires when the *thread* that forked exits, and this one lives as long as genq.
            self._nats_url = self.nats.start()
            (self.data_dir / "nats.url").write_text(self._nats_url)
        self.rt = build_runtime(self.settings, self.registry, self._nats_url)
        await self.rt.open()
        self.generated_admin_key = await ensure_admin_key(self.rt)
        self.housekeeper = Housekeeper(self.rt)
        handed_back = await self.housekeeper.recover_orphans(set())
        if handed_back:
            log.info("handed back %d job(s) left running by a previous process", handed_back)
        for spec in self.registry:
            tool = build_tool(spec, slots=spec.capacity)
            w = Worker(spec, tool, store=self.rt.store, bus=self.rt.bus, blobs=self.rt.blobs, settings=self.settings,
                       slots=spec.capacity, metrics=self.rt.metrics)
            await w.start()
            self.workers.append(w)
        self._hk_task = asyncio.create_task(self.housekeeper.run(), name="housekeeping")
        if self.nats is not None:
            self._watch_task = asyncio.create_task(self._watch_nats(), name="nats-watch")

    async def _watch_nats(self) -> None:
        """Restart the embedded nats-server when its JetStream has stopped storing messages.
        After a failed write (a full disk) nats-server answers no publish to that stream
        until it restarts, even once space is back; its files are kept, clients reconnect."""
        assert self.nats is not None and self.rt is not None
        while True:
            await asyncio.sleep(1.0)
            since = self.rt.bus.stalled_since
            if since is None or time.monotonic() - since < NATS_STALL_RESTART_SECONDS:
                continue
            if shutil.disk_usage(self.nats.store_dir).free < NATS_RESTART_MIN_FREE_BYTES:
                continue
            log.warning("JetStream has stored no job for %.0fs (after a full disk?); restarting the embedded nats-server",
                        time.monotonic() - since)
            try:
                await asyncio.to_thread(self.nats.stop)
                # From this (the main) thread: see start().
                self.nats.start()
            except Exception:
                log.exception("restarting the embedded nats-server failed; trying again")
                continue
            self.rt.bus.stalled_since = None

    def app(self):
        assert self.rt is not None
        app = create_app(self.rt)
        # What exists now (imported modules, adapters, tools, the app) lives as long as the
        # process: out of the cyclic GC's sight, a full collection no longer walks it
        # (each one stalled the loop under load: BENCHMARKS.md §6).
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        return app

    async def stop(self, drain: float | None = None) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self.housekeeper is not None:
            self.housekeeper.stop()
        await asyncio.gather(*(w.stop(drain) for w in self.workers), return_exceptions=True)
        if self._hk_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._hk_task, 5)
        if self.rt is not None:
            await self.rt.close()
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)


async def serve(settings: Settings, registry: Registry, *, announce: Callable[[str], None] = print) -> None:
    emb = Embedded(settings, registry)
    t0 = time.perf_counter()
    await emb.start()
    try:
        config = uvicorn.Config(emb.app(), host=settings.host, port=settings.port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=10, access_log=False)
        server = uvicorn.Server(config)
        url = f"http://{settings.host}:{settings.port}"

        async def _announce() -> None:
            while not server.started:
                await asyncio.sleep(0.05)
            announce(f"genq is up at {url}  (docs: {url}/docs; data: {emb.data_dir}; started in {time.perf_counter() - t0:.1f}s)")
            announce(f"tools: {', '.join(registry.names())}")
            if emb.generated_admin_key:
                announce(f"admin key (shown once, store it now): {emb.generated_admin_key}")
            elif settings.admin_key is None:
                announce("admin key: the one printed on first start (set GENQ_ADMIN_KEY to use your own)")
            announce("Ctrl-C to stop")

        announcer = asyncio.create_task(_announce())
        # uvicorn re-raises the SIGINT/SIGTERM it caught once it has stopped serving, into
        # the handlers it found when it started. With the default ones that kills the
        # process right here, before the drain below; give it handlers that do nothing,
        # and put the defaults back afterwards so a second signal cuts the drain short.
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            await server.serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        announcer.cancel()
    finally:
        announce("draining running jobs …")
        await emb.stop()
        announce("genq stopped")
