"""API keys: random, shown once, stored only as a SHA-256 hash, compared in constant time.

``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The bootstrap admin key comes from
configuration (``GENQ_ADMIN_KEY``) or, in embedded mode, is generated once and stored hashed.
Every authenticated request is also counted against its key's tier rate limit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass

from fastapi import Request
from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from genq import constants
from genq.api.errors import ApiError
from genq.models import ApiKey


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def generate_key() -> str:
    return constants.API_KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    id: str
    name: str
    tier: str
    admin: bool
    max_queued: int | None


class WindowStorage(MemoryStorage):
    """``limits``' in-memory storage with each key's moving window kept as a deque of hit
    times, oldest first: a hit appends, the hits that left the window leave from the front,
    so a hit costs the same at any limit.

    ``limits`` 5.8 keeps the window as a list, newest first: every hit inserts at the
    front (a copy of the whole window) and an expiry task copies every key's list again,
    by way of a thread. At a limit of 100,000 a minute hit 1,000 times a second that was a
    sixth of the API's event loop (BENCHMARKS.md §5). The answers are the same
    (``tests/test_rate_limit.py`` compares the two on random hits); the fixed and sliding
    window strategies keep the parent's code."""

    #: How often keys whose window emptied are dropped (seconds).
    SWEEP_SECONDS = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._windows: dict[str, tuple[deque[float], float]] = {}  # key -> (hit times, expiry)
        self._next_sweep = time.time() + self.SWEEP_SECONDS

    @staticmethod
    def _expire(hits: deque[float], expiry: float, now: float) -> None:
        # A hit exactly ``expiry`` old still counts against a new one, as in ``limits``.
        cutoff = now - expiry
        while hits and hits[0] < cutoff:
            hits.popleft()

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self.SWEEP_SECONDS
        for key, (hits, expiry) in list(self._windows.items()):
            self._expire(hits, expiry, now)
            if not hits:
                del self._windows[key]

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = time.time()
        if now >= self._next_sweep:
            self._sweep(now)
        found = self._windows.get(key)
        if found is None:
            found = self._windows[key] = (deque(), float(expiry))
        hits = found[0]
        self._expire(hits, expiry, now)
        if len(hits) + amount > limit:
            return False
        hits.extend([now] * amount)
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """(the oldest hit in the window, the hits in it); (now, 0) for an empty one."""
        now = time.time()
        found = self._windows.get(key)
        if found is None:
            return now, 0
        hits = found[0]
        self._expire(hits, expiry, now)
        # ... but not in the window's numbers, again as in ``limits``.
        cutoff, gone = now - expiry, 0
        while gone < len(hits) and hits[gone] == cutoff:
            gone += 1
        return (hits[gone], len(hits) - gone) if gone < len(hits) else (now, 0)

    async def clear(self, key: str) -> None:
        self._windows.pop(key, None)
        await super().clear(key)


class RateLimiter:
    """A moving window per key (the ``limits`` library's strategy, on :class:`WindowStorage`),
    with the RateLimit-* numbers."""

    def __init__(self, tiers: dict[str, str]):
        self._limits = {tier: parse(spec) for tier, spec in tiers.items()}
        self._limiter = MovingWindowRateLimiter(WindowStorage())

    async def hit(self, principal: Principal) -> dict[str, str]:
        item = self._limits.get(principal.tier) or self._limits["standard"]
        allowed = await self._limiter.hit(item, principal.id)
        stats = await self._limiter.get_window_stats(item, principal.id)
        reset = max(0, int(stats.reset_time - time.time()) + 1)
        headers = {
            "RateLimit-Limit": str(item.amount),
            # Refused means none left now; the window read after the refusal can already
            # have slid past an old hit (CI saw a 429 saying 1 remaining).
            "RateLimit-Remaining": str(max(0, stats.remaining)) if allowed else "0",
            "RateLimit-Reset": str(reset),
        }
        if not allowed:
            raise ApiError(
                "rate_limited",
                f"Rate limit of {item.amount} requests per {item.GRANULARITY.name} exceeded.",
                {"limit": item.amount, "retry_after_seconds": reset},
                headers={**headers, "Retry-After": str(reset)},
            )
        return headers


class Authenticator:
    def __init__(self, keys, admin_key: str | None, *, cache_seconds: float = 5.0):
        self._keys = keys
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._cache_seconds = cache_seconds

    def invalidate(self) -> None:
        self._cache.clear()

    async def principal(self, request: Request) -> Principal:
        raw = _presented_key(request)
        if not raw:
            raise ApiError("unauthorized", "An API key is required (Authorization: Bearer <key> or X-API-Key).",
                           headers={"WWW-Authenticate": "Bearer"})
        if len(raw) > 256:
            raise ApiError("unauthorized", "The API key is not valid.", headers={"WWW-Authenticate": "Bearer"})
        digest = hash_key(raw)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return Principal(constants.BOOTSTRAP_ADMIN_KEY_ID, "bootstrap-admin", "premium", True, None)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            record = cached[1]
        else:
            record = await self._keys.key_by_hash(digest)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self._cache_seconds, record)
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            raise ApiError("unauthorized", "The API key is not valid.", headers={"WWW-Authenticate": "Bearer"})
        return Principal(record.id, record.name, record.tier, record.admin, record.max_queued)


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get(constants.API_KEY_HEADER)
    return key.strip() if key else None
