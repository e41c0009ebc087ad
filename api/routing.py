"""``JsonRoute``: the route class of every genq router, so every JSON body is read by
``genq.jsonlimits.loads`` (depth, size and content limits decided before parsing).

FastAPI parses a route's JSON body with a plain ``json.loads`` (``Request.json``) and
turns anything it raises into a vague 400. This class parses the body first, with
genq's limits, so a refusal is the SPEC's 400 ``invalid_input`` naming the limit, and
hands FastAPI the parsed value. A new router made with ``router()`` gets it; the test
``test_every_route_reads_json_bodies_through_genq_limits`` checks that no route is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from genq import jsonlimits


def is_json(content_type: str | None) -> bool:
    """``application/json`` or any ``application/*+json`` (what FastAPI parses as JSON)."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class JsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            if is_json(request.headers.get("content-type")):
                raw = await request.body()
                if raw:
                    # Starlette's Request caches its parsed JSON here; FastAPI's
                    # ``await request.json()`` then returns it without parsing again.
                    request._json = jsonlimits.loads(raw)
            return await handler(request)

        return checked


def router(**kwargs: Any) -> APIRouter:
    """An ``APIRouter`` whose routes read JSON bodies through ``genq.jsonlimits``."""
    return APIRouter(route_class=JsonRoute, **kwargs)
