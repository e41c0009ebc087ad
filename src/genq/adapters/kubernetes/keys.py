"""``KeyStore`` on Kubernetes: API keys as Secrets (label ``genq.io/component=api-key``).

Only the key's hash is stored. ``key_by_hash`` runs on every request, so keys are held in
memory and re-listed at most every ``refresh`` seconds (and at once on a miss, so a new
key works at once on every replica; a deleted key stops working within ``refresh`` on
other replicas).

Neighbours: implements :class:`genq.ports.KeyStore`; shares the job store's connection
(:class:`~.client.Kube`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import time

from kubernetes_asyncio.client.exceptions import ApiException

from genq import constants
from genq.adapters.kubernetes.store import KubernetesStore
from genq.models import ApiKey

#: A miss re-lists at once, but not more often than this (a flood of bad keys is cheap).
_MISS_RELIST_SECONDS = 0.2


class KubernetesKeyStore:
    """API keys as Secrets in the job store's namespace."""

    SELECTOR = f"{constants.LABEL_COMPONENT}=api-key"

    def __init__(self, store: KubernetesStore, refresh: float = 2.0):
        self.kube = store.kube
        self.refresh = refresh
        self._keys: dict[str, ApiKey] = {}
        self._loaded = 0.0
        self._lock = asyncio.Lock()

    def _name(self, key_id: str) -> str:
        slug = re.sub(r"[^a-z0-9-]+", "-", key_id.lower()).strip("-")[:40]
        return f"genq-key-{slug}-{hashlib.sha256(key_id.encode()).hexdigest()[:8]}"

    async def _load(self, force: bool = False) -> None:
        async with self._lock:
            if not force and time.monotonic() - self._loaded < self.refresh:
                return
            secrets = await self.kube.call(self.kube.core.list_namespaced_secret, self.kube.namespace,
                                           label_selector=self.SELECTOR)
            keys = {}
            for s in secrets.items:
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    d = json.loads(base64.b64decode(s.data["record"]))
                    keys[d["key_hash"]] = ApiKey(**d)
            self._keys = keys
            self._loaded = time.monotonic()

    async def create_key(self, key: ApiKey) -> ApiKey:
        record = json.dumps(key.__dict__).encode()
        body = {"metadata": {"name": self._name(key.id), "labels": {constants.LABEL_COMPONENT: "api-key",
                                                                       constants.LABEL_MANAGED_BY: constants.MANAGED_BY}},
                "type": "Opaque", "data": {"record": base64.b64encode(record).decode()}}
        await self.kube.call(self.kube.core.create_namespaced_secret, self.kube.namespace, body)
        self._keys[key.key_hash] = key
        return key

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        await self._load()
        if key_hash not in self._keys and time.monotonic() - self._loaded > _MISS_RELIST_SECONDS:
            await self._load(force=True)
        return self._keys.get(key_hash)

    async def list_keys(self) -> list[ApiKey]:
        await self._load(force=True)
        return sorted(self._keys.values(), key=lambda k: k.created_at)

    async def delete_key(self, key_id: str) -> bool:
        try:
            await self.kube.call(self.kube.core.delete_namespaced_secret, self._name(key_id), self.kube.namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        self._keys = {h: k for h, k in self._keys.items() if k.id != key_id}
        return True
