"""``JobStore`` on Kubernetes: one ``GenerationJob`` custom resource per job, in one namespace.

Writes go to the apiserver through kubernetes_asyncio: ``create`` posts the resource and
then writes its first status; every status move is a compare-and-set — a PUT of the
``/status`` subresource carrying the ``resourceVersion`` that was read, which the apiserver
refuses with 409 when anyone wrote in between; on 409 the job is read afresh and
``expect`` / ``version`` / ``guard`` are checked again (as ``_cas_in_thread`` does in the
SQLite adapter). ``Job.version`` is the resource's ``resourceVersion`` (an etcd revision:
numeric, and only compared for equality and recency here).

Reads never go to the apiserver per request: a watch-fed cache (list, then watch from the
list's resourceVersion with bookmarks; a relist on 410 Gone) holds every job of the
namespace, with a dispatch-order index per tool (priority, then ``queueSequence``) like
the SQLite store's, so ``get``, ``position``, ``counts``, ``queued_count``,
``owner_active``, ``recent_durations``, ``due`` and ``list`` are answered from memory. The
result of this process's own writes is put in the cache at once (a later, older watch
event never overwrites a newer version), so a read right after a write sees it.

What the CRD keeps where: spec holds what was submitted (tool, variant, params, inputs,
owner, priority, activeDeadlineSeconds, ttlSecondsAfterFinished); status holds everything
that moves (conditions, attempts, progress, times, worker, results, seed, error, the
queue sequence, the stream sequence, the delivery, the heartbeat, maxAttempts), because
the status subresource ignores metadata — a field that must move atomically with the
status has to be in it. Two immutable values live in annotations: the job id as the API
shows it (a ULID; the resource name is its lower case) and the sub-second creation time.

Idempotency records are ConfigMaps (create is first-writer-wins) and worker liveness is a
Lease per worker; both are small and only written on submit with an Idempotency-Key or
every few seconds per worker. API keys are Secrets, in :class:`KubernetesKeyStore`.

Rate limits: kubernetes_asyncio has no client-side rate limiter at all (the official
Go/Python clients default to QPS 5 / burst 10; this one does not throttle), so the only
client-side bound is the connection pool (``connections``); the apiserver's API Priority
and Fairness does the limiting.

Neighbours: implements :class:`genq.ports.JobStore` and :class:`genq.ports.KeyStore`; the
names it writes are in :mod:`genq.constants`; the resource is ``crds/generationjobs.genq.io.yaml``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import json
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from sortedcontainers import SortedList

from genq import constants
from genq.models import ApiKey, FileRef, Job, Priority, Status, cas_allows
from genq.ports import JobFilter, Page, StorageFull, ToolCounts, Unavailable, until_available

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = constants.API_GROUP, constants.API_VERSION, constants.GENERATIONJOB_PLURAL
API_VERSION = f"{GROUP}/{VERSION}"

#: Seconds one apiserver request may take before the store answers ``Unavailable``.
REQUEST_TIMEOUT = 10.0
#: Seconds one watch request stays open (the server ends it then; it is resumed from the
#: last resourceVersion). Below the apiserver's own 30-60 min limit, above any idle gap.
WATCH_SECONDS = 300
#: Attempts of one compare-and-set against concurrent writers before giving up.
CAS_ATTEMPTS = 8
#: Deleted jobs remembered so a late watch event cannot bring one back; a watch event is
#: never older than the last few thousand deletes.
_TOMBSTONES = 10_000

# Fields of ``Job`` a transition/update may change, as in the SQLite store.
_UPDATABLE = {
    "variant", "priority", "status", "started_at", "completed_at", "expires_at", "heartbeat_at",
    "stream_seq", "attempts", "progress", "seed", "worker", "params", "inputs", "results", "result_meta",
    "error", "max_attempts", "deadline_seconds", "ttl_seconds", "delivery",
}
_SPEC_FIXED = ("variant", "priority", "params", "inputs")

_STATUS_REASON = {
    Status.QUEUED: constants.REASON_QUEUED,
    Status.RUNNING: constants.REASON_RUNNING,
    Status.SUCCEEDED: constants.REASON_COMPLETED,
    Status.FAILED: constants.REASON_FAILED,
    Status.CANCELLED: constants.REASON_CANCELLED,
}
_REASON_STATUS = {v: k for k, v in _STATUS_REASON.items()} | {constants.REASON_DEADLINE_EXCEEDED: Status.FAILED}


# -- mapping Job <-> GenerationJob ----------------------------------------------------------


def resource_name(job_id: str) -> str:
    """The resource name of a job: ULIDs are case-insensitive, resource names lower case."""
    return job_id.lower()


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _unix(s: str | None) -> float | None:
    if not s:
        return None
    return datetime.datetime.fromisoformat(s).timestamp()


def queue_sequence(now: float | None = None) -> int:
    """A job's place in its queue: microseconds since the epoch when it was (re)queued.
    Several API replicas need no shared counter; clock skew between them only blurs FIFO
    among jobs submitted within the skew."""
    return int((time.time() if now is None else now) * 1_000_000)


def _file_to_item(f: FileRef, uri_base: str) -> dict[str, Any]:
    item: dict[str, Any] = {"name": f.name, "uri": uri_base + f.key, "contentType": f.content_type, "sizeBytes": f.size_bytes}
    if f.etag:
        item["etag"] = f.etag
    return item


def _item_to_file(item: dict[str, Any], uri_base: str) -> FileRef:
    uri = item["uri"]
    if uri_base and uri.startswith(uri_base):
        key = uri[len(uri_base):]
    else:  # written with another base: the key is what follows jobs/
        i = uri.find("jobs/")
        key = uri[i:] if i >= 0 else uri
    return FileRef(item["name"], key, item.get("contentType") or "application/octet-stream", int(item.get("sizeBytes") or 0),
                   item.get("etag"))


def job_to_resource(job: Job, namespace: str, uri_base: str) -> dict[str, Any]:
    """The GenerationJob for a new job (metadata and spec; the status is written after)."""
    spec: dict[str, Any] = {
        "tool": job.tool,
        "variant": job.variant,
        "params": job.params,
        "inputs": [_file_to_item(f, uri_base) for f in job.inputs],
        "owner": job.owner,
        "priority": job.priority.value,
        "active": True,
        "ttlSecondsAfterFinished": max(0, math.ceil(job.ttl_seconds)),
    }
    if job.deadline_seconds:
        spec["activeDeadlineSeconds"] = max(1, math.ceil(job.deadline_seconds))
    annotations = {constants.ANNOTATION_JOB_ID: job.id, constants.ANNOTATION_CREATED_AT: repr(job.created_at),
                   constants.ANNOTATION_MAX_ATTEMPTS: str(job.max_attempts)}
    if job.seed is not None:
        annotations[constants.ANNOTATION_SEED] = str(job.seed)
    return {
        "apiVersion": API_VERSION,
        "kind": constants.GENERATIONJOB_KIND,
        "metadata": {
            "name": resource_name(job.id),
            "namespace": namespace,
            "labels": {constants.LABEL_TOOL: job.tool, constants.LABEL_MANAGED_BY: constants.MANAGED_BY},
            "annotations": annotations,
            # Created with genq's finalizer (no extra write): a `kubectl delete` of a live
            # job waits until housekeeping has stopped its work and removed its objects.
            "finalizers": [constants.JOB_FINALIZER],
        },
        "spec": spec,
    }


def _condition(type_: str, status: str, reason: str, at: float | None, generation: int, message: str = "") -> dict[str, Any]:
    return {
        "type": type_, "status": status, "reason": reason, "message": message[:32768],
        "lastTransitionTime": _rfc3339(at if at is not None else time.time())[:19] + "Z",
        "observedGeneration": generation,
    }


def job_status(job: Job, generation: int, uri_base: str) -> dict[str, Any]:
    """The status subresource of ``job``: conditions (the Succeeded reason is the job's
    status, as ``kubectl get gjob`` shows it) and every field that moves."""
    queued_at = job.seq / 1_000_000 if job.seq else job.created_at
    error = job.error or {}
    reason = _STATUS_REASON[job.status]
    if job.status is Status.FAILED and error.get("code") == "deadline_exceeded":
        reason = constants.REASON_DEADLINE_EXCEEDED
    succeeded = {Status.SUCCEEDED: "True", Status.FAILED: "False", Status.CANCELLED: "False"}.get(job.status, "Unknown")
    done_at = job.completed_at if job.terminal else (job.started_at if job.status is Status.RUNNING else queued_at)
    started = job.status is Status.RUNNING or (job.terminal and job.started_at is not None)
    conditions = [
        _condition(constants.CONDITION_QUEUED, "True" if job.status is Status.QUEUED else "False",
                   constants.REASON_QUEUED if job.status is Status.QUEUED else (constants.REASON_STARTED if started else reason),
                   queued_at if job.status is Status.QUEUED else (job.started_at or job.completed_at), generation),
        _condition(constants.CONDITION_STARTED, "True" if started else "False",
                   constants.REASON_STARTED if started else reason, job.started_at if started else queued_at, generation),
        _condition(constants.CONDITION_SUCCEEDED, succeeded, reason, done_at, generation,
                   str(error.get("message") or "") if job.status in (Status.FAILED, Status.CANCELLED) else ""),
    ]
    st: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions,
        "attempts": job.attempts,
        "maxAttempts": max(1, job.max_attempts),
        "progress": min(1.0, max(0.0, float(job.progress))),
        "queueSequence": job.seq,
        "results": [_file_to_item(f, uri_base) for f in job.results],
    }
    for key, value in (
        ("startTime", _rfc3339(job.started_at)), ("completionTime", _rfc3339(job.completed_at)),
        ("heartbeatTime", _rfc3339(job.heartbeat_at)), ("expiryTime", _rfc3339(job.expires_at)),
        ("worker", job.worker), ("streamSequence", job.stream_seq), ("delivery", job.delivery),
    ):
        if value is not None:
            st[key] = value
    meta = job.result_meta or {}
    seed = meta.get("seed", job.seed) if job.result_meta else job.seed
    if isinstance(seed, int) and 0 <= seed <= 0xFFFFFFFF:
        st["seed"] = seed
    if job.result_meta is not None:
        duration = meta.get("duration_seconds")
        st["durationSeconds"] = max(0.0, float(duration)) if isinstance(duration, int | float) else 0.0
        # The CRD types metrics as numbers; anything else a tool reported is dropped.
        st["metrics"] = {str(k): v for k, v in (meta.get("metrics") or {}).items()
                         if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    if job.error:
        st["error"] = {"code": str(error.get("code") or "pipeline_error")[:64], "message": str(error.get("message") or "")[:4096]}
    return st


def _int_or_none(s: str | None) -> int | None:
    try:
        return int(s) if s is not None else None
    except ValueError:
        return None


def resource_to_job(obj: dict[str, Any], uri_base: str) -> Job:
    meta, spec, st = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    ann = meta.get("annotations") or {}
    created_at = float(ann.get(constants.ANNOTATION_CREATED_AT) or _unix(meta.get("creationTimestamp")) or 0.0)
    reason = next((c.get("reason") for c in st.get("conditions") or () if c.get("type") == constants.CONDITION_SUCCEEDED), None)
    status = _REASON_STATUS.get(reason or "", Status.QUEUED)
    result_meta = None
    if "durationSeconds" in st:
        result_meta = {"seed": st.get("seed"), "duration_seconds": st["durationSeconds"], "metrics": dict(st.get("metrics") or {})}
    error = st.get("error")
    return Job(
        id=ann.get(constants.ANNOTATION_JOB_ID) or meta["name"],
        owner=spec.get("owner") or "",
        tool=spec["tool"],
        variant=spec.get("variant") or "",
        priority=Priority(spec.get("priority") or "normal"),
        params=spec.get("params") or {},
        inputs=tuple(_item_to_file(i, uri_base) for i in spec.get("inputs") or ()),
        status=status,
        seed=st["seed"] if "seed" in st else _int_or_none(ann.get(constants.ANNOTATION_SEED)),
        progress=float(st.get("progress") or 0.0),
        attempts=int(st.get("attempts") or 0),
        max_attempts=int(st.get("maxAttempts") or ann.get(constants.ANNOTATION_MAX_ATTEMPTS) or 3),
        deadline_seconds=float(spec["activeDeadlineSeconds"]) if spec.get("activeDeadlineSeconds") else None,
        ttl_seconds=float(spec.get("ttlSecondsAfterFinished", 3600)),
        created_at=created_at,
        started_at=_unix(st.get("startTime")),
        completed_at=_unix(st.get("completionTime")),
        expires_at=_unix(st.get("expiryTime")),
        heartbeat_at=_unix(st.get("heartbeatTime")),
        worker=st.get("worker"),
        results=tuple(_item_to_file(i, uri_base) for i in st.get("results") or ()),
        result_meta=result_meta,
        error={"code": error.get("code"), "message": error.get("message", "")} if error else None,
        stream_seq=st.get("streamSequence"),
        delivery=st.get("delivery"),
        seq=int(st.get("queueSequence") or queue_sequence(created_at)),
        version=int(meta.get("resourceVersion") or 0),
        active=spec.get("active", True) is not False,
        deleting=bool(meta.get("deletionTimestamp")) and constants.JOB_FINALIZER in (meta.get("finalizers") or ()),
    )


# -- the cache -----------------------------------------------------------------------------


class _Cache:
    """Every job of the namespace, and the indexes the read paths need.

    ``put`` keeps the newer of two versions of a job, so a watch event older than this
    process's own write (or delete) never undoes it."""

    def __init__(self, on_attention: Callable[[], None] | None = None) -> None:
        self.on_attention = on_attention
        self.jobs: dict[str, Job] = {}
        self.generation: dict[str, int] = {}
        self.queued: dict[str, SortedList] = {}
        self.running: dict[str, set[str]] = {}
        self.done: dict[str, Counter] = {}
        self.owner_queued: Counter = Counter()
        self.finished: dict[str, SortedList] = {}  # tool -> (completed_at, name) of succeeded jobs
        self.tombstones: dict[str, int] = {}  # name -> version it was deleted at
        # For listing without a sort per request, and housekeeping without a full scan:
        self.ids: SortedList = SortedList()  # job ids
        self.owner_ids: dict[str, SortedList] = {}  # owner -> job ids
        self.expiring: SortedList = SortedList()  # (expires_at, name)
        self.unpublished: set[str] = set()  # queued without a stream message
        self.attention: set[str] = set()  # being deleted, or inactive and not finished

    def put(self, job: Job, generation: int = 1, *, force: bool = False) -> Job:
        name = resource_name(job.id)
        old = self.jobs.get(name)
        if not force:
            if old is not None and old.version > job.version:
                return old
            if self.tombstones.get(name, -1) >= job.version:
                return job
        if old is not None:
            self._unindex(name, old)
        self.jobs[name] = job
        self.generation[name] = generation
        self._index(name, job)
        return job

    def remove(self, name: str, version: int) -> None:
        old = self.jobs.get(name)
        if old is not None and old.version > version:
            return
        self.tombstones[name] = max(version, self.tombstones.get(name, 0))
        if len(self.tombstones) > _TOMBSTONES:  # only late events of recent deletes matter
            for stale in list(self.tombstones)[: _TOMBSTONES // 2]:
                del self.tombstones[stale]
        if old is not None:
            self._unindex(name, old)
            del self.jobs[name]
            self.generation.pop(name, None)

    def _index(self, name: str, job: Job) -> None:
        self.ids.add(job.id)
        self.owner_ids.setdefault(job.owner, SortedList()).add(job.id)
        if job.expires_at is not None:
            self.expiring.add((job.expires_at, name))
        if job.status is Status.QUEUED and job.stream_seq is None:
            self.unpublished.add(name)
        if job.deleting or (not job.active and not job.terminal):
            self.attention.add(name)
            if self.on_attention is not None:
                self.on_attention()
        if job.status is Status.QUEUED:
            self.queued.setdefault(job.tool, SortedList()).add((job.priority.rank, job.seq, name))
            self.owner_queued[job.owner] += 1
        elif job.status is Status.RUNNING:
            self.running.setdefault(job.tool, set()).add(name)
        else:
            self.done.setdefault(job.tool, Counter())[job.status] += 1
            if job.status is Status.SUCCEEDED and job.started_at is not None and job.completed_at is not None:
                self.finished.setdefault(job.tool, SortedList()).add((job.completed_at, name))

    def _unindex(self, name: str, job: Job) -> None:
        self.ids.discard(job.id)
        owned = self.owner_ids.get(job.owner)
        if owned is not None:
            owned.discard(job.id)
            if not owned:
                del self.owner_ids[job.owner]
        if job.expires_at is not None:
            self.expiring.discard((job.expires_at, name))
        self.unpublished.discard(name)
        self.attention.discard(name)
        if job.status is Status.QUEUED:
            self.queued[job.tool].discard((job.priority.rank, job.seq, name))
            self.owner_queued[job.owner] -= 1
            if self.owner_queued[job.owner] <= 0:
                del self.owner_queued[job.owner]
        elif job.status is Status.RUNNING:
            self.running[job.tool].discard(name)
        else:
            self.done[job.tool][job.status] -= 1
            if job.status is Status.SUCCEEDED and job.started_at is not None and job.completed_at is not None:
                self.finished[job.tool].discard((job.completed_at, name))


# -- the store ------------------------------------------------------------------------------


class KubernetesStore:
    """Jobs as GenerationJobs, idempotency records as ConfigMaps, workers as Leases."""

    def __init__(
        self,
        namespace: str,
        *,
        kubeconfig: Path | str | None = None,
        in_cluster: bool | None = None,
        uri_base: str = "",
        connections: int = 256,
    ):
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.in_cluster = in_cluster
        self.uri_base = uri_base
        self.connections = connections
        self._api: k8s_client.ApiClient | None = None
        self._objects: k8s_client.CustomObjectsApi | None = None
        self._core: k8s_client.CoreV1Api | None = None
        self._leases: k8s_client.CoordinationV1Api | None = None
        #: Set when a job needs housekeeping at once (cancelled by ``spec.active``, being
        #: deleted): the housekeeper waits on it instead of its next interval.
        self.attention = asyncio.Event()
        self._cache = _Cache(self.attention.set)
        self._resource_version: str | None = None
        self._synced = asyncio.Event()
        self._watch_task: asyncio.Task | None = None
        self._watch_error: str | None = None
        #: Full lists of the namespace so far (1 at open; one more per 410 Gone).
        self.relists = 0

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        self._api = await make_api_client(self.kubeconfig, self.in_cluster, self.connections)
        self._objects = k8s_client.CustomObjectsApi(self._api)
        self._core = k8s_client.CoreV1Api(self._api)
        self._leases = k8s_client.CoordinationV1Api(self._api)
        try:
            await until_available(self._relist, "kube-apiserver (GenerationJobs)")
        except BaseException:  # gave up (or cancelled): nothing half-open is left behind
            api, self._api = self._api, None
            self._objects = self._core = self._leases = None
            await api.close()
            raise
        self._watch_task = asyncio.create_task(self._watch(), name=f"genq-watch-{self.namespace}")

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
            self._watch_task = None
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def ping(self) -> None:
        await self._call(self._objects_api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, limit=1)

    @property
    def _objects_api(self) -> k8s_client.CustomObjectsApi:
        if self._objects is None:
            raise Unavailable("job store is closed")
        return self._objects

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One apiserver request; transport trouble and 5xx/429 become ``Unavailable``."""
        try:
            return await fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as e:
            if e.status in (429, 500, 502, 503, 504):
                raise Unavailable(f"kube-apiserver: {e.status} {e.reason}") from e
            if e.status == 507:
                raise StorageFull(f"kube-apiserver: {e.reason}") from e
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise Unavailable(f"kube-apiserver: {e!r}") from e

    # -- the watch ---------------------------------------------------------------------
    async def _relist(self) -> None:
        cache = _Cache(self.attention.set)
        cont: str | None = None
        while True:
            kw = {"limit": 500, **({"_continue": cont} if cont else {})}
            page = await self._call(self._objects_api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, **kw)
            for obj in page.get("items") or ():
                self._put_object(obj, cache)
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                break
        # Own writes made while the list ran (newer than its snapshot) are kept; anything
        # else the list lacks was deleted meanwhile.
        snapshot = int(page["metadata"]["resourceVersion"])
        for name, job in self._cache.jobs.items():
            if job.version > snapshot and (name not in cache.jobs or cache.jobs[name].version < job.version):
                cache.put(job, self._cache.generation.get(name, 1), force=True)
        cache.tombstones.update(self._cache.tombstones)
        self._cache = cache
        self._resource_version = page["metadata"]["resourceVersion"]
        self.relists += 1
        self._synced.set()

    def _put_object(self, obj: dict[str, Any], cache: _Cache | None = None) -> Job | None:
        try:
            job = resource_to_job(obj, self.uri_base)
        except (KeyError, ValueError, TypeError) as e:  # not one genq can read
            log.warning("ignoring GenerationJob %s: %r", obj.get("metadata", {}).get("name"), e)
            return None
        return (cache or self._cache).put(job, int(obj["metadata"].get("generation") or 1))

    async def _watch(self) -> None:
        """Follow the namespace's GenerationJobs from the last resourceVersion; relist when
        the apiserver no longer has it (410 Gone), back off while it is unreachable."""
        delay = 0.2
        while True:
            try:
                if self._resource_version is None:
                    await self._relist()
                await self._watch_once()
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except _Gone:
                self._resource_version = None
            except Exception as e:  # apiserver away: keep the cache, retry
                self._watch_error = repr(e)
                log.debug("watch of GenerationJobs failed (%r); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    async def _watch_once(self) -> None:
        resp = await self._objects_api.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, watch=True, resource_version=self._resource_version,
            allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS, _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT, sock_read=WATCH_SECONDS + 30),
        )
        try:
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self._on_event(json.loads(line))
        finally:
            resp.release()

    def _on_event(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise RuntimeError(f"watch error: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self._put_object(obj)
        elif kind == "DELETED":
            self._cache.remove(obj["metadata"]["name"], int(rv or 0))
        if rv:
            self._resource_version = rv

    # -- jobs --------------------------------------------------------------------------
    async def create(self, job: Job) -> Job:
        job = job.evolve(seq=queue_sequence(job.created_at))
        body = job_to_resource(job, self.namespace, self.uri_base)
        obj = await self._call(self._objects_api.create_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, body)
        self._put_object(obj)
        created = job.evolve(version=int(obj["metadata"].get("resourceVersion") or 0))
        # A new queued job reads right without a status (the annotations carry its attempt
        # budget and seed): its first status write is the next update (the API's
        # stream_seq), one apiserver write per submit saved. Anything else is written now.
        if not (job.status is Status.QUEUED and job.stream_seq is None and not job.attempts and job.worker is None
                and not job.results and job.error is None and job.started_at is None):
            for _ in range(CAS_ATTEMPTS):
                body = {**obj, "status": job_status(created, int(obj["metadata"].get("generation") or 1), self.uri_base)}
                try:
                    obj = await self._call(self._objects_api.replace_namespaced_custom_object_status,
                                           GROUP, VERSION, self.namespace, PLURAL, obj["metadata"]["name"], body)
                    break
                except ApiException as e:
                    if e.status != 409:
                        raise
                    obj = await self._call(self._objects_api.get_namespaced_custom_object,
                                           GROUP, VERSION, self.namespace, PLURAL, obj["metadata"]["name"])
                    if obj.get("status"):
                        break
        return self._put_object(obj) or created

    async def get(self, job_id: str, *, fresh: bool = False) -> Job | None:
        await self._synced.wait()
        job = self._cache.jobs.get(resource_name(job_id))
        if job is None and fresh:  # created by another process, not on our watch yet
            job = await self._read(resource_name(job_id))
        return job

    async def _read(self, name: str) -> Job | None:
        """The job as the apiserver has it now (after a lost race, or a cache miss)."""
        try:
            obj = await self._call(self._objects_api.get_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return self._put_object(obj)

    async def transition(
        self,
        job_id: str,
        expect: Iterable[Status],
        *,
        version: int | None = None,
        guard: Callable[[Job], bool] | None = None,
        requeue: bool = False,
        **changes: Any,
    ) -> Job | None:
        return await self._cas(job_id, {Status(s) for s in expect}, version, guard, requeue, changes)

    async def update(
        self, job_id: str, *, version: int | None = None, guard: Callable[[Job], bool] | None = None, **changes: Any
    ) -> Job | None:
        return await self._cas(job_id, None, version, guard, False, changes)

    async def _cas(
        self,
        job_id: str,
        expect: set[Status] | None,
        version: int | None,
        guard: Callable[[Job], bool] | None,
        requeue: bool,
        changes: dict[str, Any],
    ) -> Job | None:
        bad = set(changes) - _UPDATABLE
        if bad:
            raise ValueError(f"cannot change {sorted(bad)}")
        name = resource_name(job_id)
        current = self._cache.jobs.get(name)
        fresh = False
        for _ in range(CAS_ATTEMPTS):
            if current is None:
                if fresh:
                    return None
                current, fresh = await self._read(name), True
                continue
            if not cas_allows(current, expect, version, guard):
                if fresh:
                    return None
                # The cache may lag behind another writer: decide on the apiserver's copy.
                current, fresh = await self._read(name), True
                continue
            new = current.evolve(**changes)
            for f in _SPEC_FIXED:
                if getattr(new, f) != getattr(current, f):
                    raise ValueError(f"{f} is immutable in a GenerationJob")
            if requeue:
                new = new.evolve(seq=queue_sequence())
            version_now = current.version
            if new.status is Status.QUEUED and current.terminal and not current.active:
                # A retry of a job cancelled by spec.active: active again first, so that
                # housekeeping never sees it queued and inactive (it would cancel it).
                reactivated = await self._patch_spec(name, {"active": True})
                if reactivated is not None:
                    version_now = reactivated.version
            body = {
                "apiVersion": API_VERSION, "kind": constants.GENERATIONJOB_KIND,
                "metadata": {"name": name, "namespace": self.namespace, "resourceVersion": str(version_now)},
                "status": job_status(new, self._cache.generation.get(name, 1), self.uri_base),
            }
            try:
                obj = await self._call(self._objects_api.replace_namespaced_custom_object_status,
                                       GROUP, VERSION, self.namespace, PLURAL, name, body)
            except ApiException as e:
                if e.status == 404:
                    self._cache.remove(name, current.version)
                    return None
                if e.status != 409:
                    raise
                if version is not None:
                    return None
                current, fresh = await self._read(name), True
                continue
            written = self._put_object(obj)
            spec: dict[str, Any] = {}
            if (new.ttl_seconds, new.deadline_seconds) != (current.ttl_seconds, current.deadline_seconds):
                spec["ttlSecondsAfterFinished"] = max(0, math.ceil(new.ttl_seconds))
                spec["activeDeadlineSeconds"] = max(1, math.ceil(new.deadline_seconds)) if new.deadline_seconds else None
            if new.status is Status.CANCELLED and current.status is not Status.CANCELLED and current.active:
                spec["active"] = False  # cancelled through the API: kubectl shows it too
            if spec:
                written = await self._patch_spec(name, spec) or written
            return written
        return None

    async def _patch_spec(self, name: str, spec: dict[str, Any]) -> Job | None:
        """Retention, deadline and ``active`` live in the spec (a user may edit them with
        kubectl); the rare change of one by the store is a separate merge patch. Only the
        API and the operator change them: a worker never does (its Role has no patch)."""
        obj = await self._call(self._objects_api.patch_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name,
                               {"spec": spec}, _content_type="application/merge-patch+json")
        return self._put_object(obj)

    async def delete(self, job_id: str) -> None:
        """Delete the GenerationJob and release genq's finalizer on it (the caller has
        removed its objects): two requests, the second only while the finalizer holds."""
        name = resource_name(job_id)
        try:
            obj = await self._call(self._objects_api.delete_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as e:
            if e.status != 404:
                raise
            obj = {}
        for _ in range(CAS_ATTEMPTS):
            meta = obj.get("metadata") or {}
            finalizers = meta.get("finalizers") or []
            if constants.JOB_FINALIZER not in finalizers:
                break
            # A merge patch replaces the list whole: keep others' finalizers, and make it
            # conditional on the version read so a concurrent change is not overwritten.
            body = {"metadata": {"finalizers": [f for f in finalizers if f != constants.JOB_FINALIZER] or None,
                                 "resourceVersion": meta.get("resourceVersion")}}
            try:
                obj = await self._call(self._objects_api.patch_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                       PLURAL, name, body, _content_type="application/merge-patch+json")
            except ApiException as e:
                if e.status == 404:
                    obj = {}
                    break
                if e.status != 409:
                    raise
                try:
                    obj = await self._call(self._objects_api.get_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                           PLURAL, name)
                except ApiException as e2:
                    if e2.status != 404:
                        raise
                    obj = {}
                    break
        rv = int((obj.get("metadata") or {}).get("resourceVersion") or 0)
        current = self._cache.jobs.get(name)
        self._cache.remove(name, max(rv, current.version if current else 0))

    async def list(self, flt: JobFilter, *, limit: int, cursor: str | None, order: str) -> Page:
        """From the cache's sorted id indexes (per owner, or all): no sort per request."""
        await self._synced.wait()
        from genq.adapters.sqlite import decode_cursor, encode_cursor

        cache = self._cache
        ids = cache.owner_ids.get(flt.owner, SortedList()) if flt.owner is not None else cache.ids
        plain = flt.status is None and flt.tool is None and flt.created_after is None and flt.created_before is None

        def keep(job_id: str) -> bool:
            j = cache.jobs.get(resource_name(job_id))
            return j is not None and (
                (flt.status is None or j.status is flt.status)
                and (flt.tool is None or j.tool == flt.tool)
                and (flt.created_after is None or j.created_at > flt.created_after)
                and (flt.created_before is None or j.created_at < flt.created_before)
            )

        total = len(ids) if plain else sum(1 for i in ids if keep(i))
        desc = order == "desc"
        after = decode_cursor(cursor) if cursor else None
        if after is None:
            walk = ids.irange(reverse=desc)
        elif desc:
            walk = ids.irange(maximum=after, inclusive=(True, False), reverse=True)
        else:
            walk = ids.irange(minimum=after, inclusive=(False, True))
        jobs: list[Job] = []
        more = False
        for job_id in walk:
            if not (plain or keep(job_id)):
                continue
            if len(jobs) == limit:
                more = True
                break
            jobs.append(cache.jobs[resource_name(job_id)])
        return Page(jobs=jobs, next_cursor=encode_cursor(jobs[-1].id) if more and jobs else None, total=total)

    async def position(self, job: Job) -> int | None:
        await self._synced.wait()
        name = resource_name(job.id)
        cached = self._cache.jobs.get(name)
        if cached is None or cached.status is not Status.QUEUED:
            return None
        return self._cache.queued[cached.tool].bisect_left((cached.priority.rank, cached.seq, name)) + 1

    async def counts(self, tool: str) -> ToolCounts:
        await self._synced.wait()
        done = self._cache.done.get(tool, Counter())
        return ToolCounts(
            queued=len(self._cache.queued.get(tool, ())),
            running=len(self._cache.running.get(tool, ())),
            succeeded=done[Status.SUCCEEDED],
            failed=done[Status.FAILED],
            cancelled=done[Status.CANCELLED],
        )

    async def queued_count(self, tool: str) -> int:
        await self._synced.wait()
        return len(self._cache.queued.get(tool, ()))

    async def owner_active(self, owner: str) -> int:
        await self._synced.wait()
        return self._cache.owner_queued.get(owner, 0)

    async def recent_durations(self, tool: str, limit: int = 50) -> list[float]:
        await self._synced.wait()
        recent = self._cache.finished.get(tool, SortedList())
        out = []
        for _, name in reversed(recent[-limit:] if limit else []):
            j = self._cache.jobs[name]
            out.append(j.completed_at - j.started_at)
        return out

    async def due(self, now: float, *, heartbeat_before: float, unpublished_before: float, limit: int = 500) -> list[Job]:
        """From the cache's indexes (no apiserver request, no scan of every job): expired,
        running past a deadline or silent, unpublished, cancelled with ``spec.active`` or
        being deleted."""
        await self._synced.wait()
        cache = self._cache
        names: dict[str, None] = {}  # ordered, no repeats
        for name in cache.attention:
            names[name] = None
        for expires_at, name in cache.expiring:
            if expires_at > now:
                break
            names[name] = None
        for running in cache.running.values():
            for name in running:
                j = cache.jobs[name]
                if (j.deadline_seconds and j.started_at is not None and j.started_at + j.deadline_seconds <= now) or (
                        j.heartbeat_at is not None and j.heartbeat_at < heartbeat_before):
                    names[name] = None
        for name in cache.unpublished:
            if cache.jobs[name].created_at < unpublished_before:
                names[name] = None
        return [cache.jobs[n] for n in list(names)[:limit] if n in cache.jobs]

    # -- idempotency: one ConfigMap per (owner, key) -------------------------------------
    def _idem_name(self, owner: str, key: str) -> str:
        return constants.IDEMPOTENCY_OBJECT_PREFIX + hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()[:40]

    async def _idem_read(self, name: str) -> Any | None:
        assert self._core is not None
        try:
            return await self._call(self._core.read_namespaced_config_map, name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def idempotency_get(self, owner: str, key: str) -> tuple[str, str] | None:
        cm = await self._idem_read(self._idem_name(owner, key))
        if cm is None or float(cm.data["expires_at"]) <= time.time():
            return None
        return cm.data["body_hash"], cm.data["job_id"]

    async def idempotency_put(self, owner: str, key: str, body_hash: str, job_id: str, expires_at: float) -> tuple[str, str]:
        assert self._core is not None
        name = self._idem_name(owner, key)
        body = {
            "metadata": {"name": name, "labels": {constants.LABEL_COMPONENT: "idempotency", constants.LABEL_MANAGED_BY: constants.MANAGED_BY}},
            "data": {"owner": owner, "body_hash": body_hash, "job_id": job_id, "expires_at": repr(expires_at)},
        }
        for _ in range(CAS_ATTEMPTS):
            try:
                await self._call(self._core.create_namespaced_config_map, self.namespace, body)
                return body_hash, job_id
            except ApiException as e:
                if e.status != 409:
                    raise
            cm = await self._idem_read(name)
            if cm is None:
                continue
            if float(cm.data["expires_at"]) > time.time():
                return cm.data["body_hash"], cm.data["job_id"]
            with contextlib.suppress(ApiException):  # expired: remove exactly that record, then race again
                await self._call(self._core.delete_namespaced_config_map, name, self.namespace,
                                 body=k8s_client.V1DeleteOptions(preconditions=k8s_client.V1Preconditions(
                                     resource_version=cm.metadata.resource_version)))
        raise Unavailable("idempotency record kept changing")

    async def idempotency_delete(self, owner: str, key: str, job_id: str) -> None:
        assert self._core is not None
        name = self._idem_name(owner, key)
        cm = await self._idem_read(name)
        if cm is not None and cm.data.get("job_id") == job_id:
            with contextlib.suppress(ApiException):
                await self._call(self._core.delete_namespaced_config_map, name, self.namespace,
                                 body=k8s_client.V1DeleteOptions(preconditions=k8s_client.V1Preconditions(
                                     resource_version=cm.metadata.resource_version)))

    # -- workers: one Lease per worker ---------------------------------------------------
    def _lease_name(self, worker_id: str) -> str:
        slug = re.sub(r"[^a-z0-9-]+", "-", worker_id.lower()).strip("-")[:40]
        return f"{constants.WORKER_LEASE_PREFIX}{slug}-{hashlib.sha256(worker_id.encode()).hexdigest()[:8]}"

    async def worker_seen(self, worker_id: str, tool: str, slots: int, now: float) -> None:
        assert self._leases is not None
        name = self._lease_name(worker_id)
        renew = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        body = {
            "metadata": {"name": name, "labels": {constants.LABEL_TOOL: tool, constants.LABEL_COMPONENT: "worker",
                                                  constants.LABEL_MANAGED_BY: constants.MANAGED_BY},
                         "annotations": {constants.ANNOTATION_SLOTS: str(slots)}},
            "spec": {"holderIdentity": worker_id, "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
        }
        try:
            await self._call(self._leases.patch_namespaced_lease, name, self.namespace, body,
                             _content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status != 404:
                raise
            with contextlib.suppress(ApiException):
                await self._call(self._leases.create_namespaced_lease, self.namespace, body)

    async def worker_gone(self, worker_id: str) -> None:
        assert self._leases is not None
        with contextlib.suppress(ApiException):
            await self._call(self._leases.delete_namespaced_lease, self._lease_name(worker_id), self.namespace)

    async def record_event(self, job: Job, reason: str, message: str, *, warning: bool = False) -> None:
        """A core/v1 Event on the GenerationJob (``kubectl describe gjob``, ``kubectl get
        events``), reason in CamelCase. Best effort: an Event is never worth a failure."""
        now = datetime.datetime.now(datetime.timezone.utc)
        name = resource_name(job.id)
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": self.namespace},
            "involvedObject": {"apiVersion": API_VERSION, "kind": constants.GENERATIONJOB_KIND, "name": name,
                               "namespace": self.namespace},
            "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "source": {"component": constants.FIELD_MANAGER},
            "firstTimestamp": now.isoformat().replace("+00:00", "Z"), "lastTimestamp": now.isoformat().replace("+00:00", "Z"),
            "count": 1,
        }
        try:
            assert self._core is not None
            await self._call(self._core.create_namespaced_event, self.namespace, body)
        except Exception as e:
            log.debug("event %s on %s not recorded: %r", reason, name, e)

    async def workers_alive(self, tool: str, since: float) -> int:
        assert self._leases is not None
        leases = await self._call(self._leases.list_namespaced_lease, self.namespace,
                                  label_selector=f"{constants.LABEL_TOOL}={tool},{constants.LABEL_COMPONENT}=worker")
        total = 0
        for lease in leases.items:
            renew = lease.spec.renew_time
            if renew is not None and renew.timestamp() >= since:
                total += int((lease.metadata.annotations or {}).get(constants.ANNOTATION_SLOTS, "0"))
        return total


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


async def make_api_client(kubeconfig: Path | str | None, in_cluster: bool | None, connections: int) -> k8s_client.ApiClient:
    """An ApiClient from a kubeconfig file, the pod's service account (in a cluster), or
    the default kubeconfig — in that order of preference when not told."""
    cfg = k8s_client.Configuration()
    if in_cluster is None:
        in_cluster = kubeconfig is None and Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
    if in_cluster:
        k8s_config.load_incluster_config(client_configuration=cfg)
    else:
        await k8s_config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None, client_configuration=cfg)
    # No client-side rate limiter exists in kubernetes_asyncio; this bounds concurrency.
    cfg.connection_pool_maxsize = connections
    return k8s_client.ApiClient(cfg)


# -- API keys: Secrets -----------------------------------------------------------------------


class KubernetesKeyStore:
    """API keys as Secrets (label ``genq.io/component=api-key``): only the key's hash is
    stored. ``key_by_hash`` runs on every request, so keys are held in memory and re-listed
    at most every ``refresh`` seconds (and at once on a miss, so a new key works at once on
    every replica; a deleted key stops working within ``refresh`` on other replicas)."""

    SELECTOR = f"{constants.LABEL_COMPONENT}=api-key"

    def __init__(self, store: KubernetesStore, refresh: float = 2.0):
        self.store = store
        self.refresh = refresh
        self._keys: dict[str, ApiKey] = {}
        self._loaded = 0.0
        self._lock = asyncio.Lock()

    @property
    def _core(self) -> k8s_client.CoreV1Api:
        if self.store._core is None:
            raise Unavailable("key store is closed")
        return self.store._core

    def _name(self, key_id: str) -> str:
        return "genq-key-" + re.sub(r"[^a-z0-9-]+", "-", key_id.lower()).strip("-")[:40] + "-" + hashlib.sha256(key_id.encode()).hexdigest()[:8]

    async def _load(self, force: bool = False) -> None:
        async with self._lock:
            if not force and time.monotonic() - self._loaded < self.refresh:
                return
            secrets = await self.store._call(self._core.list_namespaced_secret, self.store.namespace, label_selector=self.SELECTOR)
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
        await self.store._call(self._core.create_namespaced_secret, self.store.namespace, body)
        self._keys[key.key_hash] = key
        return key

    async def key_by_hash(self, key_hash: str) -> ApiKey | None:
        await self._load()
        if key_hash not in self._keys and time.monotonic() - self._loaded > 0.2:
            await self._load(force=True)
        return self._keys.get(key_hash)

    async def list_keys(self) -> list[ApiKey]:
        await self._load(force=True)
        return sorted(self._keys.values(), key=lambda k: k.created_at)

    async def delete_key(self, key_id: str) -> bool:
        try:
            await self.store._call(self._core.delete_namespaced_secret, self._name(key_id), self.store.namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        self._keys = {h: k for h, k in self._keys.items() if k.id != key_id}
        return True


# -- the tools: the namespace's ToolPools ------------------------------------------------------


class ToolPoolRegistry:
    """Keeps a :class:`~genq.tools.Registry` equal to the ToolPools of the store's namespace:
    the API's (and operator's) tools in a cluster, where the pools are declared once, as
    resources. A list every ``refresh`` seconds (pools change rarely; a watch would hold a
    connection per process for nothing); a pool whose spec does not parse is skipped with
    a warning, and the last good set is kept while the apiserver is away."""

    def __init__(self, store: KubernetesStore, registry: Any, refresh: float = 5.0):
        self.store = store
        self.registry = registry
        self.refresh = refresh
        self._task: asyncio.Task | None = None
        self._invalid: set[str] = set()

    async def load(self) -> list[Any]:
        from genq.tools import ToolSpec

        page = await self.store._call(self.store._objects_api.list_namespaced_custom_object, GROUP, VERSION,
                                      self.store.namespace, constants.TOOLPOOL_PLURAL)
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

    def start(self, on_change: Callable[[Any], Awaitable[None]]) -> None:
        self._task = asyncio.create_task(self._run(on_change), name="genq-toolpools")

    async def _run(self, on_change: Callable[[Any], Awaitable[None]]) -> None:
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
