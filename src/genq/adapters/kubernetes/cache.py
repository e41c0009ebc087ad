"""Every GenerationJob of a namespace in memory, fed by a watch, with the indexes reads need.

Reads never go to the apiserver per request: a watch (list, then watch from the list's
resourceVersion with bookmarks; a relist on 410 Gone) keeps every job of the namespace
here, with a dispatch-order index per tool (priority, then ``queueSequence``) like the
SQLite store's, so ``get``, ``position``, ``counts``, ``queued_count``, ``owner_active``,
``recent_durations``, ``due`` and ``list`` are answered from memory. The store puts the
result of its own writes here at once, and :meth:`JobCache.put` keeps the newer of two
versions of a job, so a later, older watch event never undoes a write (or a delete).

Neighbours: :mod:`.store` reads these indexes and owns the :class:`Watch`; :mod:`.mapping`
turns each object into a :class:`~genq.models.Job`; :mod:`.client` makes the requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from sortedcontainers import SortedList

from genq.adapters.kubernetes import mapping
from genq.adapters.kubernetes.client import REQUEST_TIMEOUT, Kube
from genq.models import Job, Status
from genq.ports import until_available

log = logging.getLogger(__name__)

#: Seconds one watch request stays open (the server ends it then; it is resumed from the
#: last resourceVersion). Below the apiserver's own 30-60 min limit, above any idle gap.
WATCH_SECONDS = 300
#: Deleted jobs remembered so a late watch event cannot bring one back; a watch event is
#: never older than the last few thousand deletes.
TOMBSTONES = 10_000
#: Objects per page of a full list.
_PAGE = 500
#: The apiserver's answer to a watch from a resourceVersion it no longer has.
_GONE = 410


class JobCache:
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
        name = mapping.resource_name(job.id)
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
        if len(self.tombstones) > TOMBSTONES:  # only late events of recent deletes matter
            for stale in list(self.tombstones)[: TOMBSTONES // 2]:
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


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class Watch:
    """Keeps :attr:`cache` equal to the namespace's GenerationJobs: a full list at
    :meth:`start`, then a watch resumed from the last resourceVersion; a relist when the
    apiserver no longer has it (410 Gone); backing off while it is unreachable."""

    def __init__(self, kube: Kube, uri_base: str, on_attention: Callable[[], None] | None = None):
        self.kube = kube
        self.uri_base = uri_base
        self.on_attention = on_attention
        self.cache = JobCache(on_attention)
        #: Set once the first full list is in: reads wait for it.
        self.synced = asyncio.Event()
        self.resource_version: str | None = None
        self.task: asyncio.Task | None = None
        self.last_error: str | None = None
        #: Full lists of the namespace so far (1 at open; one more per 410 Gone).
        self.relists = 0

    async def start(self) -> None:
        """List (waiting for the apiserver if it is away), then follow in a task."""
        await until_available(self.relist, "kube-apiserver (GenerationJobs)")
        self.task = asyncio.create_task(self.run(), name=f"genq-watch-{self.kube.namespace}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    def put_object(self, obj: dict[str, Any], cache: JobCache | None = None) -> Job | None:
        """Put a GenerationJob the apiserver returned; None if genq cannot read it."""
        try:
            job = mapping.resource_to_job(obj, self.uri_base)
        except (KeyError, ValueError, TypeError) as e:  # not one genq can read
            log.warning("ignoring GenerationJob %s: %r", obj.get("metadata", {}).get("name"), e)
            return None
        return (cache or self.cache).put(job, int(obj["metadata"].get("generation") or 1))

    async def relist(self) -> None:
        kube = self.kube
        cache = JobCache(self.on_attention)
        cont: str | None = None
        while True:
            kw = {"limit": _PAGE, **({"_continue": cont} if cont else {})}
            page = await kube.call(kube.objects.list_namespaced_custom_object, mapping.GROUP, mapping.VERSION,
                                   kube.namespace, mapping.PLURAL, **kw)
            for obj in page.get("items") or ():
                self.put_object(obj, cache)
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                break
        # Own writes made while the list ran (newer than its snapshot) are kept; anything
        # else the list lacks was deleted meanwhile.
        snapshot = int(page["metadata"]["resourceVersion"])
        for name, job in self.cache.jobs.items():
            if job.version > snapshot and (name not in cache.jobs or cache.jobs[name].version < job.version):
                cache.put(job, self.cache.generation.get(name, 1), force=True)
        cache.tombstones.update(self.cache.tombstones)
        self.cache = cache
        self.resource_version = page["metadata"]["resourceVersion"]
        self.relists += 1
        self.synced.set()

    async def run(self) -> None:
        """Follow the namespace's GenerationJobs until cancelled."""
        delay = 0.2
        while True:
            try:
                if self.resource_version is None:
                    await self.relist()
                await self._watch_once()
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except _Gone:
                self.resource_version = None
            except Exception as e:  # apiserver away: keep the cache, retry
                self.last_error = repr(e)
                log.debug("watch of GenerationJobs failed (%r); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    async def _watch_once(self) -> None:
        resp = await self.kube.objects.list_namespaced_custom_object(
            mapping.GROUP, mapping.VERSION, self.kube.namespace, mapping.PLURAL, watch=True,
            resource_version=self.resource_version, allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
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
            if obj.get("code") == _GONE:
                raise _Gone()
            raise RuntimeError(f"watch error: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self.put_object(obj)
        elif kind == "DELETED":
            self.cache.remove(obj["metadata"]["name"], int(rv or 0))
        if rv:
            self.resource_version = rv
