"""The seams at every I/O boundary: ``JobStore``, ``KeyStore``, ``Bus`` and ``BlobStore``.

The API, the worker and the housekeeping loop talk only to these protocols. Adapters:
SQLite (``genq.adapters.sqlite``), NATS JetStream (``genq.adapters.nats``), a local folder
(``genq.adapters.localfs``) and S3 (``genq.adapters.s3``); the Kubernetes job store plugs in
here too, without touching the code that uses it.

What only some adapters can do is declared here too, with a default, and callers use it
plainly (no probing): ``JobStore.attention``, ``JobStore.note_stream_seq``,
``Bus.stalled_since``. An adapter inherits the defaults by subclassing the protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from genq.models import ApiKey, Job, Status


class PortError(Exception):
    """A backing service could not be reached or failed; callers answer 503."""


class Unavailable(PortError):
    pass


class StorageFull(PortError):
    """The backing storage has no room left (disk full, quota)."""


#: How long a process starting up waits for a backing service that answers ``Unavailable``.
STARTUP_WAIT_SECONDS = 60.0


async def until_available(fn: Callable[[], Any], what: str, *, seconds: float = STARTUP_WAIT_SECONDS) -> Any:
    """``await fn()``, again after a growing pause while it raises ``Unavailable``, for up
    to ``seconds``; then the last error. For start-up reads: a kube-apiserver that was just
    restarted answers 429 or refuses connections for a few seconds, and a pod that exits
    on that only adds a crash-loop back-off to the outage."""
    import logging

    from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

    log = logging.getLogger(__name__)

    def report(state: Any) -> None:
        log.warning("%s unavailable at start-up (%s); trying again", what, state.outcome.exception())

    async for attempt in AsyncRetrying(retry=retry_if_exception_type(Unavailable), stop=stop_after_delay(seconds),
                                       wait=wait_exponential(multiplier=0.2, max=5.0), before_sleep=report, reraise=True):
        with attempt:
            return await fn()


@dataclass(frozen=True)
class JobFilter:
    owner: str | None = None
    status: Status | None = None
    tool: str | None = None
    created_after: float | None = None
    created_before: float | None = None


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    next_cursor: str | None
    total: int


@dataclass(frozen=True)
class ToolCounts:
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


@runtime_checkable
class JobStore(Protocol):
    """Where jobs live. Status moves only by compare-and-set (``transition``), and only
    through :mod:`genq.lifecycle`, which says what each move writes."""

    #: Set when a job needs housekeeping now (the Kubernetes store: a ``kubectl`` cancel or
    #: delete seen on its watch), waking the loop before its interval. None: the store
    #: cannot tell, and housekeeping finds such jobs on its next pass.
    attention: asyncio.Event | None = None

    def note_stream_seq(self, job_id: str, seq: int) -> bool:
        """Record, a moment later, where a just-published job sits in the stream, batched
        with other submits' (SQLite: one commit for many). False (the default): the store
        does not batch, and the caller writes it with ``update``."""
        return False

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    async def create(self, job: Job) -> Job:
        """Insert a new job; the store assigns ``seq`` and ``version``."""

    async def get(self, job_id: str, *, fresh: bool = False) -> Job | None:
        """The job, or None. A store that reads from a cache (Kubernetes) answers from it;
        ``fresh`` asks it to confirm a miss at the source (a worker that was just handed
        a job its cache has not seen yet)."""

    async def transition(
        self,
        job_id: str,
        expect: Iterable[Status],
        *,
        version: int | None = None,
        guard: Callable[[Job], bool] | None = None,
        requeue: bool = False,
        **changes: Any,
    ) -> Job | None:
        """Apply ``changes`` only if the job's status is one of ``expect`` (and, when given,
        its version is ``version`` and ``guard(job)`` holds). Returns the new job, or None
        when the race was lost. ``requeue`` gives the job a new place at the back of its queue."""

    async def update(
        self, job_id: str, *, version: int | None = None, guard: Callable[[Job], bool] | None = None, **changes: Any
    ) -> Job | None:
        """Change non-status fields (progress, heartbeat, stream_seq) by compare-and-set."""

    async def delete(self, job_id: str) -> None: ...

    async def list(self, flt: JobFilter, *, limit: int, cursor: str | None, order: str) -> Page: ...

    async def position(self, job: Job) -> int | None:
        """1-based place of a queued job in its tool's dispatch order (priority, then FIFO)."""

    async def counts(self, tool: str) -> ToolCounts: ...

    async def queued_count(self, tool: str) -> int:
        """Jobs of ``tool`` waiting (cheap: called on every submit)."""

    async def owner_active(self, owner: str) -> int:
        """Jobs of one owner that are queued."""

    async def recent_durations(self, tool: str, limit: int = 50) -> list[float]: ...

    async def due(self, now: float, *, heartbeat_before: float, unpublished_before: float, limit: int = 500) -> list[Job]:
        """Jobs that need housekeeping now: past retention, past their deadline, running
        without a heartbeat since ``heartbeat_before``, or queued without a stream message
        since ``unpublished_before``."""

    async def idempotency_get(self, owner: str, key: str) -> tuple[str, str] | None:
        """``(body_hash, job_id)`` recorded for this owner's key, if fresh."""

    async def idempotency_put(self, owner: str, key: str, body_hash: str, job_id: str, expires_at: float) -> tuple[str, str]:
        """Record the key unless one exists; returns what is recorded (first writer wins)."""

    async def idempotency_delete(self, owner: str, key: str, job_id: str) -> None:
        """Drop a record whose job was never created."""

    async def workers_alive(self, tool: str, since: float) -> int:
        """Worker slots of ``tool`` seen alive since ``since``."""
    async def worker_seen(self, worker_id: str, tool: str, slots: int, now: float) -> None: ...
    async def worker_gone(self, worker_id: str) -> None: ...

    async def record_event(self, job: Job, reason: str, message: str, *, warning: bool = False) -> None:
        """Tell people watching the job's record what housekeeping did to it (a
        Kubernetes Event on the GenerationJob; nothing where the store has no such feed).
        Best effort: never raises."""


@runtime_checkable
class KeyStore(Protocol):
    async def create_key(self, key: ApiKey) -> ApiKey: ...
    async def key_by_hash(self, key_hash: str) -> ApiKey | None: ...
    async def list_keys(self) -> list[ApiKey]: ...
    async def delete_key(self, key_id: str) -> bool: ...


class Delivery(Protocol):
    """One delivery of a job message; exactly one of ack/nak/term ends it."""

    job_id: str
    #: 1 for the message's first delivery; JetStream stops after ``max_attempts``.
    attempt: int
    stream_seq: int
    #: The ack subject: how another process hands the delivery back once its worker is
    #: known dead (``Bus.nak_subject``); None where there is none.
    reply: str | None

    async def ack(self) -> None: ...
    async def nak(self, delay: float | None = None) -> None: ...
    async def in_progress(self) -> None: ...
    async def term(self) -> None: ...


class Subscription(Protocol):
    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...
    async def next(self, timeout: float) -> dict[str, Any] | None: ...
    async def unsubscribe(self) -> None: ...


@runtime_checkable
class Bus(Protocol):
    """Job messages (JetStream) and the side channels (core NATS)."""

    #: When the stream first left a publish unanswered on a live connection (None once
    #: one succeeds, or the owner restarted the server): after a failed write (a full
    #: disk) nats-server refuses every publish until it restarts; ``genq up`` restarts
    #: the one it owns. None where the bus cannot tell.
    stalled_since: float | None = None

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    async def ensure_tool(self, tool: str, max_attempts: int, ack_wait: float) -> None:
        """Create or update the tool's durable consumers."""

    async def publish_job(self, tool: str, priority: str, job_id: str, dedupe_id: str | None = None) -> int:
        """Durably enqueue a job; ``dedupe_id`` (default the job id) is the JetStream message
        id, so a republish of the same queue entry is dropped. Returns the stream sequence."""

    async def pull(self, tool: str) -> Delivery | None:
        """The next job of ``tool`` in dispatch order, without waiting; None if none."""

    def work_token(self, tool: str) -> int:
        """A token to take *before* ``pull``; ``wait_for_work`` returns at once if work was
        announced since, so no announcement is ever missed between the two calls."""

    async def wait_for_work(self, tool: str, token: int, timeout: float) -> None:
        """Return when new work for ``tool`` may be available, or after ``timeout``."""

    async def remove(self, stream_seq: int) -> None:
        """Delete one job message (cancelled or failed while queued); no error if gone."""

    async def has_message(self, stream_seq: int) -> bool:
        """Whether the job message ``stream_seq`` is still in the stream."""

    async def message_job_id(self, stream_seq: int) -> str | None:
        """The job id in message ``stream_seq``; None when it is gone."""

    async def delete_message(self, stream_seq: int) -> None:
        """Remove message ``stream_seq`` from the stream (gone already is fine)."""

    async def nak_subject(self, reply: str) -> None:
        """Hand back a delivery by its ack subject (its worker is known to be dead)."""

    async def backlog(self, tool: str) -> int:
        """Messages of ``tool`` pending plus in flight."""

    async def publish(self, subject: str, data: dict[str, Any]) -> None:
        """Fire-and-forget core message (cancel, events, warm)."""

    async def subscribe(self, subject: str) -> Subscription:
        """Messages on ``subject`` (wildcards allowed): iterate it, or ``await sub.next(timeout)``;
        ``unsubscribe()`` ends it."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    etag: str | None = None
    content_type: str | None = None


@runtime_checkable
class BlobStore(Protocol):
    """Object storage for job inputs and results (keys from ``genq.constants``)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...

    async def put(self, key: str, data: bytes, content_type: str) -> BlobInfo: ...
    async def get(self, key: str) -> bytes:
        """The whole object; ``KeyError`` if missing."""

    async def stream(self, key: str, chunk_size: int = 1 << 16) -> AsyncIterator[bytes]:
        """The object in chunks; ``KeyError`` (raised before the first chunk) if missing."""

    async def stat(self, key: str) -> BlobInfo | None: ...
    async def delete(self, key: str) -> None: ...
    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many."""
