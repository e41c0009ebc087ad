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
#: Core NATS subject an API process announces a watched job on (an SSE stream is open on
#: it): ``genq.watch.<job-id>``. Workers publish a job's per-step progress events only
#: while it is watched; status events always go out.
WATCH_SUBJECT_PREFIX: Final = "genq.watch"
#: Seconds between an open stream's announcements; a worker forgets a watch after
#: ``WATCH_TTL_SECONDS`` without one.
WATCH_REFRESH_SECONDS: Final = 5.0
WATCH_TTL_SECONDS: Final = 3 * WATCH_REFRESH_SECONDS
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


#: JetStream's API subject prefix for pulling from a consumer (``<stream>.<consumer>`` follows).
CONSUMER_NEXT_PREFIX: Final = "$JS.API.CONSUMER.MSG.NEXT"


def consumer_next_subject(tool: str, priority: str) -> str:
    """Where a pull request for the next job of ``tool`` at ``priority`` goes."""
    return f"{CONSUMER_NEXT_PREFIX}.{JOBS_STREAM}.{consumer_name(tool, priority)}"


def kick_subject(tool: str) -> str:
    return f"{KICK_SUBJECT_PREFIX}.{tool}"


def cancel_subject(job_id: str) -> str:
    return f"{CANCEL_SUBJECT_PREFIX}.{job_id}"


def events_subject(job_id: str) -> str:
    return f"{EVENTS_SUBJECT_PREFIX}.{job_id}"


def warm_subject(tool: str) -> str:
    return f"{WARM_SUBJECT_PREFIX}.{tool}"


def watch_subject(job_id: str) -> str:
    return f"{WATCH_SUBJECT_PREFIX}.{job_id}"


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

# Kubernetes (cluster mode). The API group of genq's resources, and every label,
# annotation, finalizer and field manager the operator puts on objects it owns.
API_GROUP: Final = "genq.io"
API_VERSION: Final = "v1alpha1"
TOOLPOOL_PLURAL: Final = "toolpools"
GENERATIONJOB_PLURAL: Final = "generationjobs"
#: Label on a pool's worker pods (and its Deployment): the tool they run. Also the
#: Deployment's selector and the pool's ``status.selector``.
LABEL_TOOL: Final = "genq.io/tool"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
#: Prefix of the operator's bookkeeping annotations (kopf's progress and diff-base),
#: instead of kopf's ``kopf.zalando.org``.
ANNOTATION_PREFIX: Final = "genq.io"
#: Pod-template annotation: hash of the pool spec, so a spec change rolls the workers.
ANNOTATION_SPEC_HASH: Final = "genq.io/spec-hash"
#: Pod-template annotation: the model the workers load (informational, for kubectl).
ANNOTATION_MODEL: Final = "genq.io/model"
#: The operator's finalizer (instead of kopf's ``kopf.zalando.org/KopfFinalizerMarker``).
FINALIZER: Final = "genq.io/operator"
#: GenerationJobs are created holding this finalizer; housekeeping releases it once a
#: deleted job's work is stopped and its objects are gone. Not kopf's: kopf removes its
#: own finalizer from resources it has no deletion handler for.
JOB_FINALIZER: Final = "genq.io/job-cleanup"
#: Field manager of the operator's server-side applies and patches.
FIELD_MANAGER: Final = "genq-operator"
#: Lease two operator replicas elect their leader with.
OPERATOR_LEASE: Final = "genq-operator"
#: Kubernetes' own annotation: the ReplicaSet deletes pods with the lowest cost first.
POD_DELETION_COST: Final = "controller.kubernetes.io/pod-deletion-cost"
#: The worker container's name and health port (``/healthz`` live, ``/readyz`` model loaded).
WORKER_CONTAINER: Final = "worker"
WORKER_HEALTH_PORT: Final = 8081
#: Where a worker pod finds its genq.yaml (the pool's spec, from the pool's ConfigMap).
WORKER_CONFIG_DIR: Final = "/etc/genq"
WORKER_CONFIG_FILE: Final = "genq.yaml"


def worker_deployment_name(tool: str) -> str:
    """The worker Deployment (and ConfigMap) of a tool's pool."""
    return f"{tool}-workers"


# Kubernetes job store (genq.adapters.kubernetes): what it writes beside the names above.
GENERATIONJOB_KIND: Final = "GenerationJob"
#: The job id as the API shows it (a ULID, upper case); the resource name is its lower case.
ANNOTATION_JOB_ID: Final = "genq.io/job-id"
#: Creation time in UNIX seconds with sub-second precision (creationTimestamp has whole seconds).
ANNOTATION_CREATED_AT: Final = "genq.io/created-at"
#: A new job's attempt budget and seed, written with it (one request instead of a
#: create plus a status write); the status carries them from the first status write on.
ANNOTATION_MAX_ATTEMPTS: Final = "genq.io/max-attempts"
ANNOTATION_SEED: Final = "genq.io/seed"
#: Worker slots behind one worker Lease.
ANNOTATION_SLOTS: Final = "genq.io/slots"
#: Value of ``LABEL_MANAGED_BY`` on the objects the job store writes.
MANAGED_BY: Final = "genq"
#: ConfigMaps holding Idempotency-Key records and Leases of live workers: name prefixes.
IDEMPOTENCY_OBJECT_PREFIX: Final = "genq-idem-"
WORKER_LEASE_PREFIX: Final = "genq-worker-"

# GenerationJob condition types and reasons (CamelCase, Kubernetes API conventions).
CONDITION_QUEUED: Final = "Queued"
CONDITION_STARTED: Final = "Started"
CONDITION_SUCCEEDED: Final = "Succeeded"
REASON_QUEUED: Final = "Queued"
REASON_STARTED: Final = "Started"
REASON_RUNNING: Final = "Running"
REASON_COMPLETED: Final = "Completed"
REASON_FAILED: Final = "Failed"
REASON_CANCELLED: Final = "Cancelled"
REASON_DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
