"""Hostile and broken input over REST against a real genq: every refusal is the SPEC error
body with the right 4xx, answered fast, nothing is stored where it should not be, and the
server still serves a normal job afterwards."""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from conftest import data_uri, png_bytes
from helpers import assert_error, poll

MB = 1024 * 1024


def png_bomb(w: int = 20_000, h: int = 20_000) -> bytes:
    """A valid 1-bit grayscale PNG of w×h pixels (400 MP: 400 MB once Pillow decodes it)
    that is only a few dozen KB on disk: every row is zeros, which deflate squeezes ~1000×."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (w + 7) // 8)  # filter byte + packed bits
    co = zlib.compressobj(9)
    block = row * 1000
    idat = b"".join(co.compress(block) for _ in range(h // 1000)) + co.compress(row * (h % 1000)) + co.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def multipart_stream(size: int, boundary: str = "genqtestboundary", chunk: int = MB) -> tuple[AsyncIterator[bytes], int]:
    """A multipart body with a ``size``-byte image part, produced lazily; and its length."""
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"tool\"\r\n\r\necho\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def gen() -> AsyncIterator[bytes]:
        yield head + b"\x89PNG\r\n\x1a\n"
        left = size - 8
        block = b"\0" * chunk
        while left > 0:
            n = min(chunk, left)
            yield block[:n]
            left -= n
        yield tail

    return gen(), len(head) + size + len(tail)


class Timed:
    """``async with Timed(limit):`` asserts the block answered within ``limit`` seconds."""

    def __init__(self, limit: float = 1.0):
        self.limit = limit

    async def __aenter__(self) -> Timed:
        self.t0 = time.monotonic()
        return self

    async def __aexit__(self, *exc) -> None:
        self.seconds = time.monotonic() - self.t0
        if exc[0] is None:
            assert self.seconds < self.limit, f"took {self.seconds:.2f}s (limit {self.limit}s)"


def snapshot(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


async def post(c: httpx.AsyncClient, limit: float = 1.0, **kw) -> httpx.Response:
    async with Timed(limit):
        return await c.post("/v1/jobs", **kw)


def form(*fields: tuple[str, str], files: list[tuple[str, tuple[str, bytes, str]]] = ()) -> list:
    return [(k, (None, v)) for k, v in fields] + list(files)


async def test_broken_images(live):
    good = png_bytes()
    async with live.client() as c:
        # truncated PNG (the IDAT cut short)
        body = assert_error(await post(c, files=form(("tool", "echo"), files=[("image", ("t.png", good[: len(good) // 2], "image/png"))])),
                            400, "invalid_input")
        assert body["error"]["details"]["field"] == "image"
        # a PNG header and nothing after it
        assert_error(await post(c, files=form(("tool", "echo"), files=[("image", ("t.png", good[:30], "image/png"))])), 400, "invalid_input")
        # wrong magic bytes (a GIF, text) whatever the filename and declared type say
        for data in (b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + b"\0" * 20, b"hello, I am a PNG, honest"):
            body = assert_error(await post(c, files=form(("tool", "echo"), files=[("image", ("x.png", data, "image/png"))])),
                                415, "unsupported_media_type")
            assert "image/png" in body["error"]["details"]["accepted"]
        # zero bytes
        assert_error(await post(c, files=form(("tool", "echo"), files=[("image", ("empty.png", b"", "image/png"))])), 400, "invalid_input")
        # the same checks on the JSON path
        assert_error(await post(c, json={"tool": "echo", "inputs": {"image": data_uri(good[:40])}}), 400, "invalid_input")
        assert_error(await post(c, json={"tool": "echo", "inputs": {"image": data_uri(b"BM" + b"\0" * 60)}}), 415, "unsupported_media_type")
        assert_error(await post(c, json={"tool": "echo", "inputs": {"image": "data:image/png;base64,"}}), 400, "invalid_input")
        assert (await c.get("/v1/jobs")).json()["total"] == 0


async def test_decompression_bomb(live):
    bomb = png_bomb()
    assert len(bomb) < 200_000  # cheap on disk, 400 MP once decoded
    async with live.client() as c:
        for kw in ({"files": form(("tool", "echo"), files=[("image", ("bomb.png", bomb, "image/png"))])},
                   {"json": {"tool": "echo", "inputs": {"images": [data_uri(png_bytes()), data_uri(bomb)]}}}):
            body = assert_error(await post(c, **kw), 413, "payload_too_large")
            d = body["error"]["details"]
            assert d["width"] == 20_000 and d["height"] == 20_000 and d["max_pixels"] <= 40_000_000
        assert (await c.get("/v1/jobs")).json()["total"] == 0
    assert not (live.emb.data_dir / "blobs" / "jobs").exists() or not any((live.emb.data_dir / "blobs" / "jobs").iterdir())


async def test_oversize_bodies(live):
    async with live.client() as c:
        # 200 MB declared by Content-Length: refused from the header, before the body is read
        gen, length = multipart_stream(200 * MB)
        r = await post(c, 5.0, content=gen, headers={"Content-Type": "multipart/form-data; boundary=genqtestboundary",
                                                     "Content-Length": str(length)})
        body = assert_error(r, 413, "payload_too_large")
        assert body["error"]["details"]["max_bytes"] < 200 * MB
        # the same without Content-Length (chunked): refused once the limit is crossed
        gen, _ = multipart_stream(200 * MB)
        r = await post(c, 5.0, content=gen, headers={"Content-Type": "multipart/form-data; boundary=genqtestboundary"})
        assert_error(r, 413, "payload_too_large")
        # chunked JSON over the limit
        async def json_gen() -> AsyncIterator[bytes]:
            yield b'{"tool": "echo", "params": {"text": "'
            for _ in range(150):
                yield b"a" * MB
            yield b'"}}'
        r = await post(c, 5.0, content=json_gen(), headers={"Content-Type": "application/json"})
        assert_error(r, 413, "payload_too_large")
        # one file over the per-file limit (20 MB) but under the body limit
        big = b"\x89PNG\r\n\x1a\n" + b"\0" * (21 * MB)
        r = await post(c, 5.0, files=form(("tool", "echo"), files=[("image", ("big.png", big, "image/png"))]))
        assert_error(r, 413, "payload_too_large")
        # a 5 MB plain form field, and a 5 MB params field
        for name in ("text", "params"):
            r = await post(c, files=form(("tool", "echo"), (name, "x" * (5 * MB))))
            assert_error(r, 413, "payload_too_large")
        # a 5 MB string param in JSON is within the body limit: the tool's schema refuses it
        r = await post(c, json={"tool": "echo", "params": {"text": "x" * (5 * MB)}})
        assert_error(r, 422, "validation_error")


async def test_params_and_fields(live):
    async with live.client() as c:
        cases = [
            # unknown param, plain form field and JSON
            (dict(files=form(("tool", "echo"), ("colour", "red"))), 422, "validation_error"),
            (dict(json={"tool": "echo", "params": {"colour": "red"}}), 422, "validation_error"),
            # wrong types
            (dict(files=form(("tool", "echo"), ("seed", "abc"))), 422, "validation_error"),
            (dict(json={"tool": "echo", "params": {"seed": "abc"}}), 422, "validation_error"),
            (dict(json={"tool": "echo", "params": {"seed": -1}}), 422, "validation_error"),
            (dict(json={"tool": "echo", "params": {"sleep": [1]}}), 422, "validation_error"),
            (dict(json={"tool": "echo", "params": "seed=1"}), 422, "validation_error"),
            (dict(json={"tool": "echo", "wait": "soon"}), 422, "validation_error"),
            (dict(json={"tool": "echo", "wait": 500}), 422, "validation_error"),
            (dict(json={"tool": "echo", "priority": "urgent"}), 422, "validation_error"),
            (dict(json={"tool": "echo", "surprise": 1}), 422, "validation_error"),
            (dict(json={"tool": 5}), 422, "validation_error"),
            (dict(json={}), 422, "validation_error"),
            (dict(files=form(("tool", "echo"), ("wait", "soon"))), 422, "validation_error"),
            (dict(files=form(("tool", "echo"), ("priority", "urgent"))), 422, "validation_error"),
            (dict(files=form(("tool", "echo"), ("params", "[1, 2]"))), 400, "invalid_input"),
            (dict(files=form(("tool", "echo"), ("params", "{not json"))), 400, "invalid_input"),
            (dict(files=form(("text", "no tool"))), 422, "validation_error"),
            (dict(files=form(("tool", "echo"), ("seed", "1"), ("seed", "2"))), 422, "validation_error"),
            # unknown tool, unknown variant
            (dict(json={"tool": "nope"}), 422, "validation_error"),
            (dict(files=form(("tool", "../../echo"))), 422, "validation_error"),
            (dict(json={"tool": "echo", "variant": "turbo"}), 422, "validation_error"),
            (dict(files=form(("tool", "upscale"), ("variant", "nope"), ("scale", "2"),
                             files=[("image", ("a.png", png_bytes(), "image/png"))])), 422, "validation_error"),
            # malformed JSON, a JSON array, JSON that is not UTF-8
            (dict(content=b'{"tool": "echo",', headers={"Content-Type": "application/json"}), 400, "invalid_input"),
            (dict(content=b'[{"tool": "echo"}]', headers={"Content-Type": "application/json"}), 400, "invalid_input"),
            (dict(content=b'"echo"', headers={"Content-Type": "application/json"}), 400, "invalid_input"),
            (dict(content=b"\xff\xfe{}", headers={"Content-Type": "application/json"}), 400, "invalid_input"),
            (dict(content=b"", headers={"Content-Type": "application/json"}), 400, "invalid_input"),
            # wrong or missing content type
            (dict(content=b"tool=echo", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type"),
            (dict(content=b'{"tool": "echo"}', headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
            (dict(content=png_bytes(), headers={"Content-Type": "image/png"}), 415, "unsupported_media_type"),
            (dict(content=b'{"tool": "echo"}'), 415, "unsupported_media_type"),
            # multipart without a boundary, or with a broken body
            (dict(content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}), 400, "invalid_input"),
            # a file under a field that is not an image field
            (dict(files=form(("tool", "echo"), files=[("tool", ("a.png", png_bytes(), "image/png"))])), 422, "validation_error"),
            (dict(files=form(("tool", "echo"), files=[("photo", ("a.png", png_bytes(), "image/png"))])), 422, "validation_error"),
            # too many images: echo takes 0-3, upscale exactly 1
            (dict(files=form(("tool", "echo"), files=[("images", (f"{i}.png", png_bytes(), "image/png")) for i in range(4)])),
             422, "validation_error"),
            (dict(json={"tool": "echo", "inputs": {"images": [data_uri(png_bytes())] * 4}}), 422, "validation_error"),
            (dict(files=form(("tool", "upscale"), files=[("images", (f"{i}.png", png_bytes(), "image/png")) for i in range(2)])),
             422, "validation_error"),
            (dict(json={"tool": "upscale"}), 422, "validation_error"),
            (dict(json={"tool": "echo", "inputs": {"mask": data_uri(png_bytes())}}), 422, "validation_error"),
            # data: URIs that are not base64, or not strings
            (dict(json={"tool": "echo", "inputs": {"image": "data:image/png,hello"}}), 400, "invalid_input"),
            (dict(json={"tool": "echo", "inputs": {"image": "data:image/png;base64,!!!not base64!!!"}}), 400, "invalid_input"),
            (dict(json={"tool": "echo", "inputs": {"image": "data:image/png;base64"}}), 400, "invalid_input"),
            (dict(json={"tool": "echo", "inputs": {"image": 42}}), 422, "validation_error"),
            (dict(json={"tool": "echo", "inputs": {"image": "http://example.com/x.png"}}), 400, "invalid_input"),
        ]
        for kw, status, code in cases:
            r = await post(c, **kw)
            assert r.status_code == status, (kw, r.status_code, r.text[:500])
            assert_error(r, status, code)
            assert "Traceback" not in r.text
        # Idempotency-Key that is not printable
        r = await post(c, json={"tool": "echo"}, headers={"Idempotency-Key": "x" * 300})
        assert_error(r, 400, "invalid_input")
        assert (await c.get("/v1/jobs")).json()["total"] == 0


async def test_path_like_filenames_are_ignored(live):
    data_dir = live.emb.data_dir
    root = data_dir.parent  # the test's tmp_path: anything written by a traversal would land near here
    before = snapshot(root)
    etc_passwd = Path("/etc/passwd").read_bytes()
    img = png_bytes()
    async with live.client() as c:
        names = ["../../x.png", "/etc/passwd", "..\\..\\y.png", "../../../../../../../tmp/genq-escape.png", "a/../../z.png",
                 "\x00.png", "inputs/../../results/result.png"]
        ids = []
        for name in names:
            async with Timed(1.0):
                r = await c.post("/v1/jobs", files=form(("tool", "echo"), ("text", "p"), files=[("image", (name, img, "image/png"))]))
            assert r.status_code == 202, (name, r.text)
            ids.append(r.json()["id"])
        async with Timed(1.0):
            r = await c.post("/v1/jobs", files=form(("tool", "echo"), files=[("images", (n, img, "image/png")) for n in names[:3]]))
        assert r.status_code == 202, r.text
        multi = r.json()["id"]
        ids.append(multi)
        for jid in ids:
            done = await poll(c, jid)
            assert done["status"] == "succeeded", done
            meta = json.loads((await c.get(f"/v1/jobs/{jid}/result/meta.json")).content)
            expect = [["image.png", "image/png", len(img)]] if jid != multi else [
                [f"image-{i}.png", "image/png", len(img)] for i in (1, 2, 3)]
            assert meta["inputs"] == expect
            inputs = data_dir / "blobs" / "jobs" / jid / "inputs"
            assert sorted(p.name for p in inputs.iterdir()) == [e[0] for e in expect]
    after = snapshot(root)
    allowed = [data_dir / "blobs" / "jobs" / jid for jid in ids]
    stray = [p for p in after - before
             if not any(a in p.parents for a in allowed)
             and not p.is_relative_to(data_dir / "nats")
             and not p.name.startswith("genq.db")]
    assert stray == [], stray
    assert not Path("/tmp/genq-escape.png").exists()
    assert Path("/etc/passwd").read_bytes() == etc_passwd
    for p in after:  # nothing anywhere under the test folder carries an uploaded name
        assert p.name not in ("x.png", "y.png", "z.png", "passwd", "genq-escape.png"), p


async def test_server_fine_after_abuse(live):
    """A burst of every kind of bad request, then a normal job runs to completion."""
    bomb = png_bomb()
    async with live.client() as c:
        bad = [
            dict(files=form(("tool", "echo"), files=[("image", ("b.png", bomb, "image/png"))])),
            dict(files=form(("tool", "echo"), files=[("image", ("t.png", png_bytes()[:50], "image/png"))])),
            dict(content=b"[1]", headers={"Content-Type": "application/json"}),
            dict(content=b"{", headers={"Content-Type": "application/json"}),
            dict(json={"tool": "echo", "params": {"seed": "abc"}}),
            dict(files=form(("tool", "echo"), ("text", "x" * (5 * MB)))),
        ]
        for _ in range(3):
            for kw in bad:
                r = await post(c, **kw)
                assert 400 <= r.status_code < 500 and set(r.json()) == {"error"}, r.text
        gen, length = multipart_stream(200 * MB)
        r = await post(c, 5.0, content=gen, headers={"Content-Type": "multipart/form-data; boundary=genqtestboundary",
                                                     "Content-Length": str(length)})
        assert r.status_code == 413
        r = await c.post("/v1/jobs", files=form(("tool", "echo"), ("seed", "7"), ("sleep", "0.2"),
                                                  files=[("image", ("ok.png", png_bytes(), "image/png"))]))
        assert r.status_code == 202, r.text
        done = await poll(c, r.json()["id"])
        assert done["status"] == "succeeded" and done["result"]["seed"] == 7
        assert (await c.get(done["links"]["result"])).status_code == 200
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get("/v1/jobs")).json()["total"] == 1
