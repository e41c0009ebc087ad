"""Security checks against a real ``genq up`` process (SPEC §3 "Auth"):

* another key's job, result, events, cancel, delete and retry answer 404, exactly like a
  job that does not exist (never revealing that it does);
* admin endpoints answer 403 to a user key, 401 to none or an unknown one;
* keys never appear in the server's log output (at DEBUG), in error bodies, in
  ``GET /v1/keys``, or in plain text anywhere in the data folder (stored only as hashes);
* uploaded filenames never reach the object store: every file written lands under
  ``jobs/<job-id>/inputs/`` or ``jobs/<job-id>/results/`` with a name genq chose, and a
  result name cannot walk out of the job's results.

(Rate limits under 50 concurrent clients: tests/test_rate_limit.py.)
"""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

from conftest import ADMIN, png_bytes
from hostile import GenqProcess, error_body_problem

TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    g = GenqProcess(tmp_path_factory.mktemp("security"), env={"GENQ_LOG_LEVEL": "DEBUG"}).start()
    try:
        yield g
    finally:
        g.stop()


def client(g: GenqProcess, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=g.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def new_key(g: GenqProcess, **kw) -> dict:
    with client(g, ADMIN) as c:
        r = c.post("/v1/keys", json={"name": kw.pop("name", "k"), **kw})
        assert r.status_code == 201, r.text
        return r.json()


def wait(c: httpx.Client, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def assert_404(r: httpx.Response, like: httpx.Response) -> None:
    assert r.status_code == 404, (r.request.method, r.request.url, r.status_code, r.text)
    assert error_body_problem(404, r.headers.get("content-type", ""), r.text) is None, r.text
    # byte for byte the answer for a job that does not exist: nothing tells them apart
    assert r.json() == like.json(), (r.text, like.text)


def test_another_keys_job_is_404_everywhere(server):
    alice, bob = new_key(server, name="alice"), new_key(server, name="bob")
    with client(server, alice["key"]) as a, client(server, bob["key"]) as b:
        done = a.post("/v1/jobs", json={"tool": "echo", "params": {"seed": 5}, "wait": 20}).json()
        assert done["status"] == "succeeded", done
        running = a.post("/v1/jobs", json={"tool": "echo", "params": {"sleep": 20}}).json()
        failed = a.post("/v1/jobs", json={"tool": "echo", "params": {"bad": True}, "wait": 20}).json()
        assert failed["status"] == "failed"
        missing = "01JC0000000000000000000000"
        for job in (done, running, failed):
            jid = job["id"]
            for method, path in [("GET", ""), ("GET", "/result"), ("GET", "/result/result.png"), ("GET", "/result/meta.json"),
                                 ("GET", "/events"), ("POST", "/cancel"), ("DELETE", ""), ("POST", "/retry")]:
                like = b.request(method, f"/v1/jobs/{missing}{path}")
                assert like.status_code == 404
                assert_404(b.request(method, f"/v1/jobs/{jid}{path}"), like)
            # and by prefix, different case, with padding: still nobody's job
            for variant in (jid.lower(), jid + " ", jid[:-1], urllib.parse.quote(jid + "/../" + jid)):
                assert b.get(f"/v1/jobs/{variant}").status_code == 404
        # Bob's list is empty and everyone's list needs an admin
        assert b.get("/v1/jobs").json()["total"] == 0
        r = b.get("/v1/jobs", params={"all": "true"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        # Bob's cancel did nothing: Alice's job is still running, and hers to cancel
        assert a.get(f"/v1/jobs/{running['id']}").json()["status"] in ("queued", "running")
        assert a.post(f"/v1/jobs/{running['id']}/cancel").status_code == 200
        assert wait(a, running["id"])["status"] == "cancelled"
        assert a.get(f"/v1/jobs/{done['id']}/result").status_code == 200
        # an admin sees everyone's
        with client(server, ADMIN) as adm:
            assert adm.get(f"/v1/jobs/{done['id']}").status_code == 200


def test_admin_endpoints_need_an_admin_key(server):
    user = new_key(server, name="plain-user")
    admin2 = new_key(server, name="second-admin", admin=True)
    calls = [("POST", "/v1/keys", {"name": "x"}), ("GET", "/v1/keys", None), ("DELETE", f"/v1/keys/{user['id']}", None),
             ("DELETE", f"/v1/keys/{admin2['id']}", None), ("POST", "/v1/tools/echo/warm", {"variant": "default", "seconds": 10}),
             ("GET", "/v1/jobs?all=true", None)]
    with client(server, user["key"]) as u, client(server, None) as anon, client(server, "gq_unknown_key_000000") as bad:
        for method, path, body in calls:
            r = u.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["code"] == "forbidden"
            for c in (anon, bad):
                r = c.request(method, path, json=body)
                assert r.status_code == 401, (method, path, r.text)
                assert r.json()["error"]["code"] == "unauthorized" and r.headers.get("www-authenticate")
        # a user key cannot make itself an admin or a premium key by any field
        r = u.post("/v1/keys", json={"name": "escalate", "admin": True, "tier": "premium"})
        assert r.status_code == 403
    with client(server, ADMIN) as adm:
        keys = {k["id"]: k for k in adm.get("/v1/keys").json()["keys"]}
        assert user["id"] in keys and admin2["id"] in keys and not keys[user["id"]]["admin"]
        assert "escalate" not in {k["name"] for k in keys.values()}
    with client(server, admin2["key"]) as a2:  # a created admin key works as one
        assert a2.get("/v1/keys").status_code == 200


def test_keys_never_leak(server):
    created = [new_key(server, name=f"leak-{i}", tier=("premium" if i else "standard")) for i in range(3)]
    secrets = [ADMIN] + [k["key"] for k in created]
    seen: list[str] = []
    with client(server, ADMIN) as adm:
        listing = adm.get("/v1/keys")
        seen.append(listing.text)
        for k in listing.json()["keys"]:
            assert "key" not in k and "key_hash" not in k, k
        for k in created:  # shown once, at creation, with its id and a short prefix
            assert k["key"].startswith(k["prefix"]) and len(k["prefix"]) <= 8
    # error bodies, for every way a key can be presented and refused
    for key in secrets:
        for headers in ({"Authorization": f"Bearer {key}x"}, {"X-API-Key": key + "x"}, {"Authorization": f"Basic {key}"},
                        {"Authorization": f"Bearer {key} {key}"}, {"X-API-Key": key * 20}):
            with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
                for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/keys"), ("POST", "/v1/jobs")]:
                    r = c.request(method, path)
                    assert r.status_code == 401, (headers, r.text)
                    seen.append(r.text + str(r.headers))
    # every kind of refusal by an authenticated caller: the key is in the headers only
    for key in secrets:
        with client(server, key) as c:
            for r in (c.post("/v1/jobs", json={"tool": "nope"}), c.post("/v1/jobs", json={"tool": "echo", "params": {"x": 1}}),
                      c.post("/v1/jobs", content=b"{", headers={"Content-Type": "application/json"}),
                      c.post("/v1/jobs", content=b"x", headers={"Content-Type": "text/plain"}),
                      c.post("/v1/jobs", json={"tool": "echo"}, headers={"Idempotency-Key": "\x01"}),
                      c.get("/v1/jobs/01JC0000000000000000000000"), c.get("/v1/jobs", params={"cursor": "zz"}),
                      c.get("/v1/queues/nope"), c.get("/v1/tools/nope"), c.delete("/v1/keys/nope"), c.put("/v1/jobs")):
                assert r.status_code >= 400, r.text
                seen.append(r.text + str(r.headers))
    answers = "\n".join(seen)
    log = server.log()
    # Captured, at DEBUG (the store's statements used to fill it through aiosqlite's
    # debug log; the stdlib sqlite3 logs nothing, so no length is asserted).
    assert "genq is up" in log and " DEBUG " in log, "the server's DEBUG log is not captured"
    data_files = [p for p in server.data.rglob("*") if p.is_file() and "nats" not in p.parts]
    assert any(p.name.startswith("genq.db") for p in data_files)
    for key in secrets:
        secret = key[3:] if key.startswith("gq_") else key
        for text, where in ((log, "the server log"), (answers, "an error answer"), (listing.text, "GET /v1/keys")):
            assert key not in text and secret[-16:] not in text, f"a key appears in {where}"
        for p in data_files:
            assert key.encode() not in p.read_bytes(), f"a key is stored in plain text in {p}"


NAMES = ["../../x.png", "/etc/passwd", "C:\\x.png", "C:\\..\\..\\windows\\x.png", "..\\..\\y.png", "\x00.png", "a\x00/../../b.png",
         "😀/../../u.png", "名前/../../n.png", "%2e%2e%2fp.png", "..%2f..%2fq.png", "\u202egnp.exe", "con.png", "x" * 4000 + ".png",
         "inputs/../../results/result.png", "../results/result.png", ".", ".."]


def test_filenames_cannot_escape_the_job_prefix(server):
    blobs = server.data / "blobs"
    before = {p for p in server.tmp.rglob("*") if p.is_file()}
    img = png_bytes()
    ids = []
    with client(server, ADMIN) as c:
        for name in NAMES:
            r = c.post("/v1/jobs", files=[("tool", (None, "echo")), ("text", (None, "fn")),
                                          ("image", (name, img, "image/png"))])
            assert r.status_code == 202, (name, r.text)
            ids.append(r.json()["id"])
        r = c.post("/v1/jobs", files=[("tool", (None, "echo"))] + [("images", (n, img, "image/png")) for n in NAMES[:3]])
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
        for jid in ids:
            assert wait(c, jid)["status"] == "succeeded"
            # result names are genq's; names that walk out of results/ find nothing
            for name in ("../inputs/image.png", "..%2Finputs%2Fimage.png", "../../" + ids[0] + "/results/result.png",
                         "/etc/passwd", "%00", "RESULT.PNG"):
                r = c.get(f"/v1/jobs/{jid}/result/{name}")
                assert r.status_code == 404, (name, r.status_code, r.text[:200])
            r = c.get(f"/v1/jobs/{jid}/result/result.png")
            assert r.status_code == 200 and r.headers["content-disposition"] == 'attachment; filename="result.png"'
    after = {p for p in server.tmp.rglob("*") if p.is_file()}
    written = after - before
    in_blobs = [p for p in written if p.is_relative_to(blobs)]
    assert in_blobs
    for p in in_blobs:
        rel = p.relative_to(blobs).parts
        assert len(rel) == 4 and rel[0] == "jobs" and rel[1] in ids and rel[2] in ("inputs", "results"), p
        assert rel[3] in ("image.png", "image-1.png", "image-2.png", "image-3.png", "result.png", "meta.json"), p
    others = [p for p in written if not p.is_relative_to(blobs) and not p.is_relative_to(server.data / "nats")
              and not p.name.startswith("genq.db") and p != server.log_path]
    assert others == [], others
    for p in after:
        assert not any(part in ("x.png", "y.png", "passwd", "u.png", "n.png", "b.png", "p.png", "q.png") for part in p.parts), p
    assert not Path("/x.png").exists() and not Path("/tmp/x.png").exists()
