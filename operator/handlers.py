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

Neighbours: configured by :class:`genq.settings.OperatorSettings` (``Settings.operator``);
reaches the apiserver through :mod:`genq.adapters.kubernetes.client`, as the job store
does; started by ``genq operator`` (:func:`lead_and_operate`). Only this module of the
operator imports kopf and kubernetes_asyncio (``.importlinter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf
import pydantic
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kopf._core.intents import handlers as kopf_handlers
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock

from genq import conditions as kube_conditions
from genq import constants
from genq.adapters.kubernetes import client as kube_client
from genq.operator import conditions, resources, scaling
from genq.settings import OperatorSettings, Settings
from genq.tools import ToolSpec

log = logging.getLogger(__name__)

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
GROUP, VERSION = constants.API_GROUP, constants.API_VERSION


BacklogFn = Callable[[str], Awaitable[scaling.Backlog]]


class PoolReconciler:
    """The I/O of one reconcile of a ToolPool; every decision is delegated to pure code."""

    def __init__(
        self,
        api: k8s.ApiClient,
        config: OperatorSettings,
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

    async def start_one(self, body: Mapping[str, Any], memo: Any) -> tuple[int, int]:
        """At least one worker now, when the pool's Deployment has none (and the pool
        allows one): (replicas before, after). The scaler's passes then go on as usual."""
        spec = resources.pool_spec(body)
        async with _lock(memo):
            deployment = await self.read_deployment(body["metadata"]["namespace"], spec.name)
            current = 0 if deployment is None else int(deployment["spec"].get("replicas") or 0)
            if current > 0 or spec.max_workers < 1:
                return current, current
            await self.apply(body, 1)
            memo["idle_since"] = None
            return current, 1

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


def _quiet_handler_successes() -> None:
    """kopf logs every handler's success at INFO, and the scaler's timer succeeds once a
    second per pool: two lines a second for two pools, in the operator's log for ever
    (seen on the real node). Successes go to DEBUG's level; failures still show."""
    objects = logging.getLogger("kopf.objects")
    if objects.getEffectiveLevel() > logging.DEBUG:
        objects.setLevel(logging.WARNING)


def make_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    """genq's kopf settings: its own finalizer and annotation prefix, standalone."""
    settings = settings or kopf.OperatorSettings()
    settings.persistence.finalizer = constants.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=constants.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=constants.ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.peering.standalone = True  # the Lease decides who runs (see lead_and_operate)
    settings.posting.level = logging.WARNING  # Events come from our own reasons
    settings.watching.server_timeout = 300
    return settings


#: Most recent durations per tool the scaler averages (a pool's ``avgDurationSeconds``).
_DURATIONS = 200
#: Connections of the operator's client: it talks to many objects at once.
_CONNECTIONS = 32


def _running(body: kopf.Body, **_: Any) -> bool:
    """A GenerationJob a worker runs now. A job that stops matching a ``when`` filter
    leaves its index (a None result would not remove its earlier value)."""
    return bool((body.get("status") or {}).get("worker")) and scaling.is_running(body)


def _succeeded(body: kopf.Body, **_: Any) -> bool:
    """A GenerationJob that succeeded with a duration (for the pool's average)."""
    status = body.get("status") or {}
    done = kube_conditions.find(status.get("conditions"), constants.CONDITION_SUCCEEDED)
    return done.get("status") == kube_conditions.TRUE and status.get("durationSeconds") is not None


def make_registry(reconciler: PoolReconciler, config: OperatorSettings) -> kopf.OperatorRegistry:
    """Register the handlers on a fresh registry (nothing is registered at import)."""
    registry = kopf.OperatorRegistry()
    _register_job_indexes(registry)
    _register_pool_changes(registry, reconciler)
    pools_at_zero: dict[tuple[str, str], tuple[kopf.Body, Any]] = {}
    _register_scaler(registry, reconciler, config.scale_interval, pools_at_zero)
    _register_scale_from_zero(registry, reconciler, pools_at_zero)
    return registry


def _register_job_indexes(registry: kopf.OperatorRegistry) -> None:
    """Two kopf indexes of GenerationJobs by (namespace, tool): the workers running jobs
    (which pods are busy) and the durations of succeeded jobs."""
    jobs = dict(group=GROUP, version=VERSION, plural=constants.GENERATIONJOB_PLURAL, registry=registry)

    @kopf.index(**jobs, id="genq_running_workers", when=_running)
    def genq_running_workers(namespace: str, body: kopf.Body, **_: Any) -> dict[Any, str]:
        return {(namespace, body.get("spec", {}).get("tool")): body["status"]["worker"]}

    @kopf.index(**jobs, id="genq_durations", when=_succeeded)
    def genq_durations(namespace: str, body: kopf.Body, **_: Any) -> dict[Any, float]:
        return {(namespace, body.get("spec", {}).get("tool")): float(body["status"]["durationSeconds"])}


def _register_pool_changes(registry: kopf.OperatorRegistry, reconciler: PoolReconciler) -> None:
    """ToolPool create / update / resume: apply its ConfigMap, Deployment and consumers."""
    pools = dict(group=GROUP, version=VERSION, plural=constants.TOOLPOOL_PLURAL, registry=registry)

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


def _register_scaler(registry: kopf.OperatorRegistry, reconciler: PoolReconciler, interval: float,
                     pools_at_zero: dict[tuple[str, str], tuple[kopf.Body, Any]]) -> None:
    """A timer per ToolPool: one scaler pass, its Events, and the status if it changed.
    It notes the pools it left at zero workers (for the scale-from-zero handler)."""
    pools = dict(group=GROUP, version=VERSION, plural=constants.TOOLPOOL_PLURAL, registry=registry)

    @kopf.timer(**pools, id="pool_scale", interval=interval, sharp=False)
    async def pool_scale(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, namespace: str,
                         genq_running_workers: kopf.Index, genq_durations: kopf.Index, **_: Any) -> None:
        if body["metadata"].get("deletionTimestamp"):
            return  # going away: the garbage collector takes the Deployment
        tool = body["spec"]["tool"]["name"]
        running = list(genq_running_workers.get((namespace, tool), []))
        durations = list(genq_durations.get((namespace, tool), []))[-_DURATIONS:]
        try:
            status, before, after, created = await reconciler.scale(body, memo, running, durations)
        except pydantic.ValidationError:
            return  # reported by the change handler
        _scale_events(body, tool, status, before, after, created)
        if after == 0:
            pools_at_zero[(namespace, tool)] = (body, memo)
        else:
            pools_at_zero.pop((namespace, tool), None)
        if _status_changed(body.get("status"), status):
            patch.status.update(status)

    _timers_without_finalizer(registry)


def _register_scale_from_zero(registry: kopf.OperatorRegistry, reconciler: PoolReconciler,
                              pools_at_zero: dict[tuple[str, str], tuple[kopf.Body, Any]]) -> None:
    """A job arriving for a pool with no workers starts one at once, instead of at the
    scaler's next tick (up to ``scaleInterval`` later: measured on the real node, that
    tick was most of the platform's part of a cold start). The timer does the rest.
    A watch event handler: it stores nothing on the job (no finalizer, no annotation)."""
    jobs = dict(group=GROUP, version=VERSION, plural=constants.GENERATIONJOB_PLURAL, registry=registry)

    @kopf.on.event(**jobs, id="job_arrived", when=_waiting)
    async def job_arrived(event: kopf.RawEvent, namespace: str, body: kopf.Body, **_: Any) -> None:
        if event.get("type") != "ADDED":
            return
        pool = pools_at_zero.pop((namespace, body.get("spec", {}).get("tool")), None)
        if pool is None:
            return
        pool_body, memo = pool
        try:
            before, after = await reconciler.start_one(pool_body, memo)
        except (ApiException, pydantic.ValidationError) as e:
            log.warning("scale from zero of %s failed (the scaler's next pass retries): %s", body["spec"]["tool"], e)
            return
        if after > before:
            kopf.event(pool_body, type="Normal", reason=conditions.EVENT_SCALED_UP,
                       message=f"Scaled workers from {before} to {after}: a job arrived for a pool at zero.")


def _waiting(body: kopf.Body, **_: Any) -> bool:
    """A GenerationJob not yet started, not finished and not cancelled."""
    status = body.get("status") or {}
    conds = status.get("conditions")
    done = kube_conditions.find(conds, constants.CONDITION_SUCCEEDED).get("status", kube_conditions.UNKNOWN)
    started = kube_conditions.find(conds, constants.CONDITION_STARTED).get("status") == kube_conditions.TRUE
    return body.get("spec", {}).get("active", True) is not False and done == kube_conditions.UNKNOWN and not started


def _scale_events(body: kopf.Body, tool: str, status: Mapping[str, Any], before: int, after: int, created: bool) -> None:
    if created:
        kopf.event(body, type="Normal", reason=conditions.EVENT_DEPLOYMENT_CREATED,
                   message=f"Created Deployment {constants.worker_deployment_name(tool)}.")
    if after > before:
        kopf.event(body, type="Normal", reason=conditions.EVENT_SCALED_UP,
                   message=f"Scaled workers from {before} to {after} (queued {status['queued']}, running {status['running']}).")
    elif after < before:
        kopf.event(body, type="Normal", reason=conditions.EVENT_SCALED_DOWN,
                   message=f"Scaled workers from {before} to {after}; idle workers go first.")


@dataclass
class _Backlog:
    """Where the scaler reads backlogs, and how a pool's JetStream consumers are made."""

    read: BacklogFn
    warm_until: Callable[[str], float]
    ensure_tool: Callable[[ToolSpec], Awaitable[None]] | None = None


@contextlib.asynccontextmanager
async def _jetstream_backlog(settings: Settings) -> AsyncIterator[_Backlog]:
    """Connect to NATS (``GENQ_NATS_URL``) and follow JetStream's backlogs and warm requests."""
    from genq.adapters.nats import NatsBus
    from genq.operator.backlog import JetStreamBacklog

    if not settings.nats_url:
        raise RuntimeError("set GENQ_NATS_URL")
    bus = NatsBus(settings.nats_url, name="genq-operator")
    await bus.connect()
    try:
        source = JetStreamBacklog(bus)
        await source.start()
        try:
            async def ensure_tool(spec: ToolSpec) -> None:
                await bus.ensure_tool(spec.name, spec.max_attempts, settings.ack_wait_seconds)

            yield _Backlog(source, source.warm_until, ensure_tool)
        finally:
            await source.stop()
    finally:
        await bus.close()


def _register_login(registry: kopf.OperatorRegistry, kubeconfig: str | None) -> None:
    """kopf's connection: its own discovery (in-cluster, then the default kubeconfig)
    without an explicit kubeconfig, else the credentials of that file."""

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> Any:
        if not kubeconfig:
            return await kopf.login_via_async_client(**kwargs)
        c = await kube_client.configuration(kubeconfig)
        # A client certificate, or a bearer token (a ServiceAccount's kubeconfig).
        scheme = token = None
        auth = (c.api_key or {}).get("authorization") or (c.api_key or {}).get("BearerToken")
        if auth:
            prefix = (c.api_key_prefix or {}).get("authorization")
            scheme, token = (prefix, auth) if prefix else (auth.partition(" ")[0], auth.partition(" ")[2])
        return kopf.ConnectionInfo(server=c.host, ca_path=c.ssl_ca_cert, certificate_path=c.cert_file,
                                   private_key_path=c.key_file, scheme=scheme, token=token,
                                   insecure=not c.verify_ssl)


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
    settings: Settings,
    *,
    backlog: BacklogFn | None = None,
    warm_until: Callable[[str], float] | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
) -> None:
    """Run the handlers until ``stop_flag`` (an asyncio/threading Event or a Future).

    ``backlog`` None connects to NATS (``GENQ_NATS_URL``) and reads JetStream.
    """
    config = settings.operator
    kubeconfig = str(settings.kubeconfig) if settings.kubeconfig else None
    async with contextlib.AsyncExitStack() as stack:
        if backlog is None:
            source = await stack.enter_async_context(_jetstream_backlog(settings))
        else:
            source = _Backlog(backlog, warm_until or (lambda tool: 0.0))
        api = await kube_client.api_client(kubeconfig, connections=_CONNECTIONS)
        stack.push_async_callback(api.close)
        reconciler = PoolReconciler(api, config, source.read, warm_until=source.warm_until,
                                    ensure_tool=source.ensure_tool)
        registry = make_registry(reconciler, config)
        _register_login(registry, kubeconfig)
        _quiet_handler_successes()
        await kopf.operator(
            registry=registry, settings=make_settings(), standalone=True,
            clusterwide=not config.namespaces, namespaces=config.namespaces,
            stop_flag=stop_flag, ready_flag=ready_flag, memo=kopf.Memo(),
        )


async def lead_and_operate(settings: Settings, *, stop_flag: Any = None, **kwargs: Any) -> None:
    """Take the Lease ``genq-operator`` (blocking while another replica holds it), then
    run the handlers until ``stop_flag``, until they stop (kopf stops on SIGTERM/SIGINT),
    or until the Lease is lost (then ``SystemExit(1)``: restart as a follower)."""
    from kubernetes_asyncio.leaderelection import electionconfig, leaderelection

    config = settings.operator
    api = await kube_client.api_client(settings.kubeconfig, connections=_CONNECTIONS)
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
            await operate(settings, stop_flag=halt, **kwargs)
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
        if lead_task is not None and not lost.is_set():
            await _release_lease(api, config.lease_namespace, config.identity)
        await api.close()
    if lost.is_set():
        raise SystemExit(1)  # restart as a follower; never run handlers without the Lease


async def _release_lease(api: k8s.ApiClient, namespace: str, identity: str) -> None:
    """A leader that stops cleanly deletes its Lease (if it still holds it: the delete is
    conditional on the version read), so a successor leads at once instead of waiting
    for the Lease to expire, and `helm uninstall` leaves no Lease behind (found on the
    real node). Best effort: on any failure the Lease simply expires."""
    coordination = k8s.CoordinationV1Api(api)
    try:
        lease = await coordination.read_namespaced_lease(constants.OPERATOR_LEASE, namespace)
        if lease.spec.holder_identity != identity:
            return
        await coordination.delete_namespaced_lease(
            constants.OPERATOR_LEASE, namespace,
            body=k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(resource_version=lease.metadata.resource_version)))
        log.info("%s released the lease %s", identity, constants.OPERATOR_LEASE)
    except (ApiException, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        log.warning("could not release the lease %s: %s", constants.OPERATOR_LEASE, e)


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

