"""The one error body of SPEC §3 and the handlers that make every failure use it.

``{"error": {"code": "<code>", "message": "<one clear sentence>", "details": {...}}}``;
no stack traces ever reach a body.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from genq.jsonlimits import JsonRejected
from genq.ports import PortError, StorageFull

log = logging.getLogger(__name__)

STATUS = {
    "invalid_input": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "not_ready": 409,
    "gone": 410,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "validation_error": 422,
    "queue_full": 429,
    "rate_limited": 429,
    "internal": 500,
    "unavailable": 503,
    "insufficient_storage": 507,
}

_BY_STATUS = {400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
              409: "conflict", 410: "gone", 413: "payload_too_large", 415: "unsupported_media_type",
              422: "validation_error", 429: "rate_limited", 503: "unavailable"}


class ApiError(Exception):
    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None, *,
                 headers: dict[str, str] | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}
        self.status = status or STATUS[code]


def body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def not_found(what: str = "job") -> ApiError:
    return ApiError("not_found", f"No such {what}.")


def render(e: Exception) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """(status, error body, headers) for an exception a route raised: what the app's
    handlers answer, and what the JSON submit's direct path (``routes.jobs``) answers."""
    if isinstance(e, ApiError):
        return e.status, body(e.code, e.message, e.details), e.headers
    if isinstance(e, StarletteHTTPException):
        code = _BY_STATUS.get(e.status_code, "invalid_input" if e.status_code < 500 else "internal")
        message = {404: "No such resource.", 405: "Method not allowed on this resource."}.get(e.status_code, str(e.detail))
        return e.status_code, body(code, message), getattr(e, "headers", None)
    if isinstance(e, JsonRejected):  # the client's JSON: a 400, never logged (genq.jsonlimits)
        return 400, body("invalid_input", e.message, e.details), None
    if isinstance(e, StorageFull):
        log.error("storage full: %s", e)
        return 503, body("unavailable", "Storage is full; try again later."), {"Retry-After": "30"}
    if isinstance(e, PortError):
        log.warning("backing service unavailable: %s", e)
        return 503, body("unavailable", "A backing service is unavailable; try again shortly."), {"Retry-After": "2"}
    log.exception("unhandled error", exc_info=e)
    return 500, body("internal", "Something went wrong on our side."), None


def install(app: FastAPI) -> None:
    async def _render(_: Request, e: Exception) -> JSONResponse:
        status, payload, headers = render(e)
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")) or None,
             "message": str(err.get("msg", ""))[:300]}
            for err in e.errors()[:20]
        ]
        return JSONResponse(body("validation_error", "The request does not match the expected schema.", {"errors": errors}),
                            status_code=422)

    for exc in (ApiError, JsonRejected, StarletteHTTPException, StorageFull, PortError, Exception):
        app.add_exception_handler(exc, _render)
