"""ConnectionPool bookkeeping against a real origin on 127.0.0.1: LIFO reuse, the idle cap,
dead connections never handed out, idle expiry, connect errors, repr.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest

from pibl.balancer.upstream import Address
from pibl.errors import UpstreamConnectError, status_for
from pibl.http.head import ResponseHead
from pibl.pool.connection import UpstreamConnection
from pibl.pool.pool import ConnectionPool

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _OriginProtocol(asyncio.Protocol):
    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it.
        self.transport = cast(asyncio.Transport, transport)
        self.origin.transports.append(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            assert self.transport is not None
            self.origin.requests += 1
            self.transport.write(self.origin.reply())
            if self.origin.close_after_reply:
                self.transport.close()


class Origin:
    """A minimal HTTP/1.1 origin: answers every request head with ``reply()``."""

    def __init__(self) -> None:
        self.requests = 0
        self.close_after_reply = False
        self.reply: Callable[[], bytes] = lambda: OK
        self.transports: list[asyncio.Transport] = []
        self.server: asyncio.Server | None = None
        self.address = Address("127.0.0.1", 0)


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    loop = asyncio.get_running_loop()
    result = Origin()
    server = await loop.create_server(lambda: _OriginProtocol(result), "127.0.0.1", 0)
    result.server = server
    result.address = Address("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        yield result
    finally:
        server.close()
        for transport in result.transports:
            transport.close()
        await server.wait_closed()


class Sink:
    """A ResponseSink that completes a future when the response ends (or fails)."""

    def __init__(self) -> None:
        self.done: asyncio.Future[ResponseHead | None] = asyncio.get_running_loop().create_future()
        self.head: ResponseHead | None = None
        self.body = b""

    def on_response_head(self, head: ResponseHead) -> None:
        self.head = head

    def on_response_body(self, data: bytes) -> None:
        self.body += data

    def on_response_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(self.head)

    def on_upstream_error(self, error: Exception, got_bytes: bool) -> None:
        if not self.done.done():
            self.done.set_exception(error)

    def on_tunnel_data(self, data: bytes) -> None:
        raise AssertionError("no tunnel expected")

    def on_upstream_writable(self, writable: bool) -> None:
        pass

    def flush_pending(self) -> None:
        pass


async def exchange(conn: UpstreamConnection) -> Sink:
    """One GET over ``conn``; returns when the response is complete."""
    sink = Sink()
    conn.begin(sink, head_request=False)
    conn.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    async with asyncio.timeout(5):
        await sink.done
    return sink


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``condition()`` holds (bounded; no fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def settle() -> None:
    """A few loop iterations, so that closed transports report connection_lost."""
    for _ in range(5):
        await asyncio.sleep(0)


def dead_address() -> Address:
    # Bind, note the port, close: nothing listens there (guaranteed ECONNREFUSED).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Address("127.0.0.1", port)


async def used(pool: ConnectionPool) -> UpstreamConnection:
    """A fresh connection that completed one exchange, ready to be released."""
    conn = await pool.connect()
    sink = await exchange(conn)
    assert sink.head is not None
    assert sink.head.status == 200
    assert sink.body == b"ok"
    return conn


# --------------------------------------------------------------------------- reuse


async def test_lifo_reuse(origin: Origin) -> None:
    pool = ConnectionPool(origin.address)
    try:
        first, second = await used(pool), await used(pool)
        assert (pool.active, pool.idle, pool.connects) == (2, 0, 2)
        pool.release(first)
        pool.release(second)
        assert (pool.active, pool.idle) == (0, 2)
        assert pool.take_idle() is second  # most recently released first
        assert pool.take_idle() is first
        assert pool.take_idle() is None
        assert (pool.active, pool.idle, pool.reuses) == (2, 0, 2)
        # A reused connection carries another exchange.
        await exchange(second)
        assert second.requests_served == 1
        pool.release(second)
        assert pool.take_idle() is second
        assert second.requests_served == 2
        pool.release(second)
        pool.release(first)
    finally:
        pool.close()
        await settle()
    assert origin.requests == 3


async def test_empty_pool_hands_out_nothing(origin: Origin) -> None:
    pool = ConnectionPool(origin.address)
    assert pool.take_idle() is None
    assert (pool.active, pool.reuses) == (0, 0)


async def test_max_idle_cap_closes_extras(origin: Origin) -> None:
    pool = ConnectionPool(origin.address, max_idle=2)
    try:
        conns = [await used(pool) for _ in range(4)]
        for conn in conns:
            pool.release(conn)
        assert (pool.active, pool.idle) == (0, 2)
        assert [c.is_open for c in conns] == [True, True, False, False]
        assert pool.take_idle() is conns[1]
        assert pool.take_idle() is conns[0]
        for conn in conns[:2]:
            pool.release(conn)
    finally:
        pool.close()
        await settle()


async def test_max_idle_zero_keeps_nothing(origin: Origin) -> None:
    pool = ConnectionPool(origin.address, max_idle=0)
    conn = await used(pool)
    pool.release(conn)
    assert pool.idle == 0
    assert not conn.is_open
    await settle()


# --------------------------------------------------------------------------- dead connections


async def test_connection_closed_while_idle_is_never_handed_out(origin: Origin) -> None:
    pool = ConnectionPool(origin.address)
    try:
        kept, broken = await used(pool), await used(pool)
        pool.release(kept)
        pool.release(broken)
        broken.close()
        assert pool.take_idle() is kept  # the closed one was skipped (and dropped)
        assert pool.idle == 0
        assert pool.reuses == 1
        pool.release(kept)
    finally:
        pool.close()
        await settle()


async def test_connection_the_server_closed_is_never_handed_out(origin: Origin) -> None:
    origin.close_after_reply = True  # replies keep-alive, then closes: the classic stale case
    pool = ConnectionPool(origin.address)
    try:
        conn = await used(pool)
        pool.release(conn)
        await wait_for(lambda: not conn.is_open)
        assert pool.take_idle() is None
        assert (pool.idle, pool.active, pool.reuses) == (0, 0, 0)
    finally:
        pool.close()
        await settle()


async def test_bytes_from_an_idle_connection_make_it_unusable(origin: Origin) -> None:
    pool = ConnectionPool(origin.address)
    try:
        conn = await used(pool)
        pool.release(conn)
        origin.transports[-1].write(b"HTTP/1.1 200 OK\r\n")  # nothing was asked
        await wait_for(lambda: not conn.is_open)
        assert pool.take_idle() is None
    finally:
        pool.close()
        await settle()


class CountingSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.heads: list[ResponseHead] = []
        self.completions = 0

    def on_response_head(self, head: ResponseHead) -> None:
        super().on_response_head(head)
        self.heads.append(head)

    def on_response_complete(self) -> None:
        self.completions += 1
        super().on_response_complete()


async def test_unsolicited_response_after_the_answer_is_not_delivered(origin: Origin) -> None:
    # Response desync: a second response in the same segment must never reach the exchange.
    origin.reply = lambda: OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    pool = ConnectionPool(origin.address)
    conn = await pool.connect()
    sink = CountingSink()
    conn.begin(sink, head_request=False)
    conn.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    try:
        await wait_for(lambda: sink.done.done())
        await settle()
        assert len(sink.heads) == 1
        assert sink.body == b"ok"
        assert sink.completions == 1
        pool.release(conn)
        assert pool.take_idle() is None  # it sent bytes nobody asked for: not reusable
    finally:
        pool.close()
        await settle()


async def test_unfinished_exchange_is_not_pooled(origin: Origin) -> None:
    origin.reply = lambda: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"
    pool = ConnectionPool(origin.address)
    conn = await pool.connect()
    sink = Sink()
    conn.begin(sink, head_request=False)
    conn.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await wait_for(lambda: sink.body == b"half")
    pool.release(conn)  # the body is incomplete: the connection cannot carry another request
    assert pool.idle == 0
    assert not conn.is_open
    assert pool.take_idle() is None
    await settle()


async def test_connection_close_response_is_not_pooled(origin: Origin) -> None:
    origin.reply = lambda: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    pool = ConnectionPool(origin.address)
    conn = await used(pool)
    pool.release(conn)
    assert pool.idle == 0
    assert not conn.is_open
    await settle()


async def test_discard_aborts_and_forgets(origin: Origin) -> None:
    pool = ConnectionPool(origin.address)
    conn = await used(pool)
    pool.discard(conn)
    assert (pool.active, pool.idle) == (0, 0)
    assert not conn.is_open
    assert conn.sink is None
    await settle()


# --------------------------------------------------------------------------- idle expiry


async def test_idle_connections_expire(origin: Origin) -> None:
    pool = ConnectionPool(origin.address, idle_timeout=0.05)
    try:
        conns = [await used(pool) for _ in range(3)]
        for conn in conns:
            pool.release(conn)
        assert pool.idle == 3
        await wait_for(lambda: pool.idle == 0)
        assert not any(c.is_open for c in conns)
        assert pool.take_idle() is None
        # The sweeper stops once the pool is empty, and starts again on the next release.
        conn = await used(pool)
        pool.release(conn)
        assert pool.idle == 1
        await wait_for(lambda: pool.idle == 0)
        assert not conn.is_open
    finally:
        pool.close()
        await settle()


async def test_sweep_closes_only_connections_idle_too_long(origin: Origin) -> None:
    pool = ConnectionPool(origin.address, idle_timeout=60.0)
    try:
        old, dead, recent = await used(pool), await used(pool), await used(pool)
        for conn in (old, dead, recent):
            pool.release(conn)
        now = asyncio.get_running_loop().time()
        old.idle_since = now - 61.0
        dead.idle_since = now - 61.0
        pool._sweep()
        assert pool.idle == 1
        assert not old.is_open
        assert not dead.is_open
        assert recent.is_open
        assert pool.take_idle() is recent
        pool.release(recent)
    finally:
        pool.close()
        await settle()


async def test_close_closes_idle_connections_and_stops_the_sweeper(origin: Origin) -> None:
    pool = ConnectionPool(origin.address, idle_timeout=0.01)
    conns = [await used(pool) for _ in range(2)]
    for conn in conns:
        pool.release(conn)
    pool.close()
    assert pool.idle == 0
    assert not any(c.is_open for c in conns)
    assert pool._sweeper is None
    await settle()


# --------------------------------------------------------------------------- connecting


async def test_connect_refused_becomes_upstream_connect_error() -> None:
    address = dead_address()
    pool = ConnectionPool(address, connect_timeout=5.0)
    with pytest.raises(UpstreamConnectError, match=re.escape(str(address))) as caught:
        await pool.connect()
    assert isinstance(caught.value.__cause__, OSError)
    assert status_for(caught.value) == 502
    assert (pool.active, pool.connects, pool.idle) == (0, 0, 0)


async def test_connect_timeout_becomes_upstream_connect_error() -> None:
    pool = ConnectionPool(dead_address(), connect_timeout=0)
    with pytest.raises(UpstreamConnectError, match="timed out") as caught:
        await pool.connect()
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert status_for(caught.value) == 504
    assert (pool.active, pool.connects) == (0, 0)
    await settle()


async def test_connect_sets_nodelay(origin: Origin) -> None:
    pool = ConnectionPool(origin.address)
    conn = await pool.connect()
    assert conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    pool.discard(conn)
    await settle()


# --------------------------------------------------------------------------- repr


async def test_repr(origin: Origin) -> None:
    pool = ConnectionPool(origin.address)
    port = origin.address.port
    assert repr(pool) == f"<Pool 127.0.0.1:{port} active=0 idle=0>"
    a, b = await used(pool), await used(pool)
    assert repr(pool) == f"<Pool 127.0.0.1:{port} active=2 idle=0>"
    pool.release(a)
    assert repr(pool) == f"<Pool 127.0.0.1:{port} active=1 idle=1>"
    pool.release(b)
    assert repr(pool) == f"<Pool 127.0.0.1:{port} active=0 idle=2>"
    pool.close()
    await settle()


def test_repr_ipv6_address() -> None:
    pool = ConnectionPool(Address("::1", 9001))
    assert repr(pool) == "<Pool [::1]:9001 active=0 idle=0>"
