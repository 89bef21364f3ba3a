"""WebSocket (and any Upgrade) through PIBL: the ``websockets`` library on both ends, raw
sockets where the tunnel's flow control is measured. After the backend's 101 the connection is a
tunnel: bytes both ways with back-pressure, until either side closes or it idles too long."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK

from pibl.balancer.upstream import Address
from pibl.server.app import ProxyApp
from tests.support import Client, make_settings, running_proxy, wait_until

MIB = 1024 * 1024
# Deterministic peers: no keepalive pings (they would count as tunnel activity), no deflate.
WS_OPTIONS: dict[str, Any] = {"max_size": None, "ping_interval": None, "compression": None}

WsHandler = Callable[[ServerConnection], Awaitable[None]]


async def echo(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            await ws.send(message)


@contextlib.asynccontextmanager
async def ws_backend(handler: WsHandler = echo) -> AsyncIterator[Address]:
    async with serve(handler, "127.0.0.1", 0, backlog=2048, **WS_OPTIONS) as server:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        yield Address(host, port)


@contextlib.asynccontextmanager
async def proxied(handler: WsHandler = echo, **server: Any) -> AsyncIterator[tuple[ProxyApp, str]]:
    """A websockets backend behind PIBL; yields the app and the ws:// URL to use."""
    async with ws_backend(handler) as backend:
        settings = make_settings([backend], server=server)
        async with running_proxy(settings) as app:
            yield app, f"ws://{app.addresses[0]}"


def ws_connect(url: str, **kw: Any) -> Any:
    return connect(url, open_timeout=20, close_timeout=5, **{**WS_OPTIONS, **kw})


class Watched:
    """What a backend handler saw of one socket's end."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()
        self.clean = False  # the iteration ended with a close handshake, not an error
        self.close_code: int | None = None  # from the close frame received; None without one
        self.headers: dict[str, str] = {}

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.headers = {k.lower(): v for k, v in ws.request.headers.raw_items()}
        try:
            async for message in ws:
                await ws.send(message)
            self.clean = True
        except ConnectionClosedError:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else None
            self.ended.set()


# --------------------------------------------------------------------------- echo


async def test_echo_round_trips_and_tunnel_counters() -> None:
    watched = Watched()
    async with proxied(watched.handler) as (app, url):
        async with ws_connect(f"{url}/chat?room=1") as ws:
            for message in ["hello", b"\x00\x01binary", "é" * 1000, b""]:
                await ws.send(message)
                assert await ws.recv() == message
            assert (app.tunnels_open, app.tunnels_total) == (1, 1)
            assert ws.response is not None
            assert ws.response.headers["Via"] == "1.1 pibl"
        await asyncio.wait_for(watched.ended.wait(), 5)
        await wait_until(lambda: app.tunnels_open == 0)
        assert app.tunnels_total == 1
        assert (watched.clean, watched.close_code) == (True, 1000)
    headers = watched.headers
    assert headers["upgrade"] == "websocket"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["via"] == "1.1 pibl"


@pytest.mark.slow
async def test_20_mib_message_each_way() -> None:
    async def answer(ws: ServerConnection) -> None:
        message = await ws.recv()
        assert isinstance(message, bytes)
        await ws.send(hashlib.sha256(message).hexdigest())
        await ws.send(message[::-1])
        await ws.wait_closed()

    up = os.urandom(20 * MIB)
    async with proxied(answer) as (_, url), ws_connect(url) as ws:
        await ws.send(up)
        assert await ws.recv() == hashlib.sha256(up).hexdigest()
        down = await ws.recv()
        assert len(down) == 20 * MIB
        assert down == up[::-1]


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


@pytest.mark.slow
async def test_1000_concurrent_sockets() -> None:
    count = 1000
    # Four descriptors per socket in this process: client, PIBL's two sides, the backend's.
    _raise_fd_limit(4 * count + 512)
    all_open = asyncio.Event()
    opened = 0
    open_at_peak = 0

    async def one(url: str, i: int) -> None:
        nonlocal opened, open_at_peak
        async with ws_connect(f"{url}/{i}") as ws:
            opened += 1
            if opened == count:
                open_at_peak = app.tunnels_open
                all_open.set()
            await all_open.wait()
            await ws.send(f"message {i}")
            assert await ws.recv() == f"message {i}"

    started = time.monotonic()
    async with proxied() as (app, url):
        async with asyncio.timeout(60):
            await asyncio.gather(*(one(url, i) for i in range(count)))
        await wait_until(lambda: app.tunnels_open == 0, timeout=10)
        assert app.tunnels_total == count
        assert not app.connections
    assert open_at_peak == count
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- ends


async def test_idle_tunnel_is_closed_on_both_sides() -> None:
    watched = Watched()
    async with proxied(watched.handler, tunnel_idle_timeout="0.5s") as (app, url):
        async with ws_connect(url) as ws:
            # Traffic keeps the tunnel open well past the timeout...
            for i in range(8):
                await ws.send(f"tick {i}")
                assert await ws.recv() == f"tick {i}"
                idle_from = time.monotonic()
                await asyncio.sleep(0.1)
            # ...and silence ends it: neither side sent a close frame, PIBL closed both.
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert time.monotonic() - idle_from >= 0.45
            assert ws.close_code == 1006
        await asyncio.wait_for(watched.ended.wait(), 5)
        assert (watched.clean, watched.close_code) == (False, None)
        await wait_until(lambda: app.tunnels_open == 0)
        assert not app.connections


async def test_client_close_reaches_the_backend() -> None:
    watched = Watched()
    async with proxied(watched.handler) as (app, url):
        async with ws_connect(url) as ws:
            await ws.send("x")
            await ws.recv()
        await asyncio.wait_for(watched.ended.wait(), 5)
        assert (watched.clean, watched.close_code) == (True, 1000)
        await wait_until(lambda: app.tunnels_open == 0)


async def test_client_dropping_the_connection_closes_the_backend_side() -> None:
    watched = Watched()
    async with proxied(watched.handler) as (app, url):
        ws: ClientConnection = await ws_connect(url)
        await ws.send("x")
        await ws.recv()
        ws.transport.abort()  # no close frame: only the TCP connection ends
        await asyncio.wait_for(watched.ended.wait(), 5)
        assert (watched.clean, watched.close_code) == (False, None)
        await wait_until(lambda: app.tunnels_open == 0)


async def test_backend_close_reaches_the_client() -> None:
    async def goodbye(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.close(1001, "going away")

    async with proxied(goodbye) as (app, url):
        async with ws_connect(url) as ws:
            await ws.send("x")
            with pytest.raises(ConnectionClosedOK) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "going away")
        await wait_until(lambda: app.tunnels_open == 0)


async def test_backend_dropping_the_connection_closes_the_client_side() -> None:
    async def drop(ws: ServerConnection) -> None:
        await ws.recv()
        ws.transport.abort()

    async with proxied(drop) as (app, url):
        async with ws_connect(url) as ws:
            await ws.send("x")
            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(ws.recv(), 5)
        await wait_until(lambda: app.tunnels_open == 0)


async def test_wss_through_tls_on_both_sides(tmp_path: Path) -> None:
    """wss:// to PIBL's TLS listener, and PIBL to a wss backend: the tunnel runs over TLS
    transports on both sides (no half-close there), and closes cleanly either way."""
    ca = trustme.CA()
    leaf = ca.issue_cert("a.test")
    (tmp_path / "a.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(tmp_path / "a.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    backend_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(backend_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    watched = Watched()
    async with serve(watched.handler, "127.0.0.1", 0, ssl=backend_tls, **WS_OPTIONS) as server:
        backend = Address(*next(iter(server.sockets)).getsockname()[:2])
        tls = {
            "listen": "127.0.0.1:0",
            "certificates": [{"cert": str(tmp_path / "a.pem"), "key": str(tmp_path / "a.key")}],
        }
        upstream = {"tls": True, "tls_ca": str(tmp_path / "ca.pem")}
        settings = make_settings([backend], server={"tls": tls}, upstream=upstream)
        async with running_proxy(settings) as app:
            address = app.tls_addresses[0]
            url = f"wss://a.test:{address.port}/secure"
            async with ws_connect(url, ssl=client_tls, host=address.host) as ws:
                for size in (10, 100_000, 3 * MIB):
                    await ws.send(b"z" * size)
                    assert await ws.recv() == b"z" * size
            await asyncio.wait_for(watched.ended.wait(), 5)
            assert (watched.clean, watched.close_code) == (True, 1000)
            assert watched.headers["x-forwarded-proto"] == "https"
            await wait_until(lambda: app.tunnels_open == 0)


# --------------------------------------------------------------------------- flow control

UPGRADE_REQUEST = b"GET /raw HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: raw\r\n\r\n"
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: raw\r\n\r\n"
TOTAL = 20 * MIB
PIECE = 64 * 1024
# What PIBL may hold for one direction: a transport's high-water mark plus one socket read.
MAX_BUFFERED = 1 * MIB


def pattern(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


async def sample_max(measure: Callable[[], int], stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, measure())
        await asyncio.sleep(0.001)
    return peak


def tunnel_exchange(app: ProxyApp) -> Any:
    (down,) = [c for c in app.connections if c.tunnel_sink is not None]
    return down.tunnel_sink.__self__  # the Exchange bridging the two sides


@contextlib.asynccontextmanager
async def raw_upgrade_backend(
    serve_tunnel: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[Address]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCHING)
        try:
            await serve_tunnel(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield Address(*server.sockets[0].getsockname()[:2])
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.slow
async def test_slow_client_throttles_the_backend_in_a_tunnel() -> None:
    data = pattern(TOTAL)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(0, TOTAL, PIECE):
            writer.write(data[i : i + PIECE])
            await writer.drain()
        await reader.read()  # until the client closes

    async with (
        raw_upgrade_backend(flood) as backend,
        running_proxy(make_settings([backend])) as app,
    ):
        client = await Client.connect(app.addresses[0])
        await client.send(UPGRADE_REQUEST)
        assert (await client.read_response(head_request=True)).status == 101
        stop = asyncio.Event()

        def downstream_buffer() -> int:
            return sum(
                c.transport.get_write_buffer_size()
                for c in app.connections
                if c.transport is not None and not c.is_closed
            )

        sampler = asyncio.create_task(sample_max(downstream_buffer, stop))
        received = hashlib.sha256()
        size = 0
        async with asyncio.timeout(60):
            while size < TOTAL:
                chunk = await client.read_raw(PIECE)
                assert chunk
                received.update(chunk)
                size += len(chunk)
                await asyncio.sleep(0.002)  # a slow reader
        stop.set()
        peak = await sampler
        await client.aclose()
        await wait_until(lambda: app.tunnels_open == 0)
    assert size == TOTAL
    assert received.hexdigest() == hashlib.sha256(data).hexdigest()
    assert peak < MAX_BUFFERED, f"PIBL buffered {peak} bytes for the slow client"


@pytest.mark.slow
async def test_slow_backend_throttles_the_client_in_a_tunnel() -> None:
    data = pattern(TOTAL)
    received = hashlib.sha256()
    got = 0
    done = asyncio.Event()

    async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal got
        while got < TOTAL:
            chunk = await reader.read(PIECE)
            if not chunk:
                break
            received.update(chunk)
            got += len(chunk)
            await asyncio.sleep(0.002)  # a slow reader
        done.set()

    async with (
        raw_upgrade_backend(slow_sink) as backend,
        running_proxy(make_settings([backend])) as app,
    ):
        client = await Client.connect(app.addresses[0])
        await client.send(UPGRADE_REQUEST)
        assert (await client.read_response(head_request=True)).status == 101
        upstream = tunnel_exchange(app).conn.transport
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_max(upstream.get_write_buffer_size, stop))
        async with asyncio.timeout(60):
            for i in range(0, TOTAL, PIECE):
                await client.send(data[i : i + PIECE])
            await done.wait()
        stop.set()
        peak = await sampler
        await client.aclose()
        await wait_until(lambda: app.tunnels_open == 0)
    assert got == TOTAL
    assert received.hexdigest() == hashlib.sha256(data).hexdigest()
    assert peak < MAX_BUFFERED, f"PIBL buffered {peak} bytes for the slow backend"
