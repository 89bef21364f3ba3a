"""The life of a proxied request, phase by phase. This module is the only place that decides
their order (see DESIGN.md §1):

    read head (server.downstream) → route → cache lookup → select upstream → acquire
    connection → rewrite → send request / receive head → response filter → stream body →
    log → release
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pibl.accesslog import AccessLogger, AccessRecord
from pibl.balancer.upstream import Upstream
from pibl.cache.key import make_key
from pibl.cache.policy import (
    SAFE_METHODS,
    Action,
    StoredResponse,
    cache_status,
    fresh_hit_status,
    invalidation_targets,
    only_if_cached,
    stale_if_error_allowed,
)
from pibl.cache.storage import CacheEntry, CorruptEntry
from pibl.clock import TurnClock
from pibl.errors import (
    ClientDisconnected,
    NoUpstreamAvailable,
    PiblError,
    ProtocolError,
    UpstreamError,
    UpstreamProtocolError,
    status_for,
)
from pibl.http.framing import error_response
from pibl.http.head import RequestHead, ResponseHead, length_mask, lower_name
from pibl.http.rules import upstream_request_headers
from pibl.proxy.caching import CACHEABLE_METHODS, HttpCache, Lookup, ResponseFilter
from pibl.proxy.exchange import Exchange, ResponsePlan
from pibl.proxy.retry import is_keepalive_race, should_retry
from pibl.proxy.rewrite import strip_prefix

if TYPE_CHECKING:
    from pibl.balancer.group import UpstreamGroup
    from pibl.proxy.rewrite import HeaderEdits
    from pibl.proxy.routing import Route, Router
    from pibl.server.downstream import DownstreamConnection, RequestCycle

log: Final = logging.getLogger("pibl.proxy")


class InternalError(PiblError):
    """An unexpected exception inside PIBL, answered 500."""


class RouteNotFound(ProtocolError):
    def __init__(self) -> None:
        super().__init__("no route matches this request", 404)


class GatewayTimeoutFromCache(PiblError):
    """``only-if-cached`` with nothing usable stored (RFC 9111 §5.2.1.7): 504."""


ResponseFilterFn = Callable[[ResponseHead], ResponsePlan]


class Transaction:
    """One request on its way through the phases: where it came from, where it goes, and the
    record the log phase writes."""

    __slots__ = ("cycle", "down", "head", "record", "route")

    def __init__(
        self,
        down: DownstreamConnection,
        cycle: RequestCycle,
        head: RequestHead,
        route: Route[UpstreamGroup],
        record: AccessRecord,
    ) -> None:
        self.down = down
        self.cycle = cycle
        self.head = head
        self.route = route
        self.record = record


class Pipeline:
    def __init__(
        self,
        router: Router[UpstreamGroup],
        access_log: AccessLogger,
        *,
        read_timeout: float,
        cache: HttpCache | None = None,
        clock: TurnClock | None = None,
    ) -> None:
        self.router = router
        self.access_log = access_log
        self.read_timeout = read_timeout
        self.cache = cache
        self.clock = clock if clock is not None else TurnClock()
        # Called with every finished request's record (metrics, stats), after the access log.
        self.record_observers: list[Callable[[AccessRecord], None]] = []
        # Whether requests may run without an asyncio Task (see
        # DownstreamConnection._start_serving): nothing on their way may need a current task.
        # Route, balancer, pool and a storage that answers lookups at once (memory) qualify;
        # the Redis client does not (it times its commands with asyncio.timeout), and other
        # storages keep a Task per busy period as well.
        self.eager = cache is None or cache.answers_now
        self._background: set[asyncio.Task[None]] = set()

    async def handle(self, down: DownstreamConnection, cycle: RequestCycle) -> bool:
        """Answer one request; returns whether the downstream connection may stay open."""
        record = AccessRecord()
        record.client_addr = down.client_ip
        record.start_time = cycle.start_time
        head = cycle.head
        keep_open = False
        try:
            if head is not None:
                _describe_request(record, head)
            if cycle.error is not None:
                raise cycle.error
            assert head is not None
            route = self.router.match(head)  # phase 2: route
            if route is None:
                raise RouteNotFound()
            record.route = route.name
            if route.max_body_size and (head.content_length or 0) > route.max_body_size:
                raise ProtocolError("request body too large", 413)  # before forwarding
            tx = Transaction(down, cycle, head, route, record)
            cache = self.cache
            if cache is not None and route.cache:
                answered: bool | None = None
                lookup: Lookup | None = None
                if cache.answers_now and head.method in CACHEABLE_METHODS:
                    # A hit from a storage that answers at once is served here, with no
                    # coroutine of the general path below: most cached requests end here.
                    lookup = cache.lookup_now(head, self.clock.now())
                    answered = self._answer_stored(tx, cache, lookup, corrupt_ok=True)
                if answered is None:
                    answered = await self._through_cache(tx, cache, lookup)
                keep_open = answered
            else:
                keep_open = self._finished(await self._forward(tx), tx)
        except PiblError as error:
            keep_open = self._answer_error(down, cycle, record, error)
        except Exception as error:
            # A bug must cost one request, never the process or the other connections.
            log.exception("internal error while handling %r", head)
            keep_open = self._answer_error(down, cycle, record, InternalError(str(error)))
        finally:
            # phase 10: log exactly once, whatever happened.
            record.total_time = self.clock.now() - cycle.start_time
            record.bytes_received = cycle.body_received
            self.access_log.log(record)
            for observe in self.record_observers:
                observe(record)
        return keep_open

    @staticmethod
    def _finished(exchange: Exchange, tx: Transaction) -> bool:
        tx.record.status = exchange.response.status if exchange.response else 0
        return exchange.keep_downstream and tx.head.keep_alive and tx.cycle.body_done

    @staticmethod
    def _serve(
        tx: Transaction,
        cache: HttpCache,
        entry: CacheEntry,
        meta: StoredResponse,
        status: bytes,
        now: float | None = None,
    ) -> bool:
        return cache.serve(tx.down, tx.cycle, tx.head, entry, meta, tx.record, status, now)

    # -- phase 3: cache lookup, and what follows from it ---------------------------------------
    async def _through_cache(
        self, tx: Transaction, cache: HttpCache, lookup: Lookup | None
    ) -> bool:
        """The cache phase for what ``handle`` could not answer at once: unsafe methods,
        misses, entries to revalidate, storages that are awaited. ``lookup`` is the one
        ``handle`` made, if it made one."""
        head = tx.head
        if head.method not in CACHEABLE_METHODS:
            return await self._forward_unsafe(tx, cache)
        if lookup is None:
            lookup = await cache.lookup(head)
        leader = False
        while lookup.entry is None and not only_if_cached(head):
            waiting = cache.lead_fetch(lookup.key)
            if waiting is None:
                leader = True
                break
            # Another request is fetching this URL: wait for it, then look again.
            await cache.wait_for_leader(waiting)
            lookup = await cache.lookup(head)
            if lookup.entry is None:
                leader = cache.lead_fetch(lookup.key) is None
                break
        try:
            try:
                answered = self._answer_stored(tx, cache, lookup, corrupt_ok=False)
            except CorruptEntry as error:
                # Raised before anything was written: drop the entry, fetch it like a miss.
                log.warning("dropping corrupt cache entry: %s", error)
                await cache.storage.delete(lookup.key)
                cache.misses += 1
                return await self._fetch(tx, cache, Lookup(lookup.key, time.time()))
            if answered is not None:
                return answered
            cache.misses += 1
            return await self._fetch(tx, cache, lookup)
        finally:
            if leader:
                cache.end_fetch(lookup.key)

    def _answer_stored(
        self, tx: Transaction, cache: HttpCache, lookup: Lookup, *, corrupt_ok: bool
    ) -> bool | None:
        """Answer from the stored response if ``lookup`` allows it (fresh, or stale while
        revalidating): returns whether to keep the connection, or None when the request goes
        upstream.

        A corrupt entry raises ``CorruptEntry`` before anything is written; with
        ``corrupt_ok`` it returns None instead (``_through_cache`` then meets it again and
        drops it).
        """
        entry, decision = lookup.entry, lookup.decision
        if entry is None or decision is None:
            if only_if_cached(tx.head):
                raise GatewayTimeoutFromCache("only-if-cached and nothing is stored")
            return None
        try:
            # Counted, and the revalidation started, only once the stored response was
            # served: a corrupt one raises instead and is counted as the miss it becomes.
            if decision.action is Action.FRESH:
                status = fresh_hit_status(decision.ttl)
                # Served as of the lookup's time: the Age sent is the one the decision saw.
                keep_open = self._serve(tx, cache, entry, entry.meta, status, lookup.request_time)
                cache.hits += 1
                return keep_open
            if decision.action is Action.STALE_WHILE_REVALIDATE:
                status = cache_status(True, ttl=decision.ttl, detail="stale-while-revalidate")
                keep_open = self._serve(tx, cache, entry, entry.meta, status)
                cache.stale += 1
                self._revalidate_in_background(tx, lookup)
                return keep_open
        except CorruptEntry:
            if corrupt_ok:
                return None
            raise
        if decision.gateway_timeout:
            raise GatewayTimeoutFromCache("only-if-cached and the stored response is stale")
        return None

    async def _fetch(self, tx: Transaction, cache: HttpCache, lookup: Lookup) -> bool:
        """Forward a GET/HEAD that the cache could not answer; store or refresh on the way."""
        head = tx.head
        entry = lookup.entry
        revalidate = (
            entry is not None
            and lookup.decision is not None
            and lookup.decision.action is Action.STALE_REVALIDATE
        )
        upstream_head = cache.upstream_request(head, entry if revalidate else None)
        stale_ok = entry is not None and stale_if_error_allowed(entry.meta, head, time.time())
        response_filter = ResponseFilter(
            cache,
            head,
            lookup,
            tx.record,
            fwd=lookup.fwd,
            revalidating=revalidate,
            serve_stale_on_error=stale_ok,
        )
        try:
            exchange = await self._forward(tx, upstream_head, response_filter)
        except (UpstreamError, NoUpstreamAvailable):
            if (
                entry is not None
                and not tx.cycle.response_started
                and stale_if_error_allowed(entry.meta, head, time.time(), disconnected=True)
            ):
                status = cache_status(True, fwd="stale", detail="stale-if-error")
                return self._serve(tx, cache, entry, entry.meta, status)
            raise
        response = exchange.response
        if exchange.writer is not None:
            await exchange.writer.commit()  # phase 9 ended cleanly: the entry becomes visible
        if response_filter.unmatched_304 and entry is not None:
            if head.has_body:  # already sent upstream: it cannot be sent again
                raise UpstreamProtocolError("a 304 that matches no stored response")
            log.info("304 for %s matches no stored response; fetching it again", lookup.key.url)
            plain = _without_revalidation(lookup)
            return await self._fetch(tx, cache, plain)
        if response_filter.intercepted and entry is not None and response is not None:
            if response.status == 304:
                meta = await cache.refresh(
                    entry, response, lookup.request_time, response_filter.response_time
                )
                status = cache_status(False, fwd="stale", fwd_status=304)
                return self._serve(tx, cache, entry, meta, status)
            status = cache_status(
                True, fwd="stale", fwd_status=response.status, detail="stale-if-error"
            )
            return self._serve(tx, cache, entry, entry.meta, status)
        if entry is not None and response is not None and _is_head_200(head, response):
            # §4.3.5: a 200 to HEAD freshens (or invalidates) the stored GET response
            await cache.update_from_head(
                lookup.key, entry, response, lookup.request_time, response_filter.response_time
            )
        return self._finished(exchange, tx)

    async def _forward_unsafe(self, tx: Transaction, cache: HttpCache) -> bool:
        head = tx.head
        # A POST response may be stored for later GETs (RFC 9110 §9.3.3), hence a key.
        lookup = Lookup(make_key(head), time.time())
        response_filter = ResponseFilter(cache, head, lookup, tx.record, fwd="method")
        upstream_head = cache.upstream_request(head, None)
        exchange = await self._forward(tx, upstream_head, response_filter)
        if exchange.response is not None and head.method not in SAFE_METHODS:
            # §4.4: a successful unsafe request invalidates what is stored for its target.
            await cache.invalidate(invalidation_targets(head, exchange.response, lookup.key))
        if exchange.writer is not None:
            await exchange.writer.commit()  # after the invalidation, which it survives
        return self._finished(exchange, tx)

    def _revalidate_in_background(self, tx: Transaction, lookup: Lookup) -> None:
        """RFC 5861 §3: refresh a stale entry while the stale one is being served."""
        from pibl.server.downstream import DownstreamConnection, RequestCycle

        cache = self.cache
        entry = lookup.entry
        if cache is None or entry is None or cache.lead_fetch(lookup.key) is not None:
            return  # someone is already fetching this URL
        # A connection with no socket behind it: the response is only for the cache.
        sink = DownstreamConnection(tx.down.app)
        sink.client_ip = tx.down.client_ip
        plain = tx.head.with_headers(
            [(n, v) for n, v in tx.head.headers if lower_name(n) not in _CLIENT_CONDITIONALS]
        )
        plain.method = "GET"
        cycle = RequestCycle(plain, time.time())
        background_lookup = Lookup(lookup.key, time.time())
        background_lookup.entry = entry
        background_lookup.decision = lookup.decision
        background_lookup.fwd = "stale"

        async def run() -> None:
            record = AccessRecord()
            record.client_addr = "-"
            background = Transaction(sink, cycle, plain, tx.route, record)
            try:
                await self._fetch(background, cache, _as_revalidation(background_lookup))
            except PiblError as error:
                log.info("background revalidation of %s failed: %s", lookup.key.url, error)
            finally:
                cache.end_fetch(lookup.key)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- phases 4 to 9, 11: select, acquire, rewrite, exchange, release ------------------------
    async def _forward(
        self,
        tx: Transaction,
        upstream_head: RequestHead | None = None,
        response_filter: ResponseFilterFn | None = None,
    ) -> Exchange:
        down, cycle, head, route, record = tx.down, tx.cycle, tx.head, tx.route, tx.record
        group = route.target
        sent_head = upstream_head or head
        # The route's rewrites, prepared once for every attempt (none: nothing to do).
        wire_head = head
        if route.strip_prefix and route.path_prefix is not None:
            wire_head = head.with_headers(head.headers)
            wire_head.target = strip_prefix(head.target, route.path_prefix)
        request_edits = route.request_edits
        if route.response_edits is not None:
            response_filter = _with_response_edits(route.response_edits, response_filter)
        tried: list[Upstream] = []
        attempt = 0
        fresh_retry_used = False
        force_fresh = False
        last_error: PiblError | None = None
        retry_upstream: Upstream | None = None
        while True:
            # phase 4: select upstream
            upstream = retry_upstream
            retry_upstream = None
            if upstream is None:
                upstream, must_wait = group.choose_now(head, tried)
                if must_wait:
                    upstream = await group.wait_for_slot(head, tried)
            if upstream is None:
                raise last_error or NoUpstreamAvailable(f"no server available in {group.name!r}")
            if upstream not in tried:
                tried.append(upstream)
            pool = group.pool_for(upstream)
            record.upstream_addr = upstream.key
            upstream.in_flight += 1
            upstream.requests += 1
            started = time.monotonic()
            exchange = None
            try:
                # phase 5: acquire connection
                conn = None if force_fresh else pool.take_idle()
                reused = conn is not None
                if conn is None:
                    conn = await pool.connect()
                exchange = Exchange(
                    down,
                    cycle,
                    wire_head,
                    upstream,
                    conn,
                    reused=reused,
                    read_timeout=self.read_timeout,
                )
                exchange.response_filter = response_filter
                exchange.max_body_size = route.max_body_size
                # phase 6: rewrite — sanitise and add X-Forwarded-*/Via, then the route's edits
                # (after the sanitiser, so it never undoes them; they win over PIBL's fields)
                headers = upstream_request_headers(sent_head, trusted_peer=down.is_trusted)
                if request_edits is not None:
                    headers = request_edits.apply(headers)
                # phase 7: send; 8 + 9 run in the exchange's callbacks
                exchange.start(headers)
                try:
                    await exchange.done
                except BaseException:
                    pool.discard(conn)  # phase 11: a broken message never goes back
                    raise
                pool.release(conn)  # phase 11: reused only if the message ended cleanly
                status = exchange.response.status if exchange.response else 0
                # passive health (outlier detection)
                group.observe(upstream, ok=status < 500, reason=_status_reason(status))
                record.bytes_sent = exchange.bytes_sent
                record.upstream_time = time.monotonic() - started
                record.upstream_status = exchange.response.status if exchange.response else None
                return exchange
            except UpstreamError as error:
                upstream.errors += 1
                group.observe(upstream, ok=False, reason=str(error))
                record.upstream_time = time.monotonic() - started
                last_error = error
                response_started = exchange is not None and exchange.head_sent
                body_sent = exchange is not None and exchange.body_sent_upstream
                if not fresh_retry_used and is_keepalive_race(
                    error, head.method, response_started=response_started, body_sent=body_sent
                ):
                    fresh_retry_used = True
                    record.retries += 1
                    force_fresh = True
                    retry_upstream = upstream
                    log.info(
                        "retrying %s on a fresh connection to %s: %s",
                        head.method,
                        upstream.key,
                        error,
                    )
                elif not should_retry(
                    error,
                    head.method,
                    attempt=attempt,
                    retries=group.retries,
                    response_started=response_started,
                    body_sent=body_sent,
                ):
                    _note_partial(record, exchange)
                    raise
                else:
                    attempt += 1
                    record.retries += 1
                    force_fresh = False
                    log.warning("upstream %s failed (%s); retrying", upstream.key, error)
            except ClientDisconnected:
                record.upstream_time = time.monotonic() - started
                _note_partial(record, exchange)
                raise
            finally:
                upstream.in_flight -= 1
                group.release(upstream)  # a freed slot goes to a queued request

    def _answer_error(
        self,
        down: DownstreamConnection,
        cycle: RequestCycle,
        record: AccessRecord,
        error: PiblError,
    ) -> bool:
        status = 504 if isinstance(error, GatewayTimeoutFromCache) else status_for(error)
        record.error = str(error)
        if cycle.response_started or isinstance(error, ClientDisconnected):
            # Part of a response already went out: cutting the connection is the only honest
            # signal of a truncated message (nginx and HAProxy do the same).
            if isinstance(error, ClientDisconnected):
                record.status = status
            elif record.upstream_status is not None:
                record.status = record.upstream_status
            down.abort()
            return False
        record.status = status
        head = cycle.head
        if isinstance(error, UpstreamError):
            log.warning(
                "%s %s → %d: %s", head.method if head else "-", record.target, status, error
            )
        keep_open = (
            (not isinstance(error, ProtocolError) or isinstance(error, RouteNotFound))
            and head is not None
            and head.keep_alive
            and cycle.body_done
            and down.app.keepalive_enabled
        )
        body = error_response(status, _public_message(error), close=not keep_open)
        record.bytes_sent = len(body) - body.index(b"\r\n\r\n") - 4
        down.write(body)
        return keep_open


# A background revalidation must not carry the client's own conditionals (§4.3.1).
_CLIENT_CONDITIONALS: Final = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range"}
)


def _as_revalidation(lookup: Lookup) -> Lookup:
    from pibl.cache.policy import Decision

    decision = lookup.decision
    if decision is not None:
        lookup.decision = Decision(Action.STALE_REVALIDATE, decision.age, decision.ttl, "stale")
    return lookup


def _is_head_200(head: RequestHead, response: ResponseHead) -> bool:
    return head.method == "HEAD" and response.status == 200


def _without_revalidation(lookup: Lookup) -> Lookup:
    """``lookup`` with its entry kept (for stale-if-error) but no longer revalidated."""
    from pibl.cache.policy import Decision

    plain = Lookup(lookup.key, lookup.request_time)
    plain.entry = lookup.entry
    plain.fwd = lookup.fwd
    decision = lookup.decision
    if decision is not None:
        plain.decision = Decision(Action.MUST_FORWARD, decision.age, decision.ttl, decision.fwd)
    return plain


def _with_response_edits(
    edits: HeaderEdits, inner: ResponseFilterFn | None
) -> Callable[[ResponseHead], ResponsePlan]:
    """The response-filter phase with a route's response edits applied first: the cache's
    filter (``inner``) then stores and serves the edited head."""

    def response_filter(response: ResponseHead) -> ResponsePlan:
        response.headers = edits.apply(response.headers)
        return inner(response) if inner is not None else ResponsePlan()

    return response_filter


def _status_reason(status: int) -> str:
    # Only a failure's reason is ever shown (an ejection's log line): no string for a success.
    return f"status {status}" if status >= 500 else ""


def _note_partial(record: AccessRecord, exchange: Exchange | None) -> None:
    if exchange is not None:
        record.bytes_sent = exchange.bytes_sent
        if exchange.response is not None:
            record.upstream_status = exchange.response.status


def _public_message(error: PiblError) -> str:
    # Upstream details (addresses, errno) are for the operator's log, not for the client.
    if isinstance(error, ProtocolError | GatewayTimeoutFromCache):
        return str(error)
    return ""


_LOGGED_LENGTHS: Final = length_mask((b"user-agent", b"referer"))


def _describe_request(record: AccessRecord, head: RequestHead) -> None:
    record.method = head.method
    record.target = head.target.decode("latin-1")
    record.version = head.version
    record.host = head.host.decode("latin-1")
    for name, value in head.headers:
        if not (_LOGGED_LENGTHS >> len(name)) & 1:
            continue
        lname = lower_name(name)
        if lname == b"user-agent":
            record.user_agent = value.decode("latin-1")
        elif lname == b"referer":
            record.referer = value.decode("latin-1")
