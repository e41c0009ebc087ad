"""``/v1/jobs``: submit, read, list, download results, stream events, cancel, retry."""

from __future__ import annotations

import contextlib
import json
import re
import time
from datetime import datetime
from typing import Any

from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Receive, Scope, Send

from genq import constants, jsonlimits
from genq.api.auth import Principal
from genq.api.deps import principal, service
from genq.api import errors, routing
from genq.api.errors import ApiError, not_found
from genq.api.schemas import JobCreate, JobList, JobPublic
from genq.api.service import JobService, Submission, Upload, decode_data_uri
from genq.models import Priority, Status
from genq.ports import JobFilter

router = routing.router(prefix="/v1/jobs", tags=["jobs"])

_RESERVED_FORM = {"tool", "variant", "priority", "wait", "params", "image", "images"}
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.I)
_ERR = {
    400: {"description": "Malformed input"}, 401: {"description": "Missing or unknown key"},
    404: {"description": "Not found"}, 409: {"description": "Conflict"}, 413: {"description": "Too large"},
    415: {"description": "Unsupported media type"}, 422: {"description": "Validation error"},
    429: {"description": "Queue full or rate limited"}, 503: {"description": "Unavailable"},
}


#: A result file is whatever the tool wrote (image/png, application/json...), under its own
#: content type: documented as any media type rather than one that is wrong for most files.
_RESULT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file", "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
    410: {"description": "Deleted"}, **_ERR,
}


def _json_body_schema() -> dict[str, Any]:
    """JobCreate's JSON Schema with its references pointing into the OpenAPI components.

    Pydantic's default puts ``Priority`` under a local ``$defs`` and refers to it as
    ``#/$defs/Priority``; inside the OpenAPI document that resolves against the document
    root, where there is no ``$defs``, so clients and generators (schemathesis) could not
    resolve the JSON body at all. ``Priority`` is a component already (JobPublic uses it)."""
    schema = JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={200: {"model": JobPublic, "description": "The job ended inside `wait`"}, **_ERR},
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": _json_body_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["tool"],
                        "properties": {
                            "tool": {"type": "string"}, "variant": {"type": "string"},
                            "priority": {"type": "string", "enum": ["high", "normal", "low"]},
                            "wait": {"type": "number", "minimum": 0, "maximum": 120},
                            "params": {"type": "string", "description": "A JSON object of params."},
                            "image": {"type": "string", "format": "binary"},
                            "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        },
                        "additionalProperties": {"type": "string", "description": "A tool param as a plain field."},
                    }
                },
            },
            "required": True,
        }
    },
)
async def submit(request: Request, who: Principal = Depends(principal), svc: JobService = Depends(service)) -> Any:
    """Submit a job (multipart or JSON). 202 with `Location`; 200 when it ended inside `wait`."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        sub = _parse_json(await request.body(), svc)
    elif ctype == "multipart/form-data":
        sub = await _parse_multipart(request, svc)
    else:
        raise ApiError("unsupported_media_type", "Send application/json or multipart/form-data.",
                       {"content_type": ctype[:100]})
    payload, status, headers = await _submitted(svc, sub, who, request.headers)
    return JSONResponse(payload, status_code=status, headers=headers)


async def _submitted(svc: JobService, sub: Submission, who: Principal, headers: Headers) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Submit a parsed request: (the job's body, 202 or 200, headers)."""
    prefer = headers.get("prefer")
    if prefer and sub.wait == 0:
        m = _PREFER_WAIT.search(prefer)
        if m:
            sub.wait = min(float(m.group(1)), svc.settings.max_wait_seconds)
    job, created = await svc.submit(sub, who, headers.get(constants.IDEMPOTENCY_HEADER))
    if sub.wait > 0:
        job = await svc.wait(job, sub.wait)
    # 200 only when the caller waited (or replays a finished job): a fast worker may end
    # a new job before this answer is written, and without `wait` that is still a 202.
    status = 200 if job.terminal and (sub.wait > 0 or not created) else 202
    return await svc.public(job), status, {"Location": f"/v1/jobs/{job.id}"}


class DirectSubmit:
    """``POST /v1/jobs`` with a small JSON body, answered straight from the ASGI call.

    This is the hot path of a queue (a client enqueueing thousands of jobs), and FastAPI's
    layers (routing, dependency solving, exception middlewares, response wrappers) cost
    as much CPU as the submit itself. This path does what the route does — the same key
    check and rate limit, the same parsing and ``JobService.submit``, the same bodies,
    errors (``errors.render``), headers and metrics — in one call. Everything else (a
    multipart body, a body over ``MAX_BYTES`` or without a Content-Length, another
    content type) goes through the route above, which stays the documented operation."""

    MAX_BYTES = 256 * 1024

    def __init__(self, state: Any, metrics: Any):
        self.state = state
        self.metrics = metrics

    def takes(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        path = scope["path"]
        if path != "/v1/jobs" and path != scope.get("root_path", "") + "/v1/jobs":
            return False
        ctype = length = None
        for k, v in scope["headers"]:
            if k == b"content-type":
                ctype = v
            elif k == b"content-length":
                length = v
        if ctype is None or length is None or ctype.split(b";")[0].strip().lower() != b"application/json":
            return False
        return length.isdigit() and int(length) <= self.MAX_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        state = self.state
        request = Request(scope, receive)
        limit_headers: dict[str, str] = {}
        try:
            who = await state.auth.principal(request)
            limit_headers = await state.limiter.hit(who)
            sub = _parse_json(b"".join(chunks), state.service)
            payload, status, headers = await _submitted(state.service, sub, who, request.headers)
        except Exception as e:
            status, payload, headers = errors.render(e)
        data = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        raw = [(b"content-length", str(len(data)).encode()), (b"content-type", b"application/json")]
        raw += [(k.lower().encode(), v.encode()) for k, v in {**limit_headers, **(headers or {})}.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": data})
        self.metrics.http_requests.labels("POST", "/v1/jobs", str(status)).inc()
        self.metrics.http_seconds.labels("POST", "/v1/jobs").observe(time.perf_counter() - start)


def _parse_json(raw: bytes, svc: JobService) -> Submission:
    payload = jsonlimits.loads(raw)  # JsonRejected: 400 invalid_input (errors.render)
    if not isinstance(payload, dict):
        raise ApiError("invalid_input", "The body must be a JSON object.")
    try:
        req = JobCreate.model_validate(payload)
    except ValidationError as e:
        raise ApiError("validation_error", "The request does not match the expected schema.", {"errors": [
            {"field": ".".join(str(p) for p in err["loc"]) or None, "message": err["msg"][:300]} for err in e.errors()[:20]
        ]}) from e
    uploads: list[Upload] = []
    for field, value in req.inputs.items():
        if field not in ("image", "images"):
            raise ApiError("validation_error", f"Unknown input {field[:40]!r}; use 'image' or 'images'.", {"field": f"inputs.{field[:40]}"})
        values = value if isinstance(value, list) else [value]
        if len(values) > svc.settings.max_files:
            raise ApiError("validation_error", f"At most {svc.settings.max_files} images per job.", {"field": f"inputs.{field}"})
        for i, v in enumerate(values):
            name = f"inputs.{field}" if field == "image" else f"inputs.{field}[{i}]"
            uploads.append(Upload(name, decode_data_uri(v, name, svc.settings.max_file_bytes)))
    if len(uploads) > svc.settings.max_files:
        raise ApiError("validation_error", f"At most {svc.settings.max_files} images per job.", {"field": "inputs"})
    return Submission(req.tool, req.variant, req.params, {}, uploads, req.priority, min(req.wait, svc.settings.max_wait_seconds))


async def _parse_multipart(request: Request, svc: JobService) -> Submission:
    s = svc.settings
    try:
        # Starlette's parser, as request.form() builds it, but with uploads kept in memory up
        # to the per-file limit: they are read into memory for the checks anyway, and
        # spooling to a temporary file cost a thread hop per 64 KB chunk (over a second for
        # a 15 MB upload on a busy machine).
        parser = MultiPartParser(request.headers, request.stream(), max_files=s.max_files, max_fields=64,
                                 max_part_size=s.max_field_bytes)
        parser.spool_max_size = s.max_file_bytes + 1
        async with contextlib.aclosing(parser.stream):
            form = await parser.parse()
    except (MultiPartException, HTTPException) as e:
        # Starlette turns its MultiPartException into HTTPException(400, detail=message)
        # when the request belongs to an app; both carry the parser's message.
        if isinstance(e, HTTPException) and e.status_code != 400:
            raise
        msg = e.message if isinstance(e, MultiPartException) else str(e.detail)
        if "Too many files" in msg or "Too many fields" in msg:
            raise ApiError("validation_error", msg, {"max_files": s.max_files}) from e
        if "Part exceeded maximum size" in msg:
            raise ApiError("payload_too_large", f"A form field is larger than {s.max_field_bytes} bytes.",
                           {"max_field_bytes": s.max_field_bytes}) from e
        raise ApiError("invalid_input", f"Malformed multipart body: {msg[:200]}") from e
    try:
        uploads: list[Upload] = []
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if key not in ("image", "images"):
                    raise ApiError("validation_error", f"Unexpected file field {key[:40]!r}; use 'image' or 'images'.",
                                   {"field": key[:40]})
                data = await value.read(s.max_file_bytes + 1)
                if len(data) > s.max_file_bytes:
                    raise ApiError("payload_too_large", f"{key} is larger than {s.max_file_bytes} bytes.",
                                   {"field": key, "max_bytes": s.max_file_bytes})
                uploads.append(Upload(key if key == "image" else f"images[{len(uploads)}]", data))
            else:
                if key in fields:
                    raise ApiError("validation_error", f"Field {key[:40]!r} is given more than once.", {"field": key[:40]})
                fields[key] = value
    finally:
        with contextlib.suppress(Exception):
            await form.close()
    tool = fields.pop("tool", None)
    if not tool:
        raise ApiError("validation_error", "The 'tool' field is required.", {"field": "tool"})
    variant = fields.pop("variant", None) or None
    try:
        priority = Priority(fields.pop("priority", "normal") or "normal")
    except ValueError as e:
        raise ApiError("validation_error", "priority must be high, normal or low.", {"field": "priority"}) from e
    wait = _number(fields.pop("wait", "0") or "0", "wait", 0, s.max_wait_seconds)
    params: dict[str, Any] = {}
    if "params" in fields:
        params = jsonlimits.loads(fields.pop("params"), field="params")
        if not isinstance(params, dict):
            raise ApiError("invalid_input", "The 'params' field must hold a JSON object.", {"field": "params"})
    return Submission(tool, variant, params, fields, uploads, priority, wait)


def _number(raw: str, field: str, lo: float, hi: float) -> float:
    try:
        v = float(raw)
    except ValueError as e:
        raise ApiError("validation_error", f"{field} must be a number.", {"field": field}) from e
    if not lo <= v <= hi:
        raise ApiError("validation_error", f"{field} must be between {lo:g} and {hi:g}.", {"field": field})
    return v


@router.get("", response_model=JobList, responses=_ERR)
async def list_jobs(
    who: Principal = Depends(principal),
    svc: JobService = Depends(service),
    status: Status | None = None,
    tool: str | None = Query(default=None, max_length=63),
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: int = Query(default=50, ge=1, le=500),
    cursor: str | None = Query(default=None, max_length=200),
    order: str = Query(default="desc", pattern="^(asc|desc)$"),
    all: bool = Query(default=False, description="Admin only: everyone's jobs."),
) -> Any:
    """The caller's jobs, newest first by default, with cursor pagination."""
    if all and not who.admin:
        raise ApiError("forbidden", "all=true needs an admin key.")
    flt = JobFilter(
        owner=None if all else who.id, status=status, tool=tool,
        created_after=created_after.timestamp() if created_after else None,
        created_before=created_before.timestamp() if created_before else None,
    )
    try:
        page = await svc.rt.store.list(flt, limit=limit, cursor=cursor, order=order)
    except ValueError as e:
        raise ApiError("invalid_input", "The cursor is not valid.", {"field": "cursor"}) from e
    return {"jobs": [await svc.public(j) for j in page.jobs], "next_cursor": page.next_cursor, "total": page.total}


@router.get("/{job_id}", response_model=JobPublic, responses=_ERR)
async def get_job(job_id: str, who: Principal = Depends(principal), svc: JobService = Depends(service)) -> Any:
    """The job, with its queue position and ETA while it waits."""
    return await svc.public(await svc.load(job_id, who))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=_ERR)
async def cancel_job(job_id: str, who: Principal = Depends(principal), svc: JobService = Depends(service)) -> Any:
    """Cancel a queued or running job; a running one is interrupted and its slot freed."""
    return await svc.public(await svc.cancel(await svc.load(job_id, who)))


@router.delete("/{job_id}", response_model=JobPublic, responses=_ERR)
async def delete_job(job_id: str, who: Principal = Depends(principal), svc: JobService = Depends(service)) -> Any:
    """Same as cancel."""
    return await svc.public(await svc.cancel(await svc.load(job_id, who)))


@router.post("/{job_id}/retry", response_model=JobPublic, status_code=202, responses=_ERR)
async def retry_job(job_id: str, who: Principal = Depends(principal), svc: JobService = Depends(service)) -> Any:
    """Queue a failed or cancelled job again, under the same id."""
    return await svc.public(await svc.retry(await svc.load(job_id, who)))


@router.get("/{job_id}/result", response_class=Response, responses=_RESULT_RESPONSES)
async def get_first_result(job_id: str, request: Request, who: Principal = Depends(principal),
                           svc: JobService = Depends(service)) -> Any:
    """The first result file."""
    job = await svc.load(job_id, who)
    _ready(job)
    if not job.results:
        raise ApiError("gone", "This job produced no files.")
    return await _download(svc, job, job.results[0].name, request)


@router.get("/{job_id}/result/{name}", response_class=Response, responses=_RESULT_RESPONSES)
async def get_result(job_id: str, name: str, request: Request, who: Principal = Depends(principal),
                     svc: JobService = Depends(service)) -> Any:
    """One result file by name."""
    job = await svc.load(job_id, who)
    _ready(job)
    return await _download(svc, job, name, request)


def _ready(job) -> None:
    if job.status is not Status.SUCCEEDED:
        raise ApiError("not_ready", f"The job has no result yet ({job.status.value}).", {"status": job.status.value})


async def _download(svc: JobService, job, name: str, request: Request) -> Any:
    ref = next((f for f in job.results if f.name == name), None)
    if ref is None:
        raise not_found("result file")
    info = await svc.rt.blobs.stat(ref.key)
    if info is None:
        raise ApiError("gone", "This result file was deleted.", {"name": name})
    etag = f'"{ref.etag}"' if ref.etag else None
    headers = {
        "Content-Length": str(info.size),
        "Content-Disposition": f'attachment; filename="{ref.name}"',
        "Cache-Control": "private, max-age=0",
    }
    if etag:
        headers["ETag"] = etag
        if request.headers.get("if-none-match") == etag:
            return JSONResponse(None, status_code=304, headers={"ETag": etag})
    spec = svc.rt.registry.get(job.tool)
    delete_after = bool(spec and spec.delete_on_download)
    blobs = svc.rt.blobs

    async def body():
        sent = 0
        async for chunk in blobs.stream(ref.key):
            sent += len(chunk)
            yield chunk
        if delete_after and sent == info.size:
            await blobs.delete(ref.key)

    return StreamingResponse(body(), media_type=ref.content_type, headers=headers)


@router.get("/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, **_ERR})
async def job_events(job_id: str, request: Request, who: Principal = Depends(principal),
                     svc: JobService = Depends(service)) -> Any:
    """Server-Sent Events: `status` (the Job) on every change, `progress` while running;
    closed after the terminal status."""
    job = await svc.load(job_id, who)
    bus = svc.rt.bus
    sub = await bus.subscribe(constants.events_subject(job.id))
    announced = 0.0

    async def watch() -> None:
        # Workers send a job's per-step progress only while someone watches it. Announced on
        # opening, on every status change (a worker that started after the last one hears
        # of it before the job's first step ends) and every WATCH_REFRESH_SECONDS.
        nonlocal announced
        announced = time.monotonic()
        with contextlib.suppress(Exception):
            await bus.publish(constants.watch_subject(job.id), {"id": job.id})

    async def stream():
        try:
            await watch()
            latest = await svc.rt.store.get(job.id)
            if latest is None:
                return
            last_sent = (latest.status, latest.version)
            yield {"event": "status", "data": json.dumps(await svc.public(latest))}
            while not latest.terminal:
                if await request.is_disconnected():
                    return
                if time.monotonic() - announced >= constants.WATCH_REFRESH_SECONDS:
                    await watch()
                msg = await sub.next(2.0)
                if msg is not None and msg.get("type") == "progress":
                    yield {"event": "progress", "data": json.dumps(
                        {"progress": msg.get("progress"), "step": msg.get("step"), "steps": msg.get("steps")})}
                    continue
                if msg is not None:
                    await watch()
                fresh = await svc.rt.store.get(job.id)
                if fresh is None:
                    return
                latest = fresh
                if (latest.status, latest.version) != last_sent and (msg is not None or latest.status != last_sent[0]):
                    last_sent = (latest.status, latest.version)
                    yield {"event": "status", "data": json.dumps(await svc.public(latest))}
        finally:
            await sub.unsubscribe()

    return EventSourceResponse(stream(), ping=15)
