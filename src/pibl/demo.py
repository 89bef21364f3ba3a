"""``pibl demo``: three small backends and PIBL in front of them, to see balancing at work."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from typing import cast

import httptools

from pibl.balancer.upstream import Address
from pibl.http.framing import response_head_bytes


class DemoBackend(asyncio.Protocol):
    """A tiny HTTP/1.1 origin that says who it is; keep-alive, GET/HEAD/POST."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body_size = 0
        self.served = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        method = self.parser.get_method().decode()
        path = self.url.decode("latin-1")
        payload = {
            "backend": self.name,
            "method": method,
            "path": path,
            "request_body_bytes": self.body_size,
        }
        body = (json.dumps(payload) + "\n").encode()
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"X-Backend", self.name.encode()),
        ]
        if not path.startswith("/static/"):
            # Dynamic pages are never reused; /static/ carries no freshness information, so the
            # demo's default_ttl (60 s, the original design's fixed lifetime) applies to it.
            headers.append((b"Cache-Control", b"no-store"))
        if not self.parser.should_keep_alive():
            headers.append((b"Connection", b"close"))
        self.transport.write(response_head_bytes(200, headers))
        if method != "HEAD":
            self.transport.write(body)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def start_demo_backends(count: int = 3, host: str = "127.0.0.1") -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    servers = []
    for index in range(count):
        server = await loop.create_server(partial(DemoBackend, f"backend-{index + 1}"), host, 0)
        servers.append(server)
    return servers


def server_address(server: asyncio.Server) -> Address:
    host, port = server.sockets[0].getsockname()[:2]
    return Address(host, port)
