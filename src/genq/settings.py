"""Process settings, read once at start from ``GENQ_*`` environment variables.

Each setting says why its default is what it is. The tools themselves are configured in
``genq.yaml`` (see :mod:`genq.tools`); these settings are about the process. Settings of
one component only are grouped (kopf's habit): :class:`OperatorSettings` is
``Settings.operator``, read from ``GENQ_OPERATOR_*``.

Neighbours: read once per process by ``genq.cli`` and handed down to the runtime
(:mod:`genq.runtime`), the embedded mode and the operator (``Settings.operator``).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: ``GENQ_*`` settings that are not the workers' to have: each worker pod's own (set by
#: its Deployment), the API's, or the operator's.
_NOT_FOR_WORKERS = ("GENQ_CONFIG", "GENQ_STORE", "GENQ_HOST", "GENQ_PORT", "GENQ_ADMIN_KEY", "GENQ_KUBECONFIG",
                    "GENQ_KUBE_NAMESPACE", "GENQ_DRAIN_SECONDS")


def worker_env_of(env: Mapping[str, str]) -> dict[str, str]:
    """The ``GENQ_*`` settings of ``env`` the operator passes on to every worker (NATS
    URL, object storage, timings): all but the operator's own and :data:`_NOT_FOR_WORKERS`."""
    return {k: v for k, v in env.items()
            if k.startswith("GENQ_") and not k.startswith("GENQ_OPERATOR_") and k not in _NOT_FOR_WORKERS}


class OperatorSettings(BaseSettings):
    """How ``genq operator`` runs its ToolPool handlers (``GENQ_OPERATOR_*``)."""

    model_config = SettingsConfigDict(env_prefix="GENQ_OPERATOR_", extra="ignore", env_ignore_empty=True,
                                      populate_by_name=True)

    worker_image: str = "ghcr.io/genq/genq-worker:latest"
    """Image of the worker pods when a pool names none. The chart sets its own worker
    image; this default is for a hand-run operator."""
    worker_env: dict[str, str] = Field(default_factory=lambda: worker_env_of(os.environ))
    """``GENQ_*`` settings every worker gets (NATS URL, object storage, timings): the
    operator's own environment minus its and the API's settings (:func:`worker_env_of`),
    so the chart configures the workers once, on the operator."""
    worker_probes: bool = True
    """HTTP probes on the workers' health port; off for worker images that serve none."""
    worker_service_account: str = "genq-worker"
    """ServiceAccount the worker pods run as: the Helm chart's worker ServiceAccount."""
    worker_env_secret: str = "genq-worker"
    """Optional Secret whose keys every worker gets as environment variables (e.g. S3
    credentials), so secrets never appear in the Deployment itself. The chart's name."""
    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Namespaces to watch, comma-separated; empty means cluster-wide (one operator for
    the cluster, the plain install; the chart narrows it to its release namespace)."""
    scale_interval: float = 5.0
    """Seconds between backlog reads per pool: scale-up latency versus JetStream and
    apiserver load (one consumer-info request per priority, one pod list, per pool)."""
    lease_namespace: str = Field("default", validation_alias=AliasChoices("GENQ_OPERATOR_LEASE_NAMESPACE", "POD_NAMESPACE"))
    """Namespace of the leader-election Lease: the operator's own (``POD_NAMESPACE``, from
    the downward API, when not set), else ``default``."""
    lease_seconds: float = 15.0
    """Lease duration: how long a dead leader blocks its successor (client-go's default)."""
    identity: str = Field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
    """This replica's name in the Lease: the pod's hostname plus a random suffix, unique
    even across restarts of one pod."""

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return [n for n in v.split(",") if n] if isinstance(v, str) else v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENQ_", extra="ignore")

    host: str = "127.0.0.1"
    """Address the API binds to. Loopback by default: exposing it is a deliberate act."""

    port: int = 8000
    """API port."""

    data_dir: Path = Path("./genq-data")
    """Embedded mode's home: SQLite file, JetStream files and the local object store."""

    config: Path | None = None
    """Path of ``genq.yaml`` (the tools). None: ``<data_dir>/../genq.yaml`` if it exists,
    else the built-in default (an ``upscale`` tool)."""

    admin_key: SecretStr | None = None
    """Bootstrap admin key. Unset in embedded mode: one is generated on first start and
    printed once; only its hash is kept."""

    # Adapters.
    store: Literal["sqlite", "kubernetes"] = "sqlite"
    """Job store adapter: SQLite under ``data_dir`` (one machine), or ``kubernetes``:
    GenerationJob resources (and API keys as Secrets) in ``kube_namespace``."""

    kube_namespace: str | None = None
    """Namespace of the GenerationJobs. None: the pod's own namespace in a cluster, else
    ``default`` — so a chart needs no setting to keep jobs beside the API."""
    kubeconfig: Path | None = None
    """Kubeconfig file for the Kubernetes store. None: the pod's service account in a
    cluster, else ``$KUBECONFIG`` or ``~/.kube/config``, as kubectl does."""
    kube_connections: int = 256
    """Most concurrent requests to the apiserver. kubernetes_asyncio has no client-side
    QPS limiter (client-go's default is 5 QPS, burst 10, far too low for a job queue), so
    this bounds the load; the apiserver's priority and fairness does the rest."""

    blob: Literal["local", "s3"] = "local"
    """Object storage adapter: a folder under ``data_dir`` or an S3-compatible service."""

    nats_url: str | None = None
    """NATS server URL. None: genq starts its own ``nats-server -js`` under ``data_dir``."""

    s3_endpoint_url: str | None = None
    """S3 endpoint (MinIO, SeaweedFS, Ceph, AWS). None means AWS's own endpoint."""
    s3_bucket: str = "genq"
    """Bucket for inputs and results; created on start if missing."""
    s3_region: str = "us-east-1"
    """Region passed to the S3 client; most S3-compatible servers accept any value."""
    s3_access_key_id: str | None = None
    """Credentials; None falls back to the standard AWS credential chain."""
    s3_secret_access_key: SecretStr | None = None
    """Secret half of the S3 credentials."""

    # Input limits (SPEC §3).
    max_file_bytes: int = 20 * 1024 * 1024
    """Largest accepted input file: 20 MB holds any sensible photo as PNG."""
    max_pixels: int = 40_000_000
    """Largest accepted image in pixels (40 MP); checked from the header, before decoding,
    so decompression bombs never allocate."""
    max_files: int = 3
    """Most images one job may carry (image-edit takes up to 3)."""
    max_field_bytes: int = 64 * 1024
    """Largest plain form field or JSON params body part, and a job's params as JSON (they
    live in the job's record; a Kubernetes object holds 1.5 MB); prompts are 2,000 chars at most."""
    max_json_bytes: int = 3 * 28 * 1024 * 1024
    """Largest JSON submit body: three base64 images at the file limit, plus params."""
    max_wait_seconds: float = 120.0
    """Longest sync ``wait`` a request may hold (SPEC: 0-120 s)."""

    # Limits per key.
    rate_standard: str = "60/minute"
    """Requests a standard-tier key may make (all endpoints)."""
    rate_premium: str = "300/minute"
    """Requests a premium-tier key may make (all endpoints)."""
    default_key_max_queued: int = 20
    """Jobs one key may have queued at once unless its record says otherwise."""
    idempotency_ttl_seconds: int = 24 * 3600
    """How long an ``Idempotency-Key`` maps to its first job (SPEC: 24 h)."""

    # Worker and bus timings.
    ack_wait_seconds: float = 30.0
    """How long JetStream waits for a heartbeat before redelivering a job; a dead worker's
    job restarts after at most this long. Workers heartbeat at a third of it."""
    retry_backoff_seconds: float = 2.0
    """First retry delay; doubles per attempt (capped at ``retry_backoff_max_seconds``)."""
    retry_backoff_max_seconds: float = 60.0
    """Cap on the retry delay so a flaky tool still retries within a minute."""
    drain_seconds: float = 30.0
    """On SIGTERM, how long running jobs get to finish before they are handed back."""
    reconcile_interval_seconds: float = 1.0
    """How often retention, deadlines and lost jobs are checked. One second keeps
    retention and deadlines accurate to about a second at negligible cost."""
    worker_heartbeat_seconds: float = 5.0
    """How often a worker reports itself alive (for ``workers`` in queue stats)."""

    operator: OperatorSettings = Field(default_factory=OperatorSettings)
    """``genq operator``'s own settings, from ``GENQ_OPERATOR_*``."""

    log_level: str = "INFO"
    """Root log level."""

    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The event loop of ``genq up``, ``genq api`` and ``genq worker``: ``auto`` is uvloop
    when installed (it is, with uvicorn[standard]), else the standard library's."""

    def resolved_kube_namespace(self) -> str:
        if self.kube_namespace:
            return self.kube_namespace
        pod_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return pod_ns.read_text().strip() if pod_ns.exists() else "default"

    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()
