"""One attempt to forward a request over one upstream connection.

The exchange is the bridge between a downstream connection and an upstream one: it sends the
request head, streams the request body up, relays the response head and streams the body down,
both directions with back-pressure (a full write buffer on one side pauses reading on the other).
It runs inside callbacks; the pipeline awaits ``done``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pibl.deadline import Deadline
from pibl.errors import (
    ClientDisconnected,
    ProtocolError,
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from pibl.http.framing import (
    LAST_CHUNK,
    chunk,
    request_head_bytes,
    response_has_body,
    response_head_bytes,
)
from pibl.http.head import Headers, RequestHead, ResponseHead, lower_name
from pibl.http.rules import downstream_response_headers

if TYPE_CHECKING:
    from pibl.balancer.upstream import Upstream
    from pibl.cache.storage import CacheWriter
    from pibl.pool.connection import UpstreamConnection
    from pibl.server.downstream import DownstreamConnection, RequestCycle

log: Final = logging.getLogger("pibl.proxy")

CONTINUE_RESPONSE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# How long to wait for an upstream's 100 (Continue) before sending the body anyway: curl's
# and Go's Transport.ExpectContinueTimeout default.
EXPECT_CONTINUE_TIMEOUT: Final = 1.0


class ResponsePlan:
    """What the cache phase decided about a response head (see ``Exchange.response_filter``).

    ``forward`` False keeps the response from the client (a 304 to PIBL's own conditional
    request, an error masked by stale-if-error): its body is read and dropped, and the pipeline
    answers instead. ``writer`` receives the body as it streams to the client.
    ``remove_headers`` (lower-case names) are not forwarded, e.g. a consumed
    ``Surrogate-Control``; ``extra_headers`` are added after them.
    """

    __slots__ = ("extra_headers", "forward", "remove_headers", "writer")

    def __init__(
        self,
        *,
        forward: bool = True,
        extra_headers: Headers | None = None,
        writer: CacheWriter | None = None,
        remove_headers: frozenset[bytes] = frozenset(),
    ) -> None:
        self.forward = forward
        self.extra_headers = extra_headers or []
        self.writer = writer
        self.remove_headers = remove_headers


class Exchange:
    __slots__ = (
        "_chunked_out",
        "_complete_pending",
        "_expect_timer",
        "_forwarding",
        "_has_body_out",
        "_head_out",
        "_request_body_done",
        "_timer",
        "_upgrading",
        "body_sent_upstream",
        "bytes_sent",
        "conn",
        "cycle",
        "done",
        "down",
        "head_sent",
        "keep_downstream",
        "last_activity",
        "loop",
        "max_body_size",
        "read_timeout",
        "request",
        "response",
        "response_filter",
        "reused",
        "tunnel_idle_timeout",
        "upstream",
        "writer",
    )

    def __init__(
        self,
        down: DownstreamConnection,
        cycle: RequestCycle,
        request: RequestHead,
        upstream: Upstream,
        conn: UpstreamConnection,
        *,
        reused: bool,
        read_timeout: float,
    ) -> None:
        self.down = down
        self.cycle = cycle
        self.request = request
        self.upstream = upstream
        self.conn = conn
        self.reused = reused
        self.read_timeout = read_timeout
        self.loop = down.loop
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.response: ResponseHead | None = None
        self.head_sent = False
        self.bytes_sent = 0
        self.body_sent_upstream = False
        self.keep_downstream = True
        self.last_activity = 0.0
        self._chunked_out = False
        self._has_body_out = False
        self._request_body_done = not request.has_body
        timer = conn.timer
        if timer is None:
            timer = conn.timer = Deadline(self.loop)
        self._timer = timer  # the read timeout, then the tunnel's idle timeout
        self._upgrading = False
        self._forwarding = True
        self._complete_pending = False
        self._head_out: bytes | None = None
        self._expect_timer: asyncio.TimerHandle | None = None
        self.response_filter: Callable[[ResponseHead], ResponsePlan] | None = None
        self.writer: CacheWriter | None = None
        self.tunnel_idle_timeout = 0.0
        # A route's limit on the request body (0: none). A Content-Length over it was refused
        # before forwarding; a chunked body is counted as it streams.
        self.max_body_size = 0

    # -- request side --------------------------------------------------------------------------
    def start(self, headers: Headers) -> None:
        """Send the request head (and the body as it comes) to the upstream."""
        request = self.request
        if request.content_length is not None and (
            request.has_body or request.method in _BODY_METHODS
        ):
            headers.append((b"Content-Length", b"%d" % request.content_length))
        elif request.is_chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        self.conn.begin(self, head_request=request.method == "HEAD")
        self.conn.write(request_head_bytes(request.method, request.target, headers))
        down = self.down
        down.on_writable = self._on_downstream_writable
        down.on_lost = self._on_downstream_lost
        if not down.is_writable:
            self.conn.pause_reading()
        if request.has_body:
            if not request.expects_continue:
                self._stream_request_body()
            else:
                self._expect_timer = self.loop.call_later(
                    EXPECT_CONTINUE_TIMEOUT, self._on_expect_timeout
                )
        self.last_activity = self.loop.time()
        if self.read_timeout > 0:
            self._timer.set(self.read_timeout, self._check_timeout)

    def _on_expect_timeout(self) -> None:
        # The upstream ignored Expect (RFC 9110 §10.1.1 lets a client go ahead after a while);
        # ask the client for its body ourselves rather than leave both sides waiting.
        self._expect_timer = None
        if not self.body_sent_upstream and self.response is None and not self.done.done():
            self.down.write(CONTINUE_RESPONSE)
            self._stream_request_body()

    def _stream_request_body(self) -> None:
        if self._expect_timer is not None:
            self._expect_timer.cancel()
            self._expect_timer = None
        self.body_sent_upstream = True
        self.cycle.attach(self._send_body, self._end_body)
        # The body may have been held back while waiting; reading can go on now.
        self.down.resume_reading()

    def _send_body(self, data: bytes) -> None:
        if not data or self.done.done():
            return
        if self.max_body_size and self.cycle.body_received > self.max_body_size:
            # Whatever went up already, the upstream never sees this body end (the connection
            # is discarded); the client gets 413 and its connection closes (nginx does alike).
            self._fail(ProtocolError("request body too large", 413))
            return
        if self.request.is_chunked:
            self.conn.writelines(chunk(data))
        else:
            self.conn.write(data)

    def _end_body(self) -> None:
        if self.done.done():
            return  # failed while the buffered body was replayed: never end it upstream
        error = self.cycle.error
        if error is not None:
            # The client's body broke mid-stream: the upstream must not see it as complete.
            self._fail(error)
            return
        self._request_body_done = True
        if self.request.is_chunked:
            self.conn.write(LAST_CHUNK)

    def on_upstream_writable(self, writable: bool) -> None:
        if writable:
            self.down.resume_reading()
        else:
            self.down.pause_reading()

    # -- response side (ResponseSink) ----------------------------------------------------------
    def on_response_head(self, head: ResponseHead) -> None:
        self.last_activity = self.loop.time()
        request = self.request
        status = head.status
        if status < 200:
            if status == 101 and request.upgrade is not None:
                self._begin_tunnel(head)
            elif status == 100:
                if request.expects_continue and not self.body_sent_upstream:
                    self.down.write(CONTINUE_RESPONSE)
                    self._stream_request_body()
            elif status == 101:
                self._fail(UpstreamProtocolError("101 to a request that asked no upgrade"))
            return  # other 1xx (e.g. 103) are dropped: optional to relay (RFC 9110 §15.2)
        self.response = head
        plan = self.response_filter(head) if self.response_filter is not None else None
        if plan is not None and not plan.forward:
            self._forwarding = False
            return
        if not self.body_sent_upstream and request.has_body:
            # Final answer before the body was asked for (Expect: 100-continue): the body is not
            # forwarded; the client may still send it, so this connection cannot be reused.
            self.keep_downstream = False
        elif not self._request_body_done:
            self.keep_downstream = False  # an early response while the upload is under way
        headers = downstream_response_headers(head)
        if plan is not None:
            if plan.remove_headers:
                headers = [h for h in headers if lower_name(h[0]) not in plan.remove_headers]
            headers += plan.extra_headers
            self.writer = plan.writer
        has_body = response_has_body(request.method, status)
        if head.content_length is not None and (
            has_body or request.method == "HEAD" or status == 304
        ):
            headers.append((b"Content-Length", b"%d" % head.content_length))
        elif has_body:
            self._has_body_out = True
            if request.version == "1.1":
                self._chunked_out = True
                headers.append((b"Transfer-Encoding", b"chunked"))
            else:
                self.keep_downstream = False  # an HTTP/1.0 client reads until close
        if self._has_body_out or head.content_length:
            self._has_body_out = True
        if not request.keep_alive or request.upgrade is not None:
            # After an Upgrade request llhttp stops parsing: no further request can be read.
            self.keep_downstream = False
        if not self.keep_downstream or not self.down.app.keepalive_enabled:
            self.keep_downstream = False
            headers.append((b"Connection", b"close"))
        elif request.version == "1.0":
            headers.append((b"Connection", b"keep-alive"))
        # Held back until the body bytes parsed from the same read (or the end of that read):
        # head and body then leave in one send instead of two.
        self._head_out = response_head_bytes(status, headers, head.reason)
        self.head_sent = self.cycle.response_started = True

    def flush_pending(self) -> None:
        head = self._head_out
        if head is not None:
            self._head_out = None
            self.down.write(head)
        if self._complete_pending:
            # The response ended in the read just parsed. The request is resumed here, not on
            # the loop's next turn, and only now: a byte after the response in the same read
            # (a desynchronised upstream) has been seen and has condemned the connection.
            self._complete_pending = False
            self._finish(None, resume_now=True)

    def on_response_body(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if not self._forwarding:
            return
        writer = self.writer
        if writer is not None and not writer.write(data):
            self.writer = None  # over max_object_size or a storage error: stream uncached
        self.bytes_sent += len(data)
        out = chunk(data) if self._chunked_out else [data]
        head = self._head_out
        if head is not None:
            self._head_out = None
            out.insert(0, head)
        self.down.writelines(out)

    def on_response_complete(self) -> None:
        if self._forwarding:
            out = [LAST_CHUNK] if self._chunked_out else []
            head = self._head_out
            if head is not None:
                self._head_out = None
                out.insert(0, head)
            if out:
                self.down.writelines(out)
        if self.response is not None and not self._request_body_done:
            # The upstream answered before reading the whole request: it will not read the
            # rest either, so its connection cannot carry another request.
            self.conn.is_reusable = False
        if self.conn.reading:
            self._complete_pending = True  # settled by flush_pending at the end of the read
        else:
            self._finish(None)

    def on_upstream_error(self, error: Exception, got_bytes: bool) -> None:
        if self._upgrading:
            self.down.close()  # the upstream ended the tunnel; what was written still flushes
            self._finish(None)
            return
        if isinstance(error, UpstreamError):
            self._fail(error)
            return
        if isinstance(error, ConnectionError):
            failure: UpstreamError = UpstreamClosed(
                "upstream closed the connection"
                + (" mid-response" if got_bytes else " before responding"),
                self.upstream,
                # Only a silent close of a pooled connection is the keep-alive race.
                self.reused and not got_bytes,
            )
        else:
            failure = UpstreamProtocolError(
                f"invalid response: {error}", self.upstream, self.reused
            )
        failure.__cause__ = error
        self._fail(failure)

    @property
    def got_response_bytes(self) -> bool:
        return self.response is not None

    # -- tunnel (after 101) --------------------------------------------------------------------
    # Bytes flow as they come, each direction throttled like a body: a full write buffer on
    # one side pauses reading on the other (``_on_downstream_writable``, ``on_upstream_writable``
    # stay in charge). The tunnel ends when either side closes (the other is closed after its
    # pending bytes are flushed) or after ``tunnel_idle_timeout`` without a byte either way.
    def _begin_tunnel(self, head: ResponseHead) -> None:
        self.response = head
        self._upgrading = True
        app = self.down.app
        app.tunnels_open += 1
        app.tunnels_total += 1
        headers = downstream_response_headers(head)
        headers.append((b"Connection", b"upgrade"))
        upgrade = head.header(b"upgrade")
        if upgrade is not None:
            headers.append((b"Upgrade", upgrade))
        self.down.write(response_head_bytes(101, headers, head.reason))
        self.head_sent = self.cycle.response_started = True
        self.keep_downstream = False
        self._cancel_timer()
        conn, down = self.conn, self.down
        down.tunnel_sink = self._tunnel_up
        down.tunnel_eof = self._tunnel_down_eof
        leftover, down.upgrade_leftover = down.upgrade_leftover, b""
        if leftover:
            conn.write(leftover)
        down.resume_reading()
        self.last_activity = self.loop.time()
        self.tunnel_idle_timeout = app.limits.tunnel_idle_timeout
        if self.tunnel_idle_timeout > 0:
            self._timer.set(self.tunnel_idle_timeout, self._check_tunnel_idle)

    def _tunnel_up(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.conn.write(data)

    def _tunnel_down_eof(self) -> None:
        # The client half-closed: pass it on where the upstream transport can (plain TCP; the
        # upstream's close then ends the tunnel), else close the upstream side (TLS).
        if not self.conn.write_eof():
            self.conn.close()

    def on_tunnel_data(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.bytes_sent += len(data)
        self.down.write(data)

    def _check_tunnel_idle(self) -> None:
        if self.done.done():
            return
        timeout = self.tunnel_idle_timeout
        remaining = self.last_activity + timeout - self.loop.time()
        upstream = self.conn.transport
        if remaining <= 0.001 and (
            not self.down.is_writable
            or (upstream is not None and upstream.get_write_buffer_size() > 0)
        ):
            remaining = timeout  # bytes are waiting for a slow reader: throttled, not idle
        if remaining > 0.001:
            self._timer.set(remaining, self._check_tunnel_idle)
            return
        log.info(
            "tunnel %s ↔ %s idle for %gs; closing it",
            self.down.client_addr,
            self.upstream.key,
            timeout,
        )
        self.down.close()
        self.conn.close()
        self._finish(None)

    # -- flow control, timeouts, teardown ------------------------------------------------------
    def _on_downstream_writable(self, writable: bool) -> None:
        if writable:
            self.conn.resume_reading()
        else:
            self.conn.pause_reading()

    def _on_downstream_lost(self) -> None:
        if self._upgrading:
            self.conn.close()
            self._finish(None)
        else:
            self._fail(ClientDisconnected("client closed the connection"))

    def _check_timeout(self) -> None:
        if self.done.done():
            return
        if not self.down.is_writable:
            # A slow client is throttling us; that is the send timeout's business, not ours.
            self._timer.set(self.read_timeout, self._check_timeout)
            return
        remaining = self.last_activity + self.read_timeout - self.loop.time()
        if remaining > 0.001:
            self._timer.set(remaining, self._check_timeout)
            return
        self._fail(
            UpstreamTimeout(
                f"no data from upstream for {self.read_timeout:g}s", self.upstream, self.reused
            )
        )

    def _cancel_timer(self) -> None:
        self._timer.clear()

    @property
    def is_forwarding(self) -> bool:
        return self._forwarding

    def _fail(self, error: Exception) -> None:
        if self.done.done():
            return
        if self._complete_pending:
            # The response was complete before this error (bytes after it in the same read):
            # the client has it all; only the upstream connection is lost.
            self._complete_pending = False
            self.conn.is_reusable = False
            self._finish(None)
            return
        if self._head_out is not None:
            # The head never left: the client can still get a clean error response.
            self._head_out = None
            self.head_sent = self.cycle.response_started = False
        self.conn.is_reusable = False
        if self.writer is not None:
            self.writer.abort()  # a broken message never becomes a cache entry
            self.writer = None
        self._finish(error)

    def _finish(self, error: Exception | None, *, resume_now: bool = False) -> None:
        if self.done.done():
            return
        self._cancel_timer()
        if self._expect_timer is not None:
            self._expect_timer.cancel()
            self._expect_timer = None
        self.cycle.detach()
        down = self.down
        down.on_writable = None
        down.on_lost = None
        if self._upgrading:
            down.app.tunnels_open -= 1
        if error is not None:
            self.done.set_exception(error)
        elif resume_now:
            down.resume_with(self.done)
        else:
            self.done.set_result(None)


# Methods whose requests carry Content-Length: 0 meaningfully (RFC 9110 §8.6: a user agent
# SHOULD send it for POST/PUT with no content); others with no body send no framing header.
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
