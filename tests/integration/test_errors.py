"""Each failure gets the status a client can act on, within its timeout."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.support import (
    Client,
    Received,
    Reply,
    dead_address,
    make_settings,
    request,
    running_backends,
    running_proxy,
)


async def test_refused_connection_is_502() -> None:
    dead = await dead_address()
    async with running_proxy(make_settings([dead])) as app:
        response = await request(app.addresses[0])
        assert response.status == 502
        # Operator details (addresses, errno) are not shown to the client.
        assert str(dead.port).encode() not in response.body


async def test_reset_before_response_is_502() -> None:
    async with (
        running_backends(lambda r: Reply(raw=b"", close=True)) as backends,
        running_proxy(make_settings(backends, upstream={"retries": 0})) as app,
    ):
        assert (await request(app.addresses[0], "POST", "/", body=b"x")).status == 502


async def test_invalid_response_is_502_and_connection_not_reused() -> None:
    calls = {"n": 0}

    def garbage_then_ok(req: Received) -> Reply:
        calls["n"] += 1
        if calls["n"] == 1:
            return Reply(
                raw=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
            )
        return Reply(body=b"fine")

    async with running_backends(garbage_then_ok) as backends:
        async with running_proxy(make_settings(backends, upstream={"retries": 0})) as app:
            assert (await request(app.addresses[0], "POST", "/", body=b"1")).status == 502
            assert (await request(app.addresses[0])).body == b"fine"
        assert backends[0].connections == 2


async def test_response_timeout_is_504() -> None:
    never = asyncio.Event()

    async def hang(req: Received) -> Reply:
        await never.wait()
        return Reply()

    async with running_backends(hang) as backends:
        settings = make_settings(backends, server={"read_timeout": "0.2s"}, upstream={"retries": 0})
        async with running_proxy(settings) as app:
            response = await request(app.addresses[0])
            assert response.status == 504


async def test_connect_timeout_is_504() -> None:
    # A listening socket whose backlog is full never completes new handshakes.
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(sock.getsockname())
        fillers.append(s)
    host, port = sock.getsockname()
    try:
        from pibl.balancer.upstream import Address

        settings = make_settings(
            [Address(host, port)], server={"connect_timeout": "0.2s"}, upstream={"retries": 0}
        )
        async with running_proxy(settings) as app:
            response = await request(app.addresses[0])
            assert response.status == 504
    finally:
        for s in fillers:
            s.close()
        sock.close()


async def test_no_server_available_is_503() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        for upstream in app.groups["app"].upstreams:
            upstream.is_available = False
        assert (await request(app.addresses[0])).status == 503


async def test_reset_mid_body_aborts_the_client_connection() -> None:
    def short_body(req: Received) -> Reply:
        return Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part", close=True)

    async with (
        running_backends(short_body) as backends,
        running_proxy(make_settings(backends)) as app,
    ):
        client = await Client.connect(app.addresses[0])
        with pytest.raises(ConnectionError):
            await client.request("GET", "/")
        await client.aclose()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 17000 + b"\r\n\r\n", 431),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\n"
            + b"".join(b"X-F%d: v\r\n" % i for i in range(101))
            + b"\r\n",
            431,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n", 413),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
    ],
)
async def test_malformed_requests_get_their_status_and_close(raw: bytes, status: int) -> None:
    async with running_backends(count=1) as backends:
        settings = make_settings(backends, server={"max_body_size": 1000})
        async with running_proxy(settings) as app:
            client = await Client.connect(app.addresses[0])
            await client.send(raw)
            response = await client.read_response()
            assert response.status == status
            assert response.header("Connection") == "close"
            assert await client.is_closed()
            await client.aclose()
        assert backends[0].requests == []


async def test_chunked_body_over_limit_is_413() -> None:
    async with running_backends(count=1) as backends:
        settings = make_settings(backends, server={"max_body_size": 10})
        async with running_proxy(settings) as app:
            client = await Client.connect(app.addresses[0])
            await client.send(
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
            )
            response = await client.read_response()
            assert response.status == 413
            await client.aclose()


async def test_error_after_good_pipelined_request_keeps_order() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        await client.send(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nBAD REQUEST\r\n\r\n")
        first = await client.read_response()
        second = await client.read_response()
        assert first.status == 200
        assert second.status == 400
        assert await client.is_closed()
        await client.aclose()


async def test_unknown_route_is_404_and_keeps_connection() -> None:
    async with running_backends(count=1) as backends:
        settings = make_settings(backends, routes=[{"path_prefix": "/api", "upstream": "app"}])
        async with running_proxy(settings) as app:
            client = await Client.connect(app.addresses[0])
            assert (await client.request("GET", "/nope")).status == 404
            assert (await client.request("GET", "/api/x")).status == 200
            await client.aclose()


async def test_idle_keepalive_timeout_closes_connection() -> None:
    async with running_backends(count=1) as backends:
        settings = make_settings(backends, server={"keepalive_timeout": "0.1s"})
        async with running_proxy(settings) as app:
            client = await Client.connect(app.addresses[0])
            assert (await client.request()).status == 200
            assert await client.is_closed(timeout=5)
            await client.aclose()


@pytest.mark.parametrize("answered_before", [0, 1], ids=["first-request", "kept-alive"])
async def test_slow_request_head_gets_408(answered_before: int) -> None:
    async with running_backends(count=1) as backends:
        settings = make_settings(
            backends, server={"client_header_timeout": "0.2s", "keepalive_timeout": "60s"}
        )
        async with running_proxy(settings) as app:
            client = await Client.connect(app.addresses[0])
            for _ in range(answered_before):
                assert (await client.request()).status == 200
            await client.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
            response = await client.read_response()
            assert response.status == 408
            assert await client.is_closed()
            await client.aclose()


async def test_pipelined_head_left_incomplete_after_the_first_answer_gets_408() -> None:
    # The second head begins in the same read as the first request, while that one is queued;
    # once the first is answered the connection is not idle (a head is under way) and the
    # keep-alive timeout does not apply: the header timeout does.
    async with running_backends(count=1) as backends:
        settings = make_settings(
            backends, server={"client_header_timeout": "0.2s", "keepalive_timeout": "60s"}
        )
        async with running_proxy(settings) as app:
            client = await Client.connect(app.addresses[0])
            await client.send(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHo")
            first = await client.read_response()
            assert first.status == 200
            second = await client.read_response()
            assert second.status == 408
            assert await client.is_closed()
            await client.aclose()
        assert [r.target for r in backends[0].requests] == [b"/first"]


async def test_listener_max_connections_makes_extra_connections_wait() -> None:
    async with running_backends(count=1) as backends:
        settings = make_settings(backends, server={"max_connections": 2})
        async with running_proxy(settings) as app:
            first = await Client.connect(app.addresses[0])
            second = await Client.connect(app.addresses[0])
            assert (await first.request()).status == 200
            assert (await second.request()).status == 200
            third = await Client.connect(app.addresses[0])
            await third.send(b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n")
            # Established connections keep being served while the third one waits.
            assert (await first.request()).status == 200
            assert len(app.waiting) == 1
            assert [r.target for r in backends[0].requests].count(b"/third") == 0
            await second.aclose()  # a slot frees: the waiting connection is served
            response = await third.read_response()
            assert response.status == 200
            assert response.body == b"b1 GET /third\n"
            for client in (first, third):
                await client.aclose()


async def test_slowloris_trickling_a_head_still_gets_408_at_the_deadline() -> None:
    async with running_backends(count=1) as backends:
        settings = make_settings(backends, server={"client_header_timeout": "0.3s"})
        async with running_proxy(settings) as app:
            client = await Client.connect(app.addresses[0])
            head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"z" * 500

            async def trickle() -> int:
                # One byte every 20 ms: every read is recent, but the head never completes;
                # the deadline is total, not per read.
                for sent in range(len(head)):
                    await client.send(head[sent : sent + 1])
                    await asyncio.sleep(0.02)  # the trickle itself, not a synchronisation
                return len(head)

            loop = asyncio.get_running_loop()
            started = loop.time()
            trickling = asyncio.create_task(trickle())
            response = await client.read_response()
            elapsed = loop.time() - started
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await trickling
            assert response.status == 408
            assert 0.25 < elapsed < 3
            await client.aclose()
        assert backends[0].requests == []
