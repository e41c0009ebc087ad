"""``create_app(runtime)``: the FastAPI application, nothing built at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from genq import __version__
from genq.api import errors
from genq.api.auth import Authenticator, RateLimiter
from genq.api.middleware import GenqMiddleware
from genq.api.routes import health, jobs, keys, queues, tools
from genq.api.service import JobService
from genq.runtime import Runtime


class GenqApp(FastAPI):
    """FastAPI, with the JSON submit answered before the framework's layers when it
    qualifies (``jobs.DirectSubmit``); every other request takes the normal way."""

    direct_submit: jobs.DirectSubmit | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        direct = self.direct_submit
        if direct is not None and direct.takes(scope):
            await direct(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(runtime: Runtime, *, manage_runtime: bool = False) -> FastAPI:
    """The API over ``runtime``. With ``manage_runtime`` the app opens and closes the
    runtime in its lifespan (``genq api``); otherwise its owner does (``genq up``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_runtime:
            await runtime.open()
        try:
            yield
        finally:
            if manage_runtime:
                await runtime.close()

    app = GenqApp(
        title="genq",
        version=__version__,
        description="GPU generation tools as queued jobs behind one REST API.",
        lifespan=lifespan,
    )
    s = runtime.settings
    app.state.runtime = runtime
    app.state.service = JobService(runtime)
    admin_key = s.admin_key.get_secret_value() if s.admin_key else None
    app.state.auth = Authenticator(runtime.keys, admin_key)
    app.state.limiter = RateLimiter({"standard": s.rate_standard, "premium": s.rate_premium})
    errors.install(app)
    for r in (jobs.router, queues.router, tools.router, keys.router, health.router):
        app.include_router(r)
    max_body = max(s.max_json_bytes, s.max_files * s.max_file_bytes + 1024 * 1024)
    app.add_middleware(GenqMiddleware, max_body=max_body, metrics=runtime.metrics)
    app.direct_submit = jobs.DirectSubmit(app.state, runtime.metrics)
    return app
