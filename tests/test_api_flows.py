"""The reference queue flows over REST against a real genq (NATS JetStream, SQLite, files)."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from PIL import Image

from conftest import data_uri, png_bytes, read_events
from helpers import assert_error, poll


async def test_submit_poll_download_with_seed(live):
    async with live.client() as c:
        r = await c.post("/v1/jobs", files=[("tool", (None, "echo")), ("seed", (None, "42")), ("text", (None, "hi")),
                                            ("image", ("../../etc/passwd", png_bytes(), "image/png"))])
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] in ("queued", "running", "succeeded") and job["params"] == {"seed": 42, "text": "hi"}
        done = await poll(c, job["id"])
        assert done["status"] == "succeeded" and done["result"]["seed"] == 42 and done["progress"] == 1.0
        assert done["attempts"] == 1 and done["expires_at"] and done["completed_at"]
        files = {f["name"]: f for f in done["result"]["files"]}
        assert set(files) == {"result.png", "meta.json"}
        r = await c.get(files["result.png"]["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["content-disposition"] == 'attachment; filename="result.png"'
        assert int(r.headers["content-length"]) == files["result.png"]["size_bytes"] == len(r.content)
        assert r.headers["etag"]
        assert Image.open(io.BytesIO(r.content)).size == (16, 16)
        first = await c.get(f"/v1/jobs/{job['id']}/result")
        assert first.content == r.content
        meta = json.loads((await c.get(files["meta.json"]["url"])).content)
        # The uploaded filename was never used: inputs are named by genq.
        assert meta["inputs"] == [["image.png", "image/png", len(png_bytes())]]


async def test_json_submit_and_random_seed(live):
    async with live.client() as c:
        r = await c.post("/v1/jobs", json={"tool": "echo", "params": {"text": "j"}, "inputs": {"image": data_uri(png_bytes())}, "wait": 10})
        assert r.status_code == 200, r.text  # sync mode: ended inside wait
        job = r.json()
        assert job["status"] == "succeeded" and isinstance(job["result"]["seed"], int)


async def test_prefer_wait_header(live):
    async with live.client() as c:
        r = await c.post("/v1/jobs", json={"tool": "echo", "params": {"seed": 1}}, headers={"Prefer": "wait=10"})
        assert r.status_code == 200 and r.json()["status"] == "succeeded"
        r = await c.post("/v1/jobs", json={"tool": "echo", "params": {"seed": 1, "sleep": 3}}, headers={"Prefer": "wait=0.3"})
        assert r.status_code == 202 and r.json()["status"] in ("queued", "running")


async def test_auth_and_ownership(live):
    alice = await live.new_key(name="alice")
    bob = await live.new_key(name="bob")
    async with live.client(None) as anon, live.client("gq_nope") as bad, live.client(alice) as a, live.client(bob) as b:
        assert_error(await anon.get("/v1/jobs"), 401, "unauthorized")
        assert_error(await bad.get("/v1/jobs"), 401, "unauthorized")
        r = await a.post("/v1/jobs", json={"tool": "echo", "params": {"seed": 3}})
        assert r.status_code == 202
        jid = r.json()["id"]
        assert_error(await a.get("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV"), 404, "not_found")
        for path in ("", "/result", "/result/result.png", "/events"):
            assert_error(await b.get(f"/v1/jobs/{jid}{path}"), 404, "not_found")
        assert_error(await b.post(f"/v1/jobs/{jid}/cancel"), 404, "not_found")
        assert_error(await b.delete(f"/v1/jobs/{jid}"), 404, "not_found")
        assert_error(await a.post("/v1/keys", json={"name": "x"}), 403, "forbidden")
        assert_error(await a.get("/v1/keys"), 403, "forbidden")
        assert_error(await a.post("/v1/tools/echo/warm", json={}), 403, "forbidden")
        assert (await b.get("/v1/jobs")).json()["total"] == 0
        # Keys never appear again after creation.
        async with live.client() as admin:
            listed = (await admin.get("/v1/keys")).json()["keys"]
            assert all("key" not in k for k in listed) and alice not in json.dumps(listed)
            kid = next(k["id"] for k in listed if k["name"] == "bob")
            assert (await admin.delete(f"/v1/keys/{kid}")).status_code == 204
        assert_error(await b.get("/v1/jobs"), 401, "unauthorized")


async def test_queue_full_and_stats(live):
    async with live.client() as c:
        ids = []
        # 2 slots run, 8 may wait: the 11th is refused. (Long jobs, cancelled below: none
        # may finish while a loaded machine is still submitting.)
        for i in range(10):
            r = await c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 60, "text": f"q{i}"}})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        await asyncio.sleep(0.5)
        r = await c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 2}})
        body = assert_error(r, 429, "queue_full")
        assert int(r.headers["retry-after"]) >= 1 and body["error"]["details"]["max_queued"] == 8
        q = (await c.get("/v1/queues/echo")).json()
        assert q["active"] == 2 and q["queued"] == 8 and q["max_concurrent"] == 2 and q["max_queued"] == 8
        assert q["workers"] == 2 and q["label"] == "Echo"  # embedded: maxWorkers slots
        # positions follow FIFO inside a priority
        positions = [(await c.get(f"/v1/jobs/{i}")).json()["position"] for i in ids[2:]]
        assert positions == list(range(1, 9))
        for i in ids:
            await c.post(f"/v1/jobs/{i}/cancel")
        q = (await c.get("/v1/queues")).json()["queues"]
        echo = next(x for x in q if x["tool"] == "echo")
        assert echo["queued"] == 0


async def test_per_key_queue_limit(live):
    k = await live.new_key(name="small", max_queued=2)
    async with live.client(k) as c:
        first = await c.post("/v1/jobs", json={"tool": "once", "params": {"sleep": 3}})
        assert first.status_code == 202
        await poll(c, first.json()["id"], until=("running",))
        codes = [(await c.post("/v1/jobs", json={"tool": "once", "params": {"sleep": 3}})).status_code for _ in range(3)]
        # one runs (1 slot), two wait, the fourth is over the key's limit of 2 queued
        assert codes == [202, 202, 429]


async def test_priority_dispatch_order(live):
    async with live.client() as c:
        blockers = [(await c.post("/v1/jobs", json={"tool": "once", "params": {"sleep": 1.5}})).json()["id"]]
        await asyncio.sleep(0.3)
        low = (await c.post("/v1/jobs", json={"tool": "once", "priority": "low", "params": {"text": "low"}})).json()["id"]
        normal = (await c.post("/v1/jobs", json={"tool": "once", "params": {"text": "normal"}})).json()["id"]
        high = (await c.post("/v1/jobs", json={"tool": "once", "priority": "high", "params": {"text": "high"}})).json()["id"]
        pos = {n: (await c.get(f"/v1/jobs/{i}")).json()["position"] for n, i in (("low", low), ("normal", normal), ("high", high))}
        assert pos == {"high": 1, "normal": 2, "low": 3}
        jobs = [await poll(c, i) for i in (high, normal, low)]
        starts = [j["started_at"] for j in jobs]
        assert starts == sorted(starts), starts
        assert blockers


async def test_cancel_running_job_frees_slot(live):
    async with live.client() as c:
        jid = (await c.post("/v1/jobs", json={"tool": "once", "params": {"sleep": 30}})).json()["id"]
        await poll(c, jid, until=("running",))
        t0 = time.monotonic()
        r = await c.post(f"/v1/jobs/{jid}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        # the slot is free again: the next job runs at once
        r = await c.post("/v1/jobs", json={"tool": "once", "params": {"text": "after"}, "wait": 10})
        assert r.json()["status"] == "succeeded"
        assert time.monotonic() - t0 < 3
        assert_error(await c.post(f"/v1/jobs/{jid}/cancel"), 409, "conflict")
        assert_error(await c.get(f"/v1/jobs/{jid}/result"), 409, "not_ready")
        # retry re-queues under the same id
        r = await c.post(f"/v1/jobs/{jid}/retry")
        assert r.status_code == 202 and r.json()["id"] == jid and r.json()["status"] in ("queued", "running")
        await c.delete(f"/v1/jobs/{jid}")


async def test_next_job_starts_while_the_last_results_are_written(live):
    """One slot: the second job starts once the first one's tool returned, while the
    first one's 64 MiB result is still being written and recorded."""
    async with live.client() as c:
        first = (await c.post("/v1/jobs", json={"tool": "once", "params": {"text": "big", "pad_mb": 64}})).json()["id"]
        second = (await c.post("/v1/jobs", json={"tool": "once", "params": {"text": "small"}})).json()["id"]
        a, b = await poll(c, first), await poll(c, second)
    assert a["status"] == b["status"] == "succeeded"
    assert [f["name"] for f in a["result"]["files"]] == ["result.png", "meta.json", "pad.bin"]
    assert b["started_at"] < a["completed_at"], (a, b)


async def test_cancel_queued_job(live):
    async with live.client() as c:
        block = (await c.post("/v1/jobs", json={"tool": "once", "params": {"sleep": 1}})).json()["id"]
        jid = (await c.post("/v1/jobs", json={"tool": "once", "params": {"text": "queued"}})).json()["id"]
        r = await c.delete(f"/v1/jobs/{jid}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        await poll(c, block)
        await asyncio.sleep(0.3)
        assert (await c.get(f"/v1/jobs/{jid}")).json()["status"] == "cancelled"


async def test_list_filters_and_pagination(live):
    async with live.client() as c:
        ids = [(await c.post("/v1/jobs", json={"tool": "echo", "params": {"seed": i}, "wait": 10})).json()["id"] for i in range(5)]
        failed = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"bad": True}, "wait": 10})).json()
        assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
        r = (await c.get("/v1/jobs", params={"status": "succeeded", "limit": 2})).json()
        assert r["total"] == 5 and len(r["jobs"]) == 2 and r["next_cursor"]
        seen = [j["id"] for j in r["jobs"]]
        while r["next_cursor"]:
            r = (await c.get("/v1/jobs", params={"status": "succeeded", "limit": 2, "cursor": r["next_cursor"]})).json()
            seen += [j["id"] for j in r["jobs"]]
        assert seen == list(reversed(ids))
        asc = (await c.get("/v1/jobs", params={"order": "asc", "limit": 500})).json()
        assert [j["id"] for j in asc["jobs"]] == ids + [failed["id"]]
        assert (await c.get("/v1/jobs", params={"status": "failed"})).json()["total"] == 1
        assert (await c.get("/v1/jobs", params={"tool": "upscale"})).json()["total"] == 0
        assert_error(await c.get("/v1/jobs", params={"cursor": "!!!"}), 400, "invalid_input")
        assert_error(await c.get("/v1/jobs", params={"limit": 0}), 422, "validation_error")


async def test_delete_on_download_and_retention(live):
    async with live.client() as c:
        job = (await c.post("/v1/jobs", json={"tool": "once", "params": {"seed": 5}, "wait": 10})).json()
        assert job["status"] == "succeeded"
        url = job["result"]["files"][0]["url"]
        assert (await c.get(url)).status_code == 200
        assert_error(await c.get(url), 410, "gone")
        # resultTTLSeconds: 2 — the job and its files are deleted, then 404
        await asyncio.sleep(3.0)
        assert_error(await c.get(f"/v1/jobs/{job['id']}"), 404, "not_found")
        blobs = live.emb.data_dir / "blobs" / "jobs" / job["id"]
        assert not blobs.exists()


async def test_retries_then_success_and_exhaustion(live):
    async with live.client() as c:
        ok = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"text": "flaky2", "fail_times": 2}})).json()
        done = await poll(c, ok["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 3
        bad = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"text": "flaky9", "fail_times": 9}})).json()
        done = await poll(c, bad["id"])
        assert done["status"] == "failed" and done["attempts"] == 3
        assert done["error"]["code"] == "pipeline_error" and "3 attempts" in done["error"]["message"]


@pytest.mark.genq(tools={"echo": {"activeDeadlineSeconds": 1}})
async def test_deadline(live):
    async with live.client() as c:
        job = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 20}})).json()
        done = await poll(c, job["id"], timeout=10)
        assert done["status"] == "failed" and done["error"]["code"] == "deadline_exceeded"


async def test_idempotency_key(live):
    async with live.client() as c:
        h = {"Idempotency-Key": "abc-1"}
        a = await c.post("/v1/jobs", json={"tool": "echo", "params": {"seed": 9}}, headers=h)
        b = await c.post("/v1/jobs", json={"tool": "echo", "params": {"seed": 9}}, headers=h)
        assert a.status_code in (200, 202) and a.json()["id"] == b.json()["id"]
        assert_error(await c.post("/v1/jobs", json={"tool": "echo", "params": {"seed": 10}}, headers=h), 409, "conflict")
        assert (await c.get("/v1/jobs")).json()["total"] == 1


async def test_sse_events(live):
    async with live.client() as c:
        job = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 1}})).json()
        events = await read_events(c, job["id"])
        statuses = [d["status"] for n, d in events if n == "status"]
        progress = [d for n, d in events if n == "progress"]
        assert statuses[-1] == "succeeded" and "running" in statuses
        assert len(progress) >= 10 and progress[-1]["step"] == 20 and progress[-1]["steps"] == 20


async def test_progress_events_go_out_only_while_someone_watches(live):
    """A job nobody streams gets no per-step progress events on the bus, only its status
    changes (a worker would otherwise wake nats-server every step of every job). An SSE
    stream opened mid-run announces itself, and gets the steps that are still to come."""
    from genq import constants

    bus = live.emb.rt.bus
    async with live.client() as c:
        job = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 0.5}})).json()
        sub = await bus.subscribe(constants.events_subject(job["id"]))  # a bare listener, not a watcher
        try:
            seen = []
            while not seen or seen[-1].get("status") not in ("succeeded", "failed"):
                msg = await sub.next(10.0)
                assert msg is not None, seen
                seen.append(msg)
        finally:
            await sub.unsubscribe()
        assert [m["type"] for m in seen] == ["status"] * len(seen) and seen[-1]["status"] == "succeeded"

        await _watched_from_mid_run(c)


async def _watched_from_mid_run(c) -> None:
    late = (await c.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 2}})).json()
    deadline = time.monotonic() + 10
    while (await c.get(f"/v1/jobs/{late['id']}")).json()["progress"] < 0.25:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    events = await read_events(c, late["id"])
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps and steps[-1] == 20 and steps[0] > 1, steps  # from where it was to the end
    # In its own process the tool hears of the watch one frame later: a step may be missed.
    assert steps == list(range(steps[0], 21)) or steps[1:] == list(range(steps[1], 21)) and steps[1] - steps[0] == 2, steps


@pytest.mark.genq(tools={"echo": {"options": {"isolation": "process"}, "maxWorkers": 1}})
async def test_a_tool_in_its_own_process_reports_every_step_once_someone_watches(live):
    """The same for a tool in a child process: unwatched it sends a few progress frames; an
    SSE stream opened mid-run makes the worker tell the child, which then sends every step."""
    async with live.client() as c:
        await _watched_from_mid_run(c)


async def test_a_worker_forgets_a_watch_that_is_not_renewed(monkeypatch):
    """Watches lapse after WATCH_TTL_SECONDS without an announcement (the stream closed),
    and a worker keeps at most _MAX_WATCHED of them, dropping lapsed and then the oldest."""
    from genq import constants
    from genq.worker import worker as w

    class Announcements:
        def __init__(self, ids):
            self.ids = ids

        def __aiter__(self):
            return self

        async def __anext__(self):
            if not self.ids:
                raise StopAsyncIteration
            return {"id": self.ids.pop(0)}

    clock = [1000.0]
    monkeypatch.setattr(w.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(w, "_MAX_WATCHED", 3)
    worker = w.Worker.__new__(w.Worker)
    worker._watched, worker._running = {}, {}
    await worker._listen_watches(Announcements(["a", "b"]))
    assert worker.watched("a") and worker.watched("b") and not worker.watched("c")
    clock[0] += constants.WATCH_TTL_SECONDS - 1
    await worker._listen_watches(Announcements(["b"]))  # renewed
    clock[0] += 2
    assert not worker.watched("a") and worker.watched("b")
    await worker._listen_watches(Announcements(["c", "d", "e"]))  # "a" lapsed: dropped first, then the oldest
    assert list(worker._watched) == ["c", "d", "e"] and not worker.watched("b")


async def test_tools_queues_health_metrics(live):
    async with live.client() as c:
        tools = (await c.get("/v1/tools")).json()["tools"]
        up = next(t for t in tools if t["name"] == "upscale")
        assert up["kind"] == "upscale" and up["variants"] == ["realesrgan", "lanczos"]
        assert up["params"]["properties"]["scale"]["enum"] == [2, 3, 4]
        assert_error(await c.get("/v1/tools/nope"), 404, "not_found")
        r = await c.post("/v1/tools/upscale/warm", json={"variant": "lanczos", "seconds": 60})
        assert r.status_code == 202
        assert_error(await c.post("/v1/tools/upscale/warm", json={"variant": "nope"}), 422, "validation_error")
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"store": "ok", "bus": "ok", "object_storage": "ok"}
        await c.post("/v1/jobs", json={"tool": "echo", "wait": 5})
        m = (await c.get("/metrics")).text
        assert 'genq_jobs_submitted_total{tool="echo"} 1.0' in m and "genq_http_request_seconds_bucket" in m
        assert (await c.get("/openapi.json")).json()["paths"]["/v1/jobs"]["post"]


async def test_rate_limit_headers(live):
    k = await live.new_key(name="rl")
    async with live.client(k) as c:
        r = await c.get("/v1/jobs")
        assert r.headers["ratelimit-limit"] == "60" and int(r.headers["ratelimit-remaining"]) == 59
        for _ in range(59):
            await c.get("/v1/queues")
        r = await c.get("/v1/jobs")
        assert_error(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1


async def test_upscale_end_to_end(live):
    async with live.client() as c:
        src = png_bytes(20, 12)
        for variant, scale in (("lanczos", 3), ("realesrgan", 2)):
            r = await c.post("/v1/jobs", files=[("tool", (None, "upscale")), ("variant", (None, variant)),
                                                ("scale", (None, str(scale))), ("image", ("in.png", src, "image/png"))])
            assert r.status_code == 202, r.text
            done = await poll(c, r.json()["id"], timeout=60)
            assert done["status"] == "succeeded", done
            img = Image.open(io.BytesIO((await c.get(done["links"]["result"])).content))
            assert img.size == (20 * scale, 12 * scale)
