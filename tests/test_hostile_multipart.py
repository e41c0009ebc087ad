"""Hypothesis-driven multipart fuzzing of ``POST /v1/jobs`` against a real ``genq up`` process.

Bodies are built by hand, byte by byte, so anything can be wrong in them: random fields
(genq's own and unknown ones, repeated), files under any field with any filename (unicode,
path traversal, NUL, quotes, CR/LF, 5,000 characters), any part content type and
Content-Transfer-Encoding (base64, quoted-printable, garbage), any charset; boundaries
short, long, quoted, unicode or absent; and malformed bodies: cut short, missing the final
boundary, LF-only line endings, a boundary other than the header's, header lines without
a colon, garbage before and after. Each answer is a 202/200 with a Job or a 4xx with the
SPEC error body, never a 5xx, never a hung connection, and the server serves a normal job
afterwards. (One exception, outside genq: a header value with control characters is not
HTTP, and uvicorn's parser refuses it with its own plain-text 400 before the app runs.)
Derandomized (the same bodies every run); ``GENQ_FUZZ_SEED`` explores others.
"""

from __future__ import annotations

import collections
import os
import time

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from conftest import ADMIN, png_bytes
from hostile import GenqProcess, error_body_problem, tools

FUZZ_SEED = int(os.environ.get("GENQ_FUZZ_SEED", "0"))
#: A request that gets no answer within this long counts as a hung connection.
HANG_SECONDS = 15.0

GOOD_PNG = png_bytes(8, 8)
NAMES = ["tool", "variant", "priority", "wait", "params", "image", "images", "text", "seed", "sleep", "bad",
         "colour", "", "tool\x00", "ïmage", "a" * 300]
FILENAMES = [None, "a.png", "../../x.png", "/etc/passwd", "C:\\x.png", "..\\..\\y.png", "\x00.png", "a\x00b.png",
             "😀.png", "名前.png", "x" * 5000, 'q"uote.png', "semi;colon.png", "new\r\nline.png", "", " ", ".", ".."]
CONTENT_TYPES = [None, "image/png", "image/jpeg", "image/webp", "text/plain", "application/json",
                 "application/octet-stream", "image/png; charset=utf-16", "multipart/mixed; boundary=zz", "ïmage/png", ""]
TRANSFER_ENCODINGS = [None, "base64", "quoted-printable", "8bit", "binary", "gzip", "x-\u00e9"]
VALUES = [b"echo", b"upscale", b"lanczos", b"high", b"urgent", b"0", b"-1", b"1e400", b"NaN", b"120.5", b"2",
          b'{"seed": 3}', b"[1]", b"{", b"null", b"true", b"\xff\xfe\x00", b"\xc3\x28", "😀".encode(),
          b"=?utf-8?q?x?=", b"QUJD", b"!!!", GOOD_PNG, GOOD_PNG[:20], b"GIF89a" + b"\0" * 30, b""]
BOUNDARY_CHARS = st.characters(codec="ascii", categories=["L", "N"], include_characters="'()+_,-./:=? ")


@st.composite
def parts(draw) -> bytes:
    name = draw(st.sampled_from(NAMES) | st.text(max_size=20))
    filename = draw(st.sampled_from(FILENAMES) | st.text(max_size=30))
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    if draw(st.booleans()):
        disposition += "; filename*=UTF-8''%F0%9F%98%80.png"
    headers = [f"Content-Disposition: {disposition}"]
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    if ctype is not None:
        headers.append(f"Content-Type: {ctype}")
    cte = draw(st.sampled_from(TRANSFER_ENCODINGS))
    if cte is not None:
        headers.append(f"Content-Transfer-Encoding: {cte}")
    if draw(st.integers(0, 9)) == 0:
        headers.append(draw(st.sampled_from(["no colon here", "X-Long: " + "h" * 9000, "Content-Disposition: attachment",
                                             ": empty name", "Content-Type:"])))
    encoding = draw(st.sampled_from(["utf-8", "latin-1", "utf-16"]))
    head = "\r\n".join(headers).encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace")
    value = draw(st.sampled_from(VALUES) | st.binary(max_size=200))
    return head + b"\r\n\r\n" + value


@st.composite
def multipart_requests(draw) -> tuple[str, bytes]:
    """(Content-Type header, body)."""
    boundary = draw(st.sampled_from(["b", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "x" * 200, "a b", "'q'", "é"])
                    | st.text(BOUNDARY_CHARS, min_size=1, max_size=70))
    body_parts = []
    if draw(st.booleans()):  # usually a real tool field first, so the request gets further
        body_parts.append(b'Content-Disposition: form-data; name="tool"\r\n\r\n' + draw(st.sampled_from([b"echo", b"upscale"])))
    body_parts += draw(st.lists(parts(), max_size=6))
    b = boundary.encode("utf-8")
    newline = draw(st.sampled_from([b"\r\n"] * 4 + [b"\n", b"\r"]))
    body = draw(st.sampled_from([b"", b"preamble garbage\r\n"]))
    for p in body_parts:
        body += b"--" + b + newline + p.replace(b"\r\n", newline) + newline
    body += draw(st.sampled_from([b"--" + b + b"--" + newline, b"--" + b + b"--", b"", b"--" + b, b"--" + b + b"--\r\nepilogue"]))
    cut = draw(st.sampled_from([None] * 6 + ["half", "one-byte-short"]))
    if cut == "half":
        body = body[: len(body) // 2]
    elif cut == "one-byte-short":
        body = body[:-1]
    header_boundary = draw(st.sampled_from([boundary, boundary, boundary, f'"{boundary}"', "other", ""]))
    ctype = draw(st.sampled_from([
        f"multipart/form-data; boundary={header_boundary}",
        f"multipart/form-data; boundary={header_boundary}",
        f"Multipart/Form-Data; BOUNDARY={header_boundary}; charset=utf-8",
        f"multipart/form-data; charset=ebcdic; boundary={header_boundary}",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        f"multipart/form-data;boundary={header_boundary};boundary=second",
    ]))
    return ctype, body


@st.composite
def valid_ish_requests(draw) -> tuple[str, bytes]:
    """Well-formed multipart with genq's fields, random values and files, sometimes an
    Idempotency-Key or a Prefer header: reaches the 202 path and the checks after parsing
    (params, images, filenames, idempotency)."""
    boundary = "genqfuzz" + draw(st.text(BOUNDARY_CHARS.filter(lambda c: c != " "), max_size=10))
    fields = [("tool", draw(st.sampled_from(["echo", "echo", "upscale", "nope"])))]
    for key in draw(st.lists(st.sampled_from(["variant", "priority", "wait", "params", "text", "seed", "scale"]),
                             max_size=4, unique=True)):
        value = {
            "variant": st.sampled_from(["default", "lanczos", "", "x" * 100]),
            "priority": st.sampled_from(["high", "normal", "low", "", "HIGH"]),
            "wait": st.sampled_from(["0", "0.5", "-1", "121", "abc", ""]),
            "params": st.sampled_from(['{"seed": 1}', '{"text": "hi"}', "{}", "[]", '{"seed": "x"}', "{bad"]),
            "text": st.text(max_size=120),
            "seed": st.integers(-5, 2**33).map(str),
            "scale": st.sampled_from(["2", "3", "4", "5", "x"]),
        }[key]
        fields.append((key, draw(value)))
    files = draw(st.lists(st.tuples(st.sampled_from(["image", "images"]), st.sampled_from(FILENAMES[1:]) | st.text(max_size=40),
                                    st.sampled_from([GOOD_PNG, GOOD_PNG[:40], b"not an image", b""])), max_size=4))
    out = b""
    for k, v in fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v.encode("utf-8", "surrogatepass") + b"\r\n"
    for k, fn, data in files:
        fn_bytes = fn.encode("utf-8", "surrogatepass")
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="'.encode() + fn_bytes
                + b'"\r\nContent-Type: image/png\r\n\r\n' + data + b"\r\n")
    out += f"--{boundary}--\r\n".encode()
    headers = {}
    if draw(st.booleans()):  # a few reused keys (replays and 409 conflicts) or any text
        key = draw(st.sampled_from(["k1", "k2", "k3"]) | st.text(max_size=300))
        headers["Idempotency-Key"] = key.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 3)) == 0:
        headers["Prefer"] = draw(st.sampled_from(["wait=0", "wait=0.2", "wait=abc", "respond-async, wait=0.1", "wait=-1",
                                                  "wait=" + "9" * 400 + "x", "wait"]))
    return f"multipart/form-data; boundary={boundary}", out, headers


def extremes() -> list[tuple[str, bytes]]:
    """Hand-made bodies at the parser's limits."""
    ct = "multipart/form-data; boundary=b"

    def field(name: str, value: bytes, extra: str = "") -> bytes:
        return f'--b\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode() + value + b"\r\n"

    tool = field("tool", b"echo")
    end = b"--b--\r\n"
    return [
        (ct, tool + b"".join(field(f"f{i}", b"1") for i in range(500)) + end),  # too many fields
        (ct, tool + b"".join(field("images", GOOD_PNG, f'; filename="{i}.png"') for i in range(40)) + end),  # too many files
        (ct, tool + b"--b\r\n" + b"".join(f"X-H{i}: v\r\n".encode() for i in range(5000)) + b"\r\nv\r\n" + end),
        (ct, tool + b"--b\r\nContent-Disposition: form-data; name=\"" + b"n" * 200_000 + b'"\r\n\r\nv\r\n' + end),
        (ct, tool + field("text", b"x" * 70_000) + end),  # over the per-field limit
        (ct, tool + b"--b\r\n" * 10_000 + end),  # empty parts
        (ct, b"--b--\r\n"),  # no parts at all
        (ct, b""),
        (ct, b"\r\n" * 50_000),
        ("multipart/form-data; boundary=" + "b" * 5000, b"--" + b"b" * 5000 + b"\r\n" + tool[4:] + b"--" + b"b" * 5000 + b"--\r\n"),
        (ct, tool + field("image", b"\0" * 1000, '; filename="x.png"') + b"--b\r\n" + b"Content-Disposition: form-data; name=\"image\""),
        (ct, tool + field("params", b'{"seed": ' + b"[" * 100_000 + b"]" * 100_000 + b"}") + end),  # deep JSON
        (ct, tool + field("params", b'{"seed": 1' + b"0" * 10_000 + b"}") + end),  # a 10,000-digit number
        (ct, tool + field("seed", b"1" + b"0" * 10_000) + end),
        (ct, tool + field("wait", b"1" + b"0" * 400) + end),
        (ct, tool + field("image", GOOD_PNG, '; filename="a.png"') + field("image", GOOD_PNG, '; filename="b.png"') + end),
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    g = GenqProcess(tmp_path_factory.mktemp("multipart"), config=tools(maxQueued=100_000),
                    env={"GENQ_LOG_LEVEL": "WARNING"}).start()
    try:
        yield g
    finally:
        g.stop()


class Checker:
    def __init__(self, url: str):
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"},
                                   timeout=httpx.Timeout(HANG_SECONDS))
        self.statuses: collections.Counter = collections.Counter()
        self.problems: list[str] = []

    def send(self, ctype: str, body: bytes, headers: dict | None = None) -> None:
        try:
            # raw UTF-8 header bytes: a hostile client is not bound to ASCII
            r = self.client.post("/v1/jobs", content=body, headers={"Content-Type": ctype.encode(), **(headers or {})})
        except httpx.LocalProtocolError:
            self.statuses["unsendable"] += 1  # h11 refuses to send it (a header with a trailing space)
            return
        except httpx.TimeoutException:
            self.problems.append(f"no answer in {HANG_SECONDS}s: {ctype!r} {body[:300]!r}")
            return
        except httpx.HTTPError as e:
            self.problems.append(f"connection error {e!r}: {ctype!r} {body[:300]!r}")
            return
        if r.status_code == 400 and r.text == "Invalid HTTP request received." and _has_control_bytes(headers):
            # Not HTTP: RFC 9110 forbids control characters in a field value, and uvicorn's
            # parser answers this plain 400 itself before any application sees the request.
            self.statuses["not-http"] += 1
            return
        self.statuses[r.status_code] += 1
        if r.status_code in (200, 202):
            job = r.json()
            if not (isinstance(job, dict) and job.get("id") and r.headers.get("location") == f"/v1/jobs/{job['id']}"):
                self.problems.append(f"{r.status_code} without a Job: {r.text[:200]}")
        elif 400 <= r.status_code < 500:
            why = error_body_problem(r.status_code, r.headers.get("content-type", ""), r.text)
            if why:
                self.problems.append(f"{r.status_code} not the SPEC body ({why}): {r.text[:200]} <- {ctype!r} {body[:300]!r}")
        else:
            self.problems.append(f"{r.status_code} {r.text[:200]} <- {ctype!r} {body[:300]!r}")


def _has_control_bytes(headers: dict | None) -> bool:
    return any(b < 0x20 and b != 0x09 or b == 0x7F for v in (headers or {}).values() for b in bytes(v))


def _fuzz(checker: Checker, strategy, examples: int) -> None:
    @seed(FUZZ_SEED)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=FUZZ_SEED == 0,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(req=strategy)
    def one(req):
        checker.send(*req)

    one()


@pytest.mark.slow
def test_multipart_fuzz_never_5xx_never_hangs(server):
    checker = Checker(server.url)
    t0 = time.monotonic()
    for ctype, body in extremes():
        checker.send(ctype, body)
    _fuzz(checker, multipart_requests(), 700)
    _fuzz(checker, valid_ish_requests(), 300)
    elapsed = time.monotonic() - t0
    n = sum(v for k, v in checker.statuses.items() if k not in ("unsendable", "not-http"))
    print(f"\nmultipart fuzz: {n} requests in {elapsed:.1f}s; statuses {dict(sorted(checker.statuses.items(), key=str))}")
    assert not checker.problems, f"{len(checker.problems)} bad answers, first ones:\n" + "\n".join(checker.problems[:10])
    assert checker.statuses[202] + checker.statuses[200] > 20, "the fuzzer should also reach the accepted path"
    assert sum(v for k, v in checker.statuses.items() if isinstance(k, int) and 400 <= k < 500) > 300
    # The server still serves: health, and a normal job to the end.
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        r = c.post("/v1/jobs", files=[("tool", (None, "upscale")), ("variant", (None, "lanczos")), ("scale", (None, "2")),
                                      ("image", ("ok.png", GOOD_PNG, "image/png"))], data={"wait": "30"})
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    assert server.alive()
    checker.client.close()
