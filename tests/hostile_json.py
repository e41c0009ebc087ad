"""Adversarial JSON for every endpoint that takes JSON or form fields (tests/test_hostile_json.py,
and tests/test_k8s_hostile_json.py against ``genq api`` on a real kube-apiserver).

``requests()`` is a hypothesis strategy of whole requests: a JSON document, built as raw
bytes so anything can be wrong in it — nesting thousands deep (arrays, objects, mixed,
unclosed), 100,000 keys or elements, megabyte strings, 5,000-digit integers and integers
past 64 bits, ``1e400``, ``NaN``/``Infinity``, duplicate keys, invalid UTF-8 (stray bytes,
overlong forms, encoded surrogates), lone ``\\ud800`` escapes — placed where each endpoint
reads JSON: the whole body, a submit's ``params``/``inputs``/``tool``/``wait``, a key's
``name``, a warm's ``seconds``, the multipart ``params`` field, a plain form field, a
JSON-typed form param.
A document that carries one of the poisons is marked ``must_refuse``: genq answers it 4xx.

``Fuzzer.send`` checks each answer: never a 5xx, a 4xx is the SPEC error body within
``FAST_SECONDS`` (resent after each of ``RESEND_PAUSES`` if not, so a scheduler hiccup on
a busy CI box is told apart from a slow path, which is slow every time).
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from hostile import error_body_problem

#: Derandomized by default (the same requests every run); ``GENQ_FUZZ_SEED`` explores others.
FUZZ_SEED = int(os.environ.get("GENQ_FUZZ_SEED", "0"))
#: genq's documented limits (genq.jsonlimits), restated: the test must notice if they move.
MAX_DEPTH = 32
MAX_ITEMS = 10_000
#: A refusal (4xx) must come within this long. An accepted job's answer is not timed: in
#: cluster mode it includes creating a GenerationJob (an etcd write).
FAST_SECONDS = 0.100
#: A slow refusal is sent again after each of these pauses before it counts as slow: on
#: a CI box shared by several jobs the server can wait that long for a core now and then;
#: a slow code path is slow every time.
RESEND_PAUSES = (0.1, 0.5)


@dataclass
class Doc:
    """A JSON document as raw bytes; ``poison`` names why genq must refuse it (or None)."""

    raw: bytes
    poison: str | None = None


def _join(docs, open_: bytes, close: bytes) -> Doc:
    poison = next((d.poison for d in docs if d.poison), None)
    return Doc(open_ + b",".join(d.raw for d in docs) + close, poison)


# -- scalars ---------------------------------------------------------------------------
POISON_SCALARS = [
    (b"NaN", "nan"), (b"Infinity", "nan"), (b"-Infinity", "nan"), (b"1e400", "range"), (b"-2e999", "range"),
    (b"1" + b"0" * 5000, "digits"), (b"-" + b"9" * 4400, "digits"), (b"1" + b"0" * 400, "range"),
    (b"9223372036854775808", "range"), (b"-" + b"9" * 30, "range"), (b"1" + b"0" * 400 + b".5", "range"),
    (b'"\\ud800"', "surrogate"), (b'"\\udfff\\ud800"', "surrogate"), (b'"a\\uDBFFb"', "surrogate"),
    (b'"\xff"', "utf8"), (b'"\xc0\xaf"', "utf8"), (b'"\xed\xa0\x80"', "utf8"), (b'"\xe2\x82"', "utf8"),
    (b"nan", "syntax"), (b"'single'", "syntax"), (b"01", "syntax"), (b'"unterminated', "syntax"),
]
PLAIN_SCALARS = [b"0", b"-1", b"1.5", b"1e308", b"1e-400", b"4294967296", b"9223372036854775807", b"-9223372036854775808",
                 b"1" + b"0" * 300 + b".5", b"0." + b"1" * 5000, b"true", b"false", b"null", b'""',
                 b'"echo"', b'"upscale"', b'"lanczos"', b'"high"', b'"\\ud83d\\ude00"', b'"[[[{{{"', b'"\\"]]]"',
                 b'"\\\\"', b'"a\\u0000b"', b'"\\u202e\\ufeff\\uffff"', b'"' + b"x" * 1_000_000 + b'"', b'"' + "é".encode() * 70_000 + b'"']


@st.composite
def scalars(draw) -> Doc:
    kind = draw(st.integers(0, 9))
    if kind < 3:
        raw, why = draw(st.sampled_from(POISON_SCALARS))
        return Doc(raw, why)
    if kind < 6:
        return Doc(draw(st.sampled_from(PLAIN_SCALARS)))
    if kind < 8:
        return Doc(json.dumps(draw(st.text(max_size=40))).encode())
    return Doc(json.dumps(draw(st.integers() | st.floats(allow_nan=False, allow_infinity=False))).encode())


KEYS = [b'"tool"', b'"params"', b'"text"', b'"seed"', b'"a"', b'"name"', b'"variant"', b'"\\ud800"', b'"\xff"', b'""']


@st.composite
def objects(draw, children) -> Doc:
    keys = draw(st.lists(st.sampled_from(KEYS) | st.text(max_size=10).map(lambda t: json.dumps(t).encode()), max_size=5))
    values = [draw(children) for _ in keys]
    poison = next((v.poison for v in values if v.poison), None)
    if len(set(keys)) != len(keys):
        poison = poison or "duplicate"
    if poison is None and any(k in (b'"\\ud800"', b'"\xff"') for k in keys):
        poison = "utf8"
    return Doc(b"{" + b",".join(k + b":" + v.raw for k, v in zip(keys, values)) + b"}", poison)


def values() -> st.SearchStrategy[Doc]:
    return st.recursive(scalars(), lambda c: st.lists(c, max_size=4).map(lambda ds: _join(ds, b"[", b"]")) | objects(c),
                        max_leaves=8)


@st.composite
def deep(draw) -> Doc:
    """Nested past the limit: arrays, objects or both, closed or not, around a value."""
    n = draw(st.sampled_from([MAX_DEPTH + 1, 100, 1000, 5000, 50_000]) | st.integers(MAX_DEPTH + 1, 3000))
    shape = draw(st.sampled_from(["array", "object", "mixed", "interleaved"]))
    inner = draw(st.sampled_from([b"1", b"[]", b"{}", b'"x"']))
    if shape == "array":
        opens, closes = b"[" * n, b"]" * n
    elif shape == "object":
        opens, closes = b'{"a":' * n, b"}" * n
    elif shape == "mixed":
        opens, closes = b'[{"a":' * ((n + 1) // 2), b"}]" * ((n + 1) // 2)
    else:  # depth grows past siblings: [[],[[],[[],...
        opens, closes = b"[[]," * n, b"]" * n
    if draw(st.integers(0, 4)) == 0:
        closes = closes[: len(closes) // 2]  # left open
    return Doc(opens + inner + closes, "depth")


@st.composite
def wide(draw) -> Doc:
    """Over the item limit: 100,000 keys, an array of 100,000 numbers or empty arrays."""
    n = draw(st.sampled_from([MAX_ITEMS + 1, 20_000, 100_000]))
    shape = draw(st.sampled_from(["keys", "numbers", "arrays"]))
    if shape == "keys":
        raw = b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(n)) + b"}"
    elif shape == "numbers":
        raw = b"[" + b",".join(b"1" for _ in range(n)) + b"]"
    else:
        raw = b"[" + b",".join(b"[]" for _ in range(n)) + b"]"
    return Doc(raw, "items")


def documents() -> st.SearchStrategy[Doc]:
    return st.one_of(values(), values(), deep(), wide())


# -- where each endpoint reads JSON ----------------------------------------------------
JSON_SUBMIT_PLACES = [b"%s", b'{"tool":"echo","params":%s}', b'{"tool":"echo","params":{"text":%s}}',
                      b'{"tool":"shape","params":{"opts":%s}}', b'{"tool":"echo","inputs":{"image":%s}}',
                      b'{"tool":%s}', b'{"tool":"echo","wait":%s}', b'{"tool":"echo","params":{},"x":%s}']
KEY_PLACES = [b"%s", b'{"name":%s}', b'{"name":"fuzz","max_queued":%s}', b'{"name":"fuzz","tier":%s}']
WARM_PLACES = [b"%s", b'{"variant":%s}', b'{"seconds":%s}', b'{"variant":"default","seconds":1,"x":%s}']
#: multipart: the params field, a plain string field, a JSON-typed form param (genq.tools)
FORM_PLACES = ["params", "text", "opts", "list"]


@dataclass
class Request:
    family: str
    method: str
    path: str
    headers: dict
    body: bytes | None = None
    files: list | None = None
    chunked: bool = False
    must_refuse: bool = False
    poison: str | None = None

    def describe(self) -> str:
        what = self.body if self.body is not None else self.files
        return f"{self.family} {self.path} poison={self.poison} {repr(what)[:300]}"


def _place(template: bytes, doc: Doc) -> Doc:
    return Doc(template.replace(b"%s", doc.raw), doc.poison)


@st.composite
def requests(draw) -> Request:
    doc = draw(documents())
    family = draw(st.sampled_from(["jobs-json", "jobs-json", "jobs-json-route", "jobs-multipart", "jobs-multipart",
                                   "keys", "warm"]))
    json_ct = {"Content-Type": draw(st.sampled_from(["application/json", "application/json; charset=utf-8"]))}
    if family in ("jobs-json", "jobs-json-route"):
        d = _place(draw(st.sampled_from(JSON_SUBMIT_PLACES)), doc)
        # the direct path takes a body with a Content-Length up to 256 KB; chunked goes by the route
        return Request(family, "POST", "/v1/jobs", json_ct, d.raw, chunked=family == "jobs-json-route",
                       must_refuse=d.poison is not None, poison=d.poison)
    if family == "keys":
        d = _place(draw(st.sampled_from(KEY_PLACES)), doc)
        return Request(family, "POST", "/v1/keys", json_ct, d.raw, must_refuse=d.poison is not None, poison=d.poison)
    if family == "warm":
        d = _place(draw(st.sampled_from(WARM_PLACES)), doc)
        return Request(family, "POST", "/v1/tools/echo/warm", json_ct, d.raw, must_refuse=d.poison is not None,
                       poison=d.poison)
    place = draw(st.sampled_from(FORM_PLACES))
    tool = "shape" if place in ("opts", "list") else "echo"
    files = [("tool", (None, tool.encode())), (place, (None, doc.raw))]
    # A plain string field holds text, not JSON: the schema decides. Invalid UTF-8 in a
    # form field is read as Latin-1 (Starlette), so it is text there too. ``params`` and
    # JSON-typed params are read as JSON (a JSON-typed value that is not JSON stays a
    # string the schema refuses, 422).
    must = place != "text" and doc.poison not in (None, "utf8")
    return Request(family, "POST", "/v1/jobs", {}, None, files=files, must_refuse=must, poison=doc.poison)


# -- sending and checking --------------------------------------------------------------
@dataclass
class Stats:
    requests: collections.Counter = field(default_factory=collections.Counter)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    slowest: dict = field(default_factory=dict)  # family -> (seconds, what) of its slowest 4xx
    resent: int = 0
    problems: list = field(default_factory=list)


class Fuzzer:
    def __init__(self, url: str, key: str):
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        self.stats = Stats()

    def close(self) -> None:
        self.client.close()

    def _once(self, req: Request) -> tuple[httpx.Response, float]:
        t0 = time.perf_counter()
        if req.files is not None:
            r = self.client.request(req.method, req.path, files=req.files)
        elif req.chunked:
            r = self.client.request(req.method, req.path, headers=req.headers, content=iter([req.body]))
        else:
            r = self.client.request(req.method, req.path, headers=req.headers, content=req.body)
        return r, time.perf_counter() - t0

    def send(self, req: Request) -> httpx.Response | None:
        s = self.stats
        try:
            r, took = self._once(req)
            for pause in RESEND_PAUSES:
                if took <= FAST_SECONDS or not 400 <= r.status_code < 500:
                    break
                s.resent += 1
                time.sleep(pause)
                r, took = self._once(req)  # the same request again: a slow path is slow every time
        except httpx.HTTPError as e:
            s.problems.append(f"no answer ({e!r}): {req.describe()}")
            return None
        s.requests[req.family] += 1
        s.statuses[r.status_code] += 1
        if 400 <= r.status_code < 500 and took > s.slowest.get(req.family, (0.0, ""))[0]:  # the slowest refusal
            s.slowest[req.family] = (took, f"{r.status_code} {req.poison}")
        if r.status_code >= 500:
            s.problems.append(f"{r.status_code} {r.text[:200]} <- {req.describe()}")
        elif r.status_code >= 400:
            why = error_body_problem(r.status_code, r.headers.get("content-type", ""), r.text)
            if why:
                s.problems.append(f"{r.status_code} not the SPEC body ({why}): {r.text[:200]} <- {req.describe()}")
        elif req.must_refuse:
            s.problems.append(f"{r.status_code} accepted a {req.poison} body: {r.text[:200]} <- {req.describe()}")
        if took > FAST_SECONDS and 400 <= r.status_code < 500:
            s.problems.append(f"{took * 1000:.0f} ms ({len(RESEND_PAUSES) + 1} times over {FAST_SECONDS * 1000:.0f} ms): "
                              f"{req.describe()}")
        return r

    def fuzz(self, examples: int, fuzz_seed: int = FUZZ_SEED) -> None:
        @seed(fuzz_seed)
        @settings(max_examples=examples, deadline=None, database=None, derandomize=fuzz_seed == 0,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(req=requests())
        def one(req):
            self.send(req)

        one()


class Bystander:
    """A well-behaved client beside the fuzzer: reads its queue and submits a small job
    every ``period`` seconds, and records how long each call took and any failure."""

    def __init__(self, url: str, key: str, period: float = 0.05):
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        self.period = period
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            t0 = time.perf_counter()
            try:
                if i % 2:
                    r = self.client.get("/v1/queues/echo")
                    ok = r.status_code == 200
                else:
                    r = self.client.post("/v1/jobs", json={"tool": "echo", "params": {"seed": i}})
                    ok = r.status_code in (200, 202, 429)  # 429: the fuzzer may have filled the queue
                if not ok:
                    self.failures.append(f"{r.request.method} {r.request.url.path} -> {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                self.failures.append(repr(e))
            self.latencies.append(time.perf_counter() - t0)
            self._stop.wait(self.period)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()


def burst() -> list[Request]:
    """1,000 hostile requests, one of each poison in turn on each endpoint family."""
    poisons = [Doc(b"[" * 5000 + b"]" * 5000, "depth"), Doc(b'{"a":' * 3000 + b"1" + b"}" * 3000, "depth"),
               Doc(b"[" + b",".join(b"1" for _ in range(20_000)) + b"]", "items"),
               Doc(b'{"a":NaN}', "nan"), Doc(b'{"a":1e400}', "range"), Doc(b'{"a":1' + b"0" * 5000 + b"}", "digits"),
               Doc(b'{"a":1,"a":2}', "duplicate"), Doc(b'{"a":"\\ud800"}', "surrogate"), Doc(b'{"a":"\xff"}', "utf8"),
               Doc(b'{"a":', "syntax")]
    out = []
    families = [("jobs-json", JSON_SUBMIT_PLACES[1]), ("jobs-json-route", JSON_SUBMIT_PLACES[1]),
                ("keys", KEY_PLACES[1]), ("warm", WARM_PLACES[1]), ("jobs-multipart", None)]
    i = 0
    while len(out) < 1000:
        doc = poisons[i % len(poisons)]
        family, template = families[(i // len(poisons)) % len(families)]
        i += 1
        if template is None:
            if doc.poison == "utf8":  # a form field with bad bytes is read as Latin-1 text (Starlette)
                doc = poisons[0]
            out.append(Request(family, "POST", "/v1/jobs", {}, None, files=[("tool", (None, b"echo")), ("params", (None, doc.raw))],
                               must_refuse=True, poison=doc.poison))
            continue
        d = _place(template, doc)
        path = {"keys": "/v1/keys", "warm": "/v1/tools/echo/warm"}.get(family, "/v1/jobs")
        out.append(Request(family, "POST", path, {"Content-Type": "application/json"}, d.raw,
                           chunked=family == "jobs-json-route", must_refuse=True, poison=d.poison))
    return out


#: A tool whose params are JSON-typed, so form fields are parsed as JSON (genq.tools).
SHAPE_TOOL = {
    "tool": {"kind": "python", "name": "shape", "entrypoint": "genq_testtools:echo", "inputs": [0, 3],
             "params": {"type": "object", "additionalProperties": False,
                        "properties": {"opts": {"type": "object"}, "list": {"type": "array"}, "n": {"type": "number"}}}},
    "maxWorkers": 1, "maxQueued": 100_000, "resultTTLSeconds": 60,
}


# -- the checks both suites run (embedded and cluster) ----------------------------------
def report(name: str, fuzzer: Fuzzer, elapsed: float, rss: tuple[int, int]) -> None:
    s = fuzzer.stats
    print(f"\n{name}: {sum(s.requests.values())} requests in {elapsed:.1f}s, {s.resent} resent for time")
    for family, n in sorted(s.requests.items()):
        took, what = s.slowest.get(family, (0.0, ""))
        print(f"  {family:16s} {n:5d} requests, slowest refusal {took * 1000:6.1f} ms ({what})")
    print("  statuses:", dict(sorted(s.statuses.items())))
    print(f"  server RSS {rss[0] / 1024:.1f} MiB before, {rss[1] / 1024:.1f} MiB after")


def fuzz_and_check(url: str, key: str, examples: int, rss_kb: Callable[[], int], fuzz_seed: int = FUZZ_SEED) -> None:
    """Generated requests, a bystander beside them: no 5xx, 4xx bodies per the SPEC, each
    answer fast, the bystander served, memory back where it was (within the allocator's
    slack and what the accepted jobs hold)."""
    fuzzer = Fuzzer(url, key)
    rss_before = rss_kb()
    t0 = time.monotonic()
    with Bystander(url, key) as bystander:
        fuzzer.fuzz(examples, fuzz_seed)
    elapsed = time.monotonic() - t0
    rss_after = rss_kb()
    fuzzer.close()
    report("hostile JSON", fuzzer, elapsed, (rss_before, rss_after))
    lat = sorted(bystander.latencies)
    print(f"  bystander: {len(lat)} calls, median {lat[len(lat) // 2] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")
    s = fuzzer.stats
    assert not s.problems, f"{len(s.problems)} bad answers, first ones:\n" + "\n".join(s.problems[:10])
    assert not any(code >= 500 for code in s.statuses)
    assert set(s.requests) == {"jobs-json", "jobs-json-route", "jobs-multipart", "keys", "warm"}
    assert sum(n for code, n in s.statuses.items() if 400 <= code < 500) > examples // 2
    assert not bystander.failures, bystander.failures[:5]
    assert len(lat) > 5 and lat[len(lat) // 2] < 0.5
    assert rss_after - rss_before < 100 * 1024, (rss_before, rss_after)


def burst_and_check(url: str, key: str, log: Callable[[], str], rss_kb: Callable[[], int]) -> None:
    """1,000 hostile requests: each refused fast, and the log gains no traceback, no error
    line and at most one line per request (genq logs nothing for a client's mistake)."""
    fuzzer = Fuzzer(url, key)
    before = log()
    rss_before = rss_kb()
    t0 = time.monotonic()
    reqs = burst()
    for req in reqs:
        fuzzer.send(req)
    elapsed = time.monotonic() - t0
    fuzzer.close()
    report("burst", fuzzer, elapsed, (rss_before, rss_kb()))
    time.sleep(0.5)  # let the server's log handler flush
    added = log()[len(before):]
    lines = [line for line in added.splitlines() if line.strip()]
    print(f"  log lines added: {len(lines)}")
    s = fuzzer.stats
    assert sum(s.requests.values()) == len(reqs) == 1000
    assert not s.problems, f"{len(s.problems)} bad answers, first ones:\n" + "\n".join(s.problems[:10])
    assert all(400 <= code < 500 and code != 429 for code in s.statuses), s.statuses  # 429: never reached the checks
    assert "Traceback" not in added and 'File "' not in added, added[-3000:]
    assert not [line for line in lines if " ERROR " in line or " CRITICAL " in line or "Exception" in line], lines[:5]
    assert len(lines) <= len(reqs)  # one line at most per refused request
    assert max(took for took, _ in s.slowest.values()) <= FAST_SECONDS
