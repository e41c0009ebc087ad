"""The stored records: jobs and API keys.

These are what the ports (:mod:`genq.ports`) store and return. Request and response
shapes live with the API (``genq.api.schemas``) and are built from these, never stored.
Times are UNIX seconds (float) inside genq and RFC 3339 on the wire.
"""

from __future__ import annotations

import datetime
import enum
import time
from dataclasses import dataclass, field, replace
from typing import Any

from genq import constants


class Status(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
ACTIVE = frozenset({Status.QUEUED, Status.RUNNING})


class Priority(str, enum.Enum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        return constants.PRIORITY_RANK[self.value]


@dataclass(frozen=True)
class FileRef:
    """A file of a job in object storage (an input or a result)."""

    name: str
    key: str
    content_type: str
    size_bytes: int
    etag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "content_type": self.content_type,
            "size_bytes": self.size_bytes,
            "etag": self.etag,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileRef:
        return cls(d["name"], d["key"], d["content_type"], int(d["size_bytes"]), d.get("etag"))


@dataclass(frozen=True)
class Job:
    """One run of one tool on inputs and params, owned by one API key."""

    id: str
    owner: str
    tool: str
    variant: str
    priority: Priority
    params: dict[str, Any]
    inputs: tuple[FileRef, ...] = ()
    status: Status = Status.QUEUED
    seed: int | None = None
    progress: float = 0.0
    attempts: int = 0
    max_attempts: int = 3
    deadline_seconds: float | None = None
    ttl_seconds: float = 3600.0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    heartbeat_at: float | None = None
    worker: str | None = None
    results: tuple[FileRef, ...] = ()
    result_meta: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    stream_seq: int | None = None
    #: JetStream ack subject of the delivery being worked on: lets a restarted embedded
    #: process hand a dead worker's job back at once instead of after ``ack_wait``.
    delivery: str | None = None
    #: Queue order inside (tool, priority); assigned by the store on create/retry.
    seq: int = 0
    #: False once somebody asked to stop the job outside the API (``kubectl patch gjob``
    #: with ``spec.active: false``); housekeeping cancels it. Stores without such a
    #: channel keep it True.
    active: bool = True
    #: The job's record is being deleted (a GenerationJob with a deletionTimestamp, held
    #: by genq's finalizer): housekeeping cancels its work, removes its objects and
    #: releases it.
    deleting: bool = False
    #: Bumped by every write; compare-and-set checks it.
    version: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def evolve(self, **changes: Any) -> Job:
        return replace(self, **changes)


#: The fields of :class:`Job` a ``transition`` or ``update`` may change, in every
#: ``JobStore`` (others raise ``ValueError``): what a job is and what was asked of it (id,
#: owner, tool, variant, priority, params, inputs — a GenerationJob's spec), when it was
#: made, where it queues (``seq``: the store's, on create and requeue) and its version.
MUTABLE_FIELDS = frozenset({
    "status", "started_at", "completed_at", "expires_at", "heartbeat_at", "stream_seq", "attempts",
    "progress", "seed", "worker", "results", "result_meta", "error", "max_attempts", "deadline_seconds",
    "ttl_seconds", "delivery",
})


def cas_allows(job: Job, expect: Any, version: int | None, guard: Any) -> bool:
    """The precondition of every compare-and-set, the same in every ``JobStore``: the job's
    status is one of ``expect`` (None: any), its version is ``version`` (None: any), and
    ``guard(job)`` holds (None: always)."""
    return (
        (expect is None or job.status in expect)
        and (version is None or job.version == version)
        and (guard is None or guard(job))
    )


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    key_hash: str
    prefix: str
    tier: str = "standard"
    admin: bool = False
    max_queued: int | None = None
    created_at: float = field(default_factory=time.time)


# -- times on the wire ----------------------------------------------------------------------


def rfc3339(t: float | None, digits: int = 3) -> str | None:
    """UNIX seconds as RFC 3339 in UTC with ``digits`` decimals (0, 3 or 6) and a ``Z``:
    the one formatter of genq. The REST API shows milliseconds; Kubernetes wants whole
    seconds in a ``metav1.Time`` (condition times) and microseconds in a ``MicroTime``
    (Lease renewals), and genq keeps microseconds in a GenerationJob's own times."""
    if t is None:
        return None
    s = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return (s[: 20 + digits] if digits else s[:19]) + "Z"


def parse_rfc3339(s: str | None) -> float | None:
    """The UNIX seconds of an RFC 3339 time (any precision, ``Z`` or an offset)."""
    if not s:
        return None
    return datetime.datetime.fromisoformat(s).timestamp()
