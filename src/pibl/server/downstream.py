"""One downstream (client) connection: parse requests with llhttp, queue them, answer in order.

The protocol object owns the socket, the parser, the timers and flow control; what to do with
a request is the pipeline's business (``proxy.pipeline``). One serving coroutine per connection
runs while requests are queued, so pipelined requests are answered strictly in order (RFC 9112
§9.3.2); it starts at once when a read has been parsed and, when it has to wait, is resumed by
the future it waits on (``Serving``) rather than by an asyncio Task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from pibl.clock import TurnClock
from pibl.deadline import Deadline
from pibl.errors import ProtocolError
from pibl.http.framing import error_response
from pibl.http.head import Headers, RequestHead
from pibl.http.validate import validate_request_head
from pibl.writebatch import HeldOutput

if TYPE_CHECKING:
    from pibl.config import ServerSettings
    from pibl.server.app import ProxyApp

log: Final = logging.getLogger("pibl.server")

# A request body is buffered up to this much while its request waits its turn or its upstream
# connection is being opened; beyond it the client socket stops being read (back-pressure).
BODY_BUFFER_BYTES: Final = 256 * 1024
# Pipelined requests queued beyond this pause reading (nginx and HAProxy bound them too).
MAX_PIPELINED: Final = 16


class RequestCycle:
    """One request on a downstream connection: its head, its body as it arrives, its outcome."""

    __slots__ = (
        "_on_body",
        "_on_end",
        "body_chunks",
        "body_done",
        "body_received",
        "buffered",
        "error",
        "head",
        "response_started",
        "start_time",
    )

    def __init__(
        self, head: RequestHead | None, start_time: float, error: ProtocolError | None = None
    ) -> None:
        self.head = head
        self.error = error
        self.response_started = False
        self.start_time = start_time  # time.time() when the head was read (wall clock)
        self.body_chunks: list[bytes] = []
        self.buffered = 0
        self.body_received = 0
        self.body_done = head is None or not head.has_body
        self._on_body: Callable[[bytes], None] | None = None
        self._on_end: Callable[[], None] | None = None

    def feed(self, data: bytes) -> None:
        self.body_received += len(data)
        if self._on_body is not None:
            self._on_body(data)
        else:
            self.body_chunks.append(data)
            self.buffered += len(data)

    def end(self) -> None:
        self.body_done = True
        if self._on_end is not None:
            self._on_end()

    def attach(self, on_body: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        """Stream the body to a consumer: first what was buffered, then each chunk as it comes."""
        chunks, self.body_chunks, self.buffered = self.body_chunks, [], 0
        for data in chunks:
            on_body(data)
        if self.body_done:
            on_end()
            return
        self._on_body = on_body
        self._on_end = on_end

    def detach(self) -> None:
        self._on_body = None
        self._on_end = None


class DownstreamConnection(asyncio.Protocol):
    def __init__(self, app: ProxyApp) -> None:
        self.app = app
        self.limits = app.limits
        # The limits read on every request, as plain fields (ServerSettings is an interpreted
        # dataclass: each read would be a generic attribute lookup).
        self._max_request_line = self.limits.max_request_line
        self._max_header_size = self.limits.max_header_size
        self._max_header_count = self.limits.max_header_count
        self._max_body_size = self.limits.max_body_size
        self._keepalive_timeout = self.limits.keepalive_timeout
        self._clock: TurnClock = app.clock  # the request's start time
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.client_addr = ""
        self.scheme = "http"  # "https" on a TLS listener
        self.is_trusted = False
        # Answers each request instead of the proxy pipeline (a listener's redirect_http).
        self.handler: Callable[[DownstreamConnection, RequestCycle], Awaitable[bool]] | None = None
        parser = httptools.HttpRequestParser(self)
        # Only these methods of the parser are used, bound once: a call by name on the Cython
        # parser looks the method up on its type.
        self._feed_data: Callable[[bytes], None] = parser.feed_data
        self._get_method: Callable[[], bytes] = parser.get_method
        self._get_http_version: Callable[[], str] = parser.get_http_version
        self._should_keep_alive: Callable[[], bool] = parser.should_keep_alive
        self.queue: deque[RequestCycle] = deque()
        self.receiving: RequestCycle | None = None
        # What is answering requests now (None when nothing is queued): the serving coroutine's
        # driver, or a Task when the pipeline is not eager (see ``_start_serving``).
        self.task: Serving | asyncio.Task[None] | None = None
        self._serving: Serving | None = None  # kept, parked, between requests
        self._serve_pending = False  # a request was queued by this read: serve once it is parsed
        self.is_closed = False
        self.is_writable = True
        self.on_writable: Callable[[bool], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.reading_paused = False
        self.stop_parsing = False
        self.tunnel_sink: Callable[[bytes], None] | None = None
        self.tunnel_eof: Callable[[], None] | None = None
        self.upgrade_leftover = b""
        # The header, keep-alive and body timeouts: one at a time, moved on every request.
        self._deadline = Deadline(self.loop, _shortest_timeout(self.limits))
        self._write_timer: asyncio.TimerHandle | None = None
        self._held: bytes | None = None  # bytes of a connection waiting for admission
        self._head_bytes = 0
        self._in_head = False
        self._head_timed = False  # the head being read runs under client_header_timeout
        self._url = b""
        # The read being parsed while it starts between two requests, and the read in which the
        # request line being parsed starts (see _http_version).
        self._chunk: bytes | None = None
        self._line_chunk: bytes | None = None
        self._headers: Headers = []
        self._header_bytes = 0
        self._header_count = 0
        self._stalled_bytes = 0  # fed since the body last made progress (chunk metadata, trailers)
        self.output: HeldOutput | None = None  # every write, held for the end of the turn

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it.
        self.transport = cast(asyncio.Transport, transport)
        self.output = HeldOutput(self.transport, self.app.write_batch)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip = str(peer[0])
            self.client_addr = f"{peer[0]}:{peer[1]}"
        self.is_trusted = self.app.is_trusted(self.client_ip)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection from %s", self.client_addr)
        app = self.app
        if app.max_connections and len(app.connections) >= app.max_connections:
            # Over the listener's limit: the connection waits, unread, until a slot frees
            # (HAProxy maxconn); those already established keep being served.
            self.transport.pause_reading()
            self._held = b""
            app.waiting.append(self)
            return
        self.admit()

    def admit(self) -> None:
        """Start serving this connection (at once, or when a slot under the limit frees)."""
        if self.is_closed or self.transport is None:
            return
        self.app.connections.add(self)
        self._arm(self.limits.client_header_timeout, self._on_head_timeout)
        held, self._held = self._held, None
        if held is not None:
            if not self.reading_paused:
                self.transport.resume_reading()
            if held:
                self.data_received(held)

    def data_received(self, data: bytes) -> None:
        if self._held is not None:
            # Not admitted yet (over max_connections): keep what already arrived, read no more.
            self._held += data
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if self.tunnel_sink is not None:
            self.tunnel_sink(data)
            return
        if self.stop_parsing:
            return
        # httptools accumulates a header value without bound: count the bytes fed while a head
        # is incomplete (the precise per-field limits are checked in on_header).
        self._head_bytes = self._head_bytes + len(data) if self._in_head else len(data)
        self._stalled_bytes += len(data)
        self._chunk = data if not self._in_head and self.receiving is None else None
        try:
            self._feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            # Bytes after an Upgrade request belong to the new protocol, if the upstream agrees.
            self.upgrade_leftover = data[offset:]
            self.stop_parsing = True
            self._pause_reading()
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, ProtocolError):
                self._reject(cause)
            else:
                log.exception("unexpected error while parsing a request", exc_info=cause)
                self._reject(ProtocolError("bad request"))
        except httptools.HttpParserError as error:
            self._reject(ProtocolError(_parser_message(error)))
        else:
            if self._in_head and self._head_bytes > self.app.max_head_bytes:
                self._reject(ProtocolError("request head too large", 431))
            elif self.receiving is not None and self._stalled_bytes > self.app.max_head_bytes:
                # Bytes that are neither head nor body: endless chunk extensions or trailers,
                # which llhttp would otherwise buffer without bound.
                self._reject(ProtocolError("request trailer section too large", 431))
        self._chunk = self._line_chunk = None
        if self._in_head and not self._head_timed and self.task is None and not self.queue:
            # A head begun in this read and not complete at its end: from now on it has
            # client_header_timeout to arrive. (A head read whole, nearly every one, never
            # needs the timer.) Set once per head, so trickling bytes never extend it.
            self._time_head()
        if self._serve_pending:
            self._serve_pending = False
            if self.task is None and self.queue:
                self._start_serving()

    def eof_received(self) -> bool | None:
        if self.tunnel_eof is not None:
            # Pass the half-close through the tunnel; the upstream's close ends it. A TLS
            # transport cannot stay half-open: it closes (and the tunnel with it).
            self.tunnel_eof()
            return self.transport is not None and self.transport.can_write_eof()
        # A half-close ends the request stream; answer what was received, then close.
        self.stop_parsing = True
        if self.receiving is not None and not self.receiving.body_done:
            return None  # the body is truncated: close now
        return bool(self.queue)

    def connection_lost(self, exc: Exception | None) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection from %s closed%s", self.client_addr, f": {exc}" if exc else "")
        self.is_closed = True
        if self.output is not None:
            self.output.drop()
        self._deadline.close()
        if self._write_timer is not None:
            self._write_timer.cancel()
        app = self.app
        if self in app.connections:
            app.connections.discard(self)
            while app.waiting and len(app.connections) < (app.max_connections or 1 << 62):
                app.waiting.popleft().admit()
        else:
            with contextlib.suppress(ValueError):
                app.waiting.remove(self)
        if self.on_lost is not None:
            self.on_lost()
        serving = self._serving
        if serving is not None and self.task is None:
            serving.close()  # parked: nothing more will come to resume it

    def pause_writing(self) -> None:
        self.is_writable = False
        if self.on_writable is not None:
            self.on_writable(False)
        self._write_timer = self.loop.call_later(self.limits.send_timeout, self._on_write_timeout)

    def resume_writing(self) -> None:
        self.is_writable = True
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self.on_writable is not None:
            self.on_writable(True)

    # -- llhttp callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        # Only the first request of a read that began between requests starts at its first
        # byte (llhttp skips CR and LF before a request line; _http_version checks for them).
        self._line_chunk = self._chunk
        self._chunk = None
        self._in_head = True
        self._head_timed = False  # armed after this read if the head is still incomplete
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_request_line:
            raise ProtocolError("request line too long", 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Each field costs its bytes plus ": " and CRLF on the wire.
        self._header_bytes += len(name) + len(value) + 4
        self._header_count += 1
        if (
            self._header_bytes > self._max_header_size
            or self._header_count > self._max_header_count
        ):
            raise ProtocolError("request header fields too large", 431)
        if self._in_head:
            self._headers.append((name, value))
        # else: a trailer field (RFC 9112 §7.1.2). PIBL re-frames bodies and does not forward
        # trailers; above all they must never join the head that was already validated.

    def on_headers_complete(self) -> None:
        self._in_head = False
        method = self._get_method().decode("ascii")
        head = validate_request_head(
            method,
            self._url,
            self._http_version(method),
            self._headers,
            keep_alive=self._should_keep_alive(),
            max_body_size=self._max_body_size,
        )
        head.client_ip = self.client_ip
        head.scheme = self.scheme
        cycle = RequestCycle(head, self._clock.now())
        self.receiving = cycle
        if self.task is None and not self.queue:
            self._cancel_timer()
        self.queue.append(cycle)
        if head.has_body:
            self._arm(self.limits.client_body_timeout, self._on_body_timeout)
        if len(self.queue) > MAX_PIPELINED:
            self._pause_reading()
        if self.task is None:
            # Served when data_received has parsed this read (not from inside the parser).
            self._serve_pending = True

    def _http_version(self, method: str) -> str:
        """The request's HTTP version: read from the request line when this read holds all of
        it from its first byte, else ``get_http_version()`` (which formats a new string, a
        twentieth of a cache hit's CPU time).

        llhttp has accepted the line as ``method SP target SP HTTP/d.d CRLF``, the method as
        on the wire, and nothing in it before the CR is a CR. So when the byte where the line
        ends with single spaces is a CR, the eight bytes before it are the version.
        """
        chunk = self._line_chunk
        self._line_chunk = None
        if chunk is not None and chunk[0] != 13 and chunk[0] != 10:
            at = len(method) + len(self._url) + 2  # where "HTTP/d.d" starts
            if at + 8 < len(chunk) and chunk[at + 8] == 13 and chunk[at + 5] == 49:  # "1."
                minor = chunk[at + 7]
                if minor == 49:
                    return "1.1"
                if minor == 48:
                    return "1.0"
        return self._get_http_version()

    def on_body(self, body: bytes) -> None:
        self._stalled_bytes = 0
        cycle = self.receiving
        if cycle is None:
            return
        cycle.feed(body)
        max_body = self._max_body_size
        if max_body and cycle.body_received > max_body:
            raise ProtocolError("request body too large", 413)
        if cycle.buffered > BODY_BUFFER_BYTES:
            self._pause_reading()
        if self._deadline.is_set:
            # client_body_timeout runs between two reads of the body (nginx), not over all of it.
            self._deadline.set(self.limits.client_body_timeout, self._on_body_timeout)

    def on_message_complete(self) -> None:
        self._stalled_bytes = 0
        cycle = self.receiving
        self.receiving = None
        if cycle is not None and cycle.head is not None and cycle.head.has_body:
            self._cancel_timer()
        if cycle is not None:
            cycle.end()

    # -- serving -------------------------------------------------------------------------------
    def _start_serving(self) -> None:
        """Answer what is queued, starting at once, in this callback.

        One serving coroutine per connection (``_serve_forever``) answers every request: it
        runs from here up to its first wait, is resumed by the future it waits on
        (``Serving``), and parks when the queue is empty until the next request resumes it.
        A cache hit is thus answered without a task, a future or even a new coroutine, and a
        proxied request leaves for the upstream in this same callback. There is never a
        current task on the way, so nothing may need one (``asyncio.timeout`` does):
        ``Pipeline.eager`` says whether that holds, and a Task per busy period serves when it
        does not (Redis storage).
        """
        if self.handler is None and not self.app.pipeline.eager:
            self.task = self.loop.create_task(self._serve())
            return
        serving = self._serving
        if serving is None:
            serving = Serving(self._serve_forever(), self.loop, self._on_serve_crash)
            self._serving = serving
        self.task = serving
        serving.step()

    def _on_serve_crash(self) -> None:
        log.exception("unexpected error while serving %s", self.client_addr)
        self.abort()

    def served(self) -> asyncio.Future[None] | None:
        """A future that completes when the requests being served now are answered; None when
        nothing is being served."""
        task = self.task
        if task is None or isinstance(task, asyncio.Task):
            return task
        return task.idle()

    async def _serve_forever(self) -> None:
        try:
            while not self.is_closed:
                # The queue is served here, not in a coroutine of its own: one coroutine object
                # per request less (a request's ``handle`` is the only one made).
                while self.queue and not self.is_closed:
                    cycle = self.queue[0]
                    handler = self.handler
                    if handler is None:
                        # A direct call of the compiled method: no bound method, no parsing of
                        # arguments.
                        keep_open = await self.app.pipeline.handle(self, cycle)
                    else:
                        keep_open = await handler(self, cycle)
                    if not self._answered(keep_open):
                        return
                self._drained()
                if self.is_closed:
                    return
                self.task = None
                await PARK  # until _start_serving resumes it
        finally:
            self.task = None
            self._serving = None

    async def _serve(self) -> None:
        """The Task that serves a busy period when the pipeline is not eager: the loop of
        ``_serve_forever`` without parking (kept inline there, where it saves a coroutine
        per busy period)."""
        try:
            while self.queue and not self.is_closed:
                cycle = self.queue[0]
                handler = self.handler
                if handler is None:
                    keep_open = await self.app.pipeline.handle(self, cycle)
                else:
                    keep_open = await handler(self, cycle)
                if not self._answered(keep_open):
                    return
            self._drained()
        finally:
            self.task = None

    def _answered(self, keep_open: bool) -> bool:
        """The request at the head of the queue has its answer: returns whether to go on."""
        self.queue.popleft()
        if not keep_open or self.is_closed:
            self.close()
            return False
        if self.reading_paused and len(self.queue) <= MAX_PIPELINED:
            self.resume_reading()
        return True

    def _drained(self) -> None:
        """Everything queued was answered: close, or time what comes next."""
        if self.stop_parsing and self.tunnel_sink is None:
            self.close()  # the client half-closed and everything was answered
        elif not self.is_closed:
            if self._in_head:
                self._time_head()  # the next request's head began arriving meanwhile
            else:
                self._arm(self._keepalive_timeout, self._on_idle_timeout)

    def resume_with(self, future: asyncio.Future[None]) -> None:
        """Complete ``future`` and, if this connection's serving coroutine waits on it, run the
        coroutine on at once instead of on the loop's next turn (a future's callbacks are
        scheduled, not called): a proxied request ends in the callback that read its
        response's end. The rest of the request, and maybe the next ones, run before this
        returns: call it last, from a protocol callback whose own work is done (an upstream
        read fully parsed), never from inside the parser or the pipeline."""
        serving = self.task
        if isinstance(serving, Serving):
            serving.resume_with(future)
        else:
            future.set_result(None)

    def write(self, data: bytes) -> None:
        """Send ``data`` once this turn's callbacks have run (``pibl.writebatch``)."""
        self.writelines([data])

    def writelines(self, data: list[bytes]) -> None:
        """As ``write``; takes ``data`` over (the caller must not change the list)."""
        output = self.output
        if output is not None and not self.is_closed:
            output.writelines(data)

    def close(self) -> None:
        if self.output is not None and not self.is_closed:
            self.output.flush()  # what was written goes out before the FIN
        self.is_closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.is_closed = True
        if self.output is not None:
            self.output.drop()
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def pause_reading(self) -> None:
        self._pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.is_closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def _reject(self, error: ProtocolError) -> None:
        """Reject-and-close (nginx): answer the error after the requests before it, read no more."""
        self.stop_parsing = True
        self._pause_reading()
        receiving = self.receiving
        if receiving is not None and receiving.head is not None and not receiving.body_done:
            # The body of a request being forwarded broke (bad chunk, too large): that request
            # fails with this error and nothing after it is read.
            receiving.error = error
            receiving.end()
            self.receiving = None
            if receiving in self.queue:
                return
        self.queue.append(RequestCycle(None, self._clock.now(), error))
        if self.task is None:
            self._start_serving()

    # -- timers --------------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        if delay > 0:
            self._deadline.set(delay, callback)
        else:
            self._deadline.clear()

    def _cancel_timer(self) -> None:
        self._deadline.clear()

    def _time_head(self) -> None:
        self._head_timed = True
        self._arm(self.limits.client_header_timeout, self._on_head_timeout)

    def _on_head_timeout(self) -> None:
        if self.task is None and not self.queue:
            if self._in_head:
                self.write(error_response(408, "request head not received in time"))
            self.close()
        else:
            self.stop_parsing = True  # a pipelined head is trickling: finish the others, close

    def _on_idle_timeout(self) -> None:
        if self.task is None and not self.queue and not self._in_head:
            self.close()

    def _on_body_timeout(self) -> None:
        receiving = self.receiving
        if receiving is not None and not receiving.body_done:
            self._reject(ProtocolError("request body not received in time", 408))

    def _on_write_timeout(self) -> None:
        self._write_timer = None
        if not self.is_writable:
            log.info("client %s stopped reading its response; closing", self.client_addr)
            self.abort()


class Serving:
    """Drives a connection's serving coroutine without an asyncio Task.

    A Task per request was a measurable share of a proxied request (its creation, the
    registration in asyncio's weak set of all tasks, a loop iteration for its first step, its
    completion), and so was a coroutine per request: the ``StopIteration`` that ends one costs a
    traceback entry when it reaches compiled code. Here one coroutine lives as long as its
    connection and is in one of three states:

    - running, inside ``step``;
    - waiting on an asyncio future (an exchange's ``done``, a connect, a disk read): the driver
      does what a Task does with it, it adds itself as the future's done-callback and sends
      into the coroutine when called, and ``Future.__await__`` returns the result or raises;
    - parked on ``PARK`` while no request is queued, until ``step`` is called again.

    There is no current task while it runs: nothing in the request path may need one
    (``Pipeline.eager``; ``deadline.within`` replaces ``asyncio.timeout``). It answers what the
    server asks of a Task: ``done()``, ``cancel()`` (the future being waited on is cancelled, as
    Task.cancel does) and ``idle()``, a future for the next park or the end.
    """

    __slots__ = (
        "_coro",
        "_done",
        "_idle",
        "_loop",
        "_on_crash",
        "_send",
        "_throw",
        "_waiting",
        "parked",
    )

    def __init__(
        self,
        coro: Coroutine[Any, Any, None],
        loop: asyncio.AbstractEventLoop,
        on_crash: Callable[[], None],
    ) -> None:
        self._coro = coro
        self._send = coro.send  # bound once: a call by name looks the method up each time
        self._loop = loop
        self._on_crash = on_crash  # called, inside an except block, if the coroutine raises
        self._waiting: asyncio.Future[Any] | None = None
        self._throw: BaseException | None = None  # thrown in at the next step
        self._done = False
        self._idle: asyncio.Future[None] | None = None
        self.parked = False

    def step(self) -> bool:
        """Run the coroutine to its next wait or park; returns whether it has not ended."""
        self.parked = False
        coro = self._coro
        try:
            error = self._throw
            if error is not None:
                self._throw = None
                yielded = coro.throw(error)
            else:
                yielded = self._send(None)
        except StopIteration:
            return self._end()
        except asyncio.CancelledError:
            return self._end()
        except Exception:
            self._on_crash()
            return self._end()
        if yielded is PARK:
            self.parked = True
            self._wake_idle()
        elif getattr(yielded, "_asyncio_future_blocking", None):
            # An asyncio future (Future.__await__ yields itself with this flag set).
            future = cast("asyncio.Future[Any]", yielded)
            future._asyncio_future_blocking = False
            self._waiting = future
            future.add_done_callback(self._wakeup)
        else:
            # A bare yield (asyncio.sleep(0)) asks for one turn of the loop; anything else is
            # a bug, raised inside the coroutine as a Task would.
            if yielded is not None:
                self._throw = RuntimeError(f"request coroutine yielded {yielded!r}")
            self._loop.call_soon(self._resume)
        return True

    def _wakeup(self, future: asyncio.Future[Any]) -> None:
        self._waiting = None
        self.step()

    def resume_with(self, future: asyncio.Future[None]) -> None:
        """Complete ``future`` and, if it is what the coroutine waits on, step it now."""
        if self._waiting is future and future.remove_done_callback(self._wakeup) == 1:
            future.set_result(None)
            self._waiting = None
            self.step()
        else:
            future.set_result(None)

    def _resume(self) -> None:
        self.step()

    def _end(self) -> bool:
        self._done = True
        self.parked = False
        self._waiting = None
        self._wake_idle()
        return False

    def _wake_idle(self) -> None:
        idle = self._idle
        if idle is not None:
            self._idle = None
            if not idle.done():
                idle.set_result(None)

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        if self._done:
            return False
        if self.parked:
            self._throw = asyncio.CancelledError()
            self.step()
            return True
        waiting = self._waiting
        if waiting is None or not waiting.cancel():
            self._throw = asyncio.CancelledError()  # its wake-up is already on its way
        return True

    def close(self) -> None:
        """End a parked coroutine (its connection is gone): ``finally`` blocks run."""
        if self._done:
            return
        try:
            self._coro.close()
        except Exception:
            self._on_crash()
        self._end()

    def idle(self) -> asyncio.Future[None]:
        """A future that completes when the coroutine next parks, or ends."""
        idle = self._idle
        if idle is None:
            idle = self._idle = self._loop.create_future()
            if self._done or self.parked:
                self._idle = None
                idle.set_result(None)
        return idle

    def __await__(self) -> Generator[Any, None, None]:
        return self.idle().__await__()


class _Park:
    """What the serving coroutine awaits while nothing is queued: it yields itself to its
    ``Serving``, which keeps the coroutine, unscheduled, until the next request steps it."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        yield self


PARK: Final = _Park()


def _shortest_timeout(limits: ServerSettings) -> float:
    timeouts = (
        limits.client_header_timeout,
        limits.client_body_timeout,
        limits.keepalive_timeout,
    )
    return min((t for t in timeouts if t > 0), default=0.0)


def _parser_message(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text.replace("\n", " ")[:200]
