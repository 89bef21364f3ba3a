"""Shared cache storage on Redis: every PIBL instance and worker using one Redis shares entries.

Layout, under a namespace prefix ``P`` (``redis_prefix``, default ``pibl``); keys are named by
digests of the cache key (``CacheKey.digest()``), never by the URL:

``P:k:<key digest>``
    a hash with one field per Vary variant of the URL (RFC 9111 §4.1): variant name → record.
``P:c:<key digest>:<write id>:<i>``
    body chunk ``i`` (``CHUNK_BYTES`` each, the last one shorter) of one write.
``P:index``
    a sorted set with one member ``<key digest>:<variant>:<write id>:<chunks>:<cost>`` per
    entry, scored by the time (Redis ``TIME``, ms) it expires: it drives ``stats()`` and the
    sweep, which deletes an expired entry's record and chunks even when its hash is gone.
``P:bytes``
    the sum of the entries' costs (body + record bytes).

A record is ``PIBLR1 <write id> <chunk count> <body size> <cost>\\n`` + the ``StoredResponse``
JSON, which holds the full cache key.

**No torn entries.** ``commit()`` writes the chunks under a fresh random write id, then, in the
same round trip, a Lua script checks that every chunk exists and only then points the variant's
field at them (replacing, in one step, what was there). The field is the only way to a body, so a
reader sees the old entry or the new one, never a mix. A reader checks the record, that the key in
it is the one it looked up, and the chunks' count and sizes; anything else is a miss, and the
record is removed if it is still the one that was read. The chunks of a replaced entry live on for
``REPLACED_GRACE`` so that a reader who read its record just before still gets its body.

**Expiry.** Redis expires every key by itself (see :func:`entry_ttl` for the rule); the hash lives
as long as its longest-lived variant, and a background sweep takes expired variants out of their
hash and of the index. **Size.** Redis bounds the memory (``maxmemory`` with ``volatile-lru``:
every cache key has a TTL, the index and the byte count have none); PIBL's ``max_size`` is not
used. ``max_object_size`` is.

**Outages.** Commands use short timeouts (``REDIS_TIMEOUT``) and no retries. The first failure
marks Redis down and is logged once (error); until a background ping (with backoff) succeeds,
lookups miss, writes are dropped and deletions/purges are queued and replayed on reconnection
(before lookups resume), so a cache outage only costs caching, never a client's request.

Reads are ``HGETALL`` + one ``MGET`` of every variant's chunks (``CacheEntry.read_body`` is
synchronous, so bodies are fetched at lookup); a commit is one pipelined round trip.

**Redis Cluster** (``redis+cluster://`` or ``rediss+cluster://`` URLs, see ``CLUSTER_SCHEMES``):
an entry's keys carry its digest as a hash tag, ``P:k:{<digest>}`` and
``P:c:{<digest>}:<write id>:<i>``, so that every key a script touches (or computes: chunk names)
is in the entry's slot. ``P:index`` and ``P:bytes`` cannot be: in cluster mode scripts get the
hash key alone, report the change they made to the entry and byte counts, and the caller applies
it to the ``P:counts`` hash with separate commands (not atomic with the change). There is no
sweep: entries expire by their TTLs alone, and the counts, which nothing decrements on expiry or
eviction, are an upper bound. Purges SCAN every primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pibl.cache.disk import variant_name
from pibl.cache.key import CacheKey
from pibl.cache.policy import StoredResponse
from pibl.cache.storage import BufferedWriter, CacheEntry

log = logging.getLogger("pibl.cache")

# Body bytes per Redis value: no value is huge (Redis' proto-max-bulk-len is 512 MB, but a big
# value blocks the server while it is copied; 512 KiB is also what nginx's slice module suggests
# as a unit of large objects in shared caches).
CHUNK_BYTES = 512 * 1024
# Connect and per-command socket timeout: a slow Redis is treated as a down one, quickly.
REDIS_TIMEOUT = 0.25
# Reconnection pings: first after RECONNECT_MIN seconds, then doubling up to RECONNECT_MAX.
RECONNECT_MIN = 0.1
RECONNECT_MAX = 2.0
# Deletions and purges kept while Redis is down; past this, everything is purged on return.
MAX_PENDING_INVALIDATIONS = 10_000
# How often each instance sweeps expired entries from the index (and refreshes its stats).
SWEEP_INTERVAL = 5.0
SWEEP_BATCH = 500
# TTL rule (see entry_ttl). nginx's proxy_cache_path keeps unused entries `inactive=10m`.
REVALIDATION_GRACE = 600.0
MIN_TTL = 1.0
MAX_TTL = 365 * 86400.0
# Chunks outlive their record by this much, so a record never points at expired chunks first.
CHUNK_TTL_MARGIN = 60.0
# The chunks of a replaced entry stay this long for readers that read its record just before.
REPLACED_GRACE = 5.0
# Extra bytes accounted per entry beyond body and record (keys, index member, hash field).
ENTRY_OVERHEAD_BYTES = 256
SCAN_BATCH = 500

RECORD_MAGIC = b"PIBLR1"

# ``redis_url`` schemes that select Redis Cluster (startup node from the URL).
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")

# A ``redis.asyncio.Redis`` or a ``RedisCluster``: the commands PIBL uses exist on both.
_Client = Any


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


# Lost connections and timeouts: Redis is down or too slow. Other RedisErrors (a refused write
# when Redis is out of memory, a read-only replica) cost the one operation.
_OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)

_COMMON_LUA = """
local prefix = ARGV[1]
-- Standalone: KEYS = index, bytes[, hash]. Cluster: KEYS = hash alone (the global index and byte
-- count live in other slots): changes are counted in `delta` and applied by the caller.
local INDEX, BYTES, HASH = KEYS[1], KEYS[2], KEYS[3]
if #KEYS == 1 then INDEX, BYTES, HASH = nil, nil, KEYS[1] end
local delta = {0, 0}
local function parse(record)
  return string.match(record, '^PIBLR1 (%x+) (%d+) (%d+) (%d+)\\n')
end
local function chunk(digest, wid, i)
  if not INDEX then return prefix .. ':c:{' .. digest .. '}:' .. wid .. ':' .. i end
  return prefix .. ':c:' .. digest .. ':' .. wid .. ':' .. i
end
local function member(digest, variant, wid, n, cost)
  return digest .. ':' .. variant .. ':' .. wid .. ':' .. n .. ':' .. cost
end
local function unindex(digest, variant, wid, n, cost)
  if not INDEX then
    delta[1], delta[2] = delta[1] - 1, delta[2] - tonumber(cost)
  elseif redis.call('ZREM', INDEX, member(digest, variant, wid, n, cost)) == 1 then
    redis.call('DECRBY', BYTES, cost)
  end
end
local function index(digest, variant, wid, n, cost, expires)
  if not INDEX then
    delta[1], delta[2] = delta[1] + 1, delta[2] + tonumber(cost)
  else
    redis.call('ZADD', INDEX, expires, member(digest, variant, wid, n, cost))
    redis.call('INCRBY', BYTES, cost)
  end
end
local function drop_chunks(digest, wid, n, grace)
  for i = 0, tonumber(n) - 1 do
    if grace > 0 then
      redis.call('PEXPIRE', chunk(digest, wid, i), grace)
    else
      redis.call('DEL', chunk(digest, wid, i))
    end
  end
end
-- An entry leaves the index; its chunks go now, or after grace ms (a reader may be fetching them).
local function forget(digest, variant, record, grace)
  local wid, n, size, cost = parse(record)
  if not wid then return end
  unindex(digest, variant, wid, n, cost)
  drop_chunks(digest, wid, n, grace)
end
-- {entries, bytes} standalone; cluster: {entry delta, byte delta} of this call.
local function totals()
  if not INDEX then return delta end
  return {redis.call('ZCARD', INDEX), tonumber(redis.call('GET', BYTES) or '0')}
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: index, bytes, hash. ARGV: prefix, digest, variant, record, ttl ms, chunk ttl ms,
# replaced-chunks grace ms, expected write id ("" for a new write, the read one for a refresh).
# Returns {installed 0/1, entries, bytes}.
_INSTALL_LUA = (
    _COMMON_LUA
    + """
local digest, variant, record = ARGV[2], ARGV[3], ARGV[4]
local ttl, chunk_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local grace, expect = tonumber(ARGV[7]), ARGV[8]
local wid, n, size, cost = parse(record)
n = tonumber(n)
for i = 0, n - 1 do
  if redis.call('EXISTS', chunk(digest, wid, i)) == 0 then
    local t = totals()
    return {0, t[1], t[2]}
  end
end
local old = redis.call('HGET', HASH, variant)
if expect ~= '' and (not old or parse(old) ~= expect) then
  -- a refresh applies only to the write it was read from, and never revives a deleted entry
  local t = totals()
  return {0, t[1], t[2]}
end
if old then
  local owid, on, osize, ocost = parse(old)
  if owid == wid then
    unindex(digest, variant, owid, on, ocost)
    for i = 0, n - 1 do redis.call('PEXPIRE', chunk(digest, wid, i), chunk_ttl) end
  else
    forget(digest, variant, old, grace)
  end
end
redis.call('HSET', HASH, variant, record)
if redis.call('PTTL', HASH) < ttl then redis.call('PEXPIRE', HASH, ttl) end
index(digest, variant, wid, n, cost, now_ms() + ttl)
local t = totals()
return {1, t[1], t[2]}
"""
)

# KEYS: index, bytes, hash. ARGV: prefix, digest, variant, record. Removes the variant only if it
# still holds exactly ``record``. Returns {entries, bytes}.
_DROP_LUA = (
    _COMMON_LUA
    + """
if redis.call('HGET', HASH, ARGV[3]) == ARGV[4] then
  redis.call('HDEL', HASH, ARGV[3])
  forget(ARGV[2], ARGV[3], ARGV[4], 0)
end
return totals()
"""
)

# KEYS: index, bytes, hash. ARGV: prefix, digest. Returns {variants removed, entries, bytes}.
_DELETE_LUA = (
    _COMMON_LUA
    + """
local fields = redis.call('HGETALL', HASH)
for i = 1, #fields, 2 do forget(ARGV[2], fields[i], fields[i + 1], 0) end
redis.call('DEL', HASH)
local t = totals()
return {#fields / 2, t[1], t[2]}
"""
)

# KEYS: index, bytes. ARGV: prefix, batch size. Returns {swept, entries, bytes}.
_SWEEP_LUA = (
    _COMMON_LUA
    + """
local limit = tonumber(ARGV[2])
local expired = redis.call('ZRANGEBYSCORE', INDEX, '-inf', now_ms(), 'LIMIT', 0, limit)
for _, m in ipairs(expired) do
  local digest, variant, wid, n, cost = string.match(m, '^(%x+):(%x+):(%x+):(%d+):(%d+)$')
  if digest then
    unindex(digest, variant, wid, n, cost)
    local hash = prefix .. ':k:' .. digest
    local record = redis.call('HGET', hash, variant)
    if record and parse(record) == wid then
      redis.call('HDEL', hash, variant)
    end
    drop_chunks(digest, wid, n, 0)
  else
    redis.call('ZREM', INDEX, m)
  end
end
local t = totals()
return {#expired, t[1], t[2]}
"""
)


# --------------------------------------------------------------------------- the TTL rule


def _delta(value: str | None) -> float:
    """A delta-seconds directive value (RFC 9111 §1.2.2); 0 when absent or invalid."""
    if not value or not value.isascii() or not value.isdigit():
        return 0.0
    digits = value.lstrip("0") or "0"
    return float(2**31 if len(digits) > 10 else min(int(digits), 2**31))


def entry_ttl(meta: StoredResponse, *, shared: bool = True) -> float:
    """Seconds Redis keeps the entry for ``meta``: as long as PIBL may still use it.

    * **fresh**: the freshness lifetime minus the age the response had when it was received
      (counted from ``response_time``, so the rule needs no clock), at least 0;
    * **stale**: the longer of ``stale-while-revalidate`` and ``stale-if-error`` (RFC 5861),
      unless ``must-revalidate``, ``proxy-revalidate`` or ``no-cache`` forbid serving the
      response stale (RFC 9111 §4.2.4);
    * **grace**: ``REVALIDATION_GRACE`` (10 min) when the response has a validator (``ETag`` or
      ``Last-Modified``): a stale entry that a 304 can refresh saves sending the body again;
    * **ttl** = fresh + max(stale, grace), kept within [``MIN_TTL``, ``MAX_TTL``].

    A client's ``max-stale`` and serving stale to a client while the origin is unreachable work
    only within that time: unlike the memory and disk storages, Redis does not keep an entry that
    nothing above allows to be used.
    """
    fresh = meta.freshness_lifetime(shared=shared) - meta.current_age(meta.response_time)
    cc = meta.cache_control
    forbids_stale = (
        "must-revalidate" in cc
        or ("no-cache" in cc and cc["no-cache"] is None)
        or (shared and "proxy-revalidate" in cc)
    )
    stale = 0.0
    if not forbids_stale:
        stale = max(_delta(cc.get("stale-while-revalidate")), _delta(cc.get("stale-if-error")))
    if meta.has_validators:
        stale = max(stale, REVALIDATION_GRACE)
    return min(MAX_TTL, max(MIN_TTL, max(0.0, fresh) + stale))


# --------------------------------------------------------------------------- records


class _Record:
    """A parsed variant record: which write it names, its chunks, its meta."""

    __slots__ = ("chunks", "cost", "meta", "raw", "size", "wid")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        header, newline, meta_bytes = raw.partition(b"\n")
        fields = header.split(b" ")
        if not newline or len(fields) != 5 or fields[0] != RECORD_MAGIC:
            raise ValueError("not a PIBL cache record")
        wid = fields[1]
        if not wid or any(c not in b"0123456789abcdef" for c in wid):
            raise ValueError("bad write id")
        self.wid = wid.decode("ascii")
        if not all(f.isdigit() for f in fields[2:]):
            raise ValueError("bad record header")
        self.chunks, self.size, self.cost = (int(f) for f in fields[2:])
        if self.chunks != chunk_count(self.size):
            raise ValueError(f"{self.chunks} chunks cannot hold {self.size} bytes")
        self.meta = StoredResponse.from_bytes(meta_bytes)


def chunk_count(size: int) -> int:
    return -(-size // CHUNK_BYTES)


def encode_record(wid: str, size: int, meta_bytes: bytes) -> bytes:
    cost = size + len(meta_bytes) + ENTRY_OVERHEAD_BYTES
    header = b"%s %s %d %d %d\n" % (RECORD_MAGIC, wid.encode(), chunk_count(size), size, cost)
    return header + meta_bytes


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\^-" else c for c in text)


def display_url(url: str) -> str:
    """``url`` without its password, for logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        netloc = f"{user}:***@{host}{port}" if user else f":***@{host}{port}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<redis url>"


# --------------------------------------------------------------------------- entries, writers


class RedisEntry:
    __slots__ = ("_body", "_chunks", "body_size", "meta", "variant", "wid")

    def __init__(
        self, meta: StoredResponse, chunks: list[bytes], size: int, variant: str, wid: str
    ) -> None:
        self.meta = meta
        self._chunks = chunks
        self._body: bytes | None = None
        self.body_size = size
        self.variant = variant
        self.wid = wid

    def read_body(self) -> bytes:
        # Fetched and verified at lookup (count and sizes), joined on first use.
        if self._body is None:
            self._body = b"".join(self._chunks)
            self._chunks = []
        return self._body


class RedisWriter(BufferedWriter):
    """Buffers the body in memory (``write`` runs in the exchange's callbacks); ``commit`` does
    the Redis I/O."""

    __slots__ = ("_storage",)

    def __init__(self, storage: RedisStorage, meta: StoredResponse, *, is_open: bool) -> None:
        super().__init__(meta, storage.max_object_size, is_open=is_open)
        self._storage = storage

    async def commit(self) -> None:
        body = self.take_body()
        if body is not None:
            await self._storage.store(self.meta, body)


# --------------------------------------------------------------------------- the storage


class RedisStorage:
    name = "redis"

    def __init__(
        self,
        url: str,
        max_object_size: int,
        *,
        prefix: str = "pibl",
        timeout: float | None = None,
    ) -> None:
        self.url = url
        self.max_object_size = max_object_size
        self.prefix = prefix
        self.timeout = REDIS_TIMEOUT if timeout is None else timeout
        self.available = False
        self.outages = 0  # episodes of Redis being unreachable since start
        self._epoch = 0  # bumped at each reconnection: older operations' failures are old news
        self._down_logged = False
        self._complained = False
        self._closed = False
        self.cluster = is_cluster_url(url)
        self._client: _Client | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._entries = 0
        self._bytes = 0
        # Invalidations that arrived while Redis was down, replayed when it is back.
        self._pending_keys: set[CacheKey] = set()
        self._pending_prefixes: set[str] = set()
        self._pending_all = False
        self.index_key = f"{prefix}:index"
        self.bytes_key = f"{prefix}:bytes"
        # Cluster only: a hash {entries, bytes} updated after each change (see the docstring).
        self.counts_key = f"{prefix}:counts"

    # -- names -----------------------------------------------------------------------------------
    def hash_key(self, digest: str) -> str:
        if self.cluster:  # hash tag: an entry's keys share one slot
            return f"{self.prefix}:k:{{{digest}}}"
        return f"{self.prefix}:k:{digest}"

    def chunk_key(self, digest: str, wid: str, index: int) -> str:
        if self.cluster:
            return f"{self.prefix}:c:{{{digest}}}:{wid}:{index}"
        return f"{self.prefix}:c:{digest}:{wid}:{index}"

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        options: dict[str, Any] = {
            "socket_connect_timeout": self.timeout,
            "socket_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),  # a failure is reported at once, never retried slowly
            "client_name": "pibl",
        }
        client: _Client
        if self.cluster:
            client = RedisCluster.from_url(self.url.replace("+cluster://", "://", 1), **options)
        else:
            client = aioredis.Redis.from_url(self.url, **options)
        self._client = client
        for name, source in (
            ("drop", _DROP_LUA),
            ("delete", _DELETE_LUA),
            ("sweep", _SWEEP_LUA),
        ):
            self._scripts[name] = client.register_script(source)
        try:
            await client.ping()
        except (RedisError, *_OUTAGE_ERRORS) as error:
            self._outage(error)  # PIBL starts anyway: uncached until Redis answers
        else:
            self.available = True
            log.info("redis cache at %s, prefix %r", display_url(self.url), self.prefix)
            await self._check_memory_policy()
            await self._sweep()
        self._task = asyncio.create_task(self._maintain(), name="pibl-redis-cache")

    async def aclose(self) -> None:
        self._closed = True
        self.available = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    # -- operations ------------------------------------------------------------------------------
    async def lookup(self, key: CacheKey) -> list[CacheEntry]:
        if not self.available or self._client is None:
            return []
        epoch = self._epoch
        try:
            return await self._lookup(self._client, key)
        except (RedisError, *_OUTAGE_ERRORS) as error:
            self._failed(error, epoch)
            return []

    def open_writer(self, meta: StoredResponse) -> RedisWriter:
        # While Redis is down a write is dropped at once rather than buffered for nothing.
        return RedisWriter(self, meta, is_open=self.available)

    async def store(self, meta: StoredResponse, body: bytes) -> None:
        """Write ``body`` under a new write id and publish ``meta`` pointing at it."""
        if not self.available or self._client is None:
            return
        digest = meta.key.digest()
        wid = secrets.token_hex(8)
        ttl_ms = int(entry_ttl(meta) * 1000)
        chunk_ttl_ms = ttl_ms + int(CHUNK_TTL_MARGIN * 1000)
        pipe = self._client.pipeline(transaction=False)
        view = memoryview(body)
        for index in range(chunk_count(len(body))):
            part = view[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]
            pipe.set(self.chunk_key(digest, wid, index), part, px=chunk_ttl_ms)
        self._install(pipe, meta, digest, wid, len(body), ttl_ms, chunk_ttl_ms, expect="")
        epoch = self._epoch
        try:
            results = await pipe.execute()
        except (RedisError, *_OUTAGE_ERRORS) as error:
            self._failed(error, epoch)
            return
        await self._count(results[-1][1:])

    async def update(self, entry: CacheEntry, meta: StoredResponse) -> None:
        """Refresh ``entry`` with ``meta`` (after a 304): a new record over the same chunks."""
        if not self.available or self._client is None:
            return
        if (
            not isinstance(entry, RedisEntry)
            or entry.meta.key != meta.key
            or variant_name(meta) != entry.variant
        ):
            await self.store(meta, entry.read_body())
            return
        digest = meta.key.digest()
        ttl_ms = int(entry_ttl(meta) * 1000)
        chunk_ttl_ms = ttl_ms + int(CHUNK_TTL_MARGIN * 1000)
        pipe = self._client.pipeline(transaction=False)
        self._install(
            pipe, meta, digest, entry.wid, entry.body_size, ttl_ms, chunk_ttl_ms, expect=entry.wid
        )
        epoch = self._epoch
        try:
            results = await pipe.execute()
        except (RedisError, *_OUTAGE_ERRORS) as error:
            self._failed(error, epoch)
            return
        await self._count(results[-1][1:])

    async def delete(self, key: CacheKey) -> int:
        if not self.available or self._client is None:
            self._queue_invalidation(key=key)
            return 0
        epoch = self._epoch
        try:
            return await self._delete(key.digest())
        except (RedisError, *_OUTAGE_ERRORS) as error:
            self._failed(error, epoch)
            self._queue_invalidation(key=key)
            return 0

    async def purge(self, prefix: str | None = None) -> int:
        if not self.available or self._client is None:
            self._queue_invalidation(prefix=prefix, everything=prefix is None)
            return 0
        epoch = self._epoch
        try:
            return await self._purge(self._client, prefix)
        except (RedisError, *_OUTAGE_ERRORS) as error:
            self._failed(error, epoch)
            self._queue_invalidation(prefix=prefix, everything=prefix is None)
            return 0

    def stats(self) -> dict[str, int]:
        """Entries and bytes of the whole shared cache (every instance's writes), as of this
        instance's last operation or sweep (at most ``SWEEP_INTERVAL`` old). Entries that Redis
        evicted under ``maxmemory`` still count until they would have expired. ``evictions``
        is 0: Redis evicts on its own (its ``INFO stats`` reports ``evicted_keys``)."""
        return {"entries": self._entries, "bytes": self._bytes, "evictions": 0}

    def __repr__(self) -> str:
        state = "up" if self.available else "down"
        return (
            f"<RedisStorage {display_url(self.url)} prefix={self.prefix!r} {state} "
            f"entries={self._entries} bytes={self._bytes}>"
        )

    # -- Redis I/O -------------------------------------------------------------------------------
    async def _lookup(self, client: _Client, key: CacheKey) -> list[CacheEntry]:
        digest = key.digest()
        fields = await client.hgetall(self.hash_key(digest))
        if not fields:
            return []
        records: list[tuple[str, _Record]] = []
        broken: list[tuple[str, bytes, str]] = []
        for raw_variant, raw in fields.items():
            variant = _as_bytes(raw_variant).decode("utf-8", "replace")
            data = _as_bytes(raw)
            try:
                record = _Record(data)
            except ValueError as error:
                broken.append((variant, data, str(error)))
                continue
            if record.meta.key != key:
                stored = record.meta.key.url
                broken.append((variant, data, f"stored key {stored!r} is not {key.url!r}"))
                continue
            records.append((variant, record))
        names = [
            self.chunk_key(digest, record.wid, i)
            for _, record in records
            for i in range(record.chunks)
        ]
        values = await client.mget(names) if names else []
        entries: list[CacheEntry] = []
        offset = 0
        for variant, record in records:
            parts = values[offset : offset + record.chunks]
            offset += record.chunks
            chunks = [_as_bytes(p) for p in parts if p is not None]
            problem = _check_chunks(chunks, record)
            if problem is not None:
                broken.append((variant, record.raw, problem))
                continue
            entries.append(RedisEntry(record.meta, chunks, record.size, variant, record.wid))
        for variant, data, problem in broken:
            log.warning("dropping unusable redis cache entry for %s: %s", key.url, problem)
            result = await self._scripts["drop"](
                keys=self._script_keys(digest), args=[self.prefix, digest, variant, data]
            )
            await self._count(result)
        return entries

    def _install(
        self,
        pipe: Any,
        meta: StoredResponse,
        digest: str,
        wid: str,
        size: int,
        ttl_ms: int,
        chunk_ttl_ms: int,
        *,
        expect: str,
    ) -> None:
        record = encode_record(wid, size, meta.to_bytes())
        keys = self._script_keys(digest)
        pipe.eval(
            _INSTALL_LUA,
            len(keys),
            *keys,
            self.prefix,
            digest,
            variant_name(meta),
            record,
            ttl_ms,
            chunk_ttl_ms,
            int(REPLACED_GRACE * 1000),
            expect,
        )

    def _script_keys(self, digest: str) -> list[str]:
        if self.cluster:  # scripts touch one slot: the entry's
            return [self.hash_key(digest)]
        return [self.index_key, self.bytes_key, self.hash_key(digest)]

    async def _count(self, totals: Sequence[Any]) -> None:
        """Standalone: ``totals`` are the cache's (entries, bytes). Cluster: a script's changes
        to them, applied to the counts hash by separate, non-atomic commands."""
        if not self.cluster:
            self._set_totals(totals)
            return
        delta_entries, delta_bytes = int(totals[0]), int(totals[1])
        if not delta_entries and not delta_bytes:
            return
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        pipe.hincrby(self.counts_key, "entries", delta_entries)
        pipe.hincrby(self.counts_key, "bytes", delta_bytes)
        self._set_totals(await pipe.execute())

    async def _delete(self, digest: str) -> int:
        result = await self._scripts["delete"](
            keys=self._script_keys(digest), args=[self.prefix, digest]
        )
        await self._count(result[1:])
        return int(result[0])

    async def _purge(self, client: _Client, prefix: str | None) -> int:
        """Every entry whose URL starts with ``prefix`` (all when None), found by SCAN (of every
        primary in a cluster)."""
        removed = 0
        pattern = _glob_escape(self.prefix) + ":k:*"
        batch: list[bytes] = []
        scan: dict[str, Any] = {"match": pattern, "count": SCAN_BATCH}
        if self.cluster:
            scan["target_nodes"] = RedisCluster.PRIMARIES
        async for name in client.scan_iter(**scan):
            batch.append(_as_bytes(name))
            if len(batch) >= SCAN_BATCH:
                removed += await self._purge_batch(client, batch, prefix)
                batch = []
        if batch:
            removed += await self._purge_batch(client, batch, prefix)
        return removed

    async def _purge_batch(self, client: _Client, names: list[bytes], prefix: str | None) -> int:
        digests = [
            name.rsplit(b":", 1)[1].strip(b"{}").decode("ascii", "replace") for name in names
        ]
        if prefix is not None:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.hvals(name)
            matching = []
            for digest, values in zip(digests, await pipe.execute(), strict=True):
                url = _url_of(values)
                if url is None or url.startswith(prefix):
                    matching.append(digest)  # unreadable records go too
            digests = matching
        removed = 0
        for digest in digests:
            removed += await self._delete(digest)
        return removed

    async def _sweep(self) -> None:
        """Take expired entries out of the index and their hashes; refresh the stats."""
        if self._client is None:
            return
        epoch = self._epoch
        try:
            if self.cluster:  # no global index: Redis' TTLs alone expire entries
                counts = await self._client.hmget(self.counts_key, ["entries", "bytes"])
                self._set_totals([int(value or 0) for value in counts])
                return
            for _ in range(10):  # at most 10 batches per tick
                result = await self._scripts["sweep"](
                    keys=[self.index_key, self.bytes_key], args=[self.prefix, SWEEP_BATCH]
                )
                self._set_totals(result[1:])
                if int(result[0]) < SWEEP_BATCH:
                    break
        except (RedisError, *_OUTAGE_ERRORS) as error:
            self._failed(error, epoch)

    async def _check_memory_policy(self) -> None:
        assert self._client is not None
        try:
            if self.cluster:
                per_node = await self._client.info("memory", target_nodes=RedisCluster.PRIMARIES)
                single = "maxmemory" in per_node  # one primary: its INFO, not a dict of them
                infos = [per_node] if single else list(per_node.values())
            else:
                infos = [await self._client.info("memory")]
        except (RedisError, *_OUTAGE_ERRORS):
            return  # INFO may be disabled (managed Redis): not ours to check then
        if not all(isinstance(info, dict) and info.get("maxmemory") for info in infos):
            log.warning(
                "redis at %s has no maxmemory: cache entries are bounded only by their TTLs; "
                "set maxmemory and maxmemory-policy volatile-lru",
                display_url(self.url),
            )

    def _set_totals(self, totals: Sequence[Any]) -> None:
        self._entries = max(0, int(totals[0]))
        self._bytes = max(0, int(totals[1]))

    # -- outages ---------------------------------------------------------------------------------
    def _failed(self, error: BaseException, epoch: int) -> None:
        if epoch != self._epoch or self._closed:
            return  # began before the last reconnection (or at shutdown): old news
        if isinstance(error, _OUTAGE_ERRORS):
            self._outage(error)
        elif not self._complained:  # e.g. OOM: logged once per burst, the write is dropped
            self._complained = True
            log.warning("redis cache at %s: %s", display_url(self.url), error)

    def _outage(self, error: BaseException) -> None:
        self.available = False
        if not self._down_logged and not self._closed:
            self._down_logged = True
            self.outages += 1
            log.error(
                "redis cache at %s unavailable (%s: %s); serving from the upstreams uncached, "
                "deletions and purges queued, until it answers again",
                display_url(self.url),
                type(error).__name__,
                error,
            )
        if self._wake is not None:
            self._wake.set()

    def _queue_invalidation(
        self, *, key: CacheKey | None = None, prefix: str | None = None, everything: bool = False
    ) -> None:
        if everything:
            self._pending_all = True
        elif key is not None:
            self._pending_keys.add(key)
        elif prefix is not None:
            self._pending_prefixes.add(prefix)
        if len(self._pending_keys) + len(self._pending_prefixes) > MAX_PENDING_INVALIDATIONS:
            if not self._pending_all:
                log.warning(
                    "over %d cache invalidations while redis is down: the whole cache will be "
                    "purged when it is back",
                    MAX_PENDING_INVALIDATIONS,
                )
            self._pending_all = True
        if self._pending_all:
            self._pending_keys.clear()
            self._pending_prefixes.clear()

    async def _replay(self, client: _Client) -> None:
        """Apply the invalidations queued during the outage (each forgotten once done)."""
        if self._pending_all:
            await self._purge(client, None)
            self._pending_all = False
        for prefix in list(self._pending_prefixes):
            await self._purge(client, prefix)
            self._pending_prefixes.discard(prefix)
        for key in list(self._pending_keys):
            await self._delete(key.digest())
            self._pending_keys.discard(key)

    async def _maintain(self) -> None:
        """Sweep while Redis is up; ping with backoff while it is down."""
        assert self._wake is not None
        backoff = RECONNECT_MIN
        while not self._closed:
            try:
                if self.available:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(SWEEP_INTERVAL):
                            await self._wake.wait()
                    self._wake.clear()
                    if self.available:
                        await self._sweep()
                    backoff = RECONNECT_MIN
                    continue
                await asyncio.sleep(backoff)  # reconnection backoff, not synchronisation
                backoff = min(backoff * 2, RECONNECT_MAX)
                if await self._reconnect():
                    backoff = RECONNECT_MIN
            except Exception:  # a bug here must not end reconnection for good
                log.exception("redis cache maintenance failed; retrying")
                await asyncio.sleep(RECONNECT_MAX)

    async def _reconnect(self) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            # Connections that died with the server would fail their next command.
            if not self.cluster:  # RedisCluster replaces broken connections itself
                await client.connection_pool.disconnect()
            await client.ping()
            await self._replay(client)  # before lookups resume: nothing purged is served
        except (RedisError, *_OUTAGE_ERRORS):
            return False
        self._down_logged = False
        self._complained = False
        self._epoch += 1
        self.available = True
        log.info("redis cache at %s is back; caching again", display_url(self.url))
        await self._sweep()
        return True


def _check_chunks(chunks: list[bytes], record: _Record) -> str | None:
    """Why ``chunks`` are not the body ``record`` describes, or None when they are."""
    if len(chunks) != record.chunks:
        return f"{record.chunks - len(chunks)} of {record.chunks} chunks missing"
    for index, part in enumerate(chunks):
        expected = min(CHUNK_BYTES, record.size - index * CHUNK_BYTES)
        if len(part) != expected:
            return f"chunk {index} has {len(part)} bytes, expected {expected}"
    return None


def _url_of(records: list[Any]) -> str | None:
    """The URL stored in the first readable record of a hash."""
    for raw in records:
        try:
            return _Record(_as_bytes(raw)).meta.key.url
        except ValueError:
            continue
    return None
