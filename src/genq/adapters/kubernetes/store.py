"""``JobStore`` on Kubernetes: one ``GenerationJob`` custom resource per job, in one namespace.

Writes go to the apiserver: ``create`` posts the resource (and writes its first status
only when it must); every status move is a compare-and-set — a PUT of the ``/status``
subresource carrying the ``resourceVersion`` that was read, which the apiserver refuses
with 409 when anyone wrote in between; on 409 the job is read afresh and ``expect`` /
``version`` / ``guard`` are checked again (:func:`genq.models.cas_allows`, as the SQLite
store does). ``Job.version`` is the resource's ``resourceVersion`` (an etcd revision:
numeric, and only compared for equality and recency here). Reads are answered from the
watch-fed cache (:mod:`.cache`), which this store's own writes update at once.

Idempotency records are ConfigMaps (create is first-writer-wins) and worker liveness is a
Lease per worker; both are small and only written on submit with an Idempotency-Key or
every few seconds per worker.

Neighbours: implements :class:`genq.ports.JobStore`; :mod:`.mapping` builds what it
writes, :mod:`.cache` holds what it reads, :mod:`.client` makes the requests; the names
it writes are in :mod:`genq.constants`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio.client.exceptions import ApiException
from sortedcontainers import SortedList

from genq import constants
from genq.adapters.kubernetes import mapping
from genq.adapters.kubernetes.cache import JobCache, Watch
from genq.adapters.kubernetes.client import Kube
from genq.cursor import decode_cursor, encode_cursor
from genq.models import MUTABLE_FIELDS, Job, Status, cas_allows, rfc3339
from genq.ports import JobFilter, JobStore, Page, ToolCounts, Unavailable

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = mapping.GROUP, mapping.VERSION, mapping.PLURAL
resource_name = mapping.resource_name

#: Attempts of one compare-and-set against concurrent writers before giving up.
CAS_ATTEMPTS = 8
_NOT_FOUND, _CONFLICT = 404, 409
_MERGE = "application/merge-patch+json"


class KubernetesStore(JobStore):
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
        self.uri_base = uri_base
        #: The connection, shared with :class:`~.keys.KubernetesKeyStore` and
        #: :class:`~.toolpools.ToolPoolRegistry`.
        self.kube = Kube(namespace, kubeconfig=kubeconfig, in_cluster=in_cluster, connections=connections)
        #: Set when a job needs housekeeping at once (cancelled by ``spec.active``, being
        #: deleted): the housekeeper waits on it instead of its next interval.
        self.attention = asyncio.Event()
        self.watch = Watch(self.kube, uri_base, self.attention.set)

    @property
    def cache(self) -> JobCache:
        """The jobs as the watch (and this store's own writes) last saw them."""
        return self.watch.cache

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        await self.kube.open()
        try:
            await self.watch.start()
        except BaseException:  # gave up (or cancelled): nothing half-open is left behind
            await self.kube.close()
            raise

    async def close(self) -> None:
        await self.watch.stop()
        await self.kube.close()

    async def ping(self) -> None:
        await self._objects("list_namespaced_custom_object", limit=1)

    async def _objects(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One request on this namespace's GenerationJobs (``method`` of CustomObjectsApi)."""
        fn = getattr(self.kube.objects, method)
        return await self.kube.call(fn, GROUP, VERSION, self.namespace, PLURAL, *args, **kwargs)

    # -- jobs --------------------------------------------------------------------------
    async def create(self, job: Job) -> Job:
        job = job.evolve(seq=mapping.queue_sequence(job.created_at))
        obj = await self._objects("create_namespaced_custom_object", mapping.job_to_resource(job, self.namespace, self.uri_base))
        self.watch.put_object(obj)
        created = job.evolve(version=int(obj["metadata"].get("resourceVersion") or 0))
        if mapping.needs_first_status(job):
            obj = await self._first_status(obj, created)
        return self.watch.put_object(obj) or created

    async def _first_status(self, obj: dict[str, Any], created: Job) -> dict[str, Any]:
        for _ in range(CAS_ATTEMPTS):
            body = {**obj, "status": mapping.job_status(created, int(obj["metadata"].get("generation") or 1), self.uri_base)}
            try:
                return await self._objects("replace_namespaced_custom_object_status", obj["metadata"]["name"], body)
            except ApiException as e:
                if e.status != _CONFLICT:
                    raise
            obj = await self._objects("get_namespaced_custom_object", obj["metadata"]["name"])
            if obj.get("status"):
                break
        return obj

    async def get(self, job_id: str, *, fresh: bool = False) -> Job | None:
        await self.watch.synced.wait()
        job = self.cache.jobs.get(resource_name(job_id))
        if job is None and fresh:  # created by another process, not on our watch yet
            job = await self._read(resource_name(job_id))
        return job

    async def _read(self, name: str) -> Job | None:
        """The job as the apiserver has it now (after a lost race, or a cache miss)."""
        try:
            obj = await self._objects("get_namespaced_custom_object", name)
        except ApiException as e:
            if e.status == _NOT_FOUND:
                return None
            raise
        return self.watch.put_object(obj)

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
        bad = set(changes) - MUTABLE_FIELDS
        if bad:
            raise ValueError(f"cannot change {sorted(bad)}")
        name = resource_name(job_id)
        current = self.cache.jobs.get(name)
        fresh = False
        for _ in range(CAS_ATTEMPTS):
            if current is None or not cas_allows(current, expect, version, guard):
                if fresh:
                    return None
                # A miss, or a refusal by a cache that may lag behind another writer:
                # decide on the apiserver's copy.
                current, fresh = await self._read(name), True
                continue
            new = _evolved(current, changes, requeue)
            try:
                written = await self._write_status(name, current, new)
            except ApiException as e:
                if e.status == _NOT_FOUND:
                    self.cache.remove(name, current.version)
                    return None
                if e.status != _CONFLICT:
                    raise
                if version is not None:  # pinned to the version that just moved: a lost race
                    return None
                current, fresh = await self._read(name), True
                continue
            return await self._sync_spec(name, current, new) or written
        return None

    async def _write_status(self, name: str, current: Job, new: Job) -> Job | None:
        """PUT ``new``'s status, conditional on ``current``'s version (409 if it moved)."""
        version_now = current.version
        if new.status is Status.QUEUED and current.terminal and not current.active:
            # A retry of a job cancelled by spec.active: active again first, so that
            # housekeeping never sees it queued and inactive (it would cancel it).
            reactivated = await self._patch_spec(name, {"active": True})
            if reactivated is not None:
                version_now = reactivated.version
        body = {
            "apiVersion": mapping.API_VERSION, "kind": constants.GENERATIONJOB_KIND,
            "metadata": {"name": name, "namespace": self.namespace, "resourceVersion": str(version_now)},
            "status": mapping.job_status(new, self.cache.generation.get(name, 1), self.uri_base),
        }
        return self.watch.put_object(await self._objects("replace_namespaced_custom_object_status", name, body))

    async def _sync_spec(self, name: str, current: Job, new: Job) -> Job | None:
        """The spec fields a move changed: retention and deadline, and ``active`` False
        when the API cancelled the job (so kubectl shows it too)."""
        spec: dict[str, Any] = {}
        if (new.ttl_seconds, new.deadline_seconds) != (current.ttl_seconds, current.deadline_seconds):
            spec.update(mapping.spec_times(new))
        if new.status is Status.CANCELLED and current.status is not Status.CANCELLED and current.active:
            spec["active"] = False
        return await self._patch_spec(name, spec) if spec else None

    async def _patch_spec(self, name: str, spec: dict[str, Any]) -> Job | None:
        """Retention, deadline and ``active`` live in the spec (a user may edit them with
        kubectl); the rare change of one by the store is a separate merge patch. Only the
        API and the operator change them: a worker never does (its Role has no patch)."""
        obj = await self._objects("patch_namespaced_custom_object", name, {"spec": spec}, _content_type=_MERGE)
        return self.watch.put_object(obj)

    async def delete(self, job_id: str) -> None:
        """Delete the GenerationJob and release genq's finalizer on it (the caller has
        removed its objects): two requests, the second only while the finalizer holds."""
        name = resource_name(job_id)
        try:
            obj = await self._objects("delete_namespaced_custom_object", name)
        except ApiException as e:
            if e.status != _NOT_FOUND:
                raise
            obj = {}
        for _ in range(CAS_ATTEMPTS):
            if constants.JOB_FINALIZER not in ((obj.get("metadata") or {}).get("finalizers") or ()):
                break
            obj = await self._release_finalizer(name, obj["metadata"])
        rv = int((obj.get("metadata") or {}).get("resourceVersion") or 0)
        current = self.cache.jobs.get(name)
        self.cache.remove(name, max(rv, current.version if current else 0))

    async def _release_finalizer(self, name: str, meta: dict[str, Any]) -> dict[str, Any]:
        """One try at removing genq's finalizer; the object as it is now ({} once gone).
        A merge patch replaces the list whole: keep others' finalizers, and make it
        conditional on the version read so a concurrent change is not overwritten."""
        body = {"metadata": {"finalizers": [f for f in meta.get("finalizers") or [] if f != constants.JOB_FINALIZER] or None,
                             "resourceVersion": meta.get("resourceVersion")}}
        try:
            return await self._objects("patch_namespaced_custom_object", name, body, _content_type=_MERGE)
        except ApiException as e:
            if e.status == _NOT_FOUND:
                return {}
            if e.status != _CONFLICT:
                raise
        try:
            return await self._objects("get_namespaced_custom_object", name)
        except ApiException as e:
            if e.status != _NOT_FOUND:
                raise
            return {}

    # -- reads, from the cache ---------------------------------------------------------
    async def list(self, flt: JobFilter, *, limit: int, cursor: str | None, order: str) -> Page:
        """From the cache's sorted id indexes (per owner, or all): no sort per request."""
        await self.watch.synced.wait()
        cache = self.cache
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
        await self.watch.synced.wait()
        name = resource_name(job.id)
        cached = self.cache.jobs.get(name)
        if cached is None or cached.status is not Status.QUEUED:
            return None
        return self.cache.queued[cached.tool].bisect_left((cached.priority.rank, cached.seq, name)) + 1

    async def counts(self, tool: str) -> ToolCounts:
        await self.watch.synced.wait()
        done = self.cache.done.get(tool, Counter())
        return ToolCounts(
            queued=len(self.cache.queued.get(tool, ())),
            running=len(self.cache.running.get(tool, ())),
            succeeded=done[Status.SUCCEEDED],
            failed=done[Status.FAILED],
            cancelled=done[Status.CANCELLED],
        )

    async def queued_count(self, tool: str) -> int:
        await self.watch.synced.wait()
        return len(self.cache.queued.get(tool, ()))

    async def owner_active(self, owner: str) -> int:
        await self.watch.synced.wait()
        return self.cache.owner_queued.get(owner, 0)

    async def recent_durations(self, tool: str, limit: int = 50) -> list[float]:
        await self.watch.synced.wait()
        recent = self.cache.finished.get(tool, SortedList())
        out = []
        for _, name in reversed(recent[-limit:] if limit else []):
            j = self.cache.jobs[name]
            out.append(j.completed_at - j.started_at)
        return out

    async def due(self, now: float, *, heartbeat_before: float, unpublished_before: float, limit: int = 500) -> list[Job]:
        """From the cache's indexes (no apiserver request, no scan of every job): expired,
        running past a deadline or silent, unpublished, cancelled with ``spec.active`` or
        being deleted."""
        await self.watch.synced.wait()
        cache = self.cache
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
        try:
            return await self.kube.call(self.kube.core.read_namespaced_config_map, name, self.namespace)
        except ApiException as e:
            if e.status == _NOT_FOUND:
                return None
            raise

    async def _idem_remove(self, name: str, cm: Any) -> None:
        """Delete exactly the record read (a precondition on its version); best effort."""
        with contextlib.suppress(ApiException):
            await self.kube.call(self.kube.core.delete_namespaced_config_map, name, self.namespace,
                                 body=k8s_client.V1DeleteOptions(preconditions=k8s_client.V1Preconditions(
                                     resource_version=cm.metadata.resource_version)))

    async def idempotency_get(self, owner: str, key: str) -> tuple[str, str] | None:
        cm = await self._idem_read(self._idem_name(owner, key))
        if cm is None or float(cm.data["expires_at"]) <= time.time():
            return None
        return cm.data["body_hash"], cm.data["job_id"]

    async def idempotency_put(self, owner: str, key: str, body_hash: str, job_id: str, expires_at: float) -> tuple[str, str]:
        name = self._idem_name(owner, key)
        body = {
            "metadata": {"name": name, "labels": {constants.LABEL_COMPONENT: "idempotency", constants.LABEL_MANAGED_BY: constants.MANAGED_BY}},
            "data": {"owner": owner, "body_hash": body_hash, "job_id": job_id, "expires_at": repr(expires_at)},
        }
        for _ in range(CAS_ATTEMPTS):
            try:
                await self.kube.call(self.kube.core.create_namespaced_config_map, self.namespace, body)
                return body_hash, job_id
            except ApiException as e:
                if e.status != _CONFLICT:
                    raise
            cm = await self._idem_read(name)
            if cm is None:
                continue
            if float(cm.data["expires_at"]) > time.time():
                return cm.data["body_hash"], cm.data["job_id"]
            await self._idem_remove(name, cm)  # expired: remove exactly that record, then race again
        raise Unavailable("idempotency record kept changing")

    async def idempotency_delete(self, owner: str, key: str, job_id: str) -> None:
        name = self._idem_name(owner, key)
        cm = await self._idem_read(name)
        if cm is not None and cm.data.get("job_id") == job_id:
            await self._idem_remove(name, cm)

    # -- workers: one Lease per worker ---------------------------------------------------
    def _lease_name(self, worker_id: str) -> str:
        slug = re.sub(r"[^a-z0-9-]+", "-", worker_id.lower()).strip("-")[:40]
        return f"{constants.WORKER_LEASE_PREFIX}{slug}-{hashlib.sha256(worker_id.encode()).hexdigest()[:8]}"

    async def worker_seen(self, worker_id: str, tool: str, slots: int, now: float) -> None:
        leases = self.kube.leases
        name = self._lease_name(worker_id)
        body = {
            "metadata": {"name": name, "labels": {constants.LABEL_TOOL: tool, constants.LABEL_COMPONENT: "worker",
                                                  constants.LABEL_MANAGED_BY: constants.MANAGED_BY},
                         "annotations": {constants.ANNOTATION_SLOTS: str(slots)}},
            # renewTime is a MicroTime: microseconds.
            "spec": {"holderIdentity": worker_id, "renewTime": rfc3339(now, digits=6)},
        }
        try:
            await self.kube.call(leases.patch_namespaced_lease, name, self.namespace, body, _content_type=_MERGE)
        except ApiException as e:
            if e.status != _NOT_FOUND:
                raise
            with contextlib.suppress(ApiException):
                await self.kube.call(leases.create_namespaced_lease, self.namespace, body)

    async def worker_gone(self, worker_id: str) -> None:
        with contextlib.suppress(ApiException):
            await self.kube.call(self.kube.leases.delete_namespaced_lease, self._lease_name(worker_id), self.namespace)

    async def workers_alive(self, tool: str, since: float) -> int:
        leases = await self.kube.call(self.kube.leases.list_namespaced_lease, self.namespace,
                                      label_selector=f"{constants.LABEL_TOOL}={tool},{constants.LABEL_COMPONENT}=worker")
        total = 0
        for lease in leases.items:
            renew = lease.spec.renew_time
            if renew is not None and renew.timestamp() >= since:
                total += int((lease.metadata.annotations or {}).get(constants.ANNOTATION_SLOTS, "0"))
        return total

    async def record_event(self, job: Job, reason: str, message: str, *, warning: bool = False) -> None:
        """A core/v1 Event on the GenerationJob (``kubectl describe gjob``, ``kubectl get
        events``), reason in CamelCase. Best effort: an Event is never worth a failure."""
        now = rfc3339(time.time(), digits=6)
        name = resource_name(job.id)
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": self.namespace},
            "involvedObject": {"apiVersion": mapping.API_VERSION, "kind": constants.GENERATIONJOB_KIND, "name": name,
                               "namespace": self.namespace},
            "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "source": {"component": constants.FIELD_MANAGER},
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            await self.kube.call(self.kube.core.create_namespaced_event, self.namespace, body)
        except Exception as e:
            log.debug("event %s on %s not recorded: %r", reason, name, e)


def _evolved(current: Job, changes: dict[str, Any], requeue: bool) -> Job:
    """``current`` with ``changes``; a new place in the queue on ``requeue``."""
    new = current.evolve(**changes)
    return new.evolve(seq=mapping.queue_sequence()) if requeue else new

