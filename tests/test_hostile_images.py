"""A crafted-image corpus, built here, through the REST API of a real ``genq up`` process.

Decompression bombs (PNG, JPEG, WEBP with huge declared dimensions), truncated and corrupt
files, wrong magic, huge metadata (PNG tEXt/zTXt/iTXt/iCCP, JPEG COM/APP, WEBP EXIF/XMP),
animated images (APNG, GIF, WEBP), and the modes a tool must cope with (CMYK JPEG,
16-bit PNG, palette, LA, 1-bit, interlaced...). Each file goes to ``upscale`` (Lanczos:
the worker decodes and resizes every accepted image for real) as a multipart upload:

* a refusal is a 4xx with the SPEC error body; an acceptance is a 202 whose job then
  succeeds (the tool handled the mode);
* the server-side time of each request (the ``genq_http_request_seconds`` histogram's sum,
  read before and after it) has a median <= 100 ms over the repeats. The assertion allows a
  1.5x margin, more on an oversubscribed machine (load average over the core count); the
  table shows every figure against the plain 100 ms;
* the server process's resident memory grows by less than 100 MB over the whole corpus
  (peak VmHWM after a reset, and VmRSS sampled every 10 ms).

A table of every file with its answer, server-side and client round-trip medians is printed.
"""

from __future__ import annotations

import io
import json
import random
import re
import statistics
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image, PngImagePlugin

from conftest import ADMIN
from hostile import GenqProcess, error_body_problem
from helpers import encode, jpeg_with_size, noise, png_bomb, png_chunk, webp_patched, webp_vp8x

MB = 1024 * 1024
REPEATS = 5
#: SPEC / issue: each request handled in <= 100 ms on the server.
SERVER_LIMIT = 0.100
RSS_LIMIT_KB = 100 * 1024


# --- builders ------------------------------------------------------------------------------


def png_with_ihdr(width: int, height: int, *, depth: int = 8, color: int = 2) -> bytes:
    """A PNG whose IHDR declares width x height, with one tiny IDAT (not enough data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def png_insert(png: bytes, *chunks: bytes) -> bytes:
    """``png`` with chunks inserted right after IHDR (signature 8 + IHDR 25 bytes)."""
    return png[:33] + b"".join(chunks) + png[33:]


def png_bad_crc(png: bytes) -> bytes:
    i = png.index(b"IDAT")
    length = struct.unpack(">I", png[i - 4 : i])[0]
    crc = i + 4 + length
    return png[:crc] + bytes(b ^ 0xFF for b in png[crc : crc + 4]) + png[crc + 4 :]


def jpeg_with_segments(marker: int, payload: bytes, count: int) -> bytes:
    """A real JPEG with ``count`` copies of one APPn/COM segment (each <= 65,533 bytes)."""
    jpg = encode(noise("RGB", (32, 32)), "JPEG")
    seg = bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload
    return jpg[:2] + seg * count + jpg[2:]


def jpeg_progressive_bomb() -> bytes:
    data = bytearray(encode(noise("RGB", (16, 16)), "JPEG", progressive=True))
    sof = data.index(b"\xff\xc2")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65_500, 65_500)
    return bytes(data)


def webp_with_chunk(kind: bytes, size: int) -> bytes:
    """An extended WEBP (VP8X with the EXIF/XMP flag) carrying one ``size``-byte chunk."""
    frame = encode(noise("RGB", (16, 16)), "WEBP", lossless=True)[12:]
    flags = {b"EXIF": 0x08, b"XMP ": 0x04, b"ICCP": 0x20}[kind]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([flags, 0, 0, 0]) + (15).to_bytes(3, "little") + (15).to_bytes(3, "little")
    payload = kind + struct.pack("<I", size) + b"\0" * size + (b"\0" if size % 2 else b"")
    body = b"WEBP" + vp8x + (payload + frame if kind == b"ICCP" else frame + payload)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def png_text(kind: str, size: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    if kind == "iTXt":
        info.add_itxt("Comment", "x" * size, lang="en", tkey="Comment")
    else:
        info.add_text("Comment", "x" * size, zip=kind == "zTXt")
    return encode(noise("RGB", (32, 32)), "PNG", pnginfo=info)


def ztxt_bomb(size: int = 300 * MB) -> bytes:
    """A zTXt chunk that inflates to ``size`` bytes (a decompression bomb in metadata)."""
    co = zlib.compressobj(9)
    block = b"x" * MB
    data = b"".join(co.compress(block) for _ in range(size // MB)) + co.flush()
    return png_insert(encode(noise("RGB", (32, 32)), "PNG"), png_chunk(b"zTXt", b"Comment\0\0" + data))


def iccp_bomb(size: int = 300 * MB) -> bytes:
    co = zlib.compressobj(9)
    data = b"".join(co.compress(b"\0" * MB) for _ in range(size // MB)) + co.flush()
    return png_insert(encode(noise("RGB", (32, 32)), "PNG"), png_chunk(b"iCCP", b"icc\0\0" + data))


def png_huge_iccp(size: int = 15 * MB) -> bytes:
    """An iCCP chunk of ``size`` incompressible bytes."""
    data = zlib.compress(random.Random(3).randbytes(size), 0)
    return png_insert(encode(noise("RGB", (32, 32)), "PNG"), png_chunk(b"iCCP", b"icc\0\0" + data))


def png_many_chunks(n: int = 200_000) -> bytes:
    """Hundreds of thousands of tiny ancillary chunks (a slow-parse attempt)."""
    return png_insert(encode(noise("RGB", (32, 32)), "PNG"), png_chunk(b"tEXt", b"k\0v") * n)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def image(mode: str, fmt: str = "PNG", size=(48, 32), **params) -> bytes:
    if mode == "I;16":
        img = Image.frombytes("I;16", size, random.Random(1).randbytes(size[0] * size[1] * 2))
    elif mode == "P":
        img = noise("L", size).convert("P")
        img.putpalette([random.Random(2).randrange(256) for _ in range(768)])
    else:
        img = noise(mode, size)
    return encode(img, fmt, **params)


def png_rgb16() -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, written by hand (Pillow cannot)."""
    w, h = 24, 16
    raw = b"".join(b"\0" + random.Random(y).randbytes(w * 6) for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def corpus() -> list[tuple[str, bytes, str]]:
    """(name, bytes, expected): expected is "accept", "reject" or "either"."""
    good_png = image("RGB")
    good_jpg = image("RGB", "JPEG")
    good_webp = image("RGB", "WEBP")
    big = noise("RGB", (256, 256))
    c: list[tuple[str, bytes, str]] = [
        # decompression bombs
        ("png-bomb-20000x20000", png_bomb(20_000), "reject"),
        ("png-bomb-6400x6400 (41 MP)", png_bomb(6_400), "reject"),
        ("png-ihdr-100000x100000", png_with_ihdr(100_000, 100_000), "reject"),
        ("png-ihdr-2^31-1 wide", png_with_ihdr(2**31 - 1, 1), "reject"),
        ("png-ihdr-0x0", png_with_ihdr(0, 0), "reject"),
        ("jpeg-sof0-30000x30000", jpeg_with_size(30_000, 30_000), "reject"),
        ("jpeg-sof2-65500x65500", jpeg_progressive_bomb(), "reject"),
        ("jpeg-sof0-0x0", jpeg_with_size(0, 0), "reject"),
        ("webp-vp8x-16383x16383", webp_vp8x(16_383, 16_383), "reject"),
        ("webp-vp8l-16384x16384", webp_patched(16_384, 16_384, lossless=True), "reject"),
        ("webp-vp8-16383x16383", webp_patched(16_383, 16_383, lossless=False), "reject"),
        # truncated and corrupt
        ("png-truncated-half", encode(big, "PNG")[: len(encode(big, "PNG")) // 2], "reject"),
        ("jpeg-truncated-half", encode(big, "JPEG")[: len(encode(big, "JPEG")) // 2], "reject"),
        ("webp-truncated-half", encode(big, "WEBP")[: len(encode(big, "WEBP")) // 2], "reject"),
        ("png-signature-only", good_png[:8], "reject"),
        ("png-ihdr-only", good_png[:33], "reject"),
        # Pillow does not check CRCs of image data; the zlib stream is intact, so it decodes
        ("png-idat-bad-crc", png_bad_crc(encode(big, "PNG")), "either"),
        ("png-magic+random", good_png[:8] + random.Random(5).randbytes(4000), "reject"),
        ("jpeg-magic+random", b"\xff\xd8\xff" + random.Random(6).randbytes(4000), "reject"),
        ("webp-riff-size-lies", b"RIFF\xff\xff\xff\x7fWEBP" + good_webp[12:], "either"),
        ("webp-header-only", good_webp[:20], "reject"),
        ("jpeg-no-eoi", good_jpg[:-2], "either"),  # decoders pad a missing EOI
        # wrong magic (the filename says .png)
        ("gif-as-png", encode(noise("P", (32, 32)), "GIF"), "reject"),
        ("bmp-as-png", encode(noise("RGB", (32, 32)), "BMP"), "reject"),
        ("tiff-as-png", encode(noise("RGB", (32, 32)), "TIFF"), "reject"),
        ("text-as-png", b"I am a PNG, honest\n" * 50, "reject"),
        ("svg-as-png", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "reject"),
        ("html-as-png", b"<!doctype html><html><body>x</body></html>", "reject"),
        ("zip-as-png", b"PK\x03\x04" + b"\0" * 100, "reject"),
        ("pdf-as-png", b"%PDF-1.7\n" + b"\0" * 100, "reject"),
        ("empty", b"", "reject"),
        ("text-15MB-as-png", b"not an image " * (15 * MB // 13), "reject"),  # the cost of the upload alone
        # huge metadata, within the 20 MB upload limit
        ("png-tEXt-15MB", png_text("tEXt", 15 * MB), "either"),
        ("png-zTXt-15MB", png_text("zTXt", 15 * MB), "either"),
        ("png-iTXt-15MB", png_text("iTXt", 15 * MB), "either"),
        ("png-zTXt-bomb-300MB", ztxt_bomb(), "either"),
        ("png-iCCP-bomb-300MB", iccp_bomb(), "either"),
        ("png-iCCP-15MB", png_huge_iccp(), "either"),
        ("png-200k-tEXt-chunks", png_many_chunks(), "either"),
        ("jpeg-COM-250x64KB", jpeg_with_segments(0xFE, b"c" * 65_000, 250), "either"),
        ("jpeg-APP1-250x64KB", jpeg_with_segments(0xE1, b"Exif\0\0" + b"e" * 64_990, 250), "either"),
        ("jpeg-APP2-ICC-250x64KB", jpeg_with_segments(0xE2, b"ICC_PROFILE\0\x01\xfa" + b"i" * 64_980, 250), "either"),
        ("webp-EXIF-15MB", webp_with_chunk(b"EXIF", 15 * MB), "either"),
        ("webp-XMP-15MB", webp_with_chunk(b"XMP ", 15 * MB), "either"),
        ("webp-ICCP-15MB", webp_with_chunk(b"ICCP", 15 * MB), "either"),
        ("webp-EXIF-corrupt-1KB", webp_with_chunk(b"EXIF", 1024), "reject"),
        ("jpeg-EXIF-corrupt", jpeg_with_segments(0xE1, b"Exif\0\0" + b"\xff" * 200, 1), "either"),
        # animated
        ("apng-3-frames", animated("PNG"), "reject"),
        ("gif-animated", animated("GIF"), "reject"),
        ("webp-animated", animated("WEBP"), "reject"),
        # modes and variants a tool must handle
        ("png-rgb", good_png, "accept"),
        ("png-rgba", image("RGBA"), "accept"),
        ("png-l", image("L"), "accept"),
        ("png-la", image("LA"), "accept"),
        ("png-p", image("P"), "accept"),
        ("png-p-transparency", image("P", transparency=0), "accept"),
        ("png-1bit", image("1"), "accept"),
        ("png-i16-gray", image("I;16"), "accept"),
        ("png-rgb-16bit", png_rgb16(), "accept"),
        ("png-interlaced", _interlaced_png(), "accept"),
        ("png-1x1", image("RGB", size=(1, 1)), "accept"),
        ("jpeg-rgb", good_jpg, "accept"),
        ("jpeg-cmyk", image("CMYK", "JPEG"), "accept"),
        ("jpeg-l", image("L", "JPEG"), "accept"),
        ("jpeg-progressive", image("RGB", "JPEG", progressive=True), "accept"),
        ("jpeg-exif-rotated", _jpeg_rotated(), "accept"),
        ("mpo-2-frames", _mpo(), "accept"),
        ("webp-lossy", good_webp, "accept"),
        ("webp-lossless", image("RGB", "WEBP", lossless=True), "accept"),
        ("webp-rgba", image("RGBA", "WEBP"), "accept"),
    ]
    for name, data, _ in c:
        assert len(data) < 20 * MB, name
    return c


def _interlaced_png() -> bytes:
    """An Adam7-interlaced PNG, written by hand from raw rows (Pillow reads them, never
    writes them), and checked to decode to the same pixels."""
    w, h = 16, 8
    img = noise("RGB", (w, h))
    px = img.tobytes()
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b""
    for x0, y0, dx, dy in passes:
        cols = range(x0, w, dx)
        for y in range(y0, h, dy):
            if len(cols):
                raw += b"\0" + b"".join(px[(y * w + x) * 3 : (y * w + x) * 3 + 3] for x in cols)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    with Image.open(io.BytesIO(data)) as check:
        assert check.info.get("interlace") == 1 and check.convert("RGB").tobytes() == px
    return data


def _jpeg_rotated() -> bytes:
    img = noise("RGB", (48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    return encode(img, "JPEG", exif=exif.tobytes())


def _mpo() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    return encode(frames[0], "MPO", save_all=True, append_images=frames[1:])


# --- measurement ---------------------------------------------------------------------------


_SUM = re.compile(r'^genq_http_request_seconds_sum\{method="POST",route="/v1/jobs"\} (\S+)$', re.M)


def server_seconds(c: httpx.Client) -> float:
    """The POST /v1/jobs latency sum the server has recorded so far."""
    m = _SUM.search(c.get("/metrics").text)
    return float(m.group(1)) if m else 0.0


class RssSampler(threading.Thread):
    def __init__(self, g: GenqProcess):
        super().__init__(daemon=True)
        self.g, self.peak, self.stop = g, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.01):
            try:
                self.peak = max(self.peak, self.g.rss_kb())
            except (OSError, LookupError):
                return


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    g = GenqProcess(tmp_path_factory.mktemp("images"), env={"GENQ_LOG_LEVEL": "WARNING"}).start()
    try:
        yield g
    finally:
        g.stop()


BOUNDARY = "genqcorpus7MA4YWxkTrZu0gW"


def multipart(data: bytes) -> bytes:
    """The upload, encoded once: the client then only writes bytes, and the server-side time
    does not include waiting for a busy client to encode 16 MB again."""
    fields = b"".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                      for k, v in (("tool", "upscale"), ("variant", "lanczos"), ("scale", "2")))
    return (fields + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode())


def submit(c: httpx.Client, data: bytes, *, encoded: bytes | None = None) -> httpx.Response:
    return c.post("/v1/jobs", content=encoded if encoded is not None else multipart(data),
                  headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def limit_for_load() -> tuple[float, str]:
    """The server-side limit with its margin: 1.5x, or more when the machine is
    oversubscribed (load average over the core count: each runnable process then gets a
    share of a core, and wall-clock time stretches by about that factor)."""
    import os

    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    factor = max(1.5, load / cores)
    return SERVER_LIMIT * factor, f"{SERVER_LIMIT * 1000:.0f} ms x {factor:.1f} (load average {load:.1f} on {cores} cores)"


@pytest.mark.slow
def test_image_corpus_answers_fast_with_flat_memory(server):
    items = corpus()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as c:
        # warm-up: the first uploads and the first Lanczos job allocate what later ones reuse
        for data in (image("RGB"), image("RGBA", "WEBP"), image("RGB", "JPEG"), png_bomb(6_400)):
            r = submit(c, data)
            if r.status_code == 202:
                _wait(c, r.json()["id"])
        time.sleep(0.5)
        rss_before = server.rss_kb()
        reset = _reset_peak(server.pid)
        sampler = RssSampler(server)
        sampler.start()
        rows, problems, accepted = [], [], []
        for name, data, expected in items:
            srv, rtt, answers = [], [], set()
            encoded = multipart(data)
            for _ in range(REPEATS):
                s0 = server_seconds(c)
                t0 = time.perf_counter()
                r = submit(c, data, encoded=encoded)
                rtt.append(time.perf_counter() - t0)
                srv.append(server_seconds(c) - s0)
                code = r.json()["error"]["code"] if r.status_code >= 400 else "accepted"
                answers.add((r.status_code, code))
                if r.status_code == 202:
                    accepted.append((name, r.json()["id"]))
                    # the tool runs in the same process: let it finish before the next
                    # request, so each time measured is the API's alone
                    _wait(c, r.json()["id"])
                elif 400 <= r.status_code < 500:
                    why = error_body_problem(r.status_code, r.headers.get("content-type", ""), r.text)
                    if why:
                        problems.append(f"{name}: {r.status_code} is not the SPEC body ({why}): {r.text[:200]}")
                else:
                    problems.append(f"{name}: {r.status_code} {r.text[:200]}")
            if len(answers) != 1:
                problems.append(f"{name}: different answers to the same file: {answers}")
            status, code = next(iter(answers))
            if expected == "accept" and status != 202:
                problems.append(f"{name}: expected 202, got {status} {code}")
            if expected == "reject" and not 400 <= status < 500:
                problems.append(f"{name}: expected a 4xx, got {status}")
            rows.append((name, len(data), status, code, statistics.median(srv), statistics.median(rtt)))
        sampler.stop.set()
        sampler.join()
        # every accepted file was handled by the tool: the job succeeded
        failed_jobs = []
        for name, job_id in accepted:
            job = _wait(c, job_id)
            if job["status"] != "succeeded":
                failed_jobs.append(f"{name}: {job['status']} {job['error']}")
        rss_after = server.rss_kb()
        peak = status_kb(server.pid, "VmHWM") if reset else sampler.peak

    print(f"\n{'file':32} {'bytes':>10} {'status':>6} {'answer':24} {'server ms':>9} {'rtt ms':>8}   (medians of {REPEATS})")
    for name, size, status, code, srv, rtt in rows:
        flag = "  <-- over 100 ms" if srv > SERVER_LIMIT else ""
        print(f"{name:32} {size:10d} {status:6d} {code:24} {srv * 1000:9.1f} {rtt * 1000:8.1f}{flag}")
    print(f"server RSS: {rss_before / 1024:.0f} MB before, {rss_after / 1024:.0f} MB after, peak {peak / 1024:.0f} MB "
          f"({'VmHWM' if reset else 'sampled every 10 ms'}); growth {(max(peak, rss_after) - rss_before) / 1024:.0f} MB; "
          f"sampled peak {sampler.peak / 1024:.0f} MB")
    assert not problems, "\n".join(problems)
    assert not failed_jobs, "accepted files the tool did not handle:\n" + "\n".join(failed_jobs)
    limit, how = limit_for_load()
    over = [n for n, _, _, _, s, _ in rows if s > SERVER_LIMIT]
    print(f"{len(rows) - len(over)} of {len(rows)} files answered within {SERVER_LIMIT * 1000:.0f} ms server-side "
          f"(median of {REPEATS}); asserted limit {how}")
    slow = [(n, round(s * 1000, 1)) for n, _, _, _, s, _ in rows if s > limit]
    assert not slow, (f"server-side median over {how}; medians of {REPEATS} on the server's own clock "
                      f"(genq_http_request_seconds): {slow}")
    assert max(peak, rss_after) - rss_before < RSS_LIMIT_KB, "server RSS grew by 100 MB or more over the corpus"
    assert server.alive()


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _wait(c: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck in {job['status']}"
        time.sleep(0.05)


def test_corpus_is_what_it_says():
    """The builders make what their names claim (so the API test proves something)."""
    with Image.open(io.BytesIO(image("CMYK", "JPEG"))) as im:
        assert im.mode == "CMYK"
    with Image.open(io.BytesIO(image("I;16"))) as im:
        assert im.mode.startswith("I")
    with Image.open(io.BytesIO(png_rgb16())) as im:
        im.load()
    for fmt in ("PNG", "WEBP", "GIF"):
        with Image.open(io.BytesIO(animated(fmt))) as im:
            assert im.n_frames == 3, fmt
    assert json.dumps(len(ztxt_bomb(10 * MB))) and len(ztxt_bomb(10 * MB)) < 100_000
    assert b"zTXt" in png_text("zTXt", MB) and b"iTXt" in png_text("iTXt", MB)


# --- the metadata limits refuse abuse, not real files ----------------------------------------


def _check(data: bytes):
    from genq.images import check_image

    return check_image(data, max_bytes=20 * MB, max_pixels=40_000_000)


def _refused(data: bytes):
    from genq.images import ImageRejected

    with pytest.raises(ImageRejected) as info:
        _check(data)
    return info.value


def png_rechunked(png: bytes, size: int) -> bytes:
    """The same PNG with its image data split into ``size``-byte IDAT chunks (libpng: 8 KB)."""
    pos, idat, head, tail = 8, b"", b"", b""
    while pos < len(png):
        length = struct.unpack(">I", png[pos : pos + 4])[0]
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            idat += body
        elif idat:
            tail += png_chunk(kind, body)
        else:
            head += png_chunk(kind, body)
        pos += 12 + length
    return png[:8] + head + b"".join(png_chunk(b"IDAT", idat[i : i + size]) for i in range(0, len(idat), size)) + tail


def test_real_world_metadata_is_accepted():
    from PIL import ImageCms

    big = encode(noise("RGB", (2048, 2048)), "PNG", compress_level=1)  # ~12 MB of noise
    assert 10 * MB < len(big) < 20 * MB
    assert _check(big).width == 2048
    assert _check(png_rechunked(big, 8192)).width == 2048  # ~1,500 chunks, as libpng writes them
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert _check(encode(noise("RGB", (64, 64)), "JPEG", icc_profile=icc)).format == "jpeg"
    assert _check(encode(noise("RGB", (64, 64)), "WEBP", icc_profile=icc, exif=_exif_bytes())).format == "webp"
    assert _check(encode(noise("RGB", (64, 64)), "PNG", icc_profile=icc)).format == "png"
    # a generation workflow stored as a PNG text chunk (ComfyUI, A1111 "parameters"): 1 MB
    assert _check(png_text("tEXt", MB)).format == "png"
    assert _check(png_text("iTXt", 3 * MB)).format == "png"
    assert _check(encode(noise("RGB", (64, 64)), "JPEG", exif=_exif_bytes(60_000))).format == "jpeg"


def _exif_bytes(size: int = 100) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010E] = "d" * size  # ImageDescription
    return exif.tobytes()


def test_metadata_limits_are_exact():
    from genq import images

    base = encode(noise("RGB", (32, 32)), "PNG")
    room = images.MAX_METADATA_BYTES - 3  # a tEXt chunk body of "k\0" + value
    assert _check(png_insert(base, png_chunk(b"tEXt", b"k\0" + b"v" * (room - 2 + 3)))).format == "png"
    err = _refused(png_insert(base, png_chunk(b"tEXt", b"k\0" + b"v" * (room + 2))))
    assert (err.status, err.code, err.details["max_metadata_bytes"]) == (400, "invalid_input", images.MAX_METADATA_BYTES)
    assert "metadata" in err.message
    few = images.MAX_CHUNKS - 10
    assert _check(png_insert(base, png_chunk(b"tEXt", b"k\0v") * few)).format == "png"
    err = _refused(png_insert(base, png_chunk(b"tEXt", b"k\0v") * images.MAX_CHUNKS))
    assert err.details["max_chunks"] == images.MAX_CHUNKS
    # metadata after the image data counts too (Pillow reads it when it loads the pixels)
    err = _refused(base[:-12] + png_chunk(b"tEXt", b"k\0" + b"v" * (images.MAX_METADATA_BYTES + 10)) + base[-12:])
    assert err.status == 400
