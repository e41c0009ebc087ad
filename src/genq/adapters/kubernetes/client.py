"""The one way genq reaches a kube-apiserver: the job store's and the operator's client.

Which credentials, in this order, unless told:

1. an explicit kubeconfig file (``GENQ_KUBECONFIG``, ``--kubeconfig``): the operator
   asked for that cluster;
2. the pod's service account, when running in a pod (``load_incluster_config`` finds
   ``KUBERNETES_SERVICE_HOST`` and the mounted token);
3. the default kubeconfig (``$KUBECONFIG``, else ``~/.kube/config``).

In-cluster before the default kubeconfig because that is what kopf's own login
(``login_via_async_client``) does, and the operator's kopf connection and its client
must talk to the same cluster; a pod that happens to carry a kubeconfig still uses its
ServiceAccount, whose RBAC the chart grants. (The job store used to look for the token
file alone, the operator to try ``load_incluster_config``; trying is right: a token file
without the service's address is not a way in.)

kubernetes_asyncio has no client-side rate limiter (client-go defaults to 5 QPS, burst
10); the connection pool (``connections``) is the only client-side bound, and the
apiserver's API Priority and Fairness does the limiting.

Neighbours: :mod:`.store`, :mod:`.keys`, :mod:`.toolpools` share one :class:`Kube`;
``genq.operator.handlers`` uses :func:`configuration` and :func:`api_client`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from genq.ports import StorageFull, Unavailable

#: Seconds one apiserver request may take before the store answers ``Unavailable``.
REQUEST_TIMEOUT = 10.0
#: HTTP statuses that mean "the apiserver cannot answer now": retry later (503 to callers).
_UNAVAILABLE = frozenset({429, 500, 502, 503, 504})
#: The apiserver's "insufficient storage" (etcd over its quota).
_FULL = 507


async def configuration(kubeconfig: Path | str | None = None, *, in_cluster: bool | None = None) -> k8s_client.Configuration:
    """The client configuration: ``kubeconfig``, else in-cluster, else the default
    kubeconfig (see the module's docstring for why). ``in_cluster`` True or False
    forces the choice."""
    cfg = k8s_client.Configuration()
    if in_cluster or (in_cluster is None and kubeconfig is None):
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
            return cfg
        except k8s_config.ConfigException:
            if in_cluster:
                raise
    await k8s_config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None, client_configuration=cfg)
    return cfg


async def api_client(kubeconfig: Path | str | None = None, *, in_cluster: bool | None = None,
                     connections: int = 32) -> k8s_client.ApiClient:
    """An ApiClient holding at most ``connections`` concurrent requests (the client's
    default of 4 is for scripts; a store or an operator talks to many objects at once)."""
    cfg = await configuration(kubeconfig, in_cluster=in_cluster)
    cfg.connection_pool_maxsize = connections
    return k8s_client.ApiClient(cfg)


class Kube:
    """One namespace's connection, shared by the job store, the key store and the
    ToolPool registry: the typed APIs genq uses and :meth:`call`, which turns transport
    trouble into the ports' errors."""

    def __init__(self, namespace: str, *, kubeconfig: Path | str | None = None, in_cluster: bool | None = None,
                 connections: int = 256):
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.in_cluster = in_cluster
        self.connections = connections
        self._api: k8s_client.ApiClient | None = None
        self._objects: k8s_client.CustomObjectsApi | None = None
        self._core: k8s_client.CoreV1Api | None = None
        self._leases: k8s_client.CoordinationV1Api | None = None

    async def open(self) -> None:
        self._api = await api_client(self.kubeconfig, in_cluster=self.in_cluster, connections=self.connections)
        self._objects = k8s_client.CustomObjectsApi(self._api)
        self._core = k8s_client.CoreV1Api(self._api)
        self._leases = k8s_client.CoordinationV1Api(self._api)

    async def close(self) -> None:
        api, self._api = self._api, None
        self._objects = self._core = self._leases = None
        if api is not None:
            await api.close()

    @property
    def objects(self) -> k8s_client.CustomObjectsApi:
        """Custom resources (GenerationJobs, ToolPools)."""
        if self._objects is None:
            raise Unavailable("job store is closed")
        return self._objects

    @property
    def core(self) -> k8s_client.CoreV1Api:
        """ConfigMaps (idempotency), Secrets (API keys), Events."""
        if self._core is None:
            raise Unavailable("job store is closed")
        return self._core

    @property
    def leases(self) -> k8s_client.CoordinationV1Api:
        """Worker liveness Leases."""
        if self._leases is None:
            raise Unavailable("job store is closed")
        return self._leases

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One apiserver request; transport trouble and 5xx/429 become ``Unavailable``,
        507 ``StorageFull``; other statuses stay ``ApiException`` (404, 409: the caller's)."""
        try:
            return await fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as e:
            if e.status in _UNAVAILABLE:
                raise Unavailable(f"kube-apiserver: {e.status} {e.reason}") from e
            if e.status == _FULL:
                raise StorageFull(f"kube-apiserver: {e.reason}") from e
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise Unavailable(f"kube-apiserver: {e!r}") from e
