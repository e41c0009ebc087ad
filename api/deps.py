"""FastAPI dependencies: the job service, the caller (authenticated and rate-limited), admin."""

from __future__ import annotations

from fastapi import Depends, Request

from genq.api.auth import Principal
from genq.api.errors import ApiError
from genq.api.service import JobService


# async: FastAPI runs a plain ``def`` dependency in its thread pool (a thread hop per request).
async def service(request: Request) -> JobService:
    return request.app.state.service


async def principal(request: Request) -> Principal:
    state = request.app.state
    who = await state.auth.principal(request)
    request.scope.setdefault("state", {})["ratelimit_headers"] = None
    headers = await state.limiter.hit(who)
    request.scope["state"]["ratelimit_headers"] = headers
    return who


async def admin(who: Principal = Depends(principal)) -> Principal:
    if not who.admin:
        raise ApiError("forbidden", "This endpoint needs an admin key.")
    return who
