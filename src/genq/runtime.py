"""The adapters one process uses, built from settings, opened and closed together.

The API, the workers and the housekeeping loop receive a :class:`Runtime`; which adapters
are inside (SQLite or Kubernetes, local folder or S3, embedded or external NATS) is
decided here and nowhere else.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from genq import constants
from genq.metrics import Metrics
from genq.ports import BlobStore, Bus, JobStore, KeyStore, until_available
from genq.settings import Settings
from genq.tools import Registry, ToolSpec


@dataclass
class Runtime:
    settings: Settings
    registry: Registry
    store: JobStore
    keys: KeyStore
    bus: Bus
    blobs: BlobStore
    metrics: Metrics = field(default_factory=Metrics)
    #: In cluster mode without a genq.yaml: keeps ``registry`` equal to the namespace's
    #: ToolPools (``start(on_change)`` / ``stop()``).
    tool_source: Any = None

    async def open(self) -> None:
        await self.store.open()
        if self.tool_source is not None:
            await until_available(self.tool_source.load, "kube-apiserver (ToolPools)")
        await self.blobs.open()
        await self.bus.connect()
        for spec in self.registry:
            await self.ensure_tool(spec)
        if self.tool_source is not None:
            self.tool_source.start(self.ensure_tool)

    async def ensure_tool(self, spec: ToolSpec) -> None:
        await self.bus.ensure_tool(spec.name, spec.max_attempts, self.settings.ack_wait_seconds)

    async def close(self) -> None:
        if self.tool_source is not None:
            await self.tool_source.stop()
        with contextlib.suppress(Exception):
            await self.bus.close()
        with contextlib.suppress(Exception):
            await self.blobs.close()
        with contextlib.suppress(Exception):
            await self.store.close()


def build_runtime(settings: Settings, registry: Registry, nats_url: str, *, tools_from_cluster: bool = False) -> Runtime:
    """``tools_from_cluster``: with the Kubernetes store, ``registry`` follows the
    namespace's ToolPools (the API and operator in a cluster need no genq.yaml)."""
    from genq.adapters.nats import NatsBus
    from genq.adapters.sqlite import SQLiteStore

    data = settings.resolved_data_dir()
    if settings.blob == "s3":
        from genq.adapters.s3 import S3BlobStore

        blobs: BlobStore = S3BlobStore(
            endpoint_url=settings.s3_endpoint_url,
            bucket=settings.s3_bucket,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None,
        )
    else:
        from genq.adapters.localfs import LocalBlobStore

        blobs = LocalBlobStore(Path(data) / constants.BLOBS_DIR)
    store: JobStore
    keys: KeyStore
    source = None
    if settings.store == "kubernetes":
        from genq.adapters.kubernetes import KubernetesKeyStore, KubernetesStore

        uri_base = f"s3://{settings.s3_bucket}/" if settings.blob == "s3" else f"file://{Path(data) / constants.BLOBS_DIR}/"
        store = KubernetesStore(settings.resolved_kube_namespace(), kubeconfig=settings.kubeconfig,
                                uri_base=uri_base, connections=settings.kube_connections)
        keys = KubernetesKeyStore(store)
        if tools_from_cluster:
            from genq.adapters.kubernetes import ToolPoolRegistry

            source = ToolPoolRegistry(store, registry)
    else:
        store = keys = SQLiteStore(Path(data) / constants.DB_FILE)
    return Runtime(settings=settings, registry=registry, store=store, keys=keys, bus=NatsBus(nats_url), blobs=blobs,
                   tool_source=source)
