"""The cache phases of the pipeline: lookup, the response filter, serving a stored response.

Policy (RFC 9111) lives in ``pibl.cache.policy`` as pure functions; storage behind
``CacheStorage``. This module binds them to one request: it decides nothing about the order of
phases, which stays in ``pipeline``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pibl.cache.key import CacheKey, make_key
from pibl.cache.policy import (
    ERROR_STATUSES,
    Action,
    Decision,
    StoredResponse,
    age_seconds,
    cache_status,
    client_conditional_matches,
    decide,
    downstream_surrogate_control,
    format_http_date,
    head_response_matches,
    matches_304_entry,
    not_modified_headers,
    revalidation_headers,
    storable,
    vary_matches,
    with_surrogate_capability,
)
from pibl.cache.ranges import select_range
from pibl.cache.storage import CacheEntry, CacheStorage, CorruptEntry
from pibl.deadline import within
from pibl.http.framing import CRLF, response_head_bytes, serialize_headers
from pibl.http.head import Headers, RequestHead, ResponseHead, length_mask, lower_name
from pibl.http.rules import VIA_VALUE
from pibl.proxy.exchange import ResponsePlan

if TYPE_CHECKING:
    from pibl.accesslog import AccessRecord
    from pibl.server.downstream import DownstreamConnection, RequestCycle

log: Final = logging.getLogger("pibl.cache")

# How long a request waits for another request's fetch of the same URL before fetching itself
# (nginx proxy_cache_lock_timeout is 5 s).
COALESCE_WAIT: Final = 5.0
CACHEABLE_METHODS: Final = frozenset({"GET", "HEAD"})
# The keys of recent request targets are remembered (make_key normalises the authority and
# builds a key on every request: a good part of a hit's cost). Targets and hosts come from
# clients, so only short ones are kept and the table is emptied when full: a few MiB at most.
KEY_MEMO_ENTRIES: Final = 1024
KEY_MEMO_MAX_BYTES: Final = 1024  # of host + target
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})


def select_variant(entries: list[CacheEntry], request: RequestHead) -> CacheEntry | None:
    """§4.1: among the stored responses whose Vary fields match, the most recent."""
    best: CacheEntry | None = None
    for entry in entries:
        if vary_matches(entry.meta.vary, request) and (
            best is None or entry.meta.response_time > best.meta.response_time
        ):
            best = entry
    return best


class Lookup:
    """The outcome of the cache-lookup phase for one request."""

    __slots__ = ("decision", "entry", "fwd", "key", "request_time")

    def __init__(self, key: CacheKey, request_time: float) -> None:
        self.key = key
        self.request_time = request_time
        self.entry: CacheEntry | None = None
        self.decision: Decision | None = None
        self.fwd = "uri-miss"


def _decide(lookup: Lookup, entries: list[CacheEntry], request: RequestHead) -> Lookup:
    """``lookup`` completed with the variant of ``entries`` for ``request`` and whether it may
    answer it."""
    if entries:
        lookup.fwd = "vary-miss"
        entry = select_variant(entries, request)
        if entry is not None:
            lookup.entry = entry
            lookup.decision = decide(entry.meta, request, lookup.request_time)
            lookup.fwd = lookup.decision.fwd or "stale"
    return lookup


class ResponseFilter:
    """The response-filter phase for a request that passed the cache: decides storability,
    opens the cache writer and adds ``Cache-Status`` (RFC 9211) before the head goes out."""

    def __init__(
        self,
        cache: HttpCache,
        request: RequestHead,
        lookup: Lookup | None,
        record: AccessRecord,
        *,
        fwd: str,
        revalidating: bool = False,
        serve_stale_on_error: bool = False,
    ) -> None:
        self.cache = cache
        self.request = request
        self.lookup = lookup
        self.record = record
        self.fwd = fwd
        self.revalidating = revalidating
        self.serve_stale_on_error = serve_stale_on_error
        self.response: ResponseHead | None = None
        self.response_time = 0.0
        self.intercepted = False
        # A 304 to PIBL's conditional request that identifies no stored response (§4.3.4):
        # it answers a question the client never asked, so the request is sent again plainly.
        self.unmatched_304 = False

    def __call__(self, response: ResponseHead) -> ResponsePlan:
        self.response = response
        self.response_time = now = time.time()
        lookup = self.lookup
        entry = lookup.entry if lookup is not None else None
        if entry is not None:
            if self.revalidating and response.status == 304:
                self.intercepted = True  # freshen and serve the stored response (§4.3.4)
                self.unmatched_304 = not matches_304_entry(entry.meta, response.headers)
                return ResponsePlan(forward=False)
            if response.status in ERROR_STATUSES and self.serve_stale_on_error:
                self.intercepted = True  # stale-if-error (RFC 5861 §4)
                return ResponsePlan(forward=False)
        cache = self.cache
        request = self.request
        surrogate = _surrogate_edits(response)
        ok, reason = storable(request, response, default_ttl=cache.default_ttl, response_time=now)
        if (
            ok
            and response.content_length is not None
            and (response.content_length > cache.max_object_size)
        ):
            ok, reason = False, "too-large"
        if request.method not in CACHEABLE_METHODS and (not ok or lookup is None):
            value = cache_status(False, fwd="method", fwd_status=response.status)
            self.record.cache_status = value.decode()
            return ResponsePlan(
                extra_headers=[*surrogate, (b"Cache-Status", value)],
                remove_headers=_SURROGATE_FIELD,
            )
        writer = None
        if ok and lookup is not None:
            meta = StoredResponse.from_exchange(
                lookup.key,
                request,
                response,
                request_time=lookup.request_time,
                response_time=now,
                default_ttl=cache.default_ttl,
            )
            writer = cache.storage.open_writer(meta)
        value = cache_status(
            False,
            fwd=self.fwd,
            stored=writer is not None,
            detail=None if ok else reason,
            fwd_status=response.status if self.fwd in ("stale", "method") else None,
        )
        self.record.cache_status = value.decode()
        return ResponsePlan(
            extra_headers=[*surrogate, (b"Cache-Status", value)],
            writer=writer,
            remove_headers=_SURROGATE_FIELD,
        )


_SURROGATE_FIELD: Final = frozenset({b"surrogate-control"})


def _surrogate_edits(response: ResponseHead) -> Headers:
    """The ``Surrogate-Control`` forwarded in place of the upstream's: only the members
    targeted at other devices (PIBL consumes its own and the untargeted ones)."""
    rest = downstream_surrogate_control(response.headers)
    return [] if rest is None else [(b"Surrogate-Control", rest)]


class HttpCache:
    """A shared HTTP cache in front of one storage; one per proxy."""

    def __init__(self, storage: CacheStorage, *, default_ttl: float, max_object_size: int) -> None:
        self.storage = storage
        self.default_ttl = default_ttl
        self.max_object_size = max_object_size
        self._inflight: dict[CacheKey, asyncio.Future[None]] = {}
        self._keys: dict[tuple[str, bytes, bytes], CacheKey] = {}
        # A storage that never waits (memory) is asked directly, without a coroutine.
        self._lookup_now: Callable[[CacheKey], list[CacheEntry]] | None = getattr(
            storage, "lookup_now", None
        )
        self.hits = 0
        self.misses = 0
        self.stale = 0
        self.revalidations = 0

    @property
    def answers_now(self) -> bool:
        """Whether a lookup never waits (the storage has ``lookup_now``)."""
        return self._lookup_now is not None

    def key_for(self, request: RequestHead) -> CacheKey:
        """``make_key(request)``, remembered for recent targets."""
        host, target = request.host, request.target
        if not host or len(host) + len(target) > KEY_MEMO_MAX_BYTES:
            return make_key(request)  # without request.host, the Host field counts as well
        memo = (request.scheme, host, target)
        key = self._keys.get(memo)
        if key is None:
            if len(self._keys) >= KEY_MEMO_ENTRIES:
                self._keys.clear()
            key = self._keys[memo] = make_key(request)
        return key

    def lookup_now(self, request: RequestHead, now: float) -> Lookup:
        """``lookup`` for a storage that answers at once (``answers_now``), without a
        coroutine; ``now`` is the current ``time.time()``."""
        lookup_now = self._lookup_now
        assert lookup_now is not None
        lookup = Lookup(self.key_for(request), now)
        return _decide(lookup, lookup_now(lookup.key), request)

    async def lookup(self, request: RequestHead) -> Lookup:
        if self._lookup_now is not None:
            return self.lookup_now(request, time.time())
        lookup = Lookup(self.key_for(request), time.time())
        return _decide(lookup, await self.storage.lookup(lookup.key), request)

    # -- request coalescing (nginx proxy_cache_lock) -----------------------------------------
    def lead_fetch(self, key: CacheKey) -> asyncio.Future[None] | None:
        """None when this request leads the fetch of ``key``; else the leader's future."""
        future = self._inflight.get(key)
        if future is not None and not future.done():
            return future
        self._inflight[key] = asyncio.get_running_loop().create_future()
        return None

    def end_fetch(self, key: CacheKey) -> None:
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def wait_for_leader(self, future: asyncio.Future[None]) -> None:
        try:
            # ``within``, not asyncio.timeout: requests run without a task.
            await within(asyncio.shield(future), COALESCE_WAIT)
        except TimeoutError:
            log.info("gave up waiting for a concurrent fetch; fetching again")

    # -- serving -------------------------------------------------------------------------------
    def serve(
        self,
        down: DownstreamConnection,
        cycle: RequestCycle,
        request: RequestHead,
        entry: CacheEntry,
        meta: StoredResponse,
        record: AccessRecord,
        status_value: bytes,
        now: float | None = None,
    ) -> bool:
        """Answer ``request`` from a stored response as of ``now`` (default: the current
        time); returns whether to keep the connection.

        Raises ``CorruptEntry`` before anything is written when the body fails its checks.
        """
        if now is None:
            now = time.time()
        keep_open = request.keep_alive and cycle.body_done and down.app.keepalive_enabled
        connection = b"" if keep_open else b"close"
        if keep_open and request.version == "1.0":
            connection = b"keep-alive"
        if _asks_conditional_or_range(request.headers):
            status, reason, headers, body = _conditional_or_range(request, entry, meta, now)
            own = _own_fields(status_value, connection)
            down.write(response_head_bytes(status, headers + own, reason) + body)
        else:  # the whole stored response, the common case: its head is mostly serialised
            status = meta.status
            if request.method == "HEAD":
                body, length = b"", entry.body_size
            else:
                body = entry.read_body()
                length = len(body)
            head = _served_head(meta, now, length, status_value, connection)
            if body:
                down.writelines([head, body])  # one writev, the body not copied
            else:
                down.write(head)
        cycle.response_started = True
        record.status = status
        record.bytes_sent = len(body)
        record.cache_status = status_value.decode()
        return keep_open

    def upstream_request(self, request: RequestHead, entry: CacheEntry | None) -> RequestHead:
        """The request to send upstream: with PIBL's ``Surrogate-Capability`` (Edge
        Architecture §2.1) and, when ``entry`` is being revalidated, its validators in place of
        the client's (§4.3.1)."""
        headers = request.headers
        if entry is not None:
            headers = revalidation_headers(headers, entry.meta)
        return request.with_headers(with_surrogate_capability(headers))

    def revalidation_request(self, request: RequestHead, entry: CacheEntry) -> RequestHead:
        return self.upstream_request(request, entry)

    async def refresh(
        self, entry: CacheEntry, response: ResponseHead, request_time: float, response_time: float
    ) -> StoredResponse:
        """Freshen ``entry`` with a matching 304 (§4.3.4) and store the result."""
        meta = entry.meta.freshened(
            response.headers, request_time=request_time, response_time=response_time
        )
        await self.storage.update(entry, meta)
        self.revalidations += 1
        return meta

    async def update_from_head(
        self,
        key: CacheKey,
        entry: CacheEntry,
        response: ResponseHead,
        request_time: float,
        response_time: float,
    ) -> None:
        """§4.3.5: a 200 response to HEAD freshens the stored GET response it is consistent
        with, and invalidates one it contradicts (a changed ETag, Last-Modified or length)."""
        if head_response_matches(entry.meta, entry.body_size, response.headers):
            await self.refresh(entry, response, request_time, response_time)
        else:
            await self.storage.delete(key)

    async def invalidate(self, keys: list[CacheKey]) -> None:
        for key in keys:
            await self.storage.delete(key)


# A request with one of these may be answered with 304 (§4.3.2) or a part (RFC 9110 §14.2);
# without them, client_conditional_matches() is False and select_range() None.
_CONDITIONAL_OR_RANGE: Final = frozenset({b"if-none-match", b"if-modified-since", b"range"})


_CONDITIONAL_OR_RANGE_LENGTHS: Final = length_mask(_CONDITIONAL_OR_RANGE)


def _asks_conditional_or_range(headers: Headers) -> bool:
    for name, _ in headers:
        if (_CONDITIONAL_OR_RANGE_LENGTHS >> len(name)) & 1 and (
            lower_name(name) in _CONDITIONAL_OR_RANGE
        ):
            return True
    return False


def _own_fields(status_value: bytes, connection: bytes) -> Headers:
    """PIBL's fields on an answer from the cache: Via, Cache-Status, and Connection if any."""
    own: Headers = [(b"Via", VIA_VALUE), (b"Cache-Status", status_value)]
    if connection:
        own.append((b"Connection", connection))
    return own


def _served_head(
    meta: StoredResponse, now: float, length: int, status_value: bytes, connection: bytes
) -> bytes:
    """``_whole_head`` with PIBL's fields, reused while the values it was built from hold:
    Age and the ttl in Cache-Status change once a second, so the hits in between send the
    same bytes."""
    age = age_seconds(meta.current_age(now))
    last = meta.served_head
    if (
        last is not None
        and last[0] == age
        and last[1] == status_value
        and last[2] == connection
        and last[3] == length
    ):
        return last[4]
    own = _own_fields(status_value, connection)
    head = _whole_head(meta, str(age).encode("ascii"), length, own)
    object.__setattr__(meta, "served_head", (age, status_value, connection, length, head))
    return head


def _whole_head(meta: StoredResponse, age: bytes, length: int, own: Headers) -> bytes:
    """The stored response's head with ``age`` (an ``age_header`` value), re-framed with
    ``length``, then PIBL's ``own`` fields: the same bytes as ``response_head_bytes`` over
    ``headers_for_serving`` without framing."""
    facts = meta.facts
    parts = [facts.serving_head, b"Age: %s\r\n" % age]
    serialize_headers(parts, facts.downstream_surrogate)
    parts.append(b"Content-Length: %d\r\n" % length)
    serialize_headers(parts, own)
    parts.append(CRLF)
    return b"".join(parts)


def _conditional_or_range(
    request: RequestHead, entry: CacheEntry, meta: StoredResponse, now: float
) -> tuple[int, bytes, Headers, bytes]:
    """Status, reason, fields and body answering a conditional or Range request from storage:
    a 304 (§4.3.2), a 206 or 416 (RFC 9110 §14), or the whole response."""
    if client_conditional_matches(
        request, meta.headers, status=meta.status, response_time=meta.response_time
    ):
        return 304, b"Not Modified", not_modified_headers(meta.headers), b""
    status, reason = meta.status, meta.reason
    # Re-framed like every message PIBL sends: the stored length is replaced.
    headers = [(n, v) for n, v in meta.headers_for_serving(now) if lower_name(n) not in _FRAMING]
    part = select_range(request, meta.headers, status=meta.status, length=entry.body_size)
    if request.method == "HEAD":
        body = b""
        headers.append((b"Content-Length", b"%d" % entry.body_size))
    elif part is not None:  # RFC 9110 §14: a byte range of the complete stored body
        status, reason = part.status, part.reason
        body = part.slice(entry.read_body())
        if not part.satisfiable:  # a 416 says nothing about the stored response
            headers = [(b"Date", format_http_date(now))]
        headers.append((b"Content-Range", part.content_range))
        headers.append((b"Content-Length", b"%d" % len(body)))
    else:
        body = entry.read_body()
        headers.append((b"Content-Length", b"%d" % len(body)))
    return status, reason, headers, body


__all__ = [
    "Action",
    "CorruptEntry",
    "HttpCache",
    "Lookup",
    "ResponseFilter",
    "select_variant",
]
