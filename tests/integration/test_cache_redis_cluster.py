"""The Redis cache on a real three-primary Redis Cluster: two in-process PIBL instances sharing it.

With ``redis_url = "redis+cluster://..."``: a response stored through one instance is a hit on
the other; a 2 MiB body goes to the cluster in chunks and comes back intact; a purge through one
instance (which scans every primary) is seen by the other; and every key of one entry (its hash
and its chunks) lands on one slot, so each Lua script runs on one node.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

import pibl.cache.redis as redis_module
from pibl.balancer.upstream import Address
from pibl.cache.key import CacheKey
from pibl.cache.redis import CHUNK_BYTES
from pibl.errors import ConfigError
from tests.integration.test_cache_redis import (
    CACHEABLE,
    PATIENT_TIMEOUT,
    admin_purge,
    echo,
    echo_body,
    is_hit,
    storage_of,
)
from tests.redis_support import RedisClusterServers, redis_cluster
from tests.support import (
    Received,
    Reply,
    make_settings,
    request,
    running_backends,
    running_proxy,
    wait_until,
)

__all__ = ["redis_cluster"]  # the session fixture, imported for pytest

MIB = 1 << 20


@pytest.fixture(autouse=True)
def patient_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_module, "REDIS_TIMEOUT", PATIENT_TIMEOUT)


def cluster_cache(cluster: RedisClusterServers, name: str) -> dict[str, object]:
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    return {"enabled": True, "storage": "redis", "redis_url": cluster.url, "redis_prefix": prefix}


@pytest.fixture
async def cluster_client(redis_cluster: RedisClusterServers) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster.url.replace("+cluster", ""))
    yield client
    await client.aclose()


async def keys_of(client: RedisCluster, pattern: str) -> list[bytes]:
    return [
        key async for key in client.scan_iter(match=pattern, target_nodes=RedisCluster.PRIMARIES)
    ]


def test_cluster_urls_are_checked() -> None:
    backends = [Address("127.0.0.1", 1)]
    cache = {"enabled": True, "storage": "redis", "redis_url": "redis+cluster://127.0.0.1:7000"}
    assert make_settings(backends, cache=cache).cache.redis_url == cache["redis_url"]
    with pytest.raises(ConfigError, match=r"cache\.redis_prefix: must not contain \{"):
        make_settings(backends, cache={**cache, "redis_prefix": "a{b}"})
    with pytest.raises(ConfigError, match=r"cache\.redis_url: Redis Cluster has database 0"):
        make_settings(backends, cache={**cache, "redis_url": "redis+cluster://127.0.0.1:7000/3"})
    with pytest.raises(ConfigError, match=r"cache\.redis_url: expected"):
        make_settings(backends, cache={**cache, "redis_url": "cluster://127.0.0.1:7000"})


async def test_a_miss_on_one_instance_is_a_hit_on_the_other(
    redis_cluster: RedisClusterServers,
) -> None:
    async with running_backends(echo) as backends:
        settings = make_settings(backends, cache=cluster_cache(redis_cluster, "shared"))
        async with running_proxy(settings) as one, running_proxy(settings) as two:
            assert storage_of(one).cluster
            first = await request(one.addresses[0], "GET", "/shared?x=1")
            assert first.status == 200
            assert not is_hit(first), first.header("Cache-Status")
            await wait_until(lambda: storage_of(one).stats()["entries"] == 1)

            second = await request(two.addresses[0], "GET", "/shared?x=1")
            assert is_hit(second), second.header("Cache-Status")
            assert second.body == first.body == echo_body(b"/shared?x=1")
            assert is_hit(await request(one.addresses[0], "GET", "/shared?x=1"))
            assert len(backends[0].requests) == 1


async def test_a_2_mib_body_round_trips_with_every_key_on_one_slot(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    big = os.urandom(2 * MIB)

    def handler(request: Received) -> Reply:
        return Reply(headers=CACHEABLE, body=big)

    async with running_backends(handler) as backends:
        cache = cluster_cache(redis_cluster, "big")
        prefix = str(cache["redis_prefix"])
        settings = make_settings(backends, cache=cache)
        async with running_proxy(settings) as one, running_proxy(settings) as two:
            first = await request(one.addresses[0], "GET", "/big.bin")
            assert hashlib.sha256(first.body).digest() == hashlib.sha256(big).digest()
            await wait_until(lambda: storage_of(one).stats()["entries"] == 1)

            digest = CacheKey("http", "test.local", "/big.bin").digest()
            chunks = await keys_of(cluster_client, f"{prefix}:c:*")
            assert len(chunks) == 2 * MIB // CHUNK_BYTES
            for name in chunks:
                assert f"{{{digest}}}".encode() in name
                assert await cluster_client.strlen(name) == CHUNK_BYTES
            entry_keys = [*chunks, storage_of(one).hash_key(digest).encode()]
            slots = {await cluster_client.cluster_keyslot(name) for name in entry_keys}
            assert len(slots) == 1
            assert slots == {await cluster_client.cluster_keyslot(digest)}

            second = await request(two.addresses[0], "GET", "/big.bin")
            assert is_hit(second), second.header("Cache-Status")
            assert second.body == big
            assert len(backends[0].requests) == 1


async def test_a_purge_through_one_instance_is_seen_by_the_other(
    redis_cluster: RedisClusterServers, cluster_client: RedisCluster
) -> None:
    paths = [f"/p/{i}" for i in range(8)] + [f"/q/{i}" for i in range(4)]
    async with running_backends(echo) as backends:
        cache = cluster_cache(redis_cluster, "purge")
        with_admin = make_settings(backends, cache=cache, admin={"listen": "127.0.0.1:0"})
        async with (
            running_proxy(with_admin) as one,
            running_proxy(make_settings(backends, cache=cache)) as two,
        ):
            for path in paths:
                assert not is_hit(await request(one.addresses[0], "GET", path))
            await wait_until(lambda: storage_of(one).stats()["entries"] == len(paths))
            # The entries are spread over the cluster: a purge must scan every primary.
            hashes = await keys_of(cluster_client, f"{cache['redis_prefix']}:k:*")
            nodes = {
                cluster_client.get_node_from_key(name).name  # type: ignore[no-untyped-call]
                for name in hashes
            }
            assert len(hashes) == len(paths)
            assert len(nodes) > 1
            for path in paths:
                assert is_hit(await request(two.addresses[0], "GET", path)), path

            assert await admin_purge(one, {"prefix": "http://test.local/p/"}) == {"purged": 8}
            for path in paths[:8]:
                response = await request(two.addresses[0], "GET", path)
                assert not is_hit(response), path
                assert response.body == echo_body(path.encode())
            assert is_hit(await request(two.addresses[0], "GET", "/q/1"))

            await wait_until(lambda: storage_of(two).stats()["entries"] == len(paths))
            assert await admin_purge(one, {"all": True}) == {"purged": len(paths)}
            assert not is_hit(await request(two.addresses[0], "GET", "/q/1"))
            assert len(backends[0].requests) == len(paths) + 8 + 1
