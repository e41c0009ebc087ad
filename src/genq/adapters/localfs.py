"""``BlobStore`` on a local folder: the embedded default.

Writes go to a temporary file in the same folder, are fsynced and renamed into place, so
a crash never leaves a half-written object under its real key. Keys are checked so that
none can point outside the root.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import hashlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from genq.ports import BlobInfo, StorageFull


class LocalBlobStore:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    async def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"object storage folder {self.root} is missing")

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or "\\" in key or "\x00" in key:
            raise ValueError(f"invalid object key {key!r}")
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
            raise ValueError(f"invalid object key {key!r}")
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"invalid object key {key!r}")
        return path

    async def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        path = self._path(key)
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        try:
            await asyncio.to_thread(_write_atomic, path, data)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left for {key}") from e
            raise
        return BlobInfo(key=key, size=len(data), etag=etag, content_type=content_type)

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise KeyError(key) from None

    async def stream(self, key: str, chunk_size: int = 1 << 16) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise KeyError(key) from None
        try:
            while True:
                chunk = await asyncio.to_thread(f.read, chunk_size)
                if not chunk:
                    break
                yield chunk
        finally:
            f.close()

    async def stat(self, key: str) -> BlobInfo | None:
        path = self._path(key)
        try:
            st = await asyncio.to_thread(path.stat)
        except FileNotFoundError:
            return None
        return BlobInfo(key=key, size=st.st_size)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            pass

    async def delete_prefix(self, prefix: str) -> int:
        folder = self._path(prefix.rstrip("/"))
        return await asyncio.to_thread(_rmtree_count, folder)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_tmp(path)
    # Unique per write: two attempts of one job in one process never share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_dead_writers_tmp(path: Path) -> None:
    """Temporary files of this key left by a writer killed mid-write (SIGKILL skips the
    cleanup above): the next attempt writes the same key, and removes them if their
    process is gone. Otherwise they would sit beside the result until retention ends."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-4].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rmtree_count(folder: Path) -> int:
    if not folder.exists():
        return 0
    n = sum(1 for p in folder.rglob("*") if p.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    return n
