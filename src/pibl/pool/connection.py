"""One keep-alive connection to an upstream server: an ``asyncio.Protocol`` around llhttp.

The connection parses responses and hands events to the ``ResponseSink`` of the exchange that
currently owns it; body bytes go straight from ``data_received`` to the sink (no task switch,
no copy). Between exchanges it sits idle in its pool, where any byte or EOF from the server marks
it unusable.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol, cast

import httptools

from pibl.deadline import Deadline
from pibl.http.head import Headers, ResponseHead, length_mask, lower_name
from pibl.writebatch import HeldOutput, WriteBatch

# Bytes of response head (interim 1xx heads included) an upstream may send before its final
# head is complete; beyond it the response is refused (502). llhttp sets no bound of its own,
# so without this a broken upstream grows PIBL's memory until the read timeout. nginx's
# proxy_buffer_size is 4 or 8 KiB, HAProxy's tune.bufsize 16 KiB, Envoy's default 60 KiB.
MAX_RESPONSE_HEAD_BYTES: Final = 64 * 1024
_FRAMING_LENGTHS: Final = length_mask((b"content-length", b"transfer-encoding"))


class UnsolicitedResponse(Exception):
    """Bytes of a further response arrived after the exchange's response was complete."""


class ResponseHeadTooLarge(Exception):
    """The upstream's response head exceeds ``MAX_RESPONSE_HEAD_BYTES``."""


class ResponseSink(Protocol):
    """What an exchange implements to receive an upstream response."""

    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_error(self, error: Exception, got_bytes: bool) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...
    def on_upstream_writable(self, writable: bool) -> None: ...
    def flush_pending(self) -> None:
        """The read has been parsed: write out what was held back and settle a response
        that completed in it."""
        ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_batch",
        "_body_until_close",
        "_got_bytes",
        "_head_bytes",
        "_headers",
        "_parser",
        "_reason",
        "_skip_body",
        "_state",
        "idle_since",
        "is_reusable",
        "last_activity",
        "output",
        "reading",
        "requests_served",
        "sink",
        "timer",
        "transport",
    )

    # _state: "idle" between exchanges, "head" waiting for a response head, "body" receiving a
    # body, "tunnel" after a 101, "closed".
    def __init__(self, batch: WriteBatch | None = None) -> None:
        """``batch``: where writes are held until the end of the loop's turn (None: written
        at once)."""
        self.transport: asyncio.Transport | None = None
        self._batch = batch
        self.output: HeldOutput | None = None
        self.sink: ResponseSink | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._state = "idle"
        self._headers: Headers = []
        self._reason = b""
        self._skip_body = False
        self._body_until_close = False
        self._got_bytes = False
        self._head_bytes = 0
        self.is_reusable = True
        self.idle_since = 0.0
        self.last_activity = 0.0
        self.requests_served = 0
        # True while llhttp parses a read: a sink told of a complete response then settles it
        # in ``flush_pending``, once every byte of the read has been looked at.
        self.reading = False
        # The owning exchange's read (or tunnel idle) timeout, kept across exchanges so that
        # each request moves a deadline instead of creating a loop timer.
        self.timer: Deadline | None = None

    # -- owner side ----------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._state != "closed" and self.transport is not None

    def begin(self, sink: ResponseSink, *, head_request: bool) -> None:
        """Start an exchange: the next response belongs to ``sink``."""
        if self.requests_served and self._skip_body:
            # After a HEAD response the parser may still expect the body its Content-Length
            # announced (llhttp cannot be told otherwise): start the next one afresh.
            self._parser = httptools.HttpResponseParser(self)
        self.sink = sink
        self._state = "head"
        self._skip_body = head_request
        self._got_bytes = False
        self._head_bytes = 0
        self._body_until_close = False

    def write(self, data: bytes) -> None:
        self.writelines([data])

    def writelines(self, data: list[bytes]) -> None:
        """Send ``data`` (taken over: the caller must not change the list), held until the end
        of the loop's turn if the connection has a batch."""
        assert self.transport is not None
        if self.output is not None:
            self.output.writelines(data)
        else:
            self.transport.writelines(data)

    def write_eof(self) -> bool:
        """Half-close after what was written; False if the transport cannot (TLS)."""
        if self.transport is None or not self.transport.can_write_eof():
            return False
        if self.output is not None:
            self.output.flush()
        self.transport.write_eof()
        return True

    def finish(self) -> None:
        """The exchange is over; the pool decides whether to keep the connection."""
        self.sink = None
        self.requests_served += 1
        if self._state != "done":
            self.is_reusable = False  # the response did not end cleanly
        if self.is_reusable:
            self._state = "idle"
        else:
            self.close()

    def close(self) -> None:
        self.is_reusable = False
        if self.transport is not None and self._state != "closed":
            if self.output is not None:
                self.output.flush()  # what was written goes out before the FIN
            self.transport.close()
        self._state = "closed"

    def abort(self) -> None:
        self.is_reusable = False
        if self.output is not None:
            self.output.drop()
        if self.transport is not None:
            self.transport.abort()
        self._state = "closed"

    def pause_reading(self) -> None:
        if self.transport is not None and self._state != "closed":
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._state != "closed":
            self.transport.resume_reading()

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it.
        self.transport = cast(asyncio.Transport, transport)
        if self._batch is not None:
            self.output = HeldOutput(self.transport, self._batch)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == "tunnel":
            if self.sink is not None:
                self.sink.on_tunnel_data(data)
            return
        if state == "idle" or state == "closed":
            # RFC 9112 §9.3: nothing may arrive before a request; the connection cannot be
            # trusted any more.
            self.close()
            return
        self._got_bytes = True
        if state == "head":
            self._head_bytes += len(data)
        try:
            self.reading = True
            self._parser.feed_data(data)
            self.reading = False
            if self._state == "head" and self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
                # Still no complete final head (a read may also carry body bytes after it).
                self._fail(
                    ResponseHeadTooLarge(f"response head over {MAX_RESPONSE_HEAD_BYTES} bytes")
                )
                return
            if self.sink is not None:
                self.sink.flush_pending()
        except httptools.HttpParserUpgrade as upgrade:
            self.reading = False
            offset = upgrade.args[0] if upgrade.args else len(data)
            if self._state == "tunnel" and self.sink is not None and offset < len(data):
                self.sink.on_tunnel_data(data[offset:])
        except httptools.HttpParserError as error:
            self.reading = False
            self._fail(error)

    def eof_received(self) -> bool | None:
        if self._state == "body" and self._body_until_close:
            # RFC 9112 §6.3 rule 8: a response without framing ends when the connection closes.
            self.is_reusable = False
            self._state = "done"
            if self.sink is not None:
                self.sink.on_response_complete()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.output is not None:
            self.output.drop()
        if self.timer is not None:
            self.timer.close()
        state = self._state
        self._state = "closed"
        self.is_reusable = False
        sink = self.sink
        if sink is None:
            return
        if state == "body" and self._body_until_close:
            sink.on_response_complete()
        elif state in ("head", "body", "tunnel"):
            sink.on_upstream_error(
                ConnectionResetError(str(exc) if exc else "upstream closed the connection"),
                self._got_bytes,
            )

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_writable(False)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_writable(True)

    # -- llhttp callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._state != "head":
            # A second response after the one that was asked for: the upstream is out of step
            # (response desync). Stop here; the connection is closed, never reused.
            raise UnsolicitedResponse("upstream sent a response nobody asked for")
        self._headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status: int = parser.get_status_code()
        headers = self._headers
        content_length: int | None = None
        is_chunked = False
        for name, value in headers:
            if not (_FRAMING_LENGTHS >> len(name)) & 1:
                continue
            lname = lower_name(name)
            if lname == b"content-length":
                content_length = int(value)  # llhttp has validated it (digits, no duplicates)
            elif lname == b"transfer-encoding":
                is_chunked = value.strip().lower().endswith(b"chunked")
        keep_alive: bool = parser.should_keep_alive()
        head = ResponseHead(
            status,
            headers,
            reason=self._reason,
            keep_alive=keep_alive,
            content_length=content_length,
            is_chunked=is_chunked,
        )
        if not keep_alive:
            self.is_reusable = False
        if status == 101:
            self._state = "tunnel"
            self.is_reusable = False
        elif status >= 200:
            self._state = "body"
            if self._skip_body or status in (204, 304):
                self._state = "done"
            elif content_length is None and not is_chunked:
                self._body_until_close = True
                self.is_reusable = False
        sink = self.sink
        if sink is not None:
            sink.on_response_head(head)
            if self._state == "done" and self._skip_body:
                # A HEAD response ends with its head; llhttp would wait for a body.
                sink.on_response_complete()

    def on_body(self, body: bytes) -> None:
        if self._state != "body":
            # Bytes after a HEAD/204/304 response that claimed a length: not HTTP/1.1.
            self.is_reusable = False
            return
        if self.sink is not None:
            self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        state = self._state
        if state == "head":
            return  # a 1xx interim response; the final one follows (RFC 9110 §15.2)
        if state == "done" and self._skip_body:
            return  # already completed at the head
        if state == "tunnel":
            return
        self._state = "done"
        if self.sink is not None:
            self.sink.on_response_complete()

    def _fail(self, error: Exception) -> None:
        sink = self.sink
        got = self._got_bytes
        self.abort()
        if sink is not None:
            sink.on_upstream_error(error, got)

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self._state} served={self.requests_served}>"
