"""Every name genq puts on the wire or into storage, in one place.

Subjects, the stream, consumer names, object keys and header names are read by more than
one component (API, worker, operator), so they are defined once here and nowhere else.
"""

from __future__ import annotations

from typing import Final

#: The JetStream stream that holds every queued job (work-queue retention).
JOBS_STREAM: Final = "GENQ_JOBS"
#: Subject prefix of job messages: ``genq.jobs.<tool>.<priority>``.
JOBS_SUBJECT_PREFIX: Final = "genq.jobs"
#: Core NATS subject a worker slot listens on to learn that new work was published.
KICK_SUBJECT_PREFIX: Final = "genq.kick"
#: Core NATS subject for cancel requests: ``genq.cancel.<job-id>``.
CANCEL_SUBJECT_PREFIX: Final = "genq.cancel"
#: Core NATS subject for a job's events (status changes, progress): ``genq.events.<job-id>``.
EVENTS_SUBJECT_PREFIX: Final = "genq.events"
#: Core NATS subject for warm requests: ``genq.warm.<tool>``.
WARM_SUBJECT_PREFIX: Final = "genq.warm"
#: JetStream advisory published when a message exhausts its MaxDeliver.
MAX_DELIVERIES_ADVISORY: Final = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"

PRIORITIES: Final = ("high", "normal", "low")
PRIORITY_RANK: Final = {"high": 0, "normal": 1, "low": 2}


def job_subject(tool: str, priority: str) -> str:
    return f"{JOBS_SUBJECT_PREFIX}.{tool}.{priority}"


def consumer_name(tool: str, priority: str) -> str:
    """Durable consumer of one tool's jobs at one priority.

    JetStream delivers each consumer's messages in stream order (FIFO); dispatch order by
    priority comes from a worker asking the ``high`` consumer first, then ``normal``, then
    ``low``. One consumer per priority is the only way JetStream can express that order.
    """
    return f"genq-{tool}-{priority}"


def kick_subject(tool: str) -> str:
    return f"{KICK_SUBJECT_PREFIX}.{tool}"


def cancel_subject(job_id: str) -> str:
    return f"{CANCEL_SUBJECT_PREFIX}.{job_id}"


def events_subject(job_id: str) -> str:
    return f"{EVENTS_SUBJECT_PREFIX}.{job_id}"


def warm_subject(tool: str) -> str:
    return f"{WARM_SUBJECT_PREFIX}.{tool}"


# Object storage keys.
def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def input_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/inputs/{name}"


def result_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/results/{name}"


# HTTP.
API_KEY_HEADER: Final = "X-API-Key"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
API_KEY_PREFIX: Final = "gq_"
BOOTSTRAP_ADMIN_KEY_ID: Final = "admin"

# Files written under the data folder by the embedded mode.
DB_FILE: Final = "genq.db"
NATS_DIR: Final = "nats"
BLOBS_DIR: Final = "blobs"
ADMIN_KEY_FILE: Final = "admin-key.txt"
