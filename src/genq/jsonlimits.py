"""The one way genq reads JSON a client sent: ``loads`` with limits, decided before parsing.

Python's ``json`` recurses once per nesting level, so a 10 KB body nested 5,000 deep
raised ``RecursionError`` (a 500 and a traceback per request); it also accepts ``NaN`` and
``Infinity`` (not JSON, and they later broke the response), duplicate keys (which one
wins is up to the parser), lone UTF-16 surrogates (a string no UTF-8 store can hold) and
100,000-item objects (memory and time on every layer after). ``loads`` refuses each with
``JsonRejected``, a ``ValueError`` the API answers as 400 ``invalid_input``. Depth and
item count come first, from the raw bytes and never recursively (``skeleton``: a few
passes of C that keep only the brackets and commas outside strings, then bracket pairs
peeled level by level), so a hostile body costs microseconds and ``json.loads`` only ever
sees a shallow document.

Every body or form field genq parses as JSON goes through here: the JSON and multipart
submits (``genq.api.routes.jobs``, its direct path included), every FastAPI route body
(``genq.api.routing``), and JSON-typed form params (``genq.tools``).
"""

from __future__ import annotations

import json
import math
from typing import Any

#: Deepest nesting accepted (arrays and objects, the outer one counts): a submit's own
#: object and its ``params`` take two, leaving 30 for a tool's params, far more than any
#: tool's schema uses, and shallow enough for every recursive step after parsing.
MAX_DEPTH = 32
#: Most items (array elements plus object members, all levels together) in one document:
#: a job's params are a handful of fields, and images are one string each.
MAX_ITEMS = 10_000
#: Integers must fit 64 bits, signed: a job's params become a Kubernetes object, whose
#: decoder refuses a larger one (the apiserver answered 400 and genq a 500), and most
#: clients cannot hold one either. Floats must be finite.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class JsonRejected(ValueError):
    """The text is not JSON genq accepts; ``message`` is one sentence for the client."""

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


class JsonLimitExceeded(JsonRejected):
    """Valid JSON, maybe, but over one of the documented limits (depth, items, integer range)."""


#: Every byte but JSON's structure (brackets, commas) and quotes. UTF-8 never uses an
#: ASCII byte inside a multi-byte character, so this works on the raw bytes.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{},"')


def skeleton(data: bytes) -> bytes:
    """The brackets and commas of ``data`` that lie outside its strings, in order (an
    unterminated string runs to the end).

    Escaped backslashes, then escaped quotes, go first (left to right, as a JSON reader
    pairs them), so every quote left delimits a string; then every byte but structure
    and quotes. Dropping two adjacent quotes never changes which side of a quote any other
    byte is on, so the empty strings (most of them, now) go in one ``replace``; a split at
    the few quotes left puts what was inside strings at the odd places. All of it runs in
    C: a 20 MB base64 image or 100,000 keys are never looked at byte by byte in Python."""
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    data = data.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in data:
        data = b"".join(data.split(b'"')[0::2])
    return data


def check_structure(data: bytes, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS,
                    field: str | None = None) -> None:
    """Refuse ``data`` when its nesting or item count is over the limits, without parsing.

    Items are the commas and the containers of the skeleton; then each pass of
    ``replace("[]", "")`` removes the innermost level, so a pair still there after
    ``max_depth`` passes is nested deeper than that, and leftovers that do not pair up
    are not JSON. Cost: a few passes of C over the text."""
    rest = skeleton(data).replace(b"{", b"[").replace(b"}", b"]")
    if b"[" * (max_depth + 1) in rest:  # the common attack, found at once
        raise _too_deep(max_depth, field)
    brackets = rest.replace(b",", b"")
    if len(rest) - len(brackets) + len(brackets) // 2 > max_items:  # commas and containers
        raise JsonLimitExceeded(f"The JSON has more than {max_items} items; at most {max_items} are accepted.",
                                _details(field, max_items=max_items))
    for _ in range(max_depth):
        if not brackets:
            return
        peeled = brackets.replace(b"[]", b"")
        if len(peeled) == len(brackets):
            raise JsonRejected("The JSON is not valid: its brackets do not match.", _details(field))
        brackets = peeled
    if b"[]" in brackets:
        raise _too_deep(max_depth, field)
    if brackets:
        raise JsonRejected("The JSON is not valid: its brackets do not match.", _details(field))


def loads(raw: bytes | str, *, field: str | None = None, max_depth: int = MAX_DEPTH,
          max_items: int = MAX_ITEMS) -> Any:
    """``json.loads`` for text from a client: UTF-8 only, limits checked before parsing,
    and no ``NaN``/``Infinity``, infinite floats, integers past 64 bits, duplicate keys
    or lone surrogates. Raises ``JsonRejected`` (a ``ValueError``); ``field`` names the
    form field or part in its details."""
    if isinstance(raw, str):
        text = raw
        check_structure(raw.encode("utf-8", "surrogatepass"), max_depth=max_depth, max_items=max_items, field=field)
    else:
        data = bytes(raw)
        check_structure(data, max_depth=max_depth, max_items=max_items, field=field)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonRejected("The JSON is not valid UTF-8 (JSON must be UTF-8).", _details(field, position=e.start)) from None
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int, object_pairs_hook=_object)
    except JsonRejected as e:
        if field:
            e.details.setdefault("field", field)
        raise
    except json.JSONDecodeError as e:
        raise JsonRejected(f"The JSON is not valid: {e.msg} (line {e.lineno}, column {e.colno}).",
                           _details(field, position=e.pos)) from None
    except (ValueError, RecursionError) as e:  # not expected after the checks; still the client's input
        raise JsonRejected("The JSON is not valid.", _details(field)) from e
    if (not text.isascii() or "\\u" in text) and _has_lone_surrogate(value):
        raise JsonRejected("The JSON holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text.", _details(field))
    return value


def _details(field: str | None, **more: Any) -> dict[str, Any]:
    return {"field": field, **more} if field else more


def _too_deep(max_depth: int, field: str | None) -> JsonLimitExceeded:
    return JsonLimitExceeded(f"The JSON is nested more than {max_depth} levels deep; at most {max_depth} are accepted.",
                             _details(field, max_depth=max_depth))


def _constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not a JSON number.")


def _float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise JsonRejected(f"The number {s[:40]}{'...' if len(s) > 40 else ''} is out of range.")
    return v


def _int(s: str) -> int:
    if len(s) > 20 or not INT_MIN <= int(s) <= INT_MAX:  # a long literal is never int()-ed
        raise JsonLimitExceeded(f"The integer {s[:40]}{'...' if len(s) > 40 else ''} does not fit 64 bits.",
                                {"min": INT_MIN, "max": INT_MAX})
    return int(s)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise JsonRejected(f"The key {dup[:60]!r} appears twice in one object.", {"key": dup[:60]})
    return obj


def _has_lone_surrogate(value: Any) -> bool:
    """Any string (key or value) that UTF-8 cannot hold (``\\ud800`` parses to one). At most
    ``MAX_ITEMS`` values to visit, and ``isascii`` answers for an ASCII string (a base64
    image) at once."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if v.isascii():
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False
