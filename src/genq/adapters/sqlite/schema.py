"""The schema and the row codecs: the tables, the revision a write stamps, and how a
``Job`` or ``ApiKey`` goes to and from a row. Every other module of the store reads and
writes rows through these, so the column layout lives in one place."""

from __future__ import annotations

import json
import sqlite3

from genq.models import ApiKey, FileRef, Job, Priority, Status

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    tool TEXT NOT NULL,
    variant TEXT NOT NULL,
    priority TEXT NOT NULL,
    prank INTEGER NOT NULL,
    status TEXT NOT NULL,
    seq INTEGER NOT NULL,
    version INTEGER NOT NULL,
    rev INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    expires_at REAL,
    heartbeat_at REAL,
    deadline_at REAL,
    stream_seq INTEGER,
    attempts INTEGER NOT NULL,
    progress REAL NOT NULL,
    seed INTEGER,
    worker TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_rev ON jobs(rev);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs(seq);
CREATE INDEX IF NOT EXISTS jobs_owner_id ON jobs(owner, id);
CREATE INDEX IF NOT EXISTS jobs_owner_status ON jobs(owner, status);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_status_hb ON jobs(status, heartbeat_at);
CREATE INDEX IF NOT EXISTS jobs_done ON jobs(tool, status, completed_at);
CREATE INDEX IF NOT EXISTS jobs_unpublished ON jobs(created_at) WHERE status = 'queued' AND stream_seq IS NULL;
-- A prefix of jobs_done (kept by databases made before it went): one index less to write.
DROP INDEX IF EXISTS jobs_tool_status;
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    tier TEXT NOT NULL,
    admin INTEGER NOT NULL,
    max_queued INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    job_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    tool TEXT NOT NULL,
    slots INTEGER NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- The highest revision a deleted job had: revisions never go back (see _NEXT_REV).
CREATE TRIGGER IF NOT EXISTS jobs_rev_floor AFTER DELETE ON jobs BEGIN
    INSERT INTO counters (name, value) VALUES ('rev_floor', OLD.rev)
    ON CONFLICT(name) DO UPDATE SET value = max(value, excluded.value);
END;
"""

#: The revision a write stamps: one above every revision any job ever had. ``MAX(rev)``
#: alone goes back when the job holding it is deleted (a retention expiry after a quiet
#: spell, a submit taken back), and another process whose index had seen that revision
#: would then skip the next writes (a job started by a ``genq worker`` still queued in
#: the API's positions and counts).
_NEXT_REV = (
    "(SELECT max(COALESCE((SELECT MAX(rev) FROM jobs), 0),"
    " COALESCE((SELECT value FROM counters WHERE name = 'rev_floor'), 0)) + 1)"
)

# Columns kept outside the JSON ``data`` blob: what queries filter or sort on.
_COLUMNS = (
    "id", "owner", "tool", "variant", "priority", "status", "seq", "version", "created_at",
    "started_at", "completed_at", "expires_at", "heartbeat_at", "stream_seq", "attempts",
    "progress", "seed", "worker",
)
_DATA_FIELDS = ("params", "inputs", "results", "result_meta", "error", "max_attempts", "deadline_seconds", "ttl_seconds", "delivery")


def _encode_data(job: Job) -> str:
    return json.dumps(
        {
            "params": job.params,
            "inputs": [f.to_dict() for f in job.inputs],
            "results": [f.to_dict() for f in job.results],
            "result_meta": job.result_meta,
            "error": job.error,
            "max_attempts": job.max_attempts,
            "deadline_seconds": job.deadline_seconds,
            "ttl_seconds": job.ttl_seconds,
            "delivery": job.delivery,
        },
        separators=(",", ":"),
    )


_STATUSES = {s.value: s for s in Status}
_PRIORITIES = {p.value: p for p in Priority}


def _row_to_job(row: sqlite3.Row) -> Job:
    data = json.loads(row["data"])
    return Job(
        id=row["id"],
        owner=row["owner"],
        tool=row["tool"],
        variant=row["variant"],
        priority=_PRIORITIES[row["priority"]],
        status=_STATUSES[row["status"]],
        seq=row["seq"],
        version=row["version"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        expires_at=row["expires_at"],
        heartbeat_at=row["heartbeat_at"],
        stream_seq=row["stream_seq"],
        attempts=row["attempts"],
        progress=row["progress"],
        seed=row["seed"],
        worker=row["worker"],
        params=data["params"],
        inputs=tuple(FileRef.from_dict(f) for f in data["inputs"]),
        results=tuple(FileRef.from_dict(f) for f in data["results"]),
        result_meta=data["result_meta"],
        error=data["error"],
        max_attempts=data["max_attempts"],
        deadline_seconds=data["deadline_seconds"],
        ttl_seconds=data["ttl_seconds"],
        delivery=data.get("delivery"),
    )


def _deadline_at(job: Job) -> float | None:
    if job.status is Status.RUNNING and job.started_at is not None and job.deadline_seconds:
        return job.started_at + job.deadline_seconds
    return None


def _row_to_key(r: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=r["id"], name=r["name"], key_hash=r["key_hash"], prefix=r["prefix"], tier=r["tier"],
        admin=bool(r["admin"]), max_queued=r["max_queued"], created_at=r["created_at"],
    )

