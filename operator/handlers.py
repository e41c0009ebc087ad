"""The kopf operator of the cluster mode: ToolPool handlers, the scaler timer, leader election.

Thin on purpose: what to build and how many workers to run is decided by pure functions
(:mod:`~genq.operator.resources`, :mod:`~genq.operator.scaling`,
:mod:`~genq.operator.conditions`); this module only reads and writes the cluster.

- ToolPool create / update / resume: server-side apply of the pool's ConfigMap and worker
  Deployment (owned by the pool, so deleting the pool garbage-collects them), and the
  tool's JetStream consumers.
- A timer per ToolPool: reads the backlog (an injected async callable; JetStream in
  production), marks idle pods cheap to delete (``pod-deletion-cost``) before a scale-in,
  sets the Deployment's replicas, and writes ``status`` through the status subresource.
- A kopf index of running GenerationJobs by tool: which pods are busy.
- Its own finalizer and annotation prefix (``genq.io``), Events with CamelCase reasons.
- Two operator replicas do not fight: kopf runs ``standalone`` (its peering would need
  its own CRDs) inside a Kubernetes Lease leader election; a replica that loses the Lease
  stops its handlers and exits, and its Deployment restarts it as a follower.

Only this module imports kopf and kubernetes_asyncio (``.importlinter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf
import pydantic
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kopf._core.intents import handlers as kopf_handlers
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock

from genq import constants
from genq.operator import conditions, resources, scaling
from genq.tools import ToolSpec

log = logging.getLogger(__name__)

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
GROUP, VERSION = constants.API_GROUP, constants.API_VERSION


@dataclass
class OperatorConfig:
    """How the operator runs. Read from ``GENQ_OPERATOR_*`` by :meth:`from_env`."""

    worker_image: str = "ghcr.io/genq/genq-worker:latest"
    """Image of the worker pods when a pool names none."""
    worker_env: dict[str, str] = field(default_factory=dict)
    """``GENQ_*`` settings every worker gets (NATS URL, object storage, timings)."""
    worker_probes: bool = True
    """HTTP probes on the workers' health port; off for worker images that serve none."""
    worker_service_account: str = "genq-worker"
    """ServiceAccount the worker pods run as (the Helm chart's worker ServiceAccount)."""
    worker_env_secret: str = "genq-worker"
    """Optional Secret whose keys every worker gets as environment variables (e.g. S3
    credentials), so secrets never appear in the Deployment itself."""
    namespaces: list[str] = field(default_factory=list)
    """Namespaces to watch; empty means cluster-wide."""
    scale_interval: float = 5.0
    """Seconds between backlog reads per pool: scale-up latency versus JetStream and
    apiserver load (one consumer-info request per priority, one pod list, per pool)."""
    ack_wait_seconds: float = 30.0
    """The consumers' ack wait, as the API and workers use (``GENQ_ACK_WAIT_SECONDS``)."""
    lease_namespace: str = "default"
    """Namespace of the leader-election Lease (the operator's own)."""
    lease_seconds: float = 15.0
    """Lease duration: how long a dead leader blocks its successor (client-go's default)."""
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorConfig:
        worker_env = {k: v for k, v in env.items() if k.startswith("GENQ_") and not k.startswith("GENQ_OPERATOR_")}
        # The worker's own (set per pod by the Deployment) or the API's, not the workers'.
        for k in ("GENQ_CONFIG", "GENQ_STORE", "GENQ_HOST", "GENQ_PORT", "GENQ_ADMIN_KEY", "GENQ_KUBECONFIG",
                  "GENQ_KUBE_NAMESPACE", "GENQ_DRAIN_SECONDS"):
            worker_env.pop(k, None)
        ns = env.get("GENQ_OPERATOR_NAMESPACES", "")
        return cls(
            worker_image=env.get("GENQ_OPERATOR_WORKER_IMAGE", cls.worker_image),
            worker_env=worker_env,
            worker_probes=env.get("GENQ_OPERATOR_WORKER_PROBES", "true").lower() not in ("0", "false", "no"),
            worker_service_account=env.get("GENQ_OPERATOR_WORKER_SERVICE_ACCOUNT") or cls.worker_service_account,
            worker_env_secret=env.get("GENQ_OPERATOR_WORKER_ENV_SECRET") or cls.worker_env_secret,
            namespaces=[n for n in ns.split(",") if n],
            scale_interval=float(env.get("GENQ_OPERATOR_SCALE_INTERVAL", cls.scale_interval)),
            ack_wait_seconds=float(env.get("GENQ_ACK_WAIT_SECONDS", cls.ack_wait_seconds)),
            lease_namespace=env.get("GENQ_OPERATOR_LEASE_NAMESPACE") or env.get("POD_NAMESPACE") or "default",
            lease_seconds=float(env.get("GENQ_OPERATOR_LEASE_SECONDS", cls.lease_seconds)),
        )


BacklogFn = Callable[[str], Awaitable[scaling.Backlog]]


class PoolReconciler:
    """The I/O of one reconcile of a ToolPool; every decision is delegated to pure code."""

    def __init__(
        self,
        api: k8s.ApiClient,
        config: OperatorConfig,
        backlog: BacklogFn,
        *,
        warm_until: Callable[[str], float] = lambda tool: 0.0,
        ensure_tool: Callable[[ToolSpec], Awaitable[None]] | None = None,
    ):
        self.config = config
        self.backlog = backlog
        self.warm_until = warm_until
        self.ensure_tool = ensure_tool
        self.core = k8s.CoreV1Api(api)
        self.apps = k8s.AppsV1Api(api)

    # -- reads ----------------------------------------------------------------------------
    async def read_deployment(self, namespace: str, tool: str) -> dict[str, Any] | None:
        try:
            return await _body(await self.apps.read_namespaced_deployment(
                constants.worker_deployment_name(tool), namespace, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def list_pods(self, namespace: str, tool: str) -> list[dict[str, Any]]:
        resp = await self.core.list_namespaced_pod(
            namespace, label_selector=resources.selector_string(tool), _preload_content=False)
        pods = (await _body(resp))["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    # -- writes ---------------------------------------------------------------------------
    async def apply(self, body: Mapping[str, Any], replicas: int) -> dict[str, Any]:
        namespace = body["metadata"]["namespace"]
        cm = resources.build_worker_config_map(body, namespace)
        await self.core.patch_namespaced_config_map(
            cm["metadata"]["name"], namespace, cm, field_manager=constants.FIELD_MANAGER, force=True, _content_type=APPLY)
        dep = resources.build_worker_deployment(
            body, namespace, self.config.worker_image, replicas=replicas, env=self.config.worker_env,
            env_secret=self.config.worker_env_secret, service_account=self.config.worker_service_account,
            probes=self.config.worker_probes)
        resp = await self.apps.patch_namespaced_deployment(
            dep["metadata"]["name"], namespace, dep, field_manager=constants.FIELD_MANAGER, force=True,
            _content_type=APPLY, _preload_content=False)
        return await _body(resp)

    async def set_deletion_costs(self, namespace: str, patches: Mapping[str, str]) -> None:
        for name, cost in patches.items():
            with contextlib.suppress(ApiException):  # a pod that just went away
                await self.core.patch_namespaced_pod(
                    name, namespace, {"metadata": {"annotations": {constants.POD_DELETION_COST: cost}}},
                    field_manager=constants.FIELD_MANAGER, _content_type=MERGE)

    # -- the two entry points -------------------------------------------------------------
    async def ensure(self, body: Mapping[str, Any], memo: Any) -> tuple[dict[str, Any], bool]:
        """Create or update the pool's objects; keep the replica count the scaler set."""
        spec = resources.pool_spec(body)
        async with _lock(memo):
            if self.ensure_tool is not None:
                await self.ensure_tool(spec)
            namespace = body["metadata"]["namespace"]
            current = await self.read_deployment(namespace, spec.name)
            replicas = spec.min_workers if current is None else int(current["spec"].get("replicas") or 0)
            return await self.apply(body, replicas), current is None

    async def scale(self, body: Mapping[str, Any], memo: Any, running_workers: list[str], durations: list[float],
                    now: float | None = None) -> tuple[dict[str, Any], int, int, bool]:
        """One scaler pass. Returns (status, replicas before, replicas after, whether the
        Deployment had to be created: the timer can run before the create handler)."""
        now = time.time() if now is None else now
        spec = resources.pool_spec(body)
        namespace = body["metadata"]["namespace"]
        async with _lock(memo):
            deployment = await self.read_deployment(namespace, spec.name)
            created = deployment is None
            if deployment is None:
                if self.ensure_tool is not None:
                    await self.ensure_tool(spec)
                deployment = await self.apply(body, spec.min_workers)
            current = int(deployment["spec"].get("replicas") or 0)
            try:
                backlog: scaling.Backlog | None = await self.backlog(spec.name)
            except Exception as e:  # NATS down: hold the count, report Unknown
                log.warning("backlog of %s unavailable: %s", spec.name, e)
                backlog = None
            pods = await self.list_pods(namespace, spec.name)
            busy = scaling.busy_by_pod(spec.name, running_workers, [p["metadata"]["name"] for p in pods])
            desired = current
            if backlog is not None:
                memo["idle_since"] = scaling.idle_since_next(spec, backlog.total, current, memo.get("idle_since"), now)
                desired = scaling.desired_replicas(
                    spec, backlog.total, len(busy), memo["idle_since"], now, self.warm_until(spec.name), current=current)
            # Before any scale-in the ReplicaSet must know which pods are idle.
            await self.set_deletion_costs(namespace, scaling.cost_patches(pods, busy))
            if desired != current:
                deployment = await self.apply(body, desired)
                if desired < current:
                    memo["idle_since"] = None
        status = conditions.pool_status(
            generation=int(body["metadata"].get("generation") or 0),
            previous=body.get("status"),
            desired=desired,
            deployment=deployment,
            queued=None if backlog is None else backlog.queued,
            running=None if backlog is None else backlog.running,
            selector=resources.selector_string(spec.name),
            now=now,
            avg_duration=(sum(durations) / len(durations)) if durations else None,
        )
        return status, current, desired, created


def _lock(memo: Any) -> asyncio.Lock:
    lock = memo.get("lock")
    if lock is None:
        lock = memo["lock"] = asyncio.Lock()
    return lock


async def _body(resp: Any) -> dict[str, Any]:
    """The JSON of a raw (``_preload_content=False``) response; ApiException on an error
    status, as the preloading calls raise it."""
    try:
        data = await resp.read()
    finally:
        resp.release()
    if not 200 <= resp.status <= 299:
        raise ApiException(status=resp.status, reason=resp.reason)
    return json.loads(data)


def _status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    return any((old or {}).get(k) != v for k, v in new.items())


# -- kopf wiring -----------------------------------------------------------------------------


def make_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    """genq's kopf settings: its own finalizer and annotation prefix, standalone."""
    settings = settings or kopf.OperatorSettings()
    settings.persistence.finalizer = constants.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=constants.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=constants.ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.peering.standalone = True  # the Lease decides who runs (see run_operator)
    settings.posting.level = logging.WARNING  # Events come from our own reasons
    settings.watching.server_timeout = 300
    return settings


def make_registry(reconciler: PoolReconciler, config: OperatorConfig) -> kopf.OperatorRegistry:
    """Register the handlers on a fresh registry (nothing is registered at import)."""
    registry = kopf.OperatorRegistry()
    pools = dict(group=GROUP, version=VERSION, plural=constants.TOOLPOOL_PLURAL, registry=registry)
    jobs = dict(group=GROUP, version=VERSION, plural=constants.GENERATIONJOB_PLURAL, registry=registry)

    # A job that stops matching a `when` filter leaves the index (a None result would not
    # remove its earlier value).
    def _running(body: kopf.Body, **_: Any) -> bool:
        return bool((body.get("status") or {}).get("worker")) and scaling.is_running(body)

    def _succeeded(body: kopf.Body, **_: Any) -> bool:
        status = body.get("status") or {}
        done = {c.get("type"): c for c in status.get("conditions") or []}.get("Succeeded", {})
        return done.get("status") == "True" and status.get("durationSeconds") is not None

    @kopf.index(**jobs, id="genq_running_workers", when=_running)
    def genq_running_workers(namespace: str, body: kopf.Body, **_: Any) -> dict[Any, str]:
        return {(namespace, body.get("spec", {}).get("tool")): body["status"]["worker"]}

    @kopf.index(**jobs, id="genq_durations", when=_succeeded)
    def genq_durations(namespace: str, body: kopf.Body, **_: Any) -> dict[Any, float]:
        return {(namespace, body.get("spec", {}).get("tool")): float(body["status"]["durationSeconds"])}

    @kopf.on.resume(**pools, id="pool_resumed")
    @kopf.on.create(**pools, id="pool_created")
    @kopf.on.update(**pools, id="pool_updated")
    async def pool_changed(body: kopf.Body, memo: kopf.Memo, reason: str, **_: Any) -> None:
        try:
            _, created = await reconciler.ensure(body, memo)
        except pydantic.ValidationError as e:
            kopf.event(body, type="Warning", reason=conditions.EVENT_RECONCILE_FAILED, message=str(e)[:1000])
            raise kopf.PermanentError(f"invalid ToolPool spec: {e}") from e
        name = constants.worker_deployment_name(body["spec"]["tool"]["name"])
        if created:
            kopf.event(body, type="Normal", reason=conditions.EVENT_DEPLOYMENT_CREATED, message=f"Created Deployment {name}.")
        elif reason == "update":
            kopf.event(body, type="Normal", reason=conditions.EVENT_DEPLOYMENT_UPDATED, message=f"Updated Deployment {name}.")

    @kopf.timer(**pools, id="pool_scale", interval=config.scale_interval, sharp=False)
    async def pool_scale(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, namespace: str,
                         genq_running_workers: kopf.Index, genq_durations: kopf.Index, **_: Any) -> None:
        if body["metadata"].get("deletionTimestamp"):
            return  # going away: the garbage collector takes the Deployment
        tool = body["spec"]["tool"]["name"]
        running = list(genq_running_workers.get((namespace, tool), []))
        durations = list(genq_durations.get((namespace, tool), []))[-200:]
        try:
            status, before, after, created = await reconciler.scale(body, memo, running, durations)
        except pydantic.ValidationError:
            return  # reported by the change handler
        if created:
            kopf.event(body, type="Normal", reason=conditions.EVENT_DEPLOYMENT_CREATED,
                       message=f"Created Deployment {constants.worker_deployment_name(tool)}.")
        if after > before:
            kopf.event(body, type="Normal", reason=conditions.EVENT_SCALED_UP,
                       message=f"Scaled workers from {before} to {after} (queued {status['queued']}, running {status['running']}).")
        elif after < before:
            kopf.event(body, type="Normal", reason=conditions.EVENT_SCALED_DOWN,
                       message=f"Scaled workers from {before} to {after}; idle workers go first.")
        if _status_changed(body.get("status"), status):
            patch.status.update(status)

    _timers_without_finalizer(registry)
    return registry


def _timers_without_finalizer(registry: kopf.OperatorRegistry) -> None:
    """kopf puts its finalizer on every object with a timer, so that it can stop the timer
    before the object goes. The scaler needs no such goodbye (the garbage collector takes
    the worker Deployment), and the finalizer left ToolPools stuck in Terminating after
    `helm uninstall`, which deletes the operator with them (found on the real node). kopf
    has no public switch for it (1.45): the timers' handlers are replaced by copies that
    do not require it, and kopf then also removes the finalizer from existing pools."""
    spawning = registry._spawning  # noqa: SLF001 - see above; tests/test_operator_pure.py checks it
    spawning._handlers = [  # noqa: SLF001
        dataclasses.replace(h, requires_finalizer=False) if isinstance(h, kopf_handlers.TimerHandler) else h
        for h in spawning.get_all_handlers()
    ]


async def operate(
    config: OperatorConfig,
    *,
    backlog: BacklogFn | None = None,
    warm_until: Callable[[str], float] | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
    kubeconfig: str | None = None,
) -> None:
    """Run the handlers until ``stop_flag`` (an asyncio/threading Event or a Future).

    ``backlog`` None connects to NATS (``GENQ_NATS_URL``) and reads JetStream.
    """
    from genq.adapters.nats import NatsBus
    from genq.operator.backlog import JetStreamBacklog

    bus = source = None
    if backlog is None:
        url = config.worker_env.get("GENQ_NATS_URL") or os.environ.get("GENQ_NATS_URL")
        if not url:
            raise RuntimeError("set GENQ_NATS_URL")
        bus = NatsBus(url, name="genq-operator")
        await bus.connect()
        source = JetStreamBacklog(bus)
        await source.start()
        backlog, warm_until = source, source.warm_until

    async def ensure_tool(spec: ToolSpec) -> None:
        if bus is not None:
            await bus.ensure_tool(spec.name, spec.max_attempts, config.ack_wait_seconds)

    api = await _api_client(kubeconfig)
    try:
        reconciler = PoolReconciler(api, config, backlog, warm_until=warm_until or (lambda tool: 0.0),
                                    ensure_tool=ensure_tool)
        registry = make_registry(reconciler, config)
        settings = make_settings()

        @kopf.on.login(registry=registry)
        async def login(**kwargs: Any) -> Any:
            if not kubeconfig:  # in-cluster (service account) or the default kubeconfig
                return await kopf.login_via_async_client(**kwargs)
            c = await _configuration(kubeconfig)
            # A client certificate, or a bearer token (a ServiceAccount's kubeconfig).
            scheme = token = None
            auth = (c.api_key or {}).get("authorization") or (c.api_key or {}).get("BearerToken")
            if auth:
                prefix = (c.api_key_prefix or {}).get("authorization")
                scheme, token = (prefix, auth) if prefix else (auth.partition(" ")[0], auth.partition(" ")[2])
            return kopf.ConnectionInfo(server=c.host, ca_path=c.ssl_ca_cert, certificate_path=c.cert_file,
                                       private_key_path=c.key_file, scheme=scheme, token=token,
                                       insecure=not c.verify_ssl)

        await kopf.operator(
            registry=registry, settings=settings, standalone=True,
            clusterwide=not config.namespaces, namespaces=config.namespaces,
            stop_flag=stop_flag, ready_flag=ready_flag, memo=kopf.Memo(),
        )
    finally:
        await api.close()
        if source is not None:
            await source.stop()
        if bus is not None:
            await bus.close()


async def _configuration(kubeconfig: str | None = None) -> k8s.Configuration:
    """An explicit ``kubeconfig``, else in-cluster, else the default kubeconfig."""
    configuration = k8s.Configuration()
    if kubeconfig is None:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
            return configuration
        except k8s_config.ConfigException:
            pass
    await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return configuration


async def _api_client(kubeconfig: str | None = None) -> k8s.ApiClient:
    configuration = await _configuration(kubeconfig)
    # The client's defaults are for scripts; the operator talks to many objects at once.
    configuration.connection_pool_maxsize = 32
    return k8s.ApiClient(configuration)


async def lead_and_operate(config: OperatorConfig, *, kubeconfig: str | None = None, stop_flag: Any = None,
                           **kwargs: Any) -> None:
    """Take the Lease ``genq-operator`` (blocking while another replica holds it), then
    run the handlers until ``stop_flag``, until they stop (kopf stops on SIGTERM/SIGINT),
    or until the Lease is lost (then ``SystemExit(1)``: restart as a follower)."""
    from kubernetes_asyncio.leaderelection import electionconfig, leaderelection

    api = await _api_client(kubeconfig)
    lost = asyncio.Event()
    halt = asyncio.Event()  # asks kopf to stop gracefully, on every way out
    handlers_done = asyncio.Event()
    failures: list[BaseException] = []
    lead_task: asyncio.Task | None = None

    async def lead() -> None:
        nonlocal lead_task
        lead_task = asyncio.current_task()
        log.info("%s leads; starting the handlers", config.identity)
        try:
            await operate(config, kubeconfig=kubeconfig, stop_flag=halt, **kwargs)
        except Exception as e:
            failures.append(e)
            handlers_done.set()
            raise
        # Not on cancellation: that is the election stopping them (a lost Lease).
        handlers_done.set()

    async def stopped() -> None:
        log.warning("%s lost the lease %s; stopping", config.identity, constants.OPERATOR_LEASE)
        lost.set()

    lock = _TolerantLeaseLock(constants.OPERATOR_LEASE, config.lease_namespace, config.identity, api)
    election = leaderelection.LeaderElection(electionconfig.Config(
        # lease_duration in whole seconds: the Lease's field is an integer (15.0 failed).
        lock, lease_duration=max(1, round(config.lease_seconds)), renew_deadline=config.lease_seconds * 2 / 3,
        retry_period=max(1.0, config.lease_seconds / 7.5), onstarted_leading=lead, onstopped_leading=stopped))
    task = asyncio.create_task(election.run())
    waiters = [task, asyncio.create_task(handlers_done.wait())]
    if stop_flag is not None:
        waiters.append(asyncio.create_task(_wait_flag(stop_flag)))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and not task.cancelled() and task.exception() is not None:
            # The election (or the handlers it runs) failed: never exit 0 on that.
            raise task.exception()
        if failures:
            raise failures[0]
    finally:
        halt.set()
        if lead_task is not None and not lead_task.done():
            await asyncio.wait({lead_task}, timeout=15)  # kopf's own graceful stop
            lead_task.cancel()
        for w in waiters[1:]:
            w.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await api.close()
    if lost.is_set():
        raise SystemExit(1)  # restart as a follower; never run handlers without the Lease


class _TolerantLeaseLock(LeaseLock):
    """The apiserver out of reach is a failed read or write of the Lease, as client-go
    sees it, not a crash of the election: a leader keeps trying until its renew deadline,
    then steps down; a follower keeps waiting."""

    async def get(self, name: str, namespace: str) -> Any:
        try:
            return await super().get(name, namespace)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            err = ApiException(status=503, reason=f"apiserver unreachable: {e!r}")
            err.body = json.dumps({"code": 503, "message": err.reason})
            return False, err

    async def create(self, *args: Any, **kw: Any) -> bool:
        try:
            return await super().create(*args, **kw)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def update(self, *args: Any, **kw: Any) -> bool:
        try:
            return await super().update(*args, **kw)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False


async def _wait_flag(flag: Any) -> None:
    if isinstance(flag, asyncio.Event):
        await flag.wait()
    elif isinstance(flag, threading.Event):
        while not flag.is_set():
            await asyncio.sleep(0.2)
    else:
        await flag


def run_operator() -> None:
    """``genq operator`` in cluster mode: leader election, then the kopf handlers."""
    logging.basicConfig(level=os.environ.get("GENQ_LOG_LEVEL", "INFO"))
    asyncio.run(lead_and_operate(OperatorConfig.from_env()))
