"""The tools of a cluster: a :class:`~genq.tools.Registry` kept equal to the namespace's ToolPools.

In a cluster the pools are declared once, as resources, so the API and the operator need
no ``genq.yaml``. A list every ``refresh`` seconds (pools change rarely; a watch would
hold a connection per process for nothing); a pool whose spec does not parse is skipped
with a warning, and the last good set is kept while the apiserver is away.

Neighbours: shares the job store's connection (:class:`~.client.Kube`); the registry and
``ToolSpec`` are :mod:`genq.tools`; ``genq.runtime`` starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from genq import constants
from genq.adapters.kubernetes import mapping
from genq.adapters.kubernetes.store import KubernetesStore
from genq.tools import Registry, ToolSpec

log = logging.getLogger(__name__)


class ToolPoolRegistry:
    """Keeps ``registry`` equal to the ToolPools of the store's namespace."""

    def __init__(self, store: KubernetesStore, registry: Registry, refresh: float = 5.0):
        self.kube = store.kube
        self.registry = registry
        self.refresh = refresh
        self._task: asyncio.Task | None = None
        self._invalid: set[str] = set()

    async def load(self) -> list[ToolSpec]:
        """List the pools and replace the registry's tools; the specs that changed."""
        page = await self.kube.call(self.kube.objects.list_namespaced_custom_object, mapping.GROUP, mapping.VERSION,
                                    self.kube.namespace, constants.TOOLPOOL_PLURAL)
        specs = []
        for obj in page.get("items") or ():
            name = obj["metadata"]["name"]
            try:
                specs.append(ToolSpec.model_validate(obj.get("spec") or {}))
            except ValueError as e:
                if name not in self._invalid:
                    log.warning("ToolPool %s is not a valid tool; skipping it: %s", name, e)
                self._invalid.add(name)
                continue
            self._invalid.discard(name)
        specs.sort(key=lambda s: s.name)
        return self.registry.replace(specs)

    def start(self, on_change: Callable[[ToolSpec], Awaitable[None]]) -> None:
        self._task = asyncio.create_task(self._run(on_change), name="genq-toolpools")

    async def _run(self, on_change: Callable[[ToolSpec], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            try:
                for spec in await self.load():
                    await on_change(spec)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("listing ToolPools failed (%r); keeping the last set", e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
