"""The life of a proxied request, phase by phase. This module is the only place that decides
their order (see DESIGN.md §1):

    read head (server.downstream) → route → select upstream → acquire connection → rewrite →
    send request / receive head → response filter → stream body → log → release
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pibl.accesslog import AccessLogger, AccessRecord
from pibl.errors import (
    ClientDisconnected,
    NoUpstreamAvailable,
    PiblError,
    ProtocolError,
    UpstreamError,
    status_for,
)
from pibl.http.framing import error_response
from pibl.http.head import RequestHead
from pibl.http.rules import upstream_request_headers
from pibl.proxy.exchange import Exchange
from pibl.proxy.retry import is_keepalive_race, should_retry

if TYPE_CHECKING:
    from pibl.balancer.group import UpstreamGroup
    from pibl.proxy.routing import Router
    from pibl.server.downstream import DownstreamConnection, RequestCycle

log = logging.getLogger("pibl.proxy")


class InternalError(PiblError):
    """An unexpected exception inside PIBL, answered 500."""


class RouteNotFound(ProtocolError):
    def __init__(self) -> None:
        super().__init__("no route matches this request", 404)


class Pipeline:
    def __init__(
        self, router: Router[UpstreamGroup], access_log: AccessLogger, *, read_timeout: float
    ) -> None:
        self.router = router
        self.access_log = access_log
        self.read_timeout = read_timeout

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
            exchange = await self._forward(down, cycle, head, route.target, record)
            record.status = exchange.response.status if exchange.response else 0
            keep_open = exchange.keep_downstream and head.keep_alive and cycle.body_done
        except PiblError as error:
            keep_open = self._answer_error(down, cycle, record, error)
        except Exception as error:
            # A bug must cost one request, never the process or the other connections.
            log.exception("internal error while handling %r", head)
            keep_open = self._answer_error(down, cycle, record, InternalError(str(error)))
        finally:
            # phase 10: log exactly once, whatever happened.
            record.total_time = time.time() - cycle.start_time
            record.bytes_received = cycle.body_received
            self.access_log.log(record)
        return keep_open

    async def _forward(
        self,
        down: DownstreamConnection,
        cycle: RequestCycle,
        head: RequestHead,
        group: UpstreamGroup,
        record: AccessRecord,
    ) -> Exchange:
        tried: list[object] = []
        attempt = 0
        fresh_retry_used = False
        force_fresh = False
        last_error: PiblError | None = None
        retry_upstream = None
        while True:
            # phase 4: select upstream
            upstream = retry_upstream or group.select(head, tried)  # type: ignore[arg-type]
            retry_upstream = None
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
                    down, cycle, head, upstream, conn, reused=reused, read_timeout=self.read_timeout
                )
                # phase 6 + 7: rewrite, send; 8 + 9 run in the exchange's callbacks
                exchange.start(upstream_request_headers(head, trusted_peer=down.is_trusted))
                try:
                    await exchange.done
                except BaseException:
                    pool.discard(conn)  # phase 11: a broken message never goes back
                    raise
                pool.release(conn)  # phase 11: reused only if the message ended cleanly
                record.bytes_sent = exchange.bytes_sent
                record.upstream_time = time.monotonic() - started
                record.upstream_status = exchange.response.status if exchange.response else None
                return exchange
            except UpstreamError as error:
                upstream.errors += 1
                record.upstream_time = time.monotonic() - started
                last_error = error
                response_started = exchange is not None and exchange.head_sent
                body_sent = exchange is not None and exchange.body_sent_upstream
                if not fresh_retry_used and is_keepalive_race(
                    error, response_started=response_started, body_sent=body_sent
                ):
                    fresh_retry_used = True
                    force_fresh = True
                    retry_upstream = upstream
                    log.info(
                        "retrying %s on a fresh connection to %s: %s",
                        head.method,
                        upstream.key,
                        error,
                    )
                    continue
                if not should_retry(
                    error,
                    head.method,
                    attempt=attempt,
                    retries=group.retries,
                    response_started=response_started,
                    body_sent=body_sent,
                ):
                    if exchange is not None:
                        record.bytes_sent = exchange.bytes_sent
                        if exchange.response is not None:
                            record.upstream_status = exchange.response.status
                    raise
                attempt += 1
                force_fresh = False
                log.warning("upstream %s failed (%s); trying another server", upstream.key, error)
            except ClientDisconnected:
                if exchange is not None:
                    record.bytes_sent = exchange.bytes_sent
                    if exchange.response is not None:
                        record.upstream_status = exchange.response.status
                raise
            finally:
                upstream.in_flight -= 1

    def _answer_error(
        self,
        down: DownstreamConnection,
        cycle: RequestCycle,
        record: AccessRecord,
        error: PiblError,
    ) -> bool:
        status = status_for(error)
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
        if isinstance(error, UpstreamError):
            log.warning(
                "%s %s → %d: %s",
                cycle.head.method if cycle.head else "-",
                record.target,
                status,
                error,
            )
        head = cycle.head
        keep_open = (
            (not isinstance(error, ProtocolError) or isinstance(error, RouteNotFound))
            and head is not None
            and head.keep_alive
            and cycle.body_done
        )
        body = error_response(status, _public_message(error), close=not keep_open)
        record.bytes_sent = len(body) - body.index(b"\r\n\r\n") - 4
        down.write(body)
        return keep_open


def _public_message(error: PiblError) -> str:
    # Upstream details (addresses, errno) are for the operator's log, not for the client.
    if isinstance(error, ProtocolError):
        return str(error)
    return ""


def _describe_request(record: AccessRecord, head: RequestHead) -> None:
    record.method = head.method
    record.target = head.target.decode("latin-1")
    record.version = head.version
    record.host = head.host.decode("latin-1")
    for name, value in head.headers:
        lname = name.lower()
        if lname == b"user-agent":
            record.user_agent = value.decode("latin-1")
        elif lname == b"referer":
            record.referer = value.decode("latin-1")
