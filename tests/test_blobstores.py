"""Both ``BlobStore`` adapters pass the same behavioural tests.

S3 runs against a real moto server started as a subprocess (no in-process mocks).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from genq.adapters.localfs import LocalBlobStore
from genq.adapters.s3 import S3BlobStore
from genq.ports import BlobStore, Unavailable
from genq.adapters.nats_server import free_port
from helpers import start_moto, stop_process


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield url
    finally:
        stop_process(proc)


def _s3(url: str) -> S3BlobStore:
    return S3BlobStore(url, f"genq-test-{uuid.uuid4().hex[:16]}", "us-east-1", "testing", "testing")


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    s: BlobStore
    if request.param == "local":
        s = LocalBlobStore(tmp_path / "blobs")
    else:
        s = _s3(request.getfixturevalue("moto_url"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_satisfies_protocol(store: BlobStore) -> None:
    assert isinstance(store, BlobStore)
    await store.ping()


async def test_put_get_roundtrip(store: BlobStore) -> None:
    info = await store.put("jobs/j1/inputs/image", b"\x89PNG data", "image/png")
    assert info.key == "jobs/j1/inputs/image"
    assert info.size == 9
    assert info.content_type == "image/png"
    assert info.etag
    assert await store.get("jobs/j1/inputs/image") == b"\x89PNG data"


async def test_stat(store: BlobStore) -> None:
    await store.put("jobs/j1/results/out.png", b"x" * 1234, "image/png")
    info = await store.stat("jobs/j1/results/out.png")
    assert info is not None
    assert info.size == 1234
    if isinstance(store, S3BlobStore):
        assert info.content_type == "image/png"
        assert info.etag


async def test_overwrite(store: BlobStore) -> None:
    await store.put("jobs/j1/inputs/a", b"first", "text/plain")
    await store.put("jobs/j1/inputs/a", b"second!", "text/plain")
    assert await store.get("jobs/j1/inputs/a") == b"second!"


async def test_stream_reassembles_multi_chunk_object(store: BlobStore) -> None:
    data = os.urandom(300 * 1024)
    await store.put("jobs/j1/results/big.bin", data, "application/octet-stream")
    chunks = [c async for c in store.stream("jobs/j1/results/big.bin", chunk_size=64 * 1024)]
    assert len(chunks) >= 5
    assert all(len(c) <= 64 * 1024 for c in chunks)
    assert b"".join(chunks) == data


async def test_stream_stopped_early_releases(store: BlobStore) -> None:
    await store.put("jobs/j1/results/big.bin", b"y" * 200_000, "application/octet-stream")
    for _ in range(15):  # more than the client's connection pool if bodies leaked
        gen = store.stream("jobs/j1/results/big.bin", chunk_size=1024)
        assert await asyncio.wait_for(anext(gen), 10)  # a leaked connection would block here
        await gen.aclose()
    assert await store.get("jobs/j1/results/big.bin") == b"y" * 200_000


async def test_missing_key(store: BlobStore) -> None:
    with pytest.raises(KeyError):
        await store.get("jobs/nope/inputs/x")
    assert await store.stat("jobs/nope/inputs/x") is None
    with pytest.raises(KeyError):
        async for _ in store.stream("jobs/nope/inputs/x"):
            pass


async def test_delete_idempotent(store: BlobStore) -> None:
    await store.put("jobs/j1/inputs/a", b"a", "text/plain")
    await store.delete("jobs/j1/inputs/a")
    assert await store.stat("jobs/j1/inputs/a") is None
    await store.delete("jobs/j1/inputs/a")
    await store.delete("jobs/never/inputs/a")


async def test_delete_prefix_only_that_job(store: BlobStore) -> None:
    for key in ("jobs/j1/inputs/image", "jobs/j1/results/a", "jobs/j1/results/sub/b"):
        await store.put(key, b"r", "text/plain")
    await store.put("jobs/j10/results/sibling", b"r", "text/plain")  # shares the string "jobs/j1"
    await store.put("jobs/j2/results/other", b"r", "text/plain")
    assert await store.delete_prefix("jobs/j1/") == 3
    assert await store.stat("jobs/j1/inputs/image") is None
    assert await store.stat("jobs/j1/results/sub/b") is None
    assert await store.get("jobs/j10/results/sibling") == b"r"
    assert await store.get("jobs/j2/results/other") == b"r"
    assert await store.delete_prefix("jobs/j1/") == 0


@pytest.mark.parametrize("key", ["", "../x", "/abs", "a/../../b", "a/..", "a/./b", "a\x00b", "a\\b"])
async def test_hostile_keys_rejected(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        await store.put(key, b"x", "text/plain")
    with pytest.raises(ValueError):
        await store.get(key)
    with pytest.raises(ValueError):
        await store.stat(key)
    with pytest.raises(ValueError):
        await store.delete(key)
    with pytest.raises(ValueError):
        async for _ in store.stream(key):
            pass
    with pytest.raises(ValueError):
        await store.delete_prefix(key)


# --- S3 only ------------------------------------------------------------------------------


@pytest.mark.slow  # ~6 s: moto answers about 150 puts a second whatever the concurrency
async def test_s3_delete_prefix_paginates(moto_url: str) -> None:
    s = _s3(moto_url)
    await s.open()
    try:
        n = 1001  # one more than a ListObjectsV2 page and a DeleteObjects batch
        sem = asyncio.Semaphore(10)  # botocore's default connection pool size

        async def put(key: str) -> None:
            async with sem:
                await s.put(key, b"r", "text/plain")

        await asyncio.gather(*(put(f"jobs/j1/results/{i:04d}") for i in range(n)), put("jobs/j2/results/x"))
        assert await s.delete_prefix("jobs/j1") == n
        assert await s.stat("jobs/j1/results/1000") is None
        assert await s.get("jobs/j2/results/x") == b"r"
    finally:
        await s.close()


async def test_s3_open_existing_bucket(moto_url: str) -> None:
    a = _s3(moto_url)
    await a.open()
    try:
        await a.put("jobs/j1/inputs/a", b"kept", "text/plain")
        b = S3BlobStore(moto_url, a.bucket, "us-east-1", "testing", "testing")
        await b.open()
        try:
            assert await b.get("jobs/j1/inputs/a") == b"kept"
        finally:
            await b.close()
    finally:
        await a.close()


async def test_s3_unreachable_endpoint_is_unavailable() -> None:
    s = S3BlobStore(f"http://127.0.0.1:{free_port()}", "genq-test", "us-east-1", "testing", "testing")
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        await s.open()
    assert time.monotonic() - t0 < 10
    await s.close()


async def test_s3_ping_unavailable_after_server_stops(tmp_path: Path) -> None:
    proc, url = start_moto(tmp_path / "moto.log")
    s = _s3(url)
    try:
        await s.open()
        await s.ping()
        await asyncio.to_thread(stop_process, proc)
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            await s.ping()
        assert time.monotonic() - t0 < 10
        with pytest.raises(Unavailable):
            await s.get("jobs/j1/inputs/a")
    finally:
        await s.close()
        stop_process(proc)
