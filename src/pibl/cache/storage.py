"""The storage interface of the cache, and the registry of implementations.

A storage keeps, per primary key (``CacheKey``), the variants stored for that URL (one per
secondary key, RFC 9111 §4.1). Writers are fed from the exchange's callbacks, so ``write`` and
``abort`` are plain methods; only ``commit`` may wait (Redis). A writer that is not committed
leaves nothing behind (Pingora's ``HandleMiss``): a client that went away or an upstream reset
never produces an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from mypy_extensions import mypyc_attr

from pibl.cache.key import CacheKey
from pibl.cache.policy import StoredResponse
from pibl.config import CacheSettings
from pibl.errors import caused_by


class CorruptEntry(Exception):
    """A stored entry failed its integrity checks; it is treated as a miss and removed."""


class CacheEntry(Protocol):
    meta: StoredResponse
    body_size: int

    def read_body(self) -> bytes:
        """The whole body, verified; raises ``CorruptEntry``."""
        ...


class CacheWriter(Protocol):
    def write(self, data: bytes) -> bool:
        """Append body bytes; False (and the write is abandoned) once the object is too big."""
        ...

    def abort(self) -> None: ...

    async def commit(self) -> None:
        """Make the entry visible, replacing the variant with the same secondary key."""
        ...


@mypyc_attr(allow_interpreted_subclasses=True)  # RedisWriter is not compiled
class BufferedWriter:
    """A writer that collects the body in memory, bounded by ``max_object_size``, for storages
    that publish an entry in one piece at ``commit`` (memory, Redis)."""

    __slots__ = ("_parts", "_size", "max_object_size", "meta", "open")

    def __init__(self, meta: StoredResponse, max_object_size: int, *, is_open: bool = True) -> None:
        self.meta = meta
        self.max_object_size = max_object_size
        self._parts: list[bytes] = []
        self._size = 0
        self.open = is_open

    def write(self, data: bytes) -> bool:
        if not self.open:
            return False
        self._size += len(data)
        if self._size > self.max_object_size:
            self.abort()
            return False
        self._parts.append(data)
        return True

    def abort(self) -> None:
        self.open = False
        self._parts = []

    def take_body(self) -> bytes | None:
        """The whole body, once, if the writer was neither aborted nor committed before."""
        if not self.open:
            return None
        self.open = False
        body = b"".join(self._parts)
        self._parts = []
        return body


class CacheStorage(Protocol):
    name: str

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def lookup(self, key: CacheKey) -> list[CacheEntry]: ...
    def open_writer(self, meta: StoredResponse) -> CacheWriter: ...
    async def update(self, entry: CacheEntry, meta: StoredResponse) -> None: ...
    async def delete(self, key: CacheKey) -> int: ...
    async def purge(self, prefix: str | None = None) -> int:
        """Delete every entry whose URL starts with ``prefix`` (all when None)."""
        ...

    def stats(self) -> dict[str, int]: ...


StorageFactory = Callable[[CacheSettings], CacheStorage]


def _memory(settings: CacheSettings) -> CacheStorage:
    from pibl.cache.memory import MemoryStorage

    return MemoryStorage(settings.max_size, settings.max_object_size)


def _disk(settings: CacheSettings) -> CacheStorage:
    from pibl.cache.disk import DiskStorage

    return DiskStorage(settings.path, settings.max_size, settings.max_object_size)


def _redis(settings: CacheSettings) -> CacheStorage:
    from pibl.cache.redis import RedisStorage

    return RedisStorage(settings.redis_url, settings.max_object_size, prefix=settings.redis_prefix)


STORAGES: Final[dict[str, StorageFactory]] = {"memory": _memory, "disk": _disk, "redis": _redis}


def make_storage(settings: CacheSettings) -> CacheStorage:
    try:
        factory = STORAGES[settings.storage]
    except KeyError:
        raise caused_by(  # noqa: B904 (caused_by)
            ValueError(
                f"cache storage {settings.storage!r} is not available; expected one of "
                + ", ".join(sorted(STORAGES))
            ),
            None,
        )
    return factory(settings)
