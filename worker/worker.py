"""The worker loop: pull a tool's jobs, run them, report status.

Each slot (``maxWorkers × concurrencyPerWorker`` of them in the embedded mode, one per
``concurrencyPerWorker`` in a pod) asks the bus for the next job in dispatch order, moves
it ``queued → running`` by compare-and-set, heartbeats the message with ``in_progress``
while the tool runs (in the slot's own child process for the diffusers kinds, see
:mod:`genq.worker.tools.isolated`; else in a thread), writes results under the job's own
keys and ends the delivery with ``ack`` (done), ``nak(delay)`` (retry with backoff) or
``term``.

Delivery is at least once; effects are exactly once: every status write is guarded by the
attempt that made it, so a redelivered job that lost the race does nothing.

Neighbours: talks to :mod:`genq.ports` only, and moves a job's status only through
:mod:`genq.lifecycle`; tools come from :mod:`genq.worker.tools`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from genq import constants, lifecycle
from genq.metrics import Metrics
from genq.models import FileRef, Job, Status
from genq.ports import BlobStore, Bus, Delivery, JobStore, PortError, Subscription
from genq.settings import Settings
from genq.tools import ToolSpec
from genq.worker.tools.base import (
    CancelToken,
    Cancelled,
    InputFile,
    LazyFile,
    Retry,
    Tool,
    ToolCall,
    ToolError,
    ToolResult,
    WatchFlag,
    in_last_step,
)

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PROGRESS_WRITE_INTERVAL = 0.5
#: Watched jobs a worker remembers at most (open SSE streams across the API processes).
_MAX_WATCHED = 100_000
#: How long a job's start or end is retried through a storage fault (see ``_storing``)
#: when no deadline bounds it.
_STORE_RETRY_SECONDS = 60.0


def new_worker_id(tool: str) -> str:
    return f"{tool}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def backoff(attempt: int, base: float, cap: float) -> float:
    """Delay before attempt ``attempt + 1``: base, 2·base, 4·base … capped."""
    return min(cap, base * (2 ** max(0, attempt - 1)))


@dataclass
class _Running:
    job: Job
    token: CancelToken
    slot: int | None = None
    last_progress_write: float = 0.0
    #: Set when the tool reports it has begun its last step (``in_last_step``).
    last_step: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set once someone watches the job: the tool then reports every step.
    watch: WatchFlag = field(default_factory=WatchFlag)


class Worker:
    """Runs one tool's jobs with a fixed number of slots."""

    def __init__(
        self,
        spec: ToolSpec,
        tool: Tool,
        *,
        store: JobStore,
        bus: Bus,
        blobs: BlobStore,
        settings: Settings,
        slots: int | None = None,
        worker_id: str | None = None,
        metrics: Metrics | None = None,
    ):
        self.spec = spec
        self.tool = tool
        self.store = store
        self.bus = bus
        self.blobs = blobs
        self.settings = settings
        self.slots = slots or spec.concurrency_per_worker
        self.id = worker_id or new_worker_id(spec.name)
        self.metrics = metrics or Metrics()
        self._running: dict[str, _Running] = {}
        #: Succeeded jobs whose results are still being written (at most ``slots``).
        self._finishing: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._slot_tasks: list[asyncio.Task[None]] = []
        self._subs: list[Subscription] = []
        #: Per slot: the pull of its next job, started during the running job's last step.
        self._prefetch: dict[int, asyncio.Future[Delivery | None]] = {}
        #: Attempts past their last step whose slot already moved on (see ``_run``).
        self._tails: set[asyncio.Task[None]] = set()
        self.loaded = asyncio.Event()
        self._warm_until = 0.0
        #: Jobs an API process announced as watched (an SSE stream is open on them): job id
        #: → monotonic time the watch lapses. Only these get per-step progress events.
        self._watched: dict[str, float] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def busy(self) -> int:
        return len(self._running)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        await self.bus.ensure_tool(self.name, self.spec.max_attempts, self.settings.ack_wait_seconds)
        cancel_sub = await self.bus.subscribe(f"{constants.CANCEL_SUBJECT_PREFIX}.*")
        warm_sub = await self.bus.subscribe(constants.warm_subject(self.name))
        watch_sub = await self.bus.subscribe(f"{constants.WATCH_SUBJECT_PREFIX}.*")
        self._subs = [cancel_sub, warm_sub, watch_sub]
        self._tasks = [
            asyncio.create_task(self._load(), name=f"{self.id}-load"),
            asyncio.create_task(self._listen_cancels(cancel_sub), name=f"{self.id}-cancels"),
            asyncio.create_task(self._listen_warm(warm_sub), name=f"{self.id}-warm"),
            asyncio.create_task(self._listen_watches(watch_sub), name=f"{self.id}-watches"),
            asyncio.create_task(self._liveness(), name=f"{self.id}-alive"),
        ]
        self._slot_tasks = [asyncio.create_task(self._slot(i), name=f"{self.id}-slot{i}") for i in range(self.slots)]

    async def stop(self, drain: float | None = None) -> None:
        """Stop taking jobs, give running ones ``drain`` seconds, hand the rest back."""
        self._stopping.set()
        drain = self.settings.drain_seconds if drain is None else drain
        if self._slot_tasks:
            done, pending = await asyncio.wait(self._slot_tasks, timeout=drain)
            if pending:
                for r in list(self._running.values()):
                    r.token.cancel("shutdown")
                await asyncio.wait(pending, timeout=10)
                for t in pending:
                    t.cancel()
        if self._tails:
            await asyncio.wait(set(self._tails), timeout=10)
        for index in list(self._prefetch):
            with contextlib.suppress(Exception):
                await self._hand_back(index)
        if self._finishing:  # results being written: let them land (else: redelivered)
            await asyncio.wait(set(self._finishing), timeout=30)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in self._subs:
            await s.unsubscribe()
        with contextlib.suppress(Exception):  # the tool's child processes
            await self.tool.aclose()
        with contextlib.suppress(Exception):
            await self.store.worker_gone(self.id)

    async def run_until_idle(self, poll: float = 0.05) -> None:
        """Burst mode for tests and batch use: return once no job is queued or running."""
        while True:
            counts = await self.store.counts(self.name)
            if counts.queued == 0 and counts.running == 0 and not self._running:
                return
            await asyncio.sleep(poll)

    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            await self.tool.aload(self.spec.default_variant)
        except Exception:
            log.exception("%s: loading the model failed; jobs will retry the load", self.name)
        else:
            self.metrics.model_load_seconds.labels(self.name).observe(time.perf_counter() - t0)
        finally:
            self.loaded.set()

    async def _liveness(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(Exception):
                await self.store.worker_seen(self.id, self.name, self.slots, time.time())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.worker_heartbeat_seconds)

    async def _listen_cancels(self, sub: Subscription) -> None:
        async for msg in sub:
            job_id = msg.get("id")
            running = self._running.get(job_id)
            if running is not None:
                running.token.cancel(msg.get("reason") or "cancelled")

    async def _listen_warm(self, sub: Subscription) -> None:
        async for msg in sub:
            variant = msg.get("variant") or self.spec.default_variant
            self._warm_until = max(self._warm_until, time.time() + float(msg.get("seconds") or 0))
            with contextlib.suppress(Exception):
                await self.tool.aload(variant)

    async def _listen_watches(self, sub: Subscription) -> None:
        async for msg in sub:
            job_id = msg.get("id")
            if not isinstance(job_id, str):
                continue
            now = time.monotonic()
            if len(self._watched) >= _MAX_WATCHED:  # lapsed watches go first; then the oldest
                self._watched = {k: t for k, t in self._watched.items() if t > now}
                while len(self._watched) >= _MAX_WATCHED:
                    del self._watched[next(iter(self._watched))]
            self._watched.pop(job_id, None)  # re-inserted: the dict stays oldest first
            self._watched[job_id] = now + constants.WATCH_TTL_SECONDS
            running = self._running.get(job_id)
            if running is not None:
                running.watch.set()

    def watched(self, job_id: str) -> bool:
        return self._watched.get(job_id, 0.0) > time.monotonic()

    # -- the slot loop -----------------------------------------------------------------
    async def _slot(self, index: int) -> None:
        await self._unless_stopping(self.loaded.wait())
        while not self._stopping.is_set():
            token = self.bus.work_token(self.name)
            try:
                delivery = await self._next_delivery(index)
            except PortError as e:
                log.warning("%s: bus unavailable (%s); retrying", self.name, e)
                await self._sleep(0.5)
                continue
            except Exception:
                log.exception("%s: pull failed", self.name)
                await self._sleep(0.5)
                continue
            if delivery is None:
                await self._unless_stopping(self.bus.wait_for_work(self.name, token, 1.0))
                continue
            try:
                await self.handle(delivery, slot=index)
            except Exception:
                # Store or storage trouble mid-job: leave the message unacked so
                # JetStream redelivers it after ack_wait.
                log.exception("%s: job %s could not be processed; it will be redelivered", self.name, delivery.job_id)

    async def _next_delivery(self, index: int) -> Delivery | None:
        early = self._prefetch.pop(index, None)
        if early is not None:
            with contextlib.suppress(Exception):
                d = await early
                if d is not None:
                    return d
        return await self.bus.pull(self.name)

    def _prefetch_next(self, slot: int) -> None:
        """Start pulling ``slot``'s next job when its current job begins its last step, so
        the next one starts as soon as the tool returns, with no round trip to JetStream in
        between. Only then: a message held here is one no other worker can take. The job is
        still ``queued`` until its turn (``handle``)."""
        if slot in self._prefetch or self._stopping.is_set():
            return

        async def pull() -> Delivery | None:
            with contextlib.suppress(Exception):
                return await self.bus.pull(self.name)
            return None

        self._prefetch[slot] = asyncio.ensure_future(pull())

    async def _hand_back(self, slot: int) -> None:
        """Return a prefetched delivery the slot will not run (the worker is stopping):
        at once to JetStream, or, on the message's last delivery (a nak would never come
        back, MaxDeliver), as a new message."""
        early = self._prefetch.pop(slot, None)
        d = await early if early is not None else None
        if d is None:
            return
        if d.attempt < self.spec.max_attempts:
            await d.nak(0)
            return
        job = await self.store.get(d.job_id)
        if job is not None and job.status == Status.QUEUED:
            await self._publish_anew(job, d)
        else:
            await d.term()

    async def _publish_anew(self, job: Job, d: Delivery) -> None:
        """End delivery ``d`` of a queued ``job`` and put the job out as a new message."""
        try:
            seq = await self.bus.publish_job(self.name, job.priority.value, job.id, lifecycle.dedupe_id(job, d.stream_seq))
            await lifecycle.apply(self.store, job.id, lifecycle.republished(job, seq))
        except Exception:  # housekeeping's stream check republishes it once the message is gone
            log.exception("%s: job %s could not be republished", self.name, job.id)
        await d.term()

    async def _unless_stopping(self, aw: Awaitable[Any]) -> None:
        """Wait for ``aw``, or until the worker is stopping, whichever comes first."""
        waiter, stopper = asyncio.ensure_future(aw), asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- one delivery ------------------------------------------------------------------
    async def handle(self, d: Delivery, slot: int | None = None) -> None:
        # fresh: the message can outrun this process's view of the store (the API's create
        # not yet on a Kubernetes watch); only a job that is really gone is dropped.
        job = await self.store.get(d.job_id, fresh=True)
        if job is None:
            await d.term()  # deleted (retention, or a submit that failed half-way)
            return
        if job.terminal:
            await d.ack()  # cancelled while queued, or a duplicate delivery that lost
            return
        now = time.time()
        start = lifecycle.start(job, worker=self.id, now=now, stream_seq=d.stream_seq, delivery=d.reply)
        # Guarded not by the version (the API may still be writing stream_seq) but by the
        # attempt: nobody else may have started one in between, which is what matters.
        started = await self._storing(d, time.time() + _STORE_RETRY_SECONDS, lambda: lifecycle.apply(
            self.store, job.id, start, guard=lambda j: j.attempts == job.attempts))
        if started is None:
            latest = await self.store.get(d.job_id)
            if latest is None or latest.terminal:
                await d.ack()
            else:
                await d.nak(0.5)
            return
        self.metrics.queue_wait_seconds.labels(self.name).observe(max(0.0, now - job.created_at))
        await lifecycle.announce(self.bus, started)
        await self._run(started, d, slot)

    async def _storing(self, d: Delivery, until: float, write: Callable[[], Awaitable[Job | None]]) -> Job | None:
        """``await write()``, again on a storage fault (a full disk, the store down) until
        ``until``, keeping the delivery in progress meanwhile. Handing it back would spend
        one of the job's ``MaxDeliver`` deliveries on a fault that is not the job's: after a
        few, JetStream would stop delivering a job that never really ran."""
        delay = 0.25
        while True:
            try:
                return await write()
            except PortError as e:
                if self._stopping.is_set() or time.time() + delay >= until:
                    raise
                log.warning("%s: job %s: %s; trying again in %.1fs", self.name, d.job_id, e, delay)
                with contextlib.suppress(Exception):
                    await d.in_progress()
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    def _mine(self, attempt: int) -> Callable[[Job], bool]:
        return lambda j: j.attempts == attempt and j.worker == self.id

    async def _run(self, job: Job, d: Delivery, slot: int | None = None) -> None:
        running = _Running(job=job, token=CancelToken(), slot=slot)
        self._running[job.id] = running
        attempt = asyncio.ensure_future(self._attempt(job, d, running))
        if slot is None or not self.tool.queues_runs:
            await attempt
            return
        released = asyncio.ensure_future(running.last_step.wait())
        try:
            await asyncio.wait({attempt, released}, return_when=asyncio.FIRST_COMPLETED)
            # At most ``slots`` jobs past their last step. Counted now, not when this job
            # started: the job before it is still a tail at that moment (its result comes
            # back as this one starts), and counting then let only every other job hand
            # its successor over early.
            while not attempt.done() and len(self._tails) >= self.slots:
                await asyncio.wait({attempt, *self._tails}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            attempt.cancel()
            raise
        finally:
            released.cancel()
        if attempt.done():
            attempt.result()
            return
        # The tool is in its last step and takes the slot's next job behind this one (a
        # tool in its own process: it starts the moment this one ends, with no round trip
        # through this loop in between). The slot moves on; this attempt ends here.
        self._tails.add(attempt)
        attempt.add_done_callback(self._tail_done)

    def _tail_done(self, task: asyncio.Task[None]) -> None:
        self._tails.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: a job could not be processed; it will be redelivered", self.name, exc_info=task.exception())

    async def _attempt(self, job: Job, d: Delivery, running: _Running) -> None:
        token = running.token
        loop = asyncio.get_running_loop()
        mine = self._mine(job.attempts)
        heartbeat = asyncio.create_task(self._heartbeat(job, d, mine, running.slot))
        deadline = None
        if job.deadline_seconds:
            remaining = job.started_at + job.deadline_seconds - time.time()
            deadline = loop.call_later(max(0.0, remaining), token.cancel, "deadline")
        t0 = time.perf_counter()
        try:
            call = await self._call(job, running)
            token.raise_if_cancelled()
            result = await self.tool.arun(call)
            if token.cancelled:
                raise Cancelled(token.reason or "cancelled")
            # The slot is free once the tool returns: writing the results (an upload each,
            # on a cluster) and the final compare-and-set overlap the next job's compute.
            await self._finish_later(job, self._succeed(job, d, result, time.perf_counter() - t0, mine))
        except Cancelled:
            await self._interrupted(job, d, token.reason or "cancelled", mine)
        except ToolError as e:
            if e.retryable:
                await self._retry_or_fail(job, d, e.code, str(e), None, mine)
            else:
                await self._fail(job, d, e.code, str(e), mine)
        except Retry as e:
            await self._retry_or_fail(job, d, "pipeline_error", str(e), e.delay, mine)
        except PortError:
            raise
        except Exception as e:
            if token.cancelled:
                await self._interrupted(job, d, token.reason or "cancelled", mine)
            else:
                log.warning("%s: job %s attempt %d raised %r", self.name, job.id, job.attempts, e)
                msg = f"{type(e).__name__}: {e}"[:500]
                await self._retry_or_fail(job, d, "pipeline_error", msg, None, mine)
        finally:
            heartbeat.cancel()
            if deadline is not None:
                deadline.cancel()
            self._running.pop(job.id, None)
            self.metrics.job_seconds.labels(self.name).observe(time.perf_counter() - t0)

    async def _call(self, job: Job, running: _Running) -> ToolCall:
        """What the tool gets: the job's inputs read, progress reported to this loop."""
        loop = asyncio.get_running_loop()
        inputs = [InputFile(name=f.name, content_type=f.content_type, data=await self.blobs.get(f.key))
                  for f in job.inputs]

        def progress(fraction: float, step: int | None = None, steps: int | None = None) -> None:
            loop.call_soon_threadsafe(self._on_progress, running, float(fraction), step, steps)

        if self.watched(job.id):
            running.watch.set()
        return ToolCall(job_id=job.id, variant=job.variant, params=dict(job.params), inputs=inputs, seed=job.seed,
                        progress=progress, cancel=running.token, watched=running.watch)

    async def _finish_later(self, job: Job, finish: Awaitable[None]) -> None:
        """Run ``finish`` (a coroutine recording a finished job) in the background; wait
        first while ``slots`` finishes are already pending, so results held in memory stay
        bounded. A failure is logged and leaves the message unacked (redelivered after
        ack_wait), as a failure in the slot loop does."""
        while len(self._finishing) >= self.slots:
            await asyncio.wait(set(self._finishing), return_when=asyncio.FIRST_COMPLETED)

        async def guarded() -> None:
            try:
                await finish
            except Exception:
                log.exception("%s: job %s could not be recorded; it will be redelivered", self.name, job.id)

        task = asyncio.create_task(guarded(), name=f"{self.id}-finish-{job.id}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _heartbeat(self, job: Job, d: Delivery, mine: Callable[[Job], bool], slot: int | None = None) -> None:
        interval = max(0.2, self.settings.ack_wait_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await d.in_progress()
            early = self._prefetch.get(slot) if slot is not None else None
            if early is not None and early.done() and early.result() is not None:
                with contextlib.suppress(Exception):  # a long last step: keep the next one ours
                    await early.result().in_progress()
            with contextlib.suppress(Exception):
                await lifecycle.apply(self.store, job.id, lifecycle.heartbeat(time.time()), guard=mine)

    def _on_progress(self, running: _Running, fraction: float, step: int | None, steps: int | None) -> None:
        fraction = min(1.0, max(0.0, fraction))
        job = running.job
        if running.slot is not None and in_last_step(step, steps):
            # The last step begins: pull the slot's next job, and (a tool that queues runs)
            # let the slot hand it to the tool now, so its claim and hand-over land before
            # the tool is free.
            self._prefetch_next(running.slot)
            running.last_step.set()
        if self.watched(job.id):  # nobody listening, no event: they cost nats-server a wakeup each
            event = lifecycle.progress_event(job, fraction, step, steps)
            asyncio.ensure_future(self.bus.publish(constants.events_subject(job.id), event))
        now = time.monotonic()
        # Throttled (a watcher gets every step as an event); the final write is the job's success.
        if now - running.last_progress_write >= _PROGRESS_WRITE_INTERVAL and fraction < 1.0:
            running.last_progress_write = now
            asyncio.ensure_future(self._write_progress(job, fraction))

    async def _write_progress(self, job: Job, fraction: float) -> None:
        with contextlib.suppress(Exception):
            await lifecycle.apply(self.store, job.id, lifecycle.progress(fraction), guard=self._mine(job.attempts))

    # -- outcomes ----------------------------------------------------------------------
    async def _succeed(self, job: Job, d: Delivery, result: ToolResult, seconds: float, mine: Callable[[Job], bool]) -> None:
        if any(isinstance(f, LazyFile) for f in result.files):
            # Images the tool left to encode: in a thread, beside the slot's next job. A
            # file that cannot be encoded fails the job like the tool would.
            try:
                await asyncio.to_thread(lambda: [f.data for f in result.files])
            except Exception as e:
                code = e.code if isinstance(e, ToolError) else "pipeline_error"
                await self._fail(job, d, code, f"{type(e).__name__}: {e}"[:500], mine)
                return

        async def write() -> Job | None:
            refs = []
            used: set[str] = set()
            for i, f in enumerate(result.files):
                name = f.name if _SAFE_NAME.match(f.name or "") and f.name not in used else f"result-{i + 1}"
                used.add(name)
                key = constants.result_key(job.id, name)
                await self.blobs.put(key, f.data, f.content_type)
                etag = hashlib.sha256(f.data).hexdigest()[:32]
                refs.append(FileRef(name=name, key=key, content_type=f.content_type, size_bytes=len(f.data), etag=etag))
            seed = result.seed if result.seed is not None else job.seed
            meta = {"seed": seed, "duration_seconds": round(seconds, 4), "metrics": result.metrics or {}}
            change = lifecycle.succeed(job, now=time.time(), results=tuple(refs), meta=meta)
            return await lifecycle.apply(self.store, job.id, change, guard=mine)

        until = job.started_at + job.deadline_seconds if job.deadline_seconds and job.started_at else None
        done = await self._storing(d, until or time.time() + _STORE_RETRY_SECONDS, write)
        sps = (result.metrics or {}).get("steps_per_second")
        if done is not None and isinstance(sps, int | float) and sps > 0:
            self.metrics.steps_per_second.labels(self.name).observe(sps)
        await self._ended(d, done)

    async def _interrupted(self, job: Job, d: Delivery, reason: str, mine: Callable[[Job], bool]) -> None:
        if reason == "shutdown":
            # Handed back whole: a drain is not the job's fault, so the attempt does not
            # count. On the stream's last delivery a nak would never come back (MaxDeliver):
            # then the job goes out as a new message and this one ends.
            back = await lifecycle.apply(self.store, job.id, lifecycle.hand_back(job, refund=True), guard=mine)
            if back is not None and d.attempt >= self.spec.max_attempts:
                await self._publish_anew(back, d)
            else:
                await d.nak(0)
            if back is not None:
                await lifecycle.announce(self.bus, back)
            return
        if reason == "deadline":
            message = f"The job ran longer than its deadline of {job.deadline_seconds:g} seconds."
            await self._fail(job, d, "deadline_exceeded", message, mine)
            return
        done = await lifecycle.apply(self.store, job.id, lifecycle.cancel(job, now=time.time()), guard=mine)
        await self._ended(d, done)

    async def _fail(self, job: Job, d: Delivery, code: str, message: str, mine: Callable[[Job], bool]) -> None:
        change = lifecycle.fail(job, now=time.time(), code=code, message=message)
        await self._ended(d, await lifecycle.apply(self.store, job.id, change, guard=mine))

    async def _ended(self, d: Delivery, done: Job | None) -> None:
        """The job's end is recorded (``done``; None: another attempt's was): its message goes."""
        await d.ack()
        if done is not None:
            self.metrics.jobs_finished.labels(self.name, done.status.value).inc()
            await lifecycle.announce(self.bus, done)

    async def _retry_or_fail(
        self, job: Job, d: Delivery, code: str, message: str, delay: float | None, mine: Callable[[Job], bool]
    ) -> None:
        if job.attempts >= job.max_attempts:
            await self._fail(job, d, code, f"{message} (gave up after {job.attempts} attempts)", mine)
            return
        delay = delay if delay is not None else backoff(
            job.attempts, self.settings.retry_backoff_seconds, self.settings.retry_backoff_max_seconds
        )
        back = await lifecycle.apply(self.store, job.id, lifecycle.retry(job, code=code, message=message), guard=mine)
        await d.nak(delay)
        if back is not None:
            self.metrics.job_retries.labels(self.name).inc()
            await lifecycle.announce(self.bus, back)
