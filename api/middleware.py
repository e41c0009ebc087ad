"""One pure-ASGI middleware for every request: body-size limit, request metrics and the
RateLimit-* headers a route's auth step left in ``scope["state"]``.

Pure ASGI (not ``BaseHTTPMiddleware``) so streaming uploads and downloads pass through
untouched and the hot path stays cheap.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from genq.api.errors import body
from genq.metrics import Metrics


class _TooLarge(Exception):
    pass


class GenqMiddleware:
    def __init__(self, app: ASGIApp, *, max_body: int, metrics: Metrics):
        self.app = app
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})
        status_holder = [500]
        method = scope["method"]

        length = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    length = -1
                break
        if length is not None and (length < 0 or length > self.max_body):
            await _send_json(send, 413 if length >= 0 else 400, body(
                "payload_too_large" if length >= 0 else "invalid_input",
                f"The request body is larger than {self.max_body} bytes." if length >= 0 else "Invalid Content-Length.",
                {"max_bytes": self.max_body} if length >= 0 else {},
            ), close=length < 0)
            self._observe(scope, method, 413, start)
            return

        received = 0
        max_body = self.max_body

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise _TooLarge()
            return message

        started = False

        async def wrapped_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status_holder[0] = message["status"]
                extra: dict[str, str] | None = scope["state"].get("ratelimit_headers")
                if extra:
                    headers = list(message.get("headers", []))
                    have = {k.lower() for k, _ in headers}
                    for k, v in extra.items():
                        if k.lower().encode() not in have:
                            headers.append((k.lower().encode(), v.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, limited_receive, wrapped_send)
        except _TooLarge:
            if not started:
                status_holder[0] = 413
                await _send_json(send, 413, body("payload_too_large", f"The request body is larger than {max_body} bytes.",
                                                 {"max_bytes": max_body}))
        finally:
            self._observe(scope, method, status_holder[0], start)

    def _observe(self, scope: Scope, method: str, status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        self.metrics.http_requests.labels(method, path, str(status)).inc()
        self.metrics.http_seconds.labels(method, path).observe(time.perf_counter() - start)


async def _send_json(send: Send, status: int, payload: dict[str, Any], *, close: bool = False) -> None:
    """An early error response. A 413 keeps the connection open on purpose: the server then
    reads and discards the rest of the body, so the client, still writing it, gets to read
    the answer. Closing with unread data makes the kernel send a reset, and the client sees
    a broken connection instead of the 413. Only a body we cannot frame (a bad
    Content-Length) closes the connection."""
    import json

    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
