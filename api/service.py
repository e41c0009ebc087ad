"""What the job routes do, apart from HTTP: submit, read with position and ETA, wait,
cancel, retry.

Neighbours: the routes (:mod:`genq.api.routes.jobs`) parse and answer; this module talks
to the ports of a :class:`genq.runtime.Runtime` and moves a job's status only through
:mod:`genq.lifecycle`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ulid import ULID

from genq import constants, images, lifecycle
from genq.api.auth import Principal
from genq.api.errors import ApiError, not_found
from genq.api.schemas import job_public
from genq.models import FileRef, Job, Priority, Status
from genq.ports import Unavailable
from genq.runtime import Runtime
from genq.tools import ParamsError, ToolSpec, coerce_form_params, validate_params

log = logging.getLogger(__name__)


@dataclass
class Upload:
    """One input file as received, before checking."""

    field: str
    data: bytes


@dataclass
class Submission:
    tool: str
    variant: str | None
    params: dict[str, Any]
    form_params: dict[str, str]
    uploads: list[Upload]
    priority: Priority
    wait: float


@dataclass
class _Request:
    """A submission that passed :meth:`JobService._validate`."""

    spec: ToolSpec
    variant: str
    raw_params: dict[str, Any]
    params: dict[str, Any]
    images: list[images.CheckedImage]
    seed: int | None


class JobService:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.settings = rt.settings
        self._avg_cache: dict[str, tuple[float, float | None]] = {}
        self._slots_cache: dict[str, tuple[float, int]] = {}
        self._image_checks = asyncio.Semaphore(4)

    # -- reading -----------------------------------------------------------------------
    async def load(self, job_id: str, principal: Principal) -> Job:
        if len(job_id) > 64:
            raise not_found()
        job = await self.rt.store.get(job_id)
        if job is None or (job.owner != principal.id and not principal.admin):
            raise not_found()
        return job

    async def public(self, job: Job) -> dict[str, Any]:
        position = eta = None
        if job.status is Status.QUEUED:
            position = await self.rt.store.position(job)
            avg = await self.avg_duration(job.tool)
            slots = await self.live_slots(job.tool)
            if avg is not None and position is not None and slots > 0:
                eta = math.ceil(position / slots) * avg
        elif job.status is Status.RUNNING:
            avg = await self.avg_duration(job.tool)
            if avg is not None:
                eta = max(0.0, avg - (time.time() - (job.started_at or time.time())))
        return job_public(job, position=position, eta=eta)

    async def avg_duration(self, tool: str) -> float | None:
        now = time.monotonic()
        cached = self._avg_cache.get(tool)
        if cached and cached[0] > now:
            return cached[1]
        durations = await self.rt.store.recent_durations(tool)
        avg = sum(durations) / len(durations) if durations else None
        self._avg_cache[tool] = (now + 2.0, avg)
        return avg

    async def live_slots(self, tool: str) -> int:
        now = time.monotonic()
        cached = self._slots_cache.get(tool)
        if cached and cached[0] > now:
            return cached[1]
        # Three missed beats, and never under 5 s: a loaded apiserver delays Lease renewals.
        since = time.time() - max(3 * self.settings.worker_heartbeat_seconds, 5.0)
        slots = await self.rt.store.workers_alive(tool, since)
        spec = self.rt.registry.get(tool)
        if spec is not None:
            slots = min(slots, spec.capacity)
        self._slots_cache[tool] = (now + 2.0, slots)
        return slots

    # -- submit ------------------------------------------------------------------------
    def spec_for(self, tool: str) -> ToolSpec:
        spec = self.rt.registry.get(tool)
        if spec is None:
            raise ApiError("validation_error", f"Unknown tool {tool[:63]!r}.",
                           {"field": "tool", "tools": self.rt.registry.names()})
        return spec

    async def submit(self, sub: Submission, principal: Principal, idem_key: str | None) -> tuple[Job, bool]:
        """Check everything, then store inputs, record and publish. Returns (job, created):
        not created when ``idem_key`` names an earlier request's job. A step that fails
        takes back the steps before it (:meth:`_discard`)."""
        req = await self._validate(sub)
        job_id = str(ULID())
        if idem_key is not None:
            earlier = await self._claim_idempotency(req, sub, principal, idem_key, job_id)
            if earlier is not None:
                return earlier, False
        try:
            await self._check_limits(req.spec, principal)
            inputs = await self._store_inputs(job_id, sub.uploads, req.images)
            job = await self.rt.store.create(Job(
                id=job_id, owner=principal.id, tool=req.spec.name, variant=req.variant, priority=sub.priority,
                params=req.params, inputs=inputs, seed=req.seed, max_attempts=req.spec.max_attempts,
                deadline_seconds=req.spec.active_deadline_seconds, ttl_seconds=req.spec.result_ttl_seconds,
            ))
        except BaseException:
            await self._discard(job_id, idem_key, principal, stored=False)
            raise
        job = await self._enqueue(job, idem_key, principal)
        self.rt.metrics.jobs_submitted.labels(req.spec.name).inc()
        return job, True

    async def _validate(self, sub: Submission) -> _Request:
        """The tool, variant, params and inputs checked, the seed picked: or ``ApiError``."""
        spec = self.spec_for(sub.tool)
        variant = sub.variant or spec.default_variant
        if spec.variant(variant) is None:
            raise ApiError("validation_error", f"Tool {spec.name!r} has no variant {variant[:63]!r}.",
                           {"field": "variant", "variants": [v.name for v in spec.variants]})
        raw_params = {**coerce_form_params(spec, sub.form_params), **sub.params}
        try:
            params = validate_params(spec, raw_params)
        except ParamsError as e:
            raise ApiError("validation_error", "The params do not match the tool's schema.", {"errors": e.errors}) from e
        # Params travel in the job's record (a Kubernetes object, an SQLite row, every
        # status read); images go to object storage. Same bound whichever way they came.
        if len(json.dumps(params, ensure_ascii=False, separators=(",", ":"))) > self.settings.max_field_bytes:
            raise ApiError("payload_too_large", f"The params are larger than {self.settings.max_field_bytes} bytes as JSON.",
                           {"field": "params", "max_bytes": self.settings.max_field_bytes})
        lo, hi = spec.input_range
        if not lo <= len(sub.uploads) <= hi:
            want = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
            raise ApiError("validation_error", f"Tool {spec.name!r} takes {want} input image(s); got {len(sub.uploads)}.",
                           {"field": "image", "min": lo, "max": hi})
        checked = [await self._check_image(up) for up in sub.uploads]
        seed = params.get("seed")
        if spec.takes_seed and seed is None:
            seed = secrets.randbelow(2**32)
        return _Request(spec, variant, raw_params, params, checked, seed)

    async def _check_image(self, up: Upload) -> images.CheckedImage:
        async with self._image_checks:
            try:
                return await asyncio.to_thread(
                    images.check_image, up.data, max_bytes=self.settings.max_file_bytes, max_pixels=self.settings.max_pixels)
            except images.ImageRejected as e:
                raise ApiError(e.code, e.message, {"field": up.field, **(e.details or {})}) from e

    async def _claim_idempotency(
        self, req: _Request, sub: Submission, principal: Principal, idem_key: str, job_id: str
    ) -> Job | None:
        """Claim ``idem_key`` for ``job_id``; or the job an earlier, identical request made
        with it (first writer wins). A different request under the same key is a conflict."""
        if not (1 <= len(idem_key) <= 255) or not idem_key.isprintable():
            raise ApiError("invalid_input", "Idempotency-Key must be 1-255 printable characters.")
        body_hash = _body_hash(req.spec.name, req.variant, req.raw_params, sub.priority, sub.uploads)
        existing = await self.rt.store.idempotency_get(principal.id, idem_key)
        if existing is None:
            existing = await self.rt.store.idempotency_put(
                principal.id, idem_key, body_hash, job_id, time.time() + self.settings.idempotency_ttl_seconds)
        if existing[1] == job_id:
            return None
        if existing[0] != body_hash:
            raise ApiError("conflict", "This Idempotency-Key was used with a different request.",
                           {"idempotency_key": idem_key})
        job = await self._await_job(existing[1])
        if job is None:
            raise ApiError("conflict", "The job first created with this Idempotency-Key no longer exists.")
        return job

    async def _store_inputs(
        self, job_id: str, uploads: list[Upload], checked: list[images.CheckedImage]
    ) -> tuple[FileRef, ...]:
        inputs = []
        for i, (up, c) in enumerate(zip(uploads, checked, strict=True)):
            name = f"image.{c.extension}" if len(checked) == 1 else f"image-{i + 1}.{c.extension}"
            key = constants.input_key(job_id, name)
            await self.rt.blobs.put(key, up.data, c.content_type)
            inputs.append(FileRef(name=name, key=key, content_type=c.content_type, size_bytes=c.size_bytes))
        return tuple(inputs)

    async def _enqueue(self, job: Job, idem_key: str | None, principal: Principal) -> Job:
        """Publish the stored ``job``; on failure take the submit back (503), unless the
        record cannot be taken back: then the job stands, and housekeeping publishes it."""
        try:
            seq = await self.rt.bus.publish_job(job.tool, job.priority.value, job.id, lifecycle.dedupe_id(job))
        except Exception as e:
            if await self._discard(job.id, idem_key, principal, stored=True):
                raise Unavailable(f"bus: {e}") from e
            return job
        # Published: accepted, even if noting where it sits fails (a full disk). A worker
        # notes it on start, and housekeeping's republish of it is deduplicated.
        if self.rt.store.note_stream_seq(job.id, seq):
            return job.evolve(stream_seq=seq)
        try:
            return await self.rt.store.update(job.id, stream_seq=seq) or job
        except Exception as e:
            log.warning("job %s: could not record its stream position (%s); it stays accepted", job.id, e)
            return job

    async def _await_job(self, job_id: str) -> Job | None:
        for _ in range(50):  # the first request is still storing its job
            job = await self.rt.store.get(job_id)
            if job is not None:
                return job
            await asyncio.sleep(0.05)
        return None

    async def _check_limits(self, spec: ToolSpec, principal: Principal) -> None:
        if await self.rt.store.queued_count(spec.name) >= spec.max_queued:
            raise ApiError("queue_full", f"The {spec.name} queue is full ({spec.max_queued} jobs waiting).",
                           {"tool": spec.name, "max_queued": spec.max_queued},
                           headers={"Retry-After": str(await self._retry_after(spec))})
        limit = principal.max_queued or self.settings.default_key_max_queued
        if principal.admin and principal.max_queued is None:
            return
        mine = await self.rt.store.owner_active(principal.id)
        if mine >= limit:
            raise ApiError("queue_full", f"This key already has {mine} jobs queued (limit {limit}).",
                           {"max_queued": limit}, headers={"Retry-After": str(await self._retry_after(spec))})

    async def _retry_after(self, spec: ToolSpec) -> int:
        avg = await self.avg_duration(spec.name)
        slots = max(1, await self.live_slots(spec.name))
        return max(1, math.ceil((avg or 5.0) / slots))

    async def _discard(self, job_id: str, idem_key: str | None, principal: Principal, *, stored: bool) -> bool:
        """Take back a submit about to be refused: its record first, then its files and
        idempotency key. False if the record could not be deleted: then the job stands
        (housekeeping publishes a stored job), so it keeps its files and must not be refused."""
        if stored:
            try:
                await self.rt.store.delete(job_id)
            except Exception as e:
                log.warning("job %s: could not take back its record (%s); it stays accepted", job_id, e)
                return False
        with contextlib.suppress(Exception):
            await self.rt.blobs.delete_prefix(constants.job_prefix(job_id))
        if idem_key is not None:
            with contextlib.suppress(Exception):
                await self.rt.store.idempotency_delete(principal.id, idem_key, job_id)
        return True

    # -- waiting and events ------------------------------------------------------------
    async def wait(self, job: Job, seconds: float) -> Job:
        """Hold until the job ends or ``seconds`` pass; the latest job either way."""
        if job.terminal or seconds <= 0:
            return job
        sub = await self.rt.bus.subscribe(constants.events_subject(job.id))
        try:
            deadline = time.monotonic() + seconds
            latest = await self.rt.store.get(job.id)
            while latest is not None and not latest.terminal:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                msg = await sub.next(min(left, 1.0))
                if msg is not None and msg.get("type") != "status":
                    continue
                latest = await self.rt.store.get(job.id)
            return latest or job
        finally:
            await sub.unsubscribe()

    # -- cancel and retry --------------------------------------------------------------
    async def cancel(self, job: Job) -> Job:
        if job.terminal:
            raise ApiError("conflict", f"The job already ended ({job.status.value}).", {"status": job.status.value})
        done = await lifecycle.cancel_job(self.rt.store, self.rt.bus, job, now=time.time())
        if done is None:
            latest = await self.rt.store.get(job.id)
            if latest is None:
                raise not_found()
            raise ApiError("conflict", f"The job already ended ({latest.status.value}).", {"status": latest.status.value})
        self.rt.metrics.jobs_finished.labels(job.tool, "cancelled").inc()
        return done

    async def retry(self, job: Job) -> Job:
        if job.status not in (Status.FAILED, Status.CANCELLED):
            raise ApiError("conflict", f"Only failed or cancelled jobs can be retried; this one is {job.status.value}.",
                           {"status": job.status.value})
        spec = self.spec_for(job.tool)
        await self._check_limits(spec, _owner_principal(job))
        with contextlib.suppress(Exception):
            for f in job.results:
                await self.rt.blobs.delete(f.key)
        back = await lifecycle.apply(self.rt.store, job.id, lifecycle.requeue(job, max_attempts=spec.max_attempts))
        if back is None:
            raise ApiError("conflict", "The job changed while retrying; read it again.")
        seq = await self.rt.bus.publish_job(back.tool, back.priority.value, back.id, lifecycle.dedupe_id(back))
        back = await self.rt.store.update(back.id, stream_seq=seq) or back
        await lifecycle.announce(self.rt.bus, back)
        return back


def _owner_principal(job: Job) -> Principal:
    return Principal(job.owner, "", "standard", False, None)


def _body_hash(tool: str, variant: str, params: dict[str, Any], priority: Priority, uploads: list[Upload]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([tool, variant, params, priority.value], sort_keys=True, default=str).encode())
    for up in uploads:
        h.update(hashlib.sha256(up.data).digest())
    return h.hexdigest()


def decode_data_uri(value: str, field: str, max_bytes: int) -> bytes:
    """``data:image/png;base64,...`` (or bare base64) to bytes, refusing oversize early."""
    if not isinstance(value, str):
        raise ApiError("validation_error", f"{field} must be a data: URI string.", {"field": field})
    payload = value
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep or ";base64" not in header:
            raise ApiError("invalid_input", f"{field} must be a base64 data: URI.", {"field": field})
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ApiError("payload_too_large", f"{field} is larger than {max_bytes} bytes.", {"field": field, "max_bytes": max_bytes})
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError("invalid_input", f"{field} is not valid base64.", {"field": field}) from e
