"""In-memory cache storage: LRU over URLs, bounded by the total bytes of bodies and heads."""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from pibl.cache.key import CacheKey
from pibl.cache.policy import StoredResponse
from pibl.cache.storage import BufferedWriter, CacheEntry

# Bookkeeping cost of an entry beyond its body and header bytes (objects, dict slots).
ENTRY_OVERHEAD_BYTES: Final = 512


def _head_size(meta: StoredResponse) -> int:
    return sum(len(n) + len(v) + 4 for n, v in meta.headers) + ENTRY_OVERHEAD_BYTES


class MemoryEntry:
    __slots__ = ("body", "body_size", "meta", "size")

    def __init__(self, meta: StoredResponse, body: bytes) -> None:
        self.meta = meta
        self.body = body
        self.body_size = len(body)
        self.size = len(body) + _head_size(meta)

    def read_body(self) -> bytes:
        return self.body


class MemoryWriter(BufferedWriter):
    __slots__ = ("_storage",)

    def __init__(self, storage: MemoryStorage, meta: StoredResponse) -> None:
        super().__init__(meta, storage.max_object_size)
        self._storage = storage

    async def commit(self) -> None:
        body = self.take_body()
        if body is not None:
            self._storage.insert(MemoryEntry(self.meta, body))


class MemoryStorage:
    name = "memory"

    def __init__(self, max_size: int, max_object_size: int) -> None:
        self.max_size = max_size
        self.max_object_size = max_object_size
        self._entries: OrderedDict[CacheKey, list[MemoryEntry]] = OrderedDict()
        self.size = 0
        self.count = 0
        self.evictions = 0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self._entries.clear()
        self.size = self.count = 0

    async def lookup(self, key: CacheKey) -> list[CacheEntry]:
        return self.lookup_now(key)

    def lookup_now(self, key: CacheKey) -> list[CacheEntry]:
        """:meth:`lookup` without a coroutine (nothing here waits): the cache's hit path
        calls it directly (see ``HttpCache.lookup``)."""
        variants = self._entries.get(key)
        if not variants:
            return []
        self._entries.move_to_end(key)
        return list(variants)

    def open_writer(self, meta: StoredResponse) -> MemoryWriter:
        return MemoryWriter(self, meta)

    def insert(self, entry: MemoryEntry) -> None:
        if entry.size > self.max_size:
            return
        key = entry.meta.key
        variants = self._entries.setdefault(key, [])
        for index, old in enumerate(variants):
            if old.meta.vary == entry.meta.vary:
                self.size -= old.size
                variants[index] = entry
                break
        else:
            variants.append(entry)
            self.count += 1
        self.size += entry.size
        self._entries.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_size and self._entries:
            _, evicted = self._entries.popitem(last=False)
            for old in evicted:
                self.size -= old.size
                self.count -= 1
                self.evictions += 1

    async def update(self, entry: CacheEntry, meta: StoredResponse) -> None:
        variants = self._entries.get(meta.key, [])
        for index, old in enumerate(variants):
            if old is entry:
                fresh = MemoryEntry(meta, old.body)
                self.size += fresh.size - old.size
                variants[index] = fresh
                self._entries.move_to_end(meta.key)
                self._evict()  # fresh fields from a 304 may have made it bigger
                return

    async def delete(self, key: CacheKey) -> int:
        variants = self._entries.pop(key, [])
        for old in variants:
            self.size -= old.size
            self.count -= 1
        return len(variants)

    async def purge(self, prefix: str | None = None) -> int:
        if prefix is None:
            removed = self.count
            self._entries.clear()
            self.size = self.count = 0
            return removed
        removed = 0
        for key in [k for k in self._entries if k.url.startswith(prefix)]:
            removed += await self.delete(key)
        return removed

    def stats(self) -> dict[str, int]:
        return {"entries": self.count, "bytes": self.size, "evictions": self.evictions}

    def __repr__(self) -> str:
        return f"<MemoryStorage entries={self.count} bytes={self.size}/{self.max_size}>"
