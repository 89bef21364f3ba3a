"""Fault-injecting backends: every failure gets its answer in time and leaves nothing behind.

Each backend here is a real socket on 127.0.0.1 that misbehaves in one way: it refuses, resets
(RST) before or in the middle of a response, accepts and never answers, sends something that is
not HTTP/1.1, ends a body early, or closes keep-alive connections between requests. For each, the
client gets what it can act on within a bound: 502, 504, 200 when a retry on a fresh connection is
safe, or a cut connection when a response was already under way (never a response that looks
complete). Afterwards PIBL holds no downstream connection, no upstream connection counted active,
no task and no file descriptor that it did not hold before the scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pibl.balancer.upstream import Address
from pibl.pool.pool import ConnectionPool
from pibl.server.app import ProxyApp
from tests.integration.test_cli import bounded
from tests.support import (
    Client,
    Response,
    dead_address,
    make_settings,
    running_proxy,
    wait_until,
)

# Every answer, good or bad, comes well within this; the configured timeouts are 0.2 s.
CLIENT_TIMEOUT = 5.0
FAST_TIMEOUTS = {"connect_timeout": "0.2s", "read_timeout": "0.2s"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
PARTIAL_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
PARTIAL_BODY = b"x" * 100


# --------------------------------------------------------------------------- fault servers


class FaultConn:
    """One accepted connection of a ``FaultServer``, with the moves a misbehaving server makes."""

    def __init__(
        self, server: FaultServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer

    async def read_request(self) -> bytes | None:
        """The next request (head, and a body framed by Content-Length), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            body = await self.reader.readexactly(int(match.group(1))) if match else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.server.requests.append(head + body)
        return head + body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        """FIN after what was written."""
        self.writer.close()

    def reset(self) -> None:
        """RST: SO_LINGER with a zero timeout, then close."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def wait_for_close(self) -> None:
        """Read (and drop) until the peer closes the connection; counts in ``closed_by_peer``."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.server.closed_by_peer += 1


Serve = Callable[[FaultConn], Awaitable[None]]


class FaultServer:
    """A backend that runs ``serve`` on each connection and records what it received."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_peer = 0
        self.address = Address("127.0.0.1", 0)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = False

    async def start(self) -> FaultServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = Address(host, port)
        return self

    def requests_starting(self, prefix: bytes) -> list[bytes]:
        return [r for r in self.requests if r.startswith(prefix)]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.transport.abort()  # accepted just before the listener closed
            return
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self.serve(FaultConn(self, reader, writer))
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            # Cancelled by aclose(): end normally, or asyncio's stream callback (3.11) logs
            # the cancellation as an error.
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def aclose(self) -> None:
        if self._server is None or self._closed:
            return
        self._closed = True
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks)
        await self._server.wait_closed()


# --------------------------------------------------------------------------- leak checks


def open_fds() -> dict[str, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return fds


@dataclass
class Snapshot:
    """The process's open file descriptors and the event loop's tasks at one moment."""

    fds: dict[str, str]
    tasks: set[asyncio.Task[Any]]

    @classmethod
    def take(cls) -> Snapshot:
        return cls(open_fds(), asyncio.all_tasks())

    def extra_tasks(self) -> set[asyncio.Task[Any]]:
        return asyncio.all_tasks() - self.tasks - {asyncio.current_task()}

    def is_matched(self) -> bool:
        return len(open_fds()) <= len(self.fds) and not self.extra_tasks()


async def assert_back_to(before: Snapshot, when: str) -> None:
    """Fds and tasks return to ``before`` (closing is asynchronous: wait for it, bounded)."""
    try:
        await wait_until(before.is_matched)
    except TimeoutError:
        now = open_fds()
        new = sorted(target for fd, target in now.items() if before.fds.get(fd) != target)
        raise AssertionError(
            f"{when}: {len(now) - len(before.fds)} more fd(s) than before {new}; "
            f"tasks left: {before.extra_tasks()}"
        ) from None


def pools(app: ProxyApp) -> Iterator[ConnectionPool]:
    for group in app.groups.values():
        yield from group.pools.values()


async def eventually(
    predicate: Callable[[], bool], what: str, state: Callable[[], object] = lambda: ""
) -> None:
    """Wait (bounded) for ``predicate``; on timeout fail with ``what`` and ``state()``."""
    try:
        await wait_until(predicate)
    except TimeoutError:
        raise AssertionError(f"not true within 5 s: {what} {state()}") from None


async def assert_proxy_clean(app: ProxyApp, before: Snapshot) -> None:
    """Once the clients closed, PIBL holds nothing the scenario gave it."""
    await eventually(
        lambda: not app.connections, "no downstream connection", lambda: app.connections
    )
    await eventually(
        lambda: all(pool.active == 0 for pool in pools(app)),
        "no upstream connection active",
        lambda: list(pools(app)),
    )
    await eventually(
        lambda: not app.pipeline._background,
        "no background task in the pipeline",
        lambda: app.pipeline._background,
    )
    # Idle keep-alive connections are PIBL's to keep; closed, they must leave nothing either.
    for pool in pools(app):
        pool.close()
    await assert_back_to(before, "PIBL after the scenario")


async def _warm_up() -> None:
    """uvloop opens a descriptor of its own with the first listener; not a leak of anyone's."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    server.close()
    await server.wait_closed()


@contextlib.asynccontextmanager
async def proxy_in_front_of(
    *backends: Serve | Address, **sections: Any
) -> AsyncIterator[tuple[ProxyApp, list[FaultServer]]]:
    """PIBL in front of fault servers (and plain addresses), checked for leaks afterwards: while
    it still runs (its state, fds, tasks), and once it and the servers are closed."""
    await _warm_up()
    process_before = Snapshot.take()
    async with contextlib.AsyncExitStack() as stack:
        servers: list[FaultServer] = []
        addresses: list[Address] = []
        for backend in backends:
            if isinstance(backend, Address):
                addresses.append(backend)
                continue
            server = await FaultServer(backend).start()
            stack.push_async_callback(server.aclose)
            servers.append(server)
            addresses.append(server.address)
        app = await stack.enter_async_context(running_proxy(make_settings(addresses, **sections)))
        before = Snapshot.take()
        yield app, servers
        await assert_proxy_clean(app, before)
    await assert_back_to(process_before, "the process after PIBL and the backends closed")


# --------------------------------------------------------------------------- clients


async def timed_request(
    app: ProxyApp, method: str = "GET", target: str = "/", body: bytes = b""
) -> tuple[Response, float]:
    client = await Client.connect(app.addresses[0])
    try:
        started = time.monotonic()
        hdrs = [("Host", "faults.test")]
        if body:
            hdrs.append(("Content-Length", str(len(body))))
        lines = "".join(f"{k}: {v}\r\n" for k, v in hdrs)
        await client.send(f"{method} {target} HTTP/1.1\r\n{lines}\r\n".encode() + body)
        response = await client.read_response(timeout=CLIENT_TIMEOUT)
        return response, time.monotonic() - started
    finally:
        await client.aclose()


async def read_until(client: Client, done: Callable[[bytes], bool], data: bytes = b"") -> bytes:
    """Raw bytes until ``done(data)`` or the connection ends (EOF or reset)."""
    async with asyncio.timeout(CLIENT_TIMEOUT):
        while not done(data):
            try:
                more = await client.reader.read(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            data += more
    return data


def split_response(data: bytes) -> tuple[bytes, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head: {data!r}"
    return head, body


async def cut_response(app: ProxyApp) -> tuple[bytes, bytes, float]:
    """GET, then read until PIBL closes: the head, the body bytes and the time it took."""
    client = await Client.connect(app.addresses[0])
    try:
        started = time.monotonic()
        await client.send(b"GET / HTTP/1.1\r\nHost: faults.test\r\n\r\n")
        data = await read_until(client, lambda d: False)
        head, body = split_response(data)
        return head, body, time.monotonic() - started
    finally:
        await client.aclose()


async def keepalive_session(app: ProxyApp, count: int) -> list[int]:
    """``count`` GETs one after the other on one keep-alive connection; their statuses."""
    client = await Client.connect(app.addresses[0])
    try:
        statuses = []
        for i in range(count):
            await client.send(f"GET /{i} HTTP/1.1\r\nHost: faults.test\r\n\r\n".encode())
            statuses.append((await client.read_response(timeout=CLIENT_TIMEOUT)).status)
        return statuses
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- serve functions


async def reset_after_reading(conn: FaultConn) -> None:
    await conn.read_request()
    conn.reset()


async def hang(conn: FaultConn) -> None:
    await conn.read_request()
    await conn.wait_for_close()  # never answers


async def hang_mid_body(conn: FaultConn) -> None:
    await conn.read_request()
    await conn.send(PARTIAL_HEAD + PARTIAL_BODY)
    await conn.wait_for_close()


async def answer_all(conn: FaultConn) -> None:
    while await conn.read_request() is not None:
        await conn.send(OK)


def sends_then_waits(raw: bytes) -> Serve:
    """Answers ``raw`` (in one write) and keeps the connection open until the peer closes it."""

    async def serve(conn: FaultConn) -> None:
        await conn.read_request()
        await conn.send(raw)
        await conn.wait_for_close()

    return serve


def sends_then_closes(raw: bytes) -> Serve:
    async def serve(conn: FaultConn) -> None:
        await conn.read_request()
        await conn.send(raw)
        conn.close()

    return serve


# --------------------------------------------------------------------------- refused, reset


@bounded
async def test_refused_connection_is_502() -> None:
    dead = await dead_address()
    async with proxy_in_front_of(dead, server=FAST_TIMEOUTS) as (app, _):
        response, elapsed = await timed_request(app)
        assert response.status == 502
        assert elapsed < CLIENT_TIMEOUT


@bounded
async def test_reset_before_response_is_502() -> None:
    async with proxy_in_front_of(reset_after_reading, server=FAST_TIMEOUTS) as (app, [origin]):
        response, elapsed = await timed_request(app)
        assert response.status == 502
        assert elapsed < CLIENT_TIMEOUT
    assert origin.connections == 1  # the only server: nowhere else to retry


@bounded
async def test_reset_mid_body_cuts_the_client_connection() -> None:
    client_has_part = asyncio.Event()

    async def reset_mid_body(conn: FaultConn) -> None:
        await conn.read_request()
        await conn.send(PARTIAL_HEAD + PARTIAL_BODY)
        # The reset follows the part the client already holds: no race with the RST.
        await client_has_part.wait()
        conn.reset()

    async with proxy_in_front_of(reset_mid_body, server=FAST_TIMEOUTS) as (app, _):
        client = await Client.connect(app.addresses[0])
        try:
            started = time.monotonic()
            await client.send(b"GET / HTTP/1.1\r\nHost: faults.test\r\n\r\n")
            data = await read_until(
                client, lambda d: len(d.partition(b"\r\n\r\n")[2]) >= len(PARTIAL_BODY)
            )
            client_has_part.set()
            data = await read_until(client, lambda d: False, data)
            elapsed = time.monotonic() - started
        finally:
            await client.aclose()
    head, body = split_response(data)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: 1000" in head.lower()
    assert body == PARTIAL_BODY  # then the cut: 100 of the 1000 announced bytes
    assert elapsed < CLIENT_TIMEOUT


# --------------------------------------------------------------------------- hang


@bounded
async def test_accepted_but_never_answered_is_504() -> None:
    async with proxy_in_front_of(hang, server=FAST_TIMEOUTS) as (app, [origin]):
        response, elapsed = await timed_request(app)
        assert response.status == 504
        assert 0.15 <= elapsed < CLIENT_TIMEOUT
        # PIBL gave up on the connection: it closed it rather than keep it.
        await eventually(lambda: origin.closed_by_peer == 1, "the hung connection closed")
    assert origin.connections == 1  # a timeout is not retried on the same server


@bounded
async def test_hang_mid_body_cuts_the_client_connection_after_read_timeout() -> None:
    async with proxy_in_front_of(hang_mid_body, server=FAST_TIMEOUTS) as (app, [origin]):
        head, body, elapsed = await cut_response(app)
        assert head.startswith(b"HTTP/1.1 200")
        assert body == PARTIAL_BODY
        assert 0.15 <= elapsed < CLIENT_TIMEOUT
        await eventually(lambda: origin.closed_by_peer == 1, "the hung connection closed")


@bounded
async def test_connect_that_never_completes_is_504() -> None:
    # A listener whose accept backlog is full leaves new handshakes unanswered.
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(8):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
        address = Address(*listener.getsockname()[:2])
        async with proxy_in_front_of(address, server=FAST_TIMEOUTS) as (app, _):
            response, elapsed = await timed_request(app)
            assert response.status == 504
            assert 0.15 <= elapsed < CLIENT_TIMEOUT
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@bounded
@pytest.mark.parametrize(
    ("leave", "read_timeout"),
    [
        # A reset (the client process died): PIBL lets go of the backend at once, long before
        # its read timeout.
        ("rst", "30s"),
        # A FIN is a legal half-close after which the answer is still owed (like HAProxy
        # without abortonclose): PIBL holds on until its read timeout, then lets go of both.
        ("fin", "0.2s"),
    ],
)
async def test_a_client_leaving_while_the_backend_hangs_leaves_nothing_behind(
    leave: str, read_timeout: str
) -> None:
    server = {"connect_timeout": "0.2s", "read_timeout": read_timeout}
    async with proxy_in_front_of(hang, server=server) as (app, [origin]):
        client = await Client.connect(app.addresses[0])
        await client.send(b"GET / HTTP/1.1\r\nHost: faults.test\r\n\r\n")
        await eventually(lambda: len(origin.requests) == 1, "the request reached the backend")
        started = time.monotonic()
        if leave == "rst":
            sock = client.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.writer.transport.abort()
        await client.aclose()
        await eventually(lambda: origin.closed_by_peer == 1, "PIBL let go of the backend")
        assert time.monotonic() - started < CLIENT_TIMEOUT
    assert origin.connections == 1  # and did not try again for a client that is gone


# --------------------------------------------------------------------------- garbage


@bounded
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="not-http"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 4, id="binary"),
        pytest.param(b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n", id="no-status-code"),
        pytest.param(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", id="bad-status-code"),
        pytest.param(b"HTTP/9.9 200 OK\r\nContent-Length: 0\r\n\r\n", id="bad-version"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
    ],
)
async def test_garbage_response_is_502_and_the_connection_is_dropped(raw: bytes) -> None:
    async with proxy_in_front_of(sends_then_waits(raw), server=FAST_TIMEOUTS) as (app, [origin]):
        response, elapsed = await timed_request(app)
        assert response.status == 502
        assert elapsed < CLIENT_TIMEOUT
        # Never kept for another request: PIBL closed it.
        await eventually(lambda: origin.closed_by_peer == origin.connections, "dropped")
        assert raw not in response.body


@bounded
async def test_a_response_followed_by_unsolicited_bytes_in_one_read_is_served_whole() -> None:
    # Response desync: the answer is complete when the stray bytes are parsed in the same
    # read. The client gets the answer and keeps its connection; the upstream connection is
    # dropped, and the stray "response" never reaches anyone.
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    async with proxy_in_front_of(sends_then_waits(OK + stray)) as (app, [origin]):
        client = await Client.connect(app.addresses[0])
        try:
            first = await client.request()
            assert (first.status, first.body) == (200, b"ok")
            await eventually(lambda: origin.closed_by_peer == 1, "the connection dropped")
            second = await client.request()  # on the same client connection
            assert (second.status, second.body) == (200, b"ok")
            assert origin.connections == 2  # a fresh upstream connection for the second
        finally:
            await client.aclose()


@bounded
async def test_endless_response_head_is_502_at_once() -> None:
    # Regression: llhttp buffers header lines without bound; PIBL kept them all (hundreds of
    # MB) until its read timeout. The head is now capped (MAX_RESPONSE_HEAD_BYTES).
    async def endless_head(conn: FaultConn) -> None:
        await conn.read_request()
        line = b"X-Junk: " + b"a" * 1000 + b"\r\n"
        with contextlib.suppress(ConnectionError):
            await conn.send(b"HTTP/1.1 200 OK\r\n")
            for _ in range(1024):  # 1 MiB at most, should PIBL never stop it
                await conn.send(line)
        await conn.wait_for_close()

    server = {"connect_timeout": "0.2s", "read_timeout": "30s"}
    async with proxy_in_front_of(endless_head, server=server) as (app, [origin]):
        response, elapsed = await timed_request(app)
        assert response.status == 502
        assert elapsed < CLIENT_TIMEOUT  # not the 30 s read timeout
        await eventually(lambda: origin.closed_by_peer == 1, "the connection dropped")


@bounded
async def test_invalid_chunk_framing_after_body_bytes_cuts_the_client_connection() -> None:
    # The first chunk is valid and already on its way to the client when the framing breaks.
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"
    async with proxy_in_front_of(sends_then_waits(raw), server=FAST_TIMEOUTS) as (app, [origin]):
        head, body, elapsed = await cut_response(app)
        assert head.startswith(b"HTTP/1.1 200")
        assert body == b"5\r\nhello\r\n"  # re-framed by PIBL, and no last chunk after it
        assert elapsed < CLIENT_TIMEOUT
        await eventually(lambda: origin.closed_by_peer == 1, "the broken connection closed")


# --------------------------------------------------------------------------- short body


@bounded
async def test_short_content_length_body_then_close_cuts_the_client_connection() -> None:
    serve = sends_then_closes(PARTIAL_HEAD + PARTIAL_BODY)
    async with proxy_in_front_of(serve, server=FAST_TIMEOUTS) as (app, _):
        head, body, elapsed = await cut_response(app)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: 1000" in head.lower()
        assert body == PARTIAL_BODY  # 100 of 1000: the client sees the truncation
        assert elapsed < CLIENT_TIMEOUT


@bounded
async def test_chunked_body_without_last_chunk_then_close_cuts_the_client_connection() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    async with proxy_in_front_of(sends_then_closes(raw), server=FAST_TIMEOUTS) as (app, _):
        head, body, elapsed = await cut_response(app)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head.lower()
        assert body == b"5\r\nhello\r\n"  # no last chunk: not a complete message
        assert elapsed < CLIENT_TIMEOUT


# --------------------------------------------------------------------------- keep-alive closes


@bounded
async def test_backend_closing_idle_connections_after_some_responses_costs_no_request() -> None:
    rng = random.Random(20240501)

    async def close_after_some(conn: FaultConn) -> None:
        while await conn.read_request() is not None:
            await conn.send(OK)  # says nothing about closing ...
            if rng.random() < 0.5:
                conn.close()  # ... and closes the connection PIBL keeps idle
                return

    async with proxy_in_front_of(close_after_some, server=FAST_TIMEOUTS) as (app, [origin]):
        sessions = await asyncio.gather(*(keepalive_session(app, 10) for _ in range(4)))
    assert [s for session in sessions for s in session] == [200] * 40
    assert len(origin.requests) == 40  # none was sent twice
    assert origin.connections > 1


@bounded
@pytest.mark.parametrize("hang_up", [FaultConn.close, FaultConn.reset], ids=["fin", "rst"])
async def test_backend_closing_a_reused_connection_after_reading_a_request_costs_no_get(
    hang_up: Callable[[FaultConn], None],
) -> None:
    rng = random.Random(7)
    dropped = 0

    async def drop_some(conn: FaultConn) -> None:
        nonlocal dropped
        served = 0
        while await conn.read_request() is not None:
            if served and rng.random() < 0.5:
                dropped += 1
                hang_up(conn)  # read, never answered: the keep-alive race
                return
            await conn.send(OK)
            served += 1

    async with proxy_in_front_of(drop_some, server=FAST_TIMEOUTS) as (app, [origin]):
        sessions = await asyncio.gather(*(keepalive_session(app, 10) for _ in range(4)))
    assert [s for session in sessions for s in session] == [200] * 40
    assert dropped > 0
    # Each dropped GET was sent again once, on a fresh connection.
    assert len(origin.requests) == 40 + dropped


@bounded
async def test_a_post_meeting_the_keepalive_race_is_not_sent_again() -> None:
    async def answer_first_only(conn: FaultConn) -> None:
        if await conn.read_request() is not None:
            await conn.send(OK)
        if await conn.read_request() is not None:
            conn.close()  # the second request on the connection is read, never answered

    async with proxy_in_front_of(answer_first_only, server=FAST_TIMEOUTS) as (app, [origin]):
        response, _ = await timed_request(app, "GET", "/warm")  # leaves a pooled connection
        assert response.status == 200
        response, elapsed = await timed_request(app, "POST", "/order", body=b"pay once")
        assert response.status == 502  # it may have been processed: never replayed
        assert elapsed < CLIENT_TIMEOUT
    assert len(origin.requests_starting(b"POST")) == 1
    assert origin.connections == 1


# --------------------------------------------------------------------------- retry rules


@bounded
async def test_post_reset_after_reading_is_never_retried_but_a_get_is() -> None:
    async with proxy_in_front_of(
        reset_after_reading,
        reset_after_reading,
        answer_all,
        server=FAST_TIMEOUTS,
        upstream={"max_fails": 0, "retries": 2},
    ) as (app, servers):
        response, elapsed = await timed_request(app, "POST", "/order", body=b"pay once")
        assert response.status == 502
        assert elapsed < CLIENT_TIMEOUT
        posts = [r for server in servers for r in server.requests_starting(b"POST")]
        assert len(posts) == 1  # it reached a server exactly once
        assert posts[0].endswith(b"\r\n\r\npay once")

        for _ in range(3):
            response, elapsed = await timed_request(app, "GET", "/catalog")
            assert response.status == 200
            assert response.body == b"ok"
            assert elapsed < CLIENT_TIMEOUT
    resetters, good = servers[:2], servers[2]
    assert len(good.requests_starting(b"GET")) == 3
    # At least one GET met a reset first and was retried on another server.
    assert sum(len(s.requests_starting(b"GET")) for s in resetters) >= 1
