"""``BlobStore`` on S3 or any S3-compatible server (MinIO, Ceph, moto): the cluster default.

The sibling of ``genq.adapters.localfs`` behind the same ``genq.ports.BlobStore`` seam; the
API writes job inputs and the worker writes results through it. One long-lived aioboto3
client is opened in ``open`` and closed in ``close``. Keys are checked by the same rules as
the local store; network failures surface as ``genq.ports.Unavailable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from genq.ports import BlobInfo, PortError, StorageFull, Unavailable

_BATCH = 1000  # the most keys one DeleteObjects call accepts
_MISSING = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET = {"404", "NoSuchBucket", "NotFound"}
_FULL = {"XMinioStorageFull", "InsufficientStorage"}


def check_key(key: str) -> str:
    """Reject keys that are empty, absolute, have empty/``.``/``..`` segments, NUL or ``\\``."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key or len(key.encode()) > 1024:
        raise ValueError(f"invalid object key {key!r}")
    if any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except ClientError as e:
        code = _code(e)
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _FULL or status == 507:
            raise StorageFull(f"object storage is full ({what})") from e
        if status >= 500:
            raise Unavailable(f"object storage failed ({what}): {code or status}") from e
        raise
    except (BotoConnectionError, HTTPClientError, aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
        raise Unavailable(f"object storage unreachable ({what}): {e}") from e


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _etag(raw: str | None) -> str | None:
    return raw.strip('"') if raw else None


class S3BlobStore:
    def __init__(
        self,
        endpoint_url: str | None,
        bucket: str,
        region: str,
        access_key_id: str | None,
        secret_access_key: str | None,
    ):
        self.endpoint_url = endpoint_url or None
        self.bucket = bucket
        self.region = region
        self._access_key_id = access_key_id or None
        self._secret_access_key = secret_access_key or None
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    async def open(self) -> None:
        if self._client is not None:
            return
        config = Config(
            connect_timeout=2,
            read_timeout=30,
            retries={"max_attempts": 2, "mode": "standard"},
            # Custom endpoints (MinIO, moto) rarely resolve virtual-host bucket names.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
        )
        session = aioboto3.Session(
            aws_access_key_id=self._access_key_id,
            aws_secret_access_key=self._secret_access_key,
            region_name=self.region,
        )
        stack = AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                session.client("s3", endpoint_url=self.endpoint_url, config=config)
            )
            self._stack = stack
            await self._ensure_bucket()
        except BaseException:
            self._client, self._stack = None, None
            await stack.aclose()
            raise

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def _s3(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3BlobStore is not open")
        return self._client

    async def _ensure_bucket(self) -> None:
        with _mapped("head bucket"):
            try:
                await self._s3.head_bucket(Bucket=self.bucket)
                return
            except ClientError as e:
                if _code(e) not in _NO_BUCKET:
                    raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        with _mapped("create bucket"):
            try:
                await self._s3.create_bucket(**kwargs)
            except ClientError as e:
                if _code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    async def ping(self) -> None:
        with _mapped("ping"):
            await self._s3.head_bucket(Bucket=self.bucket)

    async def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        check_key(key)
        with _mapped(f"put {key}"):
            resp = await self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        return BlobInfo(key=key, size=len(data), etag=_etag(resp.get("ETag")), content_type=content_type)

    async def _get_object(self, key: str) -> dict[str, Any]:
        check_key(key)
        with _mapped(f"get {key}"):
            try:
                return await self._s3.get_object(Bucket=self.bucket, Key=key)
            except ClientError as e:
                if _code(e) in _MISSING:
                    raise KeyError(key) from None
                raise

    async def get(self, key: str) -> bytes:
        resp = await self._get_object(key)
        body = resp["Body"]
        # Not ``async with ... as body``: aiobotocore's __aenter__ yields the raw aiohttp
        # response, whose read() takes no size and skips the Content-Length check.
        async with body:
            with _mapped(f"get {key}"):
                return await body.read()

    async def stream(self, key: str, chunk_size: int = 1 << 16) -> AsyncIterator[bytes]:
        resp = await self._get_object(key)
        body = resp["Body"]
        async with body:
            while True:
                with _mapped(f"stream {key}"):
                    chunk = await body.read(chunk_size)
                if not chunk:
                    break
                yield chunk

    async def stat(self, key: str) -> BlobInfo | None:
        check_key(key)
        with _mapped(f"stat {key}"):
            try:
                resp = await self._s3.head_object(Bucket=self.bucket, Key=key)
            except ClientError as e:
                if _code(e) in _MISSING:
                    return None
                raise
        return BlobInfo(
            key=key, size=resp["ContentLength"], etag=_etag(resp.get("ETag")), content_type=resp.get("ContentType")
        )

    async def delete(self, key: str) -> None:
        check_key(key)
        with _mapped(f"delete {key}"):
            await self._s3.delete_object(Bucket=self.bucket, Key=key)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix`` (``jobs/a`` never touches ``jobs/ab/``)."""
        prefix = check_key(prefix.rstrip("/")) + "/"
        deleted = 0
        batch: list[dict[str, str]] = []
        with _mapped(f"delete prefix {prefix}"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            async for page in pages:
                for obj in page.get("Contents", ()):
                    batch.append({"Key": obj["Key"]})
                    if len(batch) == _BATCH:
                        deleted += await self._delete_batch(batch)
                        batch = []
            if batch:
                deleted += await self._delete_batch(batch)
        return deleted

    async def _delete_batch(self, batch: list[dict[str, str]]) -> int:
        resp = await self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise PortError(f"object storage refused to delete {len(errors)} objects: {first.get('Code')} {first.get('Key')}")
        return len(batch)
