"""A bare uvloop + httptools proxy: the floor a Python proxy starts from, as a yardstick.

It does only what a request needs to be answered: parse the request with httptools, pick a
backend round-robin, send the request over a kept-alive connection to it, parse the response and
pass its bytes back unchanged. With ``--cache`` it keeps each complete response to a GET in a
dict by target (marked ``X-Cache-Status: HIT``, as nginx marks its hits) and answers repeats
from it, whatever the response's caching fields say. There is no access log, no header rules, no
validation beyond the parser's, no timeouts, no limits, and no error handling beyond closing
the connection: it is not a proxy to run, only the cost of the event loop, the parser and the
socket calls that any proxy built on them pays. ``bench/run.py`` measures it beside PIBL.

    python bench/bare.py --listen 127.0.0.1:8080 --backend 127.0.0.1:8081 [--cache]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from collections import deque
from collections.abc import Iterator

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    """One kept-alive connection to a backend, carrying one response at a time."""

    def __init__(self, pool: deque[Upstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.kept: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.kept is not None:
            self.kept.append(data)
        if self.client is not None and not self.client.closed:
            self.client.transport.write(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        reusable = self.parser.should_keep_alive()
        if not reusable:
            self.close()
        if client is not None:
            client.response_done(self, self.kept, reusable)
        self.kept = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.transport.close()
            self.client = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Client(asyncio.Protocol):
    """One client connection; requests are answered one after another."""

    def __init__(self, proxy: BareProxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.raw: list[bytes] = []
        self.queue: deque[tuple[bytes, bytes, bytes, bool]] = deque()
        self.busy = False
        self.url = b""
        self.pending_url = b""
        self.pending_keep_alive = True
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.raw.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        # The request's bytes as they came (wrk sends whole requests, one per read).
        request = b"".join(self.raw)
        self.raw.clear()
        method = self.parser.get_method()
        self.queue.append((method, self.url, request, self.parser.should_keep_alive()))
        if not self.busy:
            self.next()

    def next(self) -> None:
        while self.queue:
            method, url, request, keep_alive = self.queue.popleft()
            cache = self.proxy.cache
            if cache is not None and method == b"GET":
                stored = cache.get(url)
                if stored is not None:
                    self.transport.write(stored)
                    if not keep_alive:
                        self.close()
                        return
                    continue
            self.busy = True
            self.pending_keep_alive = keep_alive
            self.proxy.forward(self, method, url, request)
            return
        self.busy = False

    def close(self) -> None:
        self.queue.clear()
        self.transport.close()

    def response_done(self, upstream: Upstream, kept: list[bytes] | None, reusable: bool) -> None:
        if reusable:  # else the upstream closed, and the stored bytes would say close to all
            if kept is not None and self.proxy.cache is not None:
                # Marked as nginx marks its hits, so that bench/run.py can tell a hit.
                response = b"".join(kept)
                line_end = response.index(b"\r\n") + 2
                marked = response[:line_end] + b"X-Cache-Status: HIT\r\n" + response[line_end:]
                self.proxy.cache[self.pending_url] = marked
            upstream.pool.append(upstream)
        if not reusable or not self.pending_keep_alive:
            self.close()
            return
        self.next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.queue.clear()


class BareProxy:
    def __init__(self, backends: list[tuple[str, int]], cache: bool) -> None:
        # Round-robin per request, each backend with its own idle connections (LIFO).
        self.backends: Iterator[tuple[tuple[str, int], deque[Upstream]]] = itertools.cycle(
            [(backend, deque()) for backend in backends]
        )
        self.cache: dict[bytes, bytes] | None = {} if cache else None
        self.connecting: set[asyncio.Task[None]] = set()

    def forward(self, client: Client, method: bytes, url: bytes, request: bytes) -> None:
        client.pending_url = url
        backend, idle = next(self.backends)
        if idle:
            self._send(idle.pop(), client, method, request)
        else:
            connect = self._connect(backend, idle, client, method, request)
            task = asyncio.get_running_loop().create_task(connect)
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    async def _connect(
        self,
        backend: tuple[str, int],
        idle: deque[Upstream],
        client: Client,
        method: bytes,
        request: bytes,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: Upstream(idle), *backend)
        except OSError:
            client.transport.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            client.transport.close()
            return
        self._send(upstream, client, method, request)

    def _send(self, upstream: Upstream, client: Client, method: bytes, request: bytes) -> None:
        upstream.client = client
        if self.cache is not None and method == b"GET":
            upstream.kept = []
        assert upstream.transport is not None
        upstream.transport.write(request)


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(listen: tuple[str, int], backends: list[tuple[str, int]], cache: bool) -> None:
    proxy = BareProxy(backends, cache)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(proxy), *listen, backlog=4096)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    host, port = server.sockets[0].getsockname()[:2]  # port 0: the one the system chose
    print(f"bare proxy listening on {host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=address, required=True)
    parser.add_argument("--backend", type=address, action="append", required=True)
    parser.add_argument("--cache", action="store_true", help="answer repeated GETs from memory")
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.backend, args.cache))


if __name__ == "__main__":
    main()
