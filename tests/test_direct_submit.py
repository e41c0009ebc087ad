"""The JSON submit's direct path (``jobs.DirectSubmit``) answers exactly as the FastAPI
route does: the same statuses, error bodies, headers and jobs, for good and bad requests.

Each request is sent twice to a real genq: with a Content-Length (the direct path takes
it) and as a chunked body (no Content-Length: the route takes it). A spy on the app
proves which path answered."""

from __future__ import annotations

import json

import pytest

from conftest import data_uri, png_bytes, start_live, stop_live, tools_config

VOLATILE = {"id", "created_at", "started_at", "completed_at", "expires_at", "status", "progress", "position",
            "eta_seconds", "attempts", "result", "seed", "worker", "links"}


@pytest.fixture
async def served(tmp_path, monkeypatch):
    monkeypatch.setenv("GENQ_TEST_STATE", str(tmp_path))
    lv, server, task = await start_live(tmp_path, tools_config(), rate_standard="6/minute")
    app = server.config.app
    direct = app.direct_submit
    seen: list[str] = []

    class Spy:
        def takes(self, scope):
            return direct.takes(scope)

        async def __call__(self, scope, receive, send):
            seen.append(scope["path"])
            await direct(scope, receive, send)

    app.direct_submit = Spy()
    try:
        yield lv, seen
    finally:
        await stop_live(lv, server, task)


async def _chunked(body: bytes):
    yield body[:5]
    yield body[5:]


async def _both(c, body: bytes, **headers) -> tuple:
    headers = {"content-type": "application/json", **headers}
    direct = await c.post("/v1/jobs", content=body, headers=headers)
    routed = await c.post("/v1/jobs", content=_chunked(body), headers=headers)
    return direct, routed


def _same(direct, routed) -> None:
    assert direct.status_code == routed.status_code, (direct.text, routed.text)
    a, b = direct.json(), routed.json()
    if set(a) == {"error"}:
        assert a == b
    else:
        assert set(a) == set(b)
        assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}
        assert direct.headers["location"] == f"/v1/jobs/{a['id']}" and routed.headers["location"] == f"/v1/jobs/{b['id']}"
    assert direct.headers["content-type"] == routed.headers["content-type"] == "application/json"
    for h in ("ratelimit-limit", "www-authenticate", "retry-after"):
        assert (h in direct.headers) == (h in routed.headers), h


@pytest.mark.parametrize("body, code", [
    (json.dumps({"tool": "echo", "params": {"text": "hi", "seed": 7}}).encode(), None),
    (json.dumps({"tool": "echo", "priority": "high", "inputs": {"image": data_uri(png_bytes())}}).encode(), None),
    (b'{"tool": "echo", "params": ', "invalid_input"),
    (b"[1, 2]", "invalid_input"),
    (json.dumps({"tool": "nope"}).encode(), "validation_error"),
    (json.dumps({"tool": "echo", "params": {"seed": "x"}}).encode(), "validation_error"),
    (json.dumps({"tool": "echo", "priority": "urgent"}).encode(), "validation_error"),
    (json.dumps({"tool": "echo", "inputs": {"mask": "data:,"}}).encode(), "validation_error"),
    (json.dumps({"tool": "echo", "inputs": {"image": "data:image/png;base64,AAAA"}}).encode(), None),
    # JSON genq refuses before or while parsing (genq.jsonlimits): the same 400 both ways
    (b'{"tool": "echo", "params": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "invalid_input"),
    (b'{"tool": "echo", "params": {"sleep": NaN}}', "invalid_input"),
    (b'{"tool": "echo", "tool": "upscale"}', "invalid_input"),
    (b'{"tool": "echo", "params": {"text": "\\ud800"}}', "invalid_input"),
])
async def test_direct_path_answers_as_the_route_does(served, body, code):
    live, seen = served
    async with live.client() as c:
        direct, routed = await _both(c, body)
    assert seen == ["/v1/jobs"], "the request with a Content-Length did not take the direct path"
    _same(direct, routed)
    if code is not None:
        assert direct.json()["error"]["code"] == code
    elif direct.status_code == 202:
        assert direct.json()["status"] in ("queued", "running", "succeeded")


async def test_direct_path_checks_the_key_and_the_rate_limit_as_the_route_does(served):
    live, seen = served
    body = json.dumps({"tool": "echo", "params": {"text": "x"}}).encode()
    async with live.client(key=None) as c:
        _same(*await _both(c, body))
        _same(*await _both(c, body, authorization="Bearer gq_nonsense"))
    key = await live.new_key(tier="standard")  # 6 a minute
    async with live.client(key=key) as c:
        for _ in range(3):
            direct, routed = await _both(c, body)
            _same(direct, routed)
            assert direct.status_code == 202 and int(direct.headers["ratelimit-limit"]) == 6
        direct, routed = await _both(c, body)
        _same(direct, routed)
        assert direct.status_code == 429 and direct.json()["error"]["code"] == "rate_limited"
        assert direct.headers["retry-after"].isdigit() and direct.headers["ratelimit-remaining"] == "0"
    assert len(seen) == 6, seen


async def test_what_the_direct_path_leaves_to_the_route(served):
    live, seen = served
    async with live.client() as c:
        r = await c.post("/v1/jobs", files=[("tool", (None, "echo"))])  # multipart
        assert r.status_code == 202, r.text
        r = await c.post("/v1/jobs", content=b"tool=echo", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        big = json.dumps({"tool": "echo", "inputs": {"image": data_uri(png_bytes() + b"\0" * 300_000)}}).encode()
        r = await c.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
        assert r.status_code in (202, 422), r.text  # over 256 KiB: the route, whatever it decides
        r = await c.post("/v1/jobs/", json={"tool": "echo"})
        assert r.status_code in (307, 404, 405)
    assert seen == []
    # and the metrics name the route the same way on both paths
    async with live.client() as c:
        assert (await c.post("/v1/jobs", json={"tool": "echo"})).status_code == 202
        text = (await c.get("/metrics")).text
    assert seen == ["/v1/jobs"]
    assert 'genq_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in text
