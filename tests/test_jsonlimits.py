"""``genq.jsonlimits``: what genq refuses in a client's JSON, that it decides before
parsing and fast, and that every JSON-reading path of the API goes through it."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.routing import APIRoute
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ADMIN, tools_config
from genq import jsonlimits
from genq.jsonlimits import MAX_DEPTH, MAX_ITEMS, JsonLimitExceeded, JsonRejected, loads
from helpers import assert_error


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


@pytest.mark.parametrize("text", [
    nested(MAX_DEPTH), '{"a":' * (MAX_DEPTH - 1) + "[]" + "}" * (MAX_DEPTH - 1),
    '{"s": "' + "[" * 1000 + '"}',  # brackets in a string are text
    '{"s": "\\"' + "{" * 1000 + '\\\\"}',  # escaped quotes and backslashes do not end it early
    json.dumps({"emoji": "😀", "escaped": "\\ud83d\\ude00"}), '{"k": "\\ud83d\\ude00"}',
    json.dumps(list(range(MAX_ITEMS - 1))), "1e308", "-0", str(2**63 - 1), str(-(2**63)), "1" + "0" * 300 + ".5",
    "0." + "1" * 5000, '"' + "x" * 100_000 + '"',
])
def test_accepted(text):
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("text, words", [
    (nested(MAX_DEPTH + 1), "nested more than 32"),
    (nested(100_000), "nested more than 32"),
    ("[" * 100_000, "nested more than 32"),  # never closed
    ('{"a":' * 5000 + "1" + "}" * 5000, "nested more than 32"),
    ("[[]," * 40 + "1" + "]" * 40, "nested more than 32"),  # depth without a run of opens
    (json.dumps({f"k{i}": i for i in range(100_000)}), f"more than {MAX_ITEMS} items"),
    ("[" + "[]," * MAX_ITEMS + "1]", f"more than {MAX_ITEMS} items"),
    ("1" + "0" * 5000, "does not fit 64 bits"),  # never given to int(): Python's own limit is 4,300 digits
    (str(2**63), "does not fit 64 bits"), ("[-" + "9" * 30 + "]", "does not fit 64 bits"),
])
def test_over_a_limit(text, words):
    with pytest.raises(JsonLimitExceeded) as e:
        loads(text, field="params")
    assert words in e.value.message and e.value.details["field"] == "params"


@pytest.mark.parametrize("raw, words", [
    (b'{"a": NaN}', "NaN is not a JSON number"), (b"[Infinity]", "Infinity is not"), (b"-Infinity", "-Infinity is not"),
    (b"1e400", "out of range"), (b"[-1e999]", "out of range"),
    (b'{"a": 1, "a": 2}', "appears twice"), (b'[{"x": {"b": 1, "b": 1}}]', "appears twice"),
    (b'"\\ud800"', "lone UTF-16 surrogate"), (b'{"\\udfff": 1}', "lone UTF-16 surrogate"), (b'"\\udc00\\ud800"', "surrogate"),
    (b'"\xff"', "not valid UTF-8"), (b'"\xed\xa0\x80"', "not valid UTF-8"), (b'"\xc0\xaf"', "not valid UTF-8"),
    (b"[1, 2", "JSON is not valid"), (b"]", "JSON is not valid"), (b"[}", "JSON is not valid"), (b'"abc', "JSON is not valid"),
    (b"", "JSON is not valid"), (b"\xef\xbb\xbf{}", "JSON is not valid"),
])
def test_not_json_genq_accepts(raw, words):
    with pytest.raises(JsonRejected) as e:
        loads(raw)
    assert words in e.value.message, e.value.message
    assert isinstance(e.value, ValueError)


def test_the_structure_is_decided_without_parsing_and_in_microseconds(monkeypatch):
    calls = []
    monkeypatch.setattr(jsonlimits.json, "loads", lambda *a, **k: calls.append(a))
    deep = ('{"tool": "echo", "params": {"a": ' + nested(5000) + "}}").encode()  # the 10 KB body
    assert len(deep) > 10_000
    t0 = time.perf_counter()
    for _ in range(100):
        with pytest.raises(JsonLimitExceeded):
            loads(deep)
    per_call = (time.perf_counter() - t0) / 100
    assert not calls, "json.loads ran on a body over the depth limit"
    assert per_call < 0.002, f"{per_call * 1e6:.0f} µs"  # ~100 µs here; generous for a busy CI box


def test_big_strings_are_never_scanned_character_by_character():
    """A JSON submit may carry three 28 MB base64 images: the checks cost about what the
    parse itself costs (they split at quotes; no Python loop over the text)."""
    image = "data:image/png;base64," + "QUJD" * (7 * 1024 * 1024)
    raw = json.dumps({"tool": "echo", "inputs": {"images": [image, image, image]}}).encode()
    t0 = time.perf_counter()
    json.loads(raw)
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    loads(raw)
    checked = time.perf_counter() - t0
    assert checked < 4 * plain + 0.2, (checked, plain)


def test_every_route_reads_json_bodies_through_genq_limits(tmp_path):
    """New routes (webhooks, the OpenAI image API) get the limits by being built with
    ``genq.api.routing.router()``; this fails for one that is not."""
    from genq.api import create_app
    from genq.api.routing import JsonRoute
    from genq.runtime import build_runtime
    from genq.settings import Settings
    from genq.tools import registry_from_dict

    rt = build_runtime(Settings(data_dir=tmp_path, admin_key=ADMIN), registry_from_dict(tools_config()),
                       "nats://127.0.0.1:1")  # never opened: only the routes are looked at
    app = create_app(rt)

    def walk(routes):  # FastAPI keeps an included router whole (0.165: _IncludedRouter)
        for r in routes:
            inner = getattr(r, "original_router", None)
            yield from walk(inner.routes) if inner is not None else [r]

    routes = [r for r in walk(app.routes) if isinstance(r, APIRoute)]
    assert len(routes) > 10
    assert [r.path for r in routes if not isinstance(r, JsonRoute)] == []


async def test_every_json_path_answers_the_limit(live):
    """The route bodies (keys, warm), the JSON submit (direct and routed) and the
    multipart ``params`` field: 400 naming the limit, fast."""
    deep = b"[" * 5000 + b"]" * 5000

    async def chunked(body: bytes):
        yield body

    async with live.client() as c:
        answers = [
            await c.post("/v1/keys", content=b'{"name": ' + deep + b"}", headers={"content-type": "application/json"}),
            await c.post("/v1/tools/echo/warm", content=b'{"seconds": ' + deep + b"}",
                         headers={"content-type": "application/vnd.genq+json"}),
            await c.post("/v1/jobs", content=b'{"tool": "echo", "params": {"a": ' + deep + b"}}",
                         headers={"content-type": "application/json"}),
            await c.post("/v1/jobs", content=chunked(b'{"tool": "echo", "params": {"a": ' + deep + b"}}"),
                         headers={"content-type": "application/json"}),
            await c.post("/v1/jobs", files=[("tool", (None, "echo")), ("params", (None, b'{"a": ' + deep + b"}"))]),
        ]
        for r in answers:
            body = assert_error(r, 400, "invalid_input")
            assert "nested more than 32 levels" in body["error"]["message"], body
            assert body["error"]["details"]["max_depth"] == MAX_DEPTH
            assert r.elapsed.total_seconds() < 0.5
        assert answers[-1].json()["error"]["details"]["field"] == "params"
        for raw in (b'{"tool": "echo", "params": {"sleep": NaN}}', b'{"tool": "echo", "wait": Infinity}',
                    b'{"tool": "echo", "params": {"seed": 1' + b"0" * 5000 + b"}}"):
            assert_error(await c.post("/v1/jobs", content=raw, headers={"content-type": "application/json"}), 400, "invalid_input")
        # a plain form value "nan" is no number either: the schema refuses it (it is not stored as NaN)
        assert_error(await c.post("/v1/jobs", files=[("tool", (None, "echo")), ("sleep", (None, "nan"))]), 422, "validation_error")
        assert (await c.get("/v1/jobs")).json()["total"] == 0


OPEN_ECHO = {"tool": {"kind": "python", "name": "echo", "entrypoint": "genq_testtools:echo", "inputs": [0, 3],
                      "params": {"type": "object"}}}


@pytest.mark.genq(tools={"echo": OPEN_ECHO})
async def test_params_are_bounded_as_json_whichever_way_they_come(live):
    """Params live in the job's record (a Kubernetes object holds 1.5 MB): at most the
    multipart field's 64 KB as JSON, from a JSON body or from plain form fields."""
    async with live.client() as c:
        big = {f"k{i}": "x" * 1100 for i in range(63)}  # 69 KB: each form field well inside its own limit
        for kw in ({"json": {"tool": "echo", "params": big}},
                   {"files": [("tool", (None, "echo"))] + [(k, (None, v)) for k, v in big.items()]}):
            r = await c.post("/v1/jobs", **kw)
            assert r.status_code == 413, r.text[:300]
            body = assert_error(r, 413, "payload_too_large")
            assert body["error"]["details"] == {"field": "params", "max_bytes": 64 * 1024}
        r = await c.post("/v1/jobs", json={"tool": "echo", "params": {"k": "x" * 60_000}})
        assert r.status_code == 202, r.text


def reference_skeleton(text: str) -> str:
    """The brackets and commas outside strings, by a plain character-by-character reader."""
    out, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[]{},":
            out.append(ch)
    return "".join(out)


def depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


TRICKY_TEXT = st.text(alphabet=st.sampled_from(list('[]{},:"\\/ab\n\u00e9\u20ac😀')), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | TRICKY_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TRICKY_TEXT, children, max_size=4),
    max_leaves=40)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(value=JSON_VALUES, ascii_only=st.booleans(), indent=st.sampled_from([None, 1]))
def test_the_skeleton_and_the_verdict_match_a_plain_reader(value, ascii_only, indent):
    """Strings full of quotes, backslashes and brackets, in every encoding json.dumps makes:
    the fast skeleton is what a character-by-character reader sees, and the document is
    accepted exactly when it is within the depth limit."""
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    assert jsonlimits.skeleton(text.encode()).decode() == reference_skeleton(text)
    if depth(value) <= MAX_DEPTH:
        assert loads(text) == value
    else:
        with pytest.raises(JsonLimitExceeded):
            loads(text)


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(inner=JSON_VALUES, levels=st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3), kind=st.sampled_from(["[", '{"k":']))
def test_depth_is_counted_exactly_around_any_value(inner, levels, kind):
    close = "]" if kind == "[" else "}"
    text = kind * levels + json.dumps(inner) + close * levels
    if levels + depth(inner) <= MAX_DEPTH:
        loads(text)
    else:
        with pytest.raises(JsonLimitExceeded):
            loads(text)
