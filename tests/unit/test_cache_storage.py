"""The ``CacheStorage`` contract, run over every registered storage, plus disk-only guarantees.

One suite for every implementation in ``STORAGES`` (DESIGN.md §3: contract tests run one suite
over every implementation of a protocol). The disk storage additionally promises that entries
survive a restart, that a corrupt, foreign or misplaced file is never served (and is removed),
that a full disk only costs caching, and that file names never contain any part of the URL.
The Redis storage runs the suite against a real ``redis-server`` (one per session, a key prefix
per test), and again (kind ``redis-cluster``) against a real three-node Redis Cluster; its own
tests cover chunking, TTLs, tampered entries, sharing and outages.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pibl.cache.disk as disk_module
import pibl.cache.redis as redis_module
from pibl.cache.disk import MAGIC, DiskStorage, variant_name
from pibl.cache.key import CacheKey
from pibl.cache.policy import SecondaryKey, StoredResponse
from pibl.cache.redis import (
    CHUNK_BYTES,
    MAX_TTL,
    MIN_TTL,
    REPLACED_GRACE,
    REVALIDATION_GRACE,
    RedisEntry,
    RedisStorage,
    entry_ttl,
)
from pibl.cache.storage import STORAGES, CacheEntry, CacheStorage, CorruptEntry
from pibl.config import CacheSettings
from tests.redis_support import RedisClusterServers, RedisServer, free_port, redis_cluster
from tests.support import wait_until

MIB = 1 << 20
KEY = CacheKey("http", "example.com", "/a")
OTHER = CacheKey("http", "example.com", "/b")
GZIP: SecondaryKey = (("accept-encoding", "gzip"),)
BR: SecondaryKey = (("accept-encoding", "br"),)
HEX_NAME = re.compile(r"[0-9a-f]+")

MakeStorage = Callable[..., Awaitable[CacheStorage]]
# The suite runs on shared, loaded machines: Redis commands get more than the production
# REDIS_TIMEOUT (0.25 s) so that only the outage tests, which make Redis slow or kill it on
# purpose, see outages.
PATIENT_TIMEOUT = 5.0


def make_meta(
    key: CacheKey = KEY, *, vary: SecondaryKey = (), tag: str = "1", at: float = 1000.0
) -> StoredResponse:
    return StoredResponse(
        key=key,
        status=200,
        reason=b"OK",
        headers=[
            (b"Cache-Control", b"max-age=600"),
            (b"Content-Type", b"text/plain"),
            (b"X-Tag", tag.encode()),
        ],
        request_time=at,
        response_time=at + 0.5,
        vary=vary,
    )


async def store(storage: CacheStorage, meta: StoredResponse, body: bytes) -> None:
    writer = storage.open_writer(meta)
    for start in range(0, len(body), 1000):
        assert writer.write(body[start : start + 1000])
    await writer.commit()


async def variants(storage: CacheStorage, key: CacheKey) -> dict[SecondaryKey, CacheEntry]:
    """The stored variants of ``key`` by secondary key (each at most once)."""
    entries = await storage.lookup(key)
    by_vary = {entry.meta.vary: entry for entry in entries}
    assert len(by_vary) == len(entries), "two entries with one secondary key"
    return by_vary


async def only_entry(storage: CacheStorage, key: CacheKey) -> CacheEntry:
    entries = await storage.lookup(key)
    assert len(entries) == 1, entries
    return entries[0]


def tmp_files(root: Path) -> list[Path]:
    folder = root / "tmp"
    return list(folder.iterdir()) if folder.exists() else []


def names_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


# --------------------------------------------------------------------------- fixtures


# The contract's kinds: every registered storage, and the Redis one on a Redis Cluster.
KINDS = sorted([*STORAGES, "redis-cluster"])
__all__ = ["redis_cluster"]  # the session fixture, imported for pytest


def storage_of_kind(kind: str) -> str:
    """The ``storage`` setting for ``kind``."""
    return "redis" if kind == "redis-cluster" else kind


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def redis_url_for(kind: str, request: pytest.FixtureRequest) -> str:
    """The session's redis-server URL when ``kind`` is "redis" (started on first use), or its
    Redis Cluster's for "redis-cluster"."""
    if kind == "redis-cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        return cluster.url
    if kind != "redis":
        return ""
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def make_storage(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MakeStorage]:
    """Builds started storages through the registry; each in its own folder (for Redis: its own
    key prefix) unless named."""
    started: list[CacheStorage] = []
    redis_url = redis_url_for(kind, request)
    monkeypatch.setattr(redis_module, "REDIS_TIMEOUT", PATIENT_TIMEOUT)
    namespace = f"test-{uuid.uuid4().hex[:12]}"

    async def make(
        *, max_size: int = 64 * MIB, max_object_size: int = MIB, folder: str = "cache"
    ) -> CacheStorage:
        config = CacheSettings(
            enabled=True,
            storage=storage_of_kind(kind),
            path=str(tmp_path / folder),
            max_size=max_size,
            max_object_size=max_object_size,
            redis_url=redis_url,
            redis_prefix=f"{namespace}-{folder}",
        )
        storage = STORAGES[storage_of_kind(kind)](config)
        await storage.start()
        started.append(storage)
        return storage

    yield make
    for storage in started:
        await storage.aclose()


@pytest.fixture
async def storage(make_storage: MakeStorage) -> CacheStorage:
    return await make_storage()


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[DiskStorage]:
    storage = DiskStorage(str(tmp_path / "cache"), 64 * MIB, MIB)
    await storage.start()
    yield storage
    await storage.aclose()


# --------------------------------------------------------------------------- the contract


def test_registry_builds_every_storage_without_side_effects(tmp_path: Path) -> None:
    for name, factory in STORAGES.items():
        config = CacheSettings(enabled=True, storage=name, path=str(tmp_path / name))
        assert factory(config).name == name
    assert list(tmp_path.iterdir()) == []  # constructors touch nothing; start() does


async def test_lookup_on_empty_storage_misses(storage: CacheStorage) -> None:
    assert await storage.lookup(KEY) == []
    assert storage.stats()["entries"] == 0
    assert storage.stats()["bytes"] == 0


async def test_committed_entry_is_returned_with_equal_meta_and_body(storage: CacheStorage) -> None:
    meta = make_meta()
    body = bytes(range(256)) * 40
    await store(storage, meta, body)
    entry = await only_entry(storage, KEY)
    assert entry.meta == meta
    assert entry.body_size == len(body)
    assert entry.read_body() == body
    assert await storage.lookup(OTHER) == []


async def test_empty_body_is_stored(storage: CacheStorage) -> None:
    writer = storage.open_writer(make_meta())
    await writer.commit()
    entry = await only_entry(storage, KEY)
    assert entry.body_size == 0
    assert entry.read_body() == b""


async def test_entry_is_invisible_until_commit(storage: CacheStorage) -> None:
    writer = storage.open_writer(make_meta())
    assert writer.write(b"partial")
    assert await storage.lookup(KEY) == []
    await writer.commit()
    assert (await only_entry(storage, KEY)).read_body() == b"partial"


async def test_aborted_writer_leaves_nothing(storage: CacheStorage, tmp_path: Path) -> None:
    writer = storage.open_writer(make_meta())
    assert writer.write(b"x" * 5000)
    writer.abort()
    assert writer.write(b"more") is False
    await writer.commit()  # too late: an aborted write stays aborted
    assert await storage.lookup(KEY) == []
    assert storage.stats()["entries"] == 0
    assert tmp_files(tmp_path / "cache") == []


async def test_abort_keeps_the_previous_entry(storage: CacheStorage) -> None:
    await store(storage, make_meta(tag="old"), b"old body")
    writer = storage.open_writer(make_meta(tag="new"))
    assert writer.write(b"new body")
    writer.abort()
    entry = await only_entry(storage, KEY)
    assert entry.meta == make_meta(tag="old")
    assert entry.read_body() == b"old body"


async def test_writer_never_committed_leaves_nothing(storage: CacheStorage, tmp_path: Path) -> None:
    writer = storage.open_writer(make_meta())
    assert writer.write(b"y" * 5000)
    del writer  # the client went away and nobody called abort()
    gc.collect()
    assert await storage.lookup(KEY) == []
    assert storage.stats()["entries"] == 0
    assert tmp_files(tmp_path / "cache") == []


async def test_writer_over_max_object_size_stores_nothing(
    make_storage: MakeStorage, tmp_path: Path
) -> None:
    storage = await make_storage(max_object_size=1000)
    await store(storage, make_meta(tag="old"), b"o" * 1000)  # exactly the limit is fine
    writer = storage.open_writer(make_meta(tag="new"))
    assert writer.write(b"z" * 600)
    assert writer.write(b"z" * 600) is False
    assert writer.write(b"z") is False
    await writer.commit()
    entry = await only_entry(storage, KEY)
    assert entry.meta.headers == make_meta(tag="old").headers
    assert entry.read_body() == b"o" * 1000
    assert tmp_files(tmp_path / "cache") == []


async def test_same_secondary_key_replaces(storage: CacheStorage) -> None:
    await store(storage, make_meta(vary=GZIP, tag="1"), b"first")
    await store(storage, make_meta(vary=GZIP, tag="2", at=2000), b"second")
    entry = await only_entry(storage, KEY)
    assert entry.meta == make_meta(vary=GZIP, tag="2", at=2000)
    assert entry.read_body() == b"second"
    assert storage.stats()["entries"] == 1


async def test_different_secondary_key_adds_a_variant(storage: CacheStorage) -> None:
    await store(storage, make_meta(vary=GZIP), b"gzip body")
    await store(storage, make_meta(vary=BR), b"br body")
    await store(storage, make_meta(vary=()), b"plain body")
    found = await variants(storage, KEY)
    assert set(found) == {GZIP, BR, ()}
    assert found[GZIP].read_body() == b"gzip body"
    assert found[BR].read_body() == b"br body"
    assert found[()].read_body() == b"plain body"
    assert storage.stats()["entries"] == 3


async def test_update_replaces_meta_and_keeps_body(storage: CacheStorage) -> None:
    await store(storage, make_meta(vary=GZIP, tag="old"), b"gzip body")
    await store(storage, make_meta(vary=BR, tag="br"), b"br body")
    entry = (await variants(storage, KEY))[GZIP]
    fresh = make_meta(vary=GZIP, tag="fresh", at=5000)
    await storage.update(entry, fresh)
    found = await variants(storage, KEY)
    assert set(found) == {GZIP, BR}
    assert found[GZIP].meta == fresh
    assert found[GZIP].read_body() == b"gzip body"
    assert found[BR].meta == make_meta(vary=BR, tag="br")
    assert storage.stats()["entries"] == 2


async def test_delete_removes_every_variant_and_counts_them(storage: CacheStorage) -> None:
    for vary in (GZIP, BR, ()):
        await store(storage, make_meta(vary=vary), b"body")
    await store(storage, make_meta(OTHER), b"other")
    assert await storage.delete(KEY) == 3
    assert await storage.lookup(KEY) == []
    assert (await only_entry(storage, OTHER)).read_body() == b"other"
    assert await storage.delete(KEY) == 0
    assert storage.stats()["entries"] == 1
    assert await storage.delete(OTHER) == 1
    assert storage.stats() | {"evictions": 0} == {"entries": 0, "bytes": 0, "evictions": 0}


async def test_purge_by_prefix_then_everything(storage: CacheStorage) -> None:
    keys = [
        CacheKey("http", "example.com", "/p/1"),
        CacheKey("http", "example.com", "/p/2"),
        CacheKey("http", "example.com", "/q/1"),
        CacheKey("http", "other.com", "/p/1"),
    ]
    for key in keys:
        await store(storage, make_meta(key), key.url.encode())
    await store(storage, make_meta(keys[0], vary=GZIP), b"variant")
    assert await storage.purge("http://example.com/p/") == 3
    assert await storage.lookup(keys[0]) == []
    assert await storage.lookup(keys[1]) == []
    assert (await only_entry(storage, keys[2])).read_body() == keys[2].url.encode()
    assert (await only_entry(storage, keys[3])).read_body() == keys[3].url.encode()
    assert await storage.purge("http://nothing/") == 0
    assert await storage.purge() == 2
    for key in keys:
        assert await storage.lookup(key) == []
    assert storage.stats()["entries"] == 0
    assert storage.stats()["bytes"] == 0


# Storages that enforce max_size themselves; Redis bounds its memory with maxmemory and
# volatile-lru instead, so these two contract tests are not part of its contract.
bounded_by_max_size = pytest.mark.parametrize(
    "kind",
    sorted(name for name in STORAGES if name != "redis"),  # so not redis-cluster either
)


@bounded_by_max_size
async def test_eviction_bounds_bytes_and_drops_least_recently_used(
    make_storage: MakeStorage, kind: str
) -> None:
    body = b"e" * 10_000
    keys = [CacheKey("http", "example.com", f"/e{i}") for i in range(6)]
    probe = await make_storage(folder="probe")
    await store(probe, make_meta(keys[0]), body)
    one = probe.stats()["bytes"]
    assert one >= len(body)

    max_size = 3 * one + one // 2  # room for three entries, not four
    storage = await make_storage(max_size=max_size, max_object_size=len(body))
    for key in keys[:3]:
        await store(storage, make_meta(key), body)
    assert storage.stats()["entries"] == 3
    assert storage.stats()["evictions"] == 0
    assert await storage.lookup(keys[0])  # keys[0] is now the most recently used
    await store(storage, make_meta(keys[3]), body)
    stats = storage.stats()
    assert stats["bytes"] <= max_size
    assert stats["entries"] == 3
    assert stats["evictions"] == 1
    assert await storage.lookup(keys[1]) == []  # the least recently used went first
    for key in (keys[0], keys[2], keys[3]):
        assert (await only_entry(storage, key)).read_body() == body
    for key in keys[4:]:
        await store(storage, make_meta(key), body)
        assert storage.stats()["bytes"] <= max_size
    assert await storage.lookup(keys[4])
    assert await storage.lookup(keys[5])


@bounded_by_max_size
async def test_update_that_grows_an_entry_still_respects_max_size(
    make_storage: MakeStorage, kind: str
) -> None:
    body = b"u" * 10_000
    keys = [CacheKey("http", "example.com", f"/u{i}") for i in range(3)]
    probe = await make_storage(folder="probe")
    await store(probe, make_meta(keys[0]), body)
    one = probe.stats()["bytes"]

    max_size = 3 * one + 1000
    storage = await make_storage(max_size=max_size, max_object_size=len(body))
    for key in keys:
        await store(storage, make_meta(key), body)
    entry = await only_entry(storage, keys[0])
    bigger = make_meta(keys[0], tag="t" * 5000, at=3000)  # e.g. a 304 adding fields
    await storage.update(entry, bigger)
    assert storage.stats()["bytes"] <= max_size
    updated = await only_entry(storage, keys[0])  # just refreshed: not the one evicted
    assert updated.meta == bigger
    assert updated.read_body() == body
    assert await storage.lookup(keys[1]) == []


async def test_stats_count_entries_and_bytes(storage: CacheStorage) -> None:
    stats = storage.stats()
    assert {"entries", "bytes", "evictions"} <= set(stats)
    await store(storage, make_meta(vary=GZIP), b"a" * 3000)
    await store(storage, make_meta(vary=BR), b"b" * 3000)
    stats = storage.stats()
    assert stats["entries"] == 2
    assert stats["bytes"] >= 6000
    await storage.delete(KEY)
    assert storage.stats()["entries"] == 0
    assert storage.stats()["bytes"] == 0


# --------------------------------------------------------------------------- a model


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.integers(0, 2), st.integers(0, 1), st.binary(max_size=3000)),
        st.tuples(st.just("commit"), st.integers(0, 7)),
        st.tuples(st.just("abort"), st.integers(0, 7)),
        st.tuples(st.just("delete"), st.integers(0, 2)),
    ),
    max_size=25,
)
_MODEL_KEYS = [CacheKey("http", "example.com", f"/m{i}") for i in range(3)]
_MODEL_VARY: list[SecondaryKey] = [(), GZIP]


async def _check_model(kind: str, folder: str, ops: list[tuple[Any, ...]], redis_url: str) -> None:
    config = CacheSettings(
        enabled=True,
        storage=storage_of_kind(kind),
        path=folder,
        redis_url=redis_url,
        redis_prefix=f"model-{uuid.uuid4().hex[:12]}",
    )
    storage = STORAGES[storage_of_kind(kind)](config)
    await storage.start()
    model: dict[tuple[CacheKey, SecondaryKey], tuple[StoredResponse, bytes]] = {}
    pending: list[tuple[Any, StoredResponse, bytes]] = []
    try:
        for serial, op in enumerate(ops):
            if op[0] == "open":
                meta = make_meta(_MODEL_KEYS[op[1]], vary=_MODEL_VARY[op[2]], tag=str(serial))
                writer = storage.open_writer(meta)
                assert writer.write(op[3])
                pending.append((writer, meta, op[3]))
            elif op[0] in ("commit", "abort") and pending:
                writer, meta, body = pending.pop(op[1] % len(pending))
                if op[0] == "commit":
                    await writer.commit()
                    model[(meta.key, meta.vary)] = (meta, body)
                else:
                    writer.abort()
            elif op[0] == "delete":
                key = _MODEL_KEYS[op[1]]
                expected = [k for k in model if k[0] == key]
                for k in expected:
                    del model[k]
                assert await storage.delete(key) == len(expected)
            for key in _MODEL_KEYS:
                found = await variants(storage, key)
                want = {vary: value for (k, vary), value in model.items() if k == key}
                assert {vary: entry.meta for vary, entry in found.items()} == {
                    vary: meta for vary, (meta, _) in want.items()
                }
                for vary, entry in found.items():
                    assert entry.read_body() == want[vary][1]
            assert storage.stats()["entries"] == len(model)
    finally:
        for writer, _, _ in pending:
            writer.abort()
        await storage.aclose()
    if kind == "disk":
        assert tmp_files(Path(folder)) == []


@pytest.mark.parametrize("kind", KINDS)
@settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=_OPS)
def test_lookups_always_match_a_model(
    kind: str, ops: list[tuple[Any, ...]], request: pytest.FixtureRequest
) -> None:
    redis_url = redis_url_for(kind, request)  # each example gets its own key prefix
    with (
        tempfile.TemporaryDirectory() as folder,
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setattr(redis_module, "REDIS_TIMEOUT", PATIENT_TIMEOUT)
        runner.run(_check_model(kind, folder, ops, redis_url))


# --------------------------------------------------------------------------- disk only


def entry_path(storage: DiskStorage, meta: StoredResponse) -> Path:
    return storage.key_dir(meta.key) / variant_name(meta)


async def test_disk_entries_survive_a_restart(tmp_path: Path) -> None:
    folder = str(tmp_path / "cache")
    first = DiskStorage(folder, 64 * MIB, MIB)
    await first.start()
    await store(first, make_meta(vary=GZIP), b"gzip body")
    await store(first, make_meta(vary=BR), b"br body")
    await store(first, make_meta(OTHER), b"other body")
    stats = first.stats()
    await first.aclose()

    second = DiskStorage(folder, 64 * MIB, MIB)
    await second.start()
    try:
        assert second.stats() == stats
        found = await variants(second, KEY)
        assert {vary: e.meta for vary, e in found.items()} == {
            GZIP: make_meta(vary=GZIP),
            BR: make_meta(vary=BR),
        }
        assert found[GZIP].read_body() == b"gzip body"
        assert found[BR].read_body() == b"br body"
        assert (await only_entry(second, OTHER)).read_body() == b"other body"
        assert await second.purge() == 3
    finally:
        await second.aclose()


async def test_disk_restart_applies_a_smaller_max_size(tmp_path: Path) -> None:
    folder = str(tmp_path / "cache")
    first = DiskStorage(folder, 64 * MIB, MIB)
    await first.start()
    for i in range(5):
        await store(first, make_meta(CacheKey("http", "h", f"/{i}")), b"r" * 10_000)
    one = first.stats()["bytes"] // 5
    await first.aclose()
    second = DiskStorage(folder, 2 * one + one // 2, MIB)
    await second.start()
    try:
        assert second.stats()["entries"] == 2
        assert second.stats()["bytes"] <= 2 * one + one // 2
        assert len(files_under(tmp_path / "cache")) == 2
    finally:
        await second.aclose()


async def test_disk_removes_leftover_tmp_files_at_start(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / "tmp").mkdir(parents=True)
    (root / "tmp" / "0123abcd.tmp").write_bytes(MAGIC + b"half written")
    (root / "tmp" / "other").write_bytes(b"x")
    storage = DiskStorage(str(root), 64 * MIB, MIB)
    await storage.start()
    try:
        assert tmp_files(root) == []
        assert storage.stats()["entries"] == 0
    finally:
        await storage.aclose()


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def _damage(kind: str, data: bytes, foreign: bytes) -> bytes:
    tag = data.index(b"tag-value")
    body = data.index(b"the stored body")
    return {
        "empty": b"",
        "magic-only": MAGIC,
        "truncated-half": data[: len(data) // 2],
        "truncated-crc": data[:-1],
        "one-byte-too-long": data + b"\0",
        "flip-magic": _flip(data, 0),
        "flip-lengths": _flip(data, len(MAGIC) + 3),
        "flip-meta-header-value": _flip(data, tag),  # still valid JSON: only the CRC tells
        "flip-body": _flip(data, body + 4),
        "flip-crc": _flip(data, len(data) - 1),
        "random-bytes": os.urandom(len(data)),
        "random-after-magic": MAGIC + os.urandom(len(data)),
        "valid-file-of-another-url": foreign,
    }[kind]


DAMAGE = [
    "empty",
    "magic-only",
    "truncated-half",
    "truncated-crc",
    "one-byte-too-long",
    "flip-magic",
    "flip-lengths",
    "flip-meta-header-value",
    "flip-body",
    "flip-crc",
    "random-bytes",
    "random-after-magic",
    "valid-file-of-another-url",
]


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("restart", [False, True], ids=["live", "restarted"])
async def test_disk_never_returns_a_damaged_file_and_removes_it(
    tmp_path: Path, damage: str, restart: bool
) -> None:
    folder = str(tmp_path / "cache")
    storage = DiskStorage(folder, 64 * MIB, MIB)
    await storage.start()
    meta = StoredResponse(
        key=KEY,
        status=200,
        reason=b"OK",
        headers=[(b"Cache-Control", b"max-age=600"), (b"X-Tag", b"tag-value")],
        request_time=1.0,
        response_time=2.0,
    )
    await store(storage, meta, b"the stored body" * 20)
    await store(storage, make_meta(OTHER), b"the other body")
    path = entry_path(storage, meta)
    foreign = entry_path(storage, make_meta(OTHER)).read_bytes()
    path.write_bytes(_damage(damage, path.read_bytes(), foreign))
    if restart:
        await storage.aclose()
        storage = DiskStorage(folder, 64 * MIB, MIB)
        await storage.start()
    try:
        assert await storage.lookup(KEY) == []
        assert not path.exists()
        assert storage.stats()["entries"] == 1
        assert (await only_entry(storage, OTHER)).read_body() == b"the other body"
        await store(storage, meta, b"stored again")  # the key works again
        assert (await only_entry(storage, KEY)).read_body() == b"stored again"
    finally:
        await storage.aclose()


async def test_disk_body_changed_after_lookup_is_detected_on_read(disk: DiskStorage) -> None:
    await store(disk, make_meta(), b"original body")
    entry = await only_entry(disk, KEY)
    path = entry_path(disk, make_meta())
    path.write_bytes(_flip(path.read_bytes(), len(path.read_bytes()) - 8))
    with pytest.raises(CorruptEntry):
        entry.read_body()


async def test_disk_a_file_where_the_key_folder_belongs_is_a_miss(disk: DiskStorage) -> None:
    folder = disk.key_dir(KEY)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_bytes(b"not a folder")
    assert await disk.lookup(KEY) == []
    assert await disk.delete(KEY) == 0
    writer = disk.open_writer(make_meta())
    assert writer.write(b"body")
    await writer.commit()  # may fail to install, but must not raise
    assert tmp_files(disk.root) == []


class _DiskFull:
    """``os.write`` that fails with ENOSPC for files in ``folder`` while ``full`` is set."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder.resolve())
        self.full = False
        self.failures = 0
        self.real = os.write

    def __call__(self, fd: int, data: Any) -> int:
        if self.full and os.readlink(f"/proc/self/fd/{fd}").startswith(self.folder):
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pibl.cache" and r.levelno >= logging.ERROR]


async def test_disk_full_aborts_the_write_logs_once_and_recovers(
    disk: DiskStorage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pibl.cache")
    full = _DiskFull(disk.tmp_dir)
    monkeypatch.setattr(disk_module.os, "write", full)
    await store(disk, make_meta(tag="old"), b"old body")

    # Full while the body streams: the writer gives up, the response would stream uncached.
    writer = disk.open_writer(make_meta(tag="new"))
    full.full = True
    assert writer.write(b"b" * 4096) is False
    assert writer.write(b"more") is False
    await writer.commit()
    # Still full: a new writer fails at once (its header), a commit fails at the trailer.
    early = disk.open_writer(make_meta(tag="new"))
    assert early.write(b"body") is False
    await early.commit()
    full.full = False
    late = disk.open_writer(make_meta(tag="new"))
    assert late.write(b"body")
    full.full = True
    await late.commit()
    assert full.failures == 3

    assert len(_errors(caplog)) == 1, "a full disk is logged once per burst"
    assert "No space left" in _errors(caplog)[0].getMessage()
    assert tmp_files(disk.root) == []
    entry = await only_entry(disk, KEY)
    assert entry.meta == make_meta(tag="old")
    assert entry.read_body() == b"old body"

    full.full = False
    await store(disk, make_meta(tag="after"), b"after body")
    entry = await only_entry(disk, KEY)
    assert entry.meta == make_meta(tag="after")
    assert entry.read_body() == b"after body"
    assert tmp_files(disk.root) == []

    full.full = True  # a new burst after a success is reported again
    assert disk.open_writer(make_meta(tag="again")).write(b"x") is False
    assert len(_errors(caplog)) == 2
    assert tmp_files(disk.root) == []


HOSTILE_KEYS = [
    CacheKey("http", "example.com", "/a/b"),
    CacheKey("http", "example.com", "/ab"),
    CacheKey("http", "example.com", "/a:b"),
    CacheKey("http", "example.com", "//ab"),
    CacheKey("http", "example.com", "/.."),
    CacheKey("http", "example.com", "/../../../../etc/passwd"),
    CacheKey("http", "example.com", "/x/../y"),
    CacheKey("http", "example.com", "/%2e%2e/%2e%2e/etc/passwd"),
    CacheKey("http", "example.com", "/%2E%2E%2F%2E%2E"),
    CacheKey("http", "example.com", "/nul%00x"),
    CacheKey("http", "example.com", "/nul\x00x"),
    CacheKey("http", "example.com", "/" + "s" * 8192),
    CacheKey("http", "example.com", "/" + "s" * 8192 + "/"),
    CacheKey("http", "example.com", "/\u00e9\\..\\x"),
    CacheKey("http", "example.com", "/a?b=/../c"),
    CacheKey("http", "example.com:8080", "/ab"),
    CacheKey("http", "example.org", "/ab"),
    CacheKey("https", "example.com", "/ab"),
    CacheKey("http", "..", "/"),
    CacheKey("http", "/etc", "/passwd"),
    CacheKey("http", "", "/ab"),
]


async def test_disk_file_names_are_digests_inside_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    storage = DiskStorage(str(root), 64 * MIB, MIB)
    await storage.start()
    try:
        for key in HOSTILE_KEYS:
            await store(storage, make_meta(key), key.url.encode("utf-8", "surrogatepass"))
            await store(storage, make_meta(key, vary=GZIP), b"gzip " + key.url.encode())
        for key in HOSTILE_KEYS:
            found = await variants(storage, key)
            assert set(found) == {(), GZIP}, key
            assert found[()].read_body() == key.url.encode("utf-8", "surrogatepass")
            assert found[GZIP].meta.key == key
        files = files_under(root)
        assert len(files) == 2 * len(HOSTILE_KEYS)  # distinct keys never share a file
        assert len({path.parent for path in files}) == len(HOSTILE_KEYS)
        resolved = root.resolve()
        for path in files:
            assert path.resolve().is_relative_to(resolved / "entries"), path
            relative = path.relative_to(root / "entries").parts
            assert len(relative) == 3, path
            assert all(HEX_NAME.fullmatch(part) for part in relative), path
        assert names_in(tmp_path) == ["cache"]
        assert storage.stats()["entries"] == 2 * len(HOSTILE_KEYS)
        for key in HOSTILE_KEYS:
            assert await storage.delete(key) == 2
        assert files_under(root) == []
    finally:
        await storage.aclose()


# --------------------------------------------------------------------------- redis only

MakeRedis = Callable[..., Awaitable[RedisStorage]]


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client to look at (and tamper with) what the storage wrote."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def make_redis(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MakeRedis]:
    """Started RedisStorages on the session's server, sharing one fresh prefix unless told."""
    monkeypatch.setattr(redis_module, "REDIS_TIMEOUT", PATIENT_TIMEOUT)
    started: list[RedisStorage] = []
    shared = f"redis-{uuid.uuid4().hex[:12]}"

    async def make(*, prefix: str = shared, max_object_size: int = 4 * MIB) -> RedisStorage:
        storage = RedisStorage(redis_server.url, max_object_size, prefix=prefix)
        await storage.start()
        started.append(storage)
        return storage

    yield make
    for storage in started:
        await storage.aclose()


async def keys_under(client: aioredis.Redis, prefix: str) -> set[bytes]:
    return {key async for key in client.scan_iter(match=f"{prefix}:*")}


def ttl_meta(*headers: tuple[bytes, bytes]) -> StoredResponse:
    return StoredResponse(
        key=KEY,
        status=200,
        reason=b"OK",
        headers=list(headers),
        request_time=1000.0,
        response_time=1000.0,
    )


CC = b"Cache-Control"
ETAG = (b"ETag", b'"v1"')


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(CC, b"max-age=600")], 600),
        ([(CC, b"max-age=600"), (b"Age", b"100")], 500),  # the age it arrived with counts
        ([(CC, b"s-maxage=60, max-age=600")], 60),  # a shared cache's lifetime
        ([(CC, b"max-age=600, stale-while-revalidate=30")], 630),
        ([(CC, b"max-age=600, stale-while-revalidate=30, stale-if-error=300")], 900),
        ([(CC, b"max-age=600, must-revalidate, stale-if-error=300")], 600),
        ([(CC, b"max-age=600, proxy-revalidate, stale-while-revalidate=30")], 600),
        ([(CC, b"max-age=600"), ETAG], 600 + REVALIDATION_GRACE),
        ([(CC, b"max-age=600"), (b"Last-Modified", b"Mon, 01 Jan 1990 00:00:00 GMT")], 1200),
        ([(CC, b"max-age=600, stale-if-error=86400"), ETAG], 600 + 86400),
        ([(CC, b"no-cache"), ETAG], REVALIDATION_GRACE),  # validated on every use
        ([(CC, b"max-age=600, must-revalidate"), ETAG], 600 + REVALIDATION_GRACE),
        ([(CC, b"max-age=0")], MIN_TTL),
        ([(CC, b"max-age=600"), (b"Age", b"9000")], MIN_TTL),
        ([(CC, b"max-age=99999999999999")], MAX_TTL),
    ],
)
def test_redis_ttl_covers_freshness_and_the_windows_an_entry_may_still_be_used_in(
    headers: list[tuple[bytes, bytes]], expected: float
) -> None:
    assert entry_ttl(ttl_meta(*headers)) == pytest.approx(expected)


async def test_redis_large_body_is_chunked_under_digest_keys_with_ttls(
    make_redis: MakeRedis, redis_client: aioredis.Redis
) -> None:
    storage = await make_redis()
    body = os.urandom(4 * CHUNK_BYTES + 123)
    await store(storage, make_meta(), body)
    entry = await only_entry(storage, KEY)
    assert entry.body_size == len(body)
    assert entry.read_body() == body

    digest = KEY.digest()
    keys = await keys_under(redis_client, storage.prefix)
    chunks = sorted(k for k in keys if k.startswith(f"{storage.prefix}:c:{digest}:".encode()))
    assert keys == {
        storage.hash_key(digest).encode(),
        storage.index_key.encode(),
        storage.bytes_key.encode(),
        *chunks,
    }
    sizes = sorted([await redis_client.strlen(name) for name in chunks])
    assert sizes == [123] + [CHUNK_BYTES] * 4  # no value bigger than a chunk
    assert all(b"example.com" not in k and b"/a" not in k for k in keys)
    # Redis expires the entry by itself: the record after its TTL, the chunks a little later.
    ttl = await redis_client.pttl(storage.hash_key(digest))
    assert 590_000 < ttl <= 600_000
    for name in chunks:
        assert 650_000 < await redis_client.pttl(name) <= 660_000
    assert await redis_client.pttl(storage.index_key) == -1  # bookkeeping never expires
    assert storage.stats()["entries"] == 1
    assert storage.stats()["bytes"] >= len(body)


async def test_redis_writes_touch_redis_only_at_commit(
    make_redis: MakeRedis, redis_client: aioredis.Redis
) -> None:
    storage = await make_redis(max_object_size=1000)
    aborted = storage.open_writer(make_meta())
    assert aborted.write(b"x" * 500)
    aborted.abort()
    await aborted.commit()
    too_big = storage.open_writer(make_meta())
    assert too_big.write(b"x" * 600)
    assert too_big.write(b"x" * 600) is False
    await too_big.commit()
    forgotten = storage.open_writer(make_meta())
    assert forgotten.write(b"x" * 500)
    del forgotten
    assert await keys_under(redis_client, storage.prefix) == set()


DAMAGE = ["missing-chunk", "short-chunk", "long-chunk", "wrong-count", "garbage-record"]


@pytest.mark.parametrize("damage", DAMAGE)
async def test_redis_never_serves_a_damaged_entry_and_removes_it(
    make_redis: MakeRedis, redis_client: aioredis.Redis, damage: str
) -> None:
    storage = await make_redis()
    body = b"b" * (CHUNK_BYTES + 10)
    await store(storage, make_meta(), body)
    await store(storage, make_meta(OTHER), b"the other body")
    digest = KEY.digest()
    hash_key = storage.hash_key(digest)
    ((variant, record),) = (await redis_client.hgetall(hash_key)).items()
    wid = record.split(b" ")[1].decode()
    if damage == "missing-chunk":
        await redis_client.delete(storage.chunk_key(digest, wid, 1))
    elif damage == "short-chunk":
        await redis_client.set(storage.chunk_key(digest, wid, 0), b"b" * 100)
    elif damage == "long-chunk":
        await redis_client.append(storage.chunk_key(digest, wid, 1), b"!")
    elif damage == "wrong-count":
        await redis_client.hset(hash_key, variant, record.replace(b" 2 ", b" 3 ", 1))
    else:
        await redis_client.hset(hash_key, variant, b"PIBLR1 garbage")

    assert await storage.lookup(KEY) == []
    assert not await redis_client.exists(hash_key)  # the record is gone, not only skipped
    assert (await only_entry(storage, OTHER)).read_body() == b"the other body"
    if damage not in ("garbage-record", "wrong-count"):
        # (A record rewritten that way no longer names its index member, which then waits for
        # its expiry in the sweep: the stats are approximate, the cache is not.)
        assert storage.stats()["entries"] == 1
    if damage != "garbage-record":
        chunk_prefix = f"{storage.prefix}:c:{digest}:".encode()
        assert not [k for k in await keys_under(redis_client, storage.prefix) if chunk_prefix in k]
    await store(storage, make_meta(), b"stored again")  # the key works again
    assert (await only_entry(storage, KEY)).read_body() == b"stored again"


async def test_redis_record_naming_another_url_is_a_miss(
    make_redis: MakeRedis, redis_client: aioredis.Redis
) -> None:
    """A record whose full key differs from the one looked up (a digest collision, or a write
    by something else) is never served, and the entry it names is not harmed."""
    storage = await make_redis()
    await store(storage, make_meta(), b"body of /a")
    await store(storage, make_meta(OTHER), b"body of /b")
    other_hash = await redis_client.hgetall(storage.hash_key(OTHER.digest()))
    ((_, foreign),) = other_hash.items()
    await redis_client.hset(storage.hash_key(KEY.digest()), "f" * 32, foreign)
    entry = await only_entry(storage, KEY)
    assert entry.read_body() == b"body of /a"
    assert await redis_client.hlen(storage.hash_key(KEY.digest())) == 1
    assert (await only_entry(storage, OTHER)).read_body() == b"body of /b"
    assert storage.stats()["entries"] == 2


async def test_redis_replaced_entry_keeps_its_chunks_briefly_for_readers(
    make_redis: MakeRedis, redis_client: aioredis.Redis
) -> None:
    storage = await make_redis()
    await store(storage, make_meta(tag="old"), b"old body")
    old = await only_entry(storage, KEY)
    assert isinstance(old, RedisEntry)
    await store(storage, make_meta(tag="new"), b"new body")
    ttl = await redis_client.pttl(storage.chunk_key(KEY.digest(), old.wid, 0))
    assert 0 < ttl <= REPLACED_GRACE * 1000
    new = await only_entry(storage, KEY)
    assert new.meta == make_meta(tag="new")
    assert new.read_body() == b"new body"
    assert storage.stats()["entries"] == 1


async def test_redis_refresh_reuses_the_chunks_and_never_revives_a_replaced_entry(
    make_redis: MakeRedis, redis_client: aioredis.Redis
) -> None:
    storage = await make_redis()
    body = b"r" * (CHUNK_BYTES + 1)
    await store(storage, make_meta(), body)
    entry = await only_entry(storage, KEY)
    before = await keys_under(redis_client, storage.prefix)
    longer = StoredResponse(
        key=KEY,
        status=200,
        reason=b"OK",
        headers=[(CC, b"max-age=3600"), (b"X-Tag", b"fresh")],
        request_time=2000.0,
        response_time=2000.0,
    )
    await storage.update(entry, longer)
    assert await keys_under(redis_client, storage.prefix) == before  # no body sent again
    refreshed = await only_entry(storage, KEY)
    assert refreshed.meta == longer
    assert refreshed.read_body() == body
    assert isinstance(refreshed, RedisEntry)
    chunk = storage.chunk_key(KEY.digest(), refreshed.wid, 0)
    assert 3_650_000 < await redis_client.pttl(chunk) <= 3_660_000

    await store(storage, make_meta(tag="newer"), b"newer body")
    await storage.update(refreshed, longer)  # a 304 for a response that was replaced meanwhile
    assert (await only_entry(storage, KEY)).meta == make_meta(tag="newer")
    await storage.delete(KEY)
    await storage.update(refreshed, longer)  # ... or deleted meanwhile
    assert await storage.lookup(KEY) == []
    assert storage.stats()["entries"] == 0


async def test_redis_sweep_forgets_expired_entries(
    make_redis: MakeRedis, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_module, "MIN_TTL", 0.001)
    storage = await make_redis()
    stale = StoredResponse(
        key=KEY, status=200, reason=b"OK", headers=[(CC, b"max-age=0")], request_time=1.0,
        response_time=1.0,
    )  # fmt: skip
    await store(storage, stale, b"s" * (CHUNK_BYTES + 1))
    await store(storage, make_meta(OTHER), b"kept")

    async def swept() -> bool:
        await storage._sweep()
        return storage.stats()["entries"] == 1

    async with asyncio.timeout(5):
        while not await swept():  # noqa: ASYNC110 - the 1 ms TTL passes on Redis' clock
            await asyncio.sleep(0.01)
    assert await storage.lookup(KEY) == []
    assert (await only_entry(storage, OTHER)).read_body() == b"kept"
    left = await keys_under(redis_client, storage.prefix)
    assert not [k for k in left if KEY.digest().encode() in k]  # chunks too, hash gone or not


async def test_redis_instances_share_entries_invalidations_and_stats(
    make_redis: MakeRedis,
) -> None:
    one = await make_redis()
    two = await make_redis()
    elsewhere = await make_redis(prefix=f"elsewhere-{uuid.uuid4().hex[:8]}")
    await store(one, make_meta(vary=GZIP), b"gzip body")
    await store(one, make_meta(vary=BR), b"br body")
    found = await variants(two, KEY)
    assert {vary: e.read_body() for vary, e in found.items()} == {
        GZIP: b"gzip body",
        BR: b"br body",
    }
    assert await elsewhere.lookup(KEY) == []  # another prefix is another cache
    await store(elsewhere, make_meta(), b"elsewhere")
    assert await two.delete(KEY) == 2
    assert await one.lookup(KEY) == []
    await store(two, make_meta(OTHER), b"other")
    assert one.stats()["entries"] == 2  # as of its own last write ...
    await one._sweep()
    assert one.stats()["entries"] == 1  # ... until its next sweep
    assert await one.purge("http://example.com/") == 1
    assert await two.lookup(OTHER) == []
    assert (await only_entry(elsewhere, KEY)).read_body() == b"elsewhere"
    assert await elsewhere.purge() == 1


def _cache_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pibl.cache" and r.levelno >= logging.ERROR
    ]


async def test_redis_down_at_start_only_costs_caching(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pibl.cache")
    storage = RedisStorage(f"redis://127.0.0.1:{free_port()}/0", MIB, prefix="down")
    await storage.start()  # refused: PIBL starts anyway
    try:
        assert not storage.available
        assert await storage.lookup(KEY) == []
        writer = storage.open_writer(make_meta())
        assert writer.write(b"body") is False  # dropped at once, nothing buffered
        await writer.commit()
        assert await storage.delete(KEY) == 0
        assert await storage.purge() == 0
        assert storage.stats() == {"entries": 0, "bytes": 0, "evictions": 0}
    finally:
        await storage.aclose()
    assert len(_cache_errors(caplog)) == 1, caplog.text
    assert "unavailable" in _cache_errors(caplog)[0]


async def test_redis_too_slow_is_an_outage_logged_once_and_invalidations_are_replayed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pibl.cache")
    with RedisServer() as server:
        control = aioredis.Redis.from_url(server.url)
        storage = RedisStorage(server.url, MIB, prefix="slow", timeout=0.5)
        await storage.start()
        try:
            await store(storage, make_meta(), b"to be invalidated")
            await store(storage, make_meta(OTHER), b"kept")
            await control.client_pause(3000, all=True)  # every command waits 3 s: "slow"
            assert await storage.delete(KEY) == 0  # times out: Redis is marked down
            assert not storage.available
            assert await storage.lookup(OTHER) == []  # misses at once while down
            assert storage.open_writer(make_meta()).write(b"x") is False
            assert await storage.purge("http://nothing.example/") == 0
            assert len(_cache_errors(caplog)) == 1
            await wait_until(lambda: storage.available, timeout=15)
            # The delete queued during the outage was applied before lookups resumed.
            assert await storage.lookup(KEY) == []
            assert (await only_entry(storage, OTHER)).read_body() == b"kept"
            assert storage.outages == 1
        finally:
            await storage.aclose()
            await control.aclose()
    assert len(_cache_errors(caplog)) == 1, caplog.text
    back = [r for r in caplog.records if "caching again" in r.getMessage()]
    assert len(back) == 1
