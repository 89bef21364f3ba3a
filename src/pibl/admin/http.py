"""A small HTTP/1.1 server for the admin listener: one request per connection, then close.

It is not the proxy's downstream code on purpose: the admin port must stay usable when the
proxy is saturated, and its needs are tiny (short JSON bodies, no keep-alive, no pipelining,
no streaming). llhttp (``httptools``) parses; strict limits bound what a client may send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast
from urllib.parse import parse_qsl, unquote

import httptools

from pibl.http.framing import REASONS, response_head_bytes

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "REQUEST_TIMEOUT",
    "AdminHttpServer",
    "AdminRequest",
    "AdminResponse",
    "error",
    "json_response",
]

log = logging.getLogger("pibl.admin")

MAX_HEAD_BYTES: Final = 16 * 1024  # request line + headers; the API's requests are tiny
MAX_BODY_BYTES: Final = 64 * 1024  # JSON bodies are a few dozen bytes ({"weight": 3})
REQUEST_TIMEOUT: Final = 10.0  # seconds for a whole request to arrive (slowloris)


@dataclass(slots=True)
class AdminRequest:
    """A parsed request. ``path`` is percent-decoded per segment by the router, not here."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names, last one wins
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        """The body as JSON; raises ``ValueError`` (bad JSON or not UTF-8)."""
        return json.loads(self.body.decode("utf-8")) if self.body else None


@dataclass(slots=True)
class AdminResponse:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def to_bytes(self, *, head_only: bool = False) -> bytes:
        headers = [
            (b"Content-Type", self.content_type.encode("latin-1")),
            (b"Content-Length", b"%d" % len(self.body)),
            (b"Cache-Control", b"no-store"),
            (b"X-Content-Type-Options", b"nosniff"),
            (b"Connection", b"close"),
        ]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers]
        head = response_head_bytes(self.status, headers, REASONS.get(self.status, b"Unknown"))
        return head if head_only else head + self.body


def json_response(data: Any, status: int = 200) -> AdminResponse:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    return AdminResponse(status, body)


def error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> AdminResponse:
    """``{"status": N, "error": "message"}``, the shape of every admin error."""
    response = json_response({"status": status, "error": message}, status)
    response.headers = headers or []
    return response


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


class _TooLarge(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _AdminConnection(asyncio.Protocol):
    """Reads one request, hands it to the handler, writes the answer and closes."""

    def __init__(self, server: AdminHttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_name = b""
        self.head_bytes = 0
        self.body = bytearray()
        self.request: AdminRequest | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.server.connections.add(self)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.server.request_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.request is not None:
            return  # one request per connection: anything after it is ignored
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply(error(400, "protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            # A callback's own exception arrives as the context of a HttpParserCallbackError.
            cause = exc.__context__
            if isinstance(cause, _TooLarge):
                self._reply(error(cause.status, str(cause)))
            else:
                self._reply(error(400, "malformed request"))

    def eof_received(self) -> bool:
        # A client that half-closes after a complete request still gets its answer.
        return self.request is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # -- httptools callbacks ------------------------------------------------------------------
    def _count(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _TooLarge(f"request head over {MAX_HEAD_BYTES} bytes", 431)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise _TooLarge(f"request body over {MAX_BODY_BYTES} bytes", 413)

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > MAX_BODY_BYTES:
            raise _TooLarge(f"request body over {MAX_BODY_BYTES} bytes", 413)
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("ascii", "replace")
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self.request = AdminRequest(method, "")
            self._reply(error(400, "invalid request target"))
            return
        query = url.query.decode("utf-8", "replace") if url.query else ""
        self.request = AdminRequest(
            method,
            url.path.decode("latin-1") if url.path else "/",
            dict(parse_qsl(query, keep_blank_values=True)),
            self.headers,
            bytes(self.body),
        )
        if self.timer is not None:
            self.timer.cancel()
        self.task = asyncio.get_running_loop().create_task(self._handle(self.request))

    # -- answering ----------------------------------------------------------------------------
    async def _handle(self, request: AdminRequest) -> None:
        try:
            response = await self.server.handler(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("admin API error on %s %s", request.method, request.path)
            response = error(500, "internal error")
        self._reply(response, head_only=request.method == "HEAD")

    def _reply(self, response: AdminResponse, *, head_only: bool = False) -> None:
        if self.request is None:
            self.request = AdminRequest("", "")  # stop parsing whatever follows
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(response.to_bytes(head_only=head_only))
            transport.close()

    def _timed_out(self) -> None:
        self.timer = None
        if self.request is None:
            self._reply(error(408, "request not received in time"))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def split_path(path: str) -> list[str]:
    """``/api/upstreams/app/servers/%5B%3A%3A1%5D%3A80/drain`` → its decoded segments."""
    return [unquote(segment) for segment in path.strip("/").split("/")] if path != "/" else []


class AdminHttpServer:
    """Listens on one address and answers each request with ``handler``."""

    def __init__(self, handler: Handler, *, request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.handler = handler
        self.request_timeout = request_timeout
        self.connections: set[_AdminConnection] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _AdminConnection(self), host, port, reuse_address=True
        )
        bound: tuple[str, int] = self.server.sockets[0].getsockname()[:2]
        return bound

    async def aclose(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        server.close()
        for conn in list(self.connections):
            if conn.task is not None and not conn.task.done():
                conn.task.cancel()
            conn.abort()
        with contextlib.suppress(Exception):
            await server.wait_closed()
