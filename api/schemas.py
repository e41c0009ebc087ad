"""Request and response shapes of the REST API, kept apart from the stored records."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from genq.models import Job, Priority, rfc3339


def iso(ts: float | None) -> str | None:
    """A time as the API shows it: RFC 3339 in UTC, milliseconds."""
    return rfc3339(ts, digits=3)


class JobCreate(BaseModel):
    """``POST /v1/jobs`` with ``application/json``."""

    model_config = ConfigDict(extra="forbid")
    tool: str = Field(min_length=1, max_length=63)
    variant: str | None = Field(default=None, max_length=63)
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, str | list[str]] = Field(default_factory=dict, description="`image` (a data: URI) or `images` (a list of them).")
    priority: Priority = Priority.NORMAL
    wait: float = Field(default=0, ge=0, le=120)


class ResultFile(BaseModel):
    name: str
    content_type: str
    size_bytes: int
    url: str


class JobResult(BaseModel):
    files: list[ResultFile]
    seed: int | None = None
    duration_seconds: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class JobErrorBody(BaseModel):
    code: str
    message: str


class JobLinks(BaseModel):
    self_: str = Field(alias="self")
    events: str
    result: str
    cancel: str
    model_config = ConfigDict(populate_by_name=True)


class JobPublic(BaseModel):
    id: str
    tool: str
    variant: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    position: int | None = None
    estimated_wait_seconds: float | None = None
    progress: float
    priority: Priority
    params: dict[str, Any]
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    expires_at: str | None = None
    attempts: int
    error: JobErrorBody | None = None
    result: JobResult | None = None
    links: JobLinks


class JobList(BaseModel):
    jobs: list[JobPublic]
    next_cursor: str | None = None
    total: int


def job_public(job: Job, *, position: int | None = None, eta: float | None = None) -> dict[str, Any]:
    """The Job as the API shows it (a plain dict: built on every status read, so no
    model validation on the hot path; ``JobPublic`` documents the shape)."""
    base = f"/v1/jobs/{job.id}"
    result = None
    if job.status.value == "succeeded":
        meta = job.result_meta or {}
        result = {
            "files": [
                {"name": f.name, "content_type": f.content_type, "size_bytes": f.size_bytes, "url": f"{base}/result/{f.name}"}
                for f in job.results
            ],
            "seed": meta.get("seed"),
            "duration_seconds": meta.get("duration_seconds"),
            "metrics": meta.get("metrics") or {},
        }
    error = None
    if job.status.value in ("failed", "cancelled") and job.error:
        error = {"code": job.error.get("code", "pipeline_error"), "message": job.error.get("message", "")}
    elif job.status.value == "failed":
        error = {"code": "pipeline_error", "message": "The job failed."}
    return {
        "id": job.id,
        "tool": job.tool,
        "variant": job.variant,
        "status": job.status.value,
        "position": position,
        "estimated_wait_seconds": None if eta is None else round(eta, 1),
        "progress": round(job.progress, 4),
        "priority": job.priority.value,
        "params": job.params,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "expires_at": iso(job.expires_at),
        "attempts": job.attempts,
        "error": error,
        "result": result,
        "links": {"self": base, "events": f"{base}/events", "result": f"{base}/result", "cancel": f"{base}/cancel"},
    }


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    tier: Literal["standard", "premium"] = "standard"
    admin: bool = False
    max_queued: int | None = Field(default=None, ge=1, le=100_000)


class KeyPublic(BaseModel):
    id: str
    name: str
    prefix: str
    tier: str
    admin: bool
    max_queued: int | None
    created_at: str


class KeyCreated(KeyPublic):
    key: str = Field(description="The key itself. Shown once; only its hash is kept.")


class WarmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str | None = None
    seconds: float = Field(default=900, gt=0, le=86400)


class QueueStats(BaseModel):
    tool: str
    label: str
    max_concurrent: int
    workers: int
    active: int
    queued: int
    max_queued: int
    completed: int
    failed: int
    avg_duration_seconds: float | None
