"""Disk cache storage: one file per variant, named by hashes of the key, never by the URL.

Layout: ``<path>/entries/<2 hex>/<key digest>/<secondary key digest>`` and ``<path>/tmp/``.
A file is written in ``tmp/`` and renamed into place when complete, so a crash or ``kill -9``
never leaves a torn entry where a reader looks; every read checks a magic, the lengths, a CRC
and the full key stored inside, so a corrupt or foreign file is ignored and removed.

File format: ``MAGIC | meta length (u32) | body length (u64) | meta | body | crc32 (u32)``,
the CRC covering meta and body. Disk I/O is synchronous: entries are bounded by
``max_object_size`` and reads mostly hit the page cache (nginx does the same without aio).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import struct
import zlib
from collections import OrderedDict
from pathlib import Path

from pibl.cache.key import CacheKey
from pibl.cache.policy import StoredResponse
from pibl.cache.storage import CacheEntry, CorruptEntry

log = logging.getLogger("pibl.cache")

MAGIC = b"PIBLCACHE1\n"
_HEAD = struct.Struct(">IQ")
_CRC = struct.Struct(">I")
_PREFIX = len(MAGIC) + _HEAD.size
# A meta section larger than this is not something PIBL wrote.
MAX_META_BYTES = 1 << 20
# Read size when checking a body's CRC at lookup (the body itself is not kept).
_READ_BLOCK = 256 * 1024


def variant_name(meta: StoredResponse) -> str:
    encoded = json.dumps([list(pair) for pair in meta.vary], separators=(",", ":"))
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class DiskEntry:
    __slots__ = ("body_size", "meta", "path")

    def __init__(self, path: Path, meta: StoredResponse, body_size: int) -> None:
        self.path = path
        self.meta = meta
        self.body_size = body_size

    def read_body(self) -> bytes:
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise CorruptEntry(f"{self.path}: {error}") from error
        meta, body = _decode(data, self.path)
        if meta.key != self.meta.key:
            raise CorruptEntry(f"{self.path}: entry replaced while reading")
        return body


def _decode(data: bytes, path: Path) -> tuple[StoredResponse, bytes]:
    if not data.startswith(MAGIC) or len(data) < _PREFIX + _CRC.size:
        raise CorruptEntry(f"{path}: not a PIBL cache file")
    meta_len, body_len = _HEAD.unpack_from(data, len(MAGIC))
    end = _PREFIX + meta_len + body_len
    if meta_len > MAX_META_BYTES or len(data) != end + _CRC.size:
        raise CorruptEntry(f"{path}: truncated or oversized")
    (crc,) = _CRC.unpack_from(data, end)
    if zlib.crc32(memoryview(data)[_PREFIX:end]) != crc:
        raise CorruptEntry(f"{path}: checksum mismatch")
    try:
        meta = StoredResponse.from_bytes(data[_PREFIX : _PREFIX + meta_len])
    except ValueError as error:
        raise CorruptEntry(f"{path}: {error}") from error
    return meta, data[_PREFIX + meta_len : end]


def _read_meta(path: Path, *, verify: bool = True) -> tuple[StoredResponse, int]:
    """Meta and body size of the entry at ``path``, without keeping the body.

    With ``verify`` the CRC is checked as on a full read: it covers the meta too, and a flipped
    byte in a stored header must not be served (on a HEAD or a 304 the body is never read).
    """
    with path.open("rb") as handle:
        prefix = handle.read(_PREFIX)
        if len(prefix) != _PREFIX or not prefix.startswith(MAGIC):
            raise CorruptEntry(f"{path}: not a PIBL cache file")
        meta_len, body_len = _HEAD.unpack_from(prefix, len(MAGIC))
        if meta_len > MAX_META_BYTES:
            raise CorruptEntry(f"{path}: oversized meta")
        size = os.fstat(handle.fileno()).st_size
        if size != _PREFIX + meta_len + body_len + _CRC.size:
            raise CorruptEntry(f"{path}: truncated")
        meta_bytes = handle.read(meta_len)
        crc = zlib.crc32(meta_bytes)
        left = body_len if verify else 0
        while left > 0:
            block = handle.read(min(left, _READ_BLOCK))
            if not block:
                raise CorruptEntry(f"{path}: truncated")
            crc = zlib.crc32(block, crc)
            left -= len(block)
        trailer = handle.read(_CRC.size) if verify else b""
        if verify and (len(trailer) != _CRC.size or _CRC.unpack(trailer)[0] != crc):
            raise CorruptEntry(f"{path}: checksum mismatch")
        try:
            meta = StoredResponse.from_bytes(meta_bytes)
        except ValueError as error:
            raise CorruptEntry(f"{path}: {error}") from error
    return meta, body_len


class DiskWriter:
    __slots__ = ("_crc", "_fd", "_size", "_storage", "_tmp", "meta", "meta_bytes")

    def __init__(self, storage: DiskStorage, meta: StoredResponse) -> None:
        self._storage = storage
        self.meta = meta
        self.meta_bytes = meta.to_bytes()
        self._size = 0
        self._tmp = storage.tmp_dir / f"{secrets.token_hex(12)}.tmp"
        self._fd: int | None = None
        try:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._write(MAGIC + _HEAD.pack(len(self.meta_bytes), 0) + self.meta_bytes)
        except OSError as error:
            storage.report_error("cannot create a cache file", error)
            self.abort()
        self._crc = zlib.crc32(self.meta_bytes)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def write(self, data: bytes) -> bool:
        if self._fd is None:
            return False
        self._size += len(data)
        if self._size > self._storage.max_object_size:
            self.abort()
            return False
        try:
            self._write(data)
        except OSError as error:  # ENOSPC, EIO: the response still streams, only uncached
            self._storage.report_error("cannot write a cache file", error)
            self.abort()
            return False
        self._crc = zlib.crc32(data, self._crc)
        return True

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def __del__(self) -> None:
        # A writer dropped without commit() or abort() must not leak its descriptor and file.
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                self.abort()

    async def commit(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            self._write(_CRC.pack(self._crc))
            os.pwrite(fd, _HEAD.pack(len(self.meta_bytes), self._size), len(MAGIC))
            os.close(fd)
            self._fd = None
            self._storage.install(self._tmp, self.meta, self._size)
        except OSError as error:
            self._storage.report_error("cannot commit a cache file", error)
            self.abort()


class DiskStorage:
    name = "disk"

    def __init__(self, path: str, max_size: int, max_object_size: int) -> None:
        self.root = Path(path)
        self.entries_dir = self.root / "entries"
        self.tmp_dir = self.root / "tmp"
        self.max_size = max_size
        self.max_object_size = max_object_size
        # path -> file size, oldest use first (LRU).
        self._index: OrderedDict[Path, int] = OrderedDict()
        self.size = 0
        self.evictions = 0
        self._error_reported = False

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():  # writes a crash interrupted
            with contextlib.suppress(OSError):
                leftover.unlink()
        found: list[tuple[float, Path, int]] = []
        for path in self.entries_dir.glob("*/*/*"):
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((stat.st_mtime, path, stat.st_size))
        for _, path, size in sorted(found):
            self._index[path] = size
            self.size += size
        self._evict()
        log.info("disk cache at %s: %d entries, %d bytes", self.root, len(self._index), self.size)

    async def aclose(self) -> None:
        return None

    # -- paths ---------------------------------------------------------------------------------
    def key_dir(self, key: CacheKey) -> Path:
        digest = key.digest()
        return self.entries_dir / digest[:2] / digest

    # -- operations ----------------------------------------------------------------------------
    async def lookup(self, key: CacheKey) -> list[CacheEntry]:
        directory = self.key_dir(key)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        except NotADirectoryError:  # a stray file where the key's folder belongs: not ours
            self._remove(directory)
            return []
        entries: list[CacheEntry] = []
        for name in names:
            path = directory / name
            try:
                meta, body_size = _read_meta(path)
                if meta.key != key:
                    raise CorruptEntry(f"{path}: stored key {meta.key.url!r} is not {key.url!r}")
            except FileNotFoundError:
                continue
            except (CorruptEntry, OSError) as error:
                log.warning("removing unusable cache file: %s", error)
                self._remove(path)
                continue
            if path in self._index:
                self._index.move_to_end(path)
            entries.append(DiskEntry(path, meta, body_size))
        return entries

    def open_writer(self, meta: StoredResponse) -> DiskWriter:
        return DiskWriter(self, meta)

    def install(self, tmp: Path, meta: StoredResponse, body_size: int) -> None:
        directory = self.key_dir(meta.key)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / variant_name(meta)
        size = tmp.stat().st_size
        if size > self.max_size:
            tmp.unlink()
            return
        os.replace(tmp, final)  # atomic: readers see the old file or the new one
        self._error_reported = False
        old = self._index.pop(final, None)
        if old is not None:
            self.size -= old
        self._index[final] = size
        self.size += size
        self._evict()

    async def update(self, entry: CacheEntry, meta: StoredResponse) -> None:
        """Rewrite ``entry`` with fresh meta (after a 304), keeping its body."""
        try:
            body = entry.read_body()
        except CorruptEntry:
            return
        writer = DiskWriter(self, meta)
        if writer.write(body) or not body:
            await writer.commit()

    async def delete(self, key: CacheKey) -> int:
        directory = self.key_dir(key)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return 0
        except NotADirectoryError:
            self._remove(directory)
            return 0
        for name in names:
            self._remove(directory / name)
        with contextlib.suppress(OSError):
            directory.rmdir()
        return len(names)

    async def purge(self, prefix: str | None = None) -> int:
        removed = 0
        for path in list(self._index):
            if prefix is not None:
                try:
                    meta, _ = _read_meta(path, verify=False)  # only the URL is needed
                except (CorruptEntry, OSError):
                    self._remove(path)
                    continue
                if not meta.key.url.startswith(prefix):
                    continue
            self._remove(path)
            removed += 1
        return removed

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._index), "bytes": self.size, "evictions": self.evictions}

    # -- internals -----------------------------------------------------------------------------
    def _remove(self, path: Path) -> None:
        size = self._index.pop(path, None)
        if size is not None:
            self.size -= size
        with contextlib.suppress(OSError):
            path.unlink()

    def _evict(self) -> None:
        while self.size > self.max_size and self._index:
            path, _ = next(iter(self._index.items()))
            self._remove(path)
            self.evictions += 1

    def report_error(self, what: str, error: OSError) -> None:
        # Logged once per burst: a full disk must not flood the event log.
        if not self._error_reported:
            self._error_reported = True
            log.error("%s in %s: %s; responses are served uncached", what, self.root, error)

    def __repr__(self) -> str:
        return f"<DiskStorage {self.root} entries={len(self._index)} bytes={self.size}>"
