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


class RateLimiter:
    """A moving window per key (the ``limits`` library), with the RateLimit-* numbers.

    The asyncio flavour of ``limits``: its in-memory storage expires keys with a task on
    the event loop, where the threaded one started a timer thread every few milliseconds."""

    def __init__(self, tiers: dict[str, str]):
        self._limits = {tier: parse(spec) for tier, spec in tiers.items()}
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

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
