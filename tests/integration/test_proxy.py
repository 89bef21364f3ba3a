"""End-to-end behaviour of the core proxy with real backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pibl.balancer.upstream import Address
from tests.support import (
    Client,
    Received,
    Reply,
    dead_address,
    make_settings,
    request,
    running_backends,
    running_proxy,
    wait_until,
)


async def test_get_is_forwarded_and_answered() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        response = await request(app.addresses[0], "GET", "/hello?x=1")
        assert response.status == 200
        assert response.body == b"b1 GET /hello?x=1\n"
        received = backends[0].requests[0]
        assert received.method == "GET"
        assert received.target == b"/hello?x=1"
        assert received.header("Host") == "test.local"


async def test_round_robin_spreads_requests_in_turn() -> None:
    async with running_backends(count=3) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        answers = [(await client.request("GET", f"/{i}")).header("X-Backend") for i in range(9)]
        await client.aclose()
        assert answers == ["b1", "b2", "b3"] * 3


@pytest.mark.parametrize(
    ("balance", "extra"),
    [
        ("weighted_round_robin", {}),
        ("least_connections", {}),
        ("random_two", {}),
        ("consistent_hash", {"hash_key": "header:X-User"}),
    ],
)
async def test_every_strategy_serves_through_the_proxy(balance: str, extra: dict[str, str]) -> None:
    async with running_backends(count=3) as backends:
        settings = make_settings(backends, upstream={"balance": balance, **extra})
        async with running_proxy(settings) as app:
            client = await Client.connect(app.addresses[0])
            seen = []
            for i in range(30):
                headers = [("Host", "t"), ("X-User", f"user-{i % 5}")]
                response = await client.request("GET", "/", headers=headers)
                assert response.status == 200
                seen.append((i % 5, response.header("X-Backend")))
            await client.aclose()
    by_backend = {name for _, name in seen}
    if balance == "consistent_hash":
        # Same key, same server, every time.
        for user in range(5):
            assert len({name for u, name in seen if u == user}) == 1
    else:
        assert by_backend == {"b1", "b2", "b3"}


async def test_keep_alive_reuses_one_upstream_connection() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        for i in range(20):
            assert (await client.request("GET", f"/{i}")).status == 200
        await client.aclose()
        # Separate client connections share the upstream pool too.
        for _ in range(5):
            assert (await request(app.addresses[0])).status == 200
        assert backends[0].connections == 1
        assert len(backends[0].requests) == 25


async def test_one_serving_coroutine_answers_a_connection_and_ends_with_it() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        assert (await client.request("GET", "/first")).status == 200
        [conn] = app.connections
        seen = set()
        for i in range(5):
            assert (await client.request("GET", f"/{i}")).status == 200
            await wait_until(lambda: conn.task is None)  # parked between requests
            seen.add(id(conn._serving))
        serving = conn._serving
        assert serving is not None
        assert len(seen) == 1
        assert serving.parked
        await client.aclose()
        await wait_until(lambda: not app.connections)
        assert serving.done()  # closed with its connection, not left parked
        assert conn._serving is None


async def test_http10_client_gets_close_delimited_or_keep_alive() -> None:
    async def chunked(req: Received) -> Reply:
        return Reply(body=b"streamed body", chunked=True)

    async with running_backends(chunked) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        await client.send(b"GET / HTTP/1.0\r\n\r\n")
        response = await client.read_response()
        assert response.status == 200
        assert response.body == b"streamed body"
        assert response.header("Transfer-Encoding") is None
        assert await client.is_closed()
        await client.aclose()
        # The upstream still saw a proper HTTP/1.1 request with a Host.
        assert backends[0].requests[0].version == "1.1"


async def test_http10_keep_alive_with_content_length() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        for _ in range(3):
            await client.send(b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = await client.read_response()
            assert response.status == 200
            assert response.header("Connection") == "keep-alive"
        await client.aclose()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running_backends(count=2) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        # Six requests in one write: llhttp parses them all at once; answers must keep order.
        await client.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(6)))
        bodies = [(await client.read_response()).body for _ in range(6)]
        await client.aclose()
    assert bodies == [b"b%d GET /%d\n" % (1 + i % 2, i) for i in range(6)]


async def test_many_concurrent_clients() -> None:
    async with running_backends(count=2) as backends, running_proxy(make_settings(backends)) as app:

        async def one(i: int) -> int:
            client = await Client.connect(app.addresses[0])
            try:
                statuses = [(await client.request("GET", f"/{i}/{j}")).status for j in range(5)]
                return sum(s == 200 for s in statuses)
            finally:
                await client.aclose()

        results = await asyncio.gather(*(one(i) for i in range(200)))
        assert sum(results) == 1000


async def test_post_body_with_content_length_reaches_backend() -> None:
    async def echo(req: Received) -> Reply:
        return Reply(body=req.body)

    async with running_backends(echo) as backends, running_proxy(make_settings(backends)) as app:
        payload = bytes(range(256)) * 1000
        response = await request(app.addresses[0], "POST", "/upload", body=payload)
        assert response.status == 200
        assert response.body == payload
        received = backends[0].requests[0]
        assert received.header("Content-Length") == str(len(payload))


async def test_chunked_request_body_is_reframed_and_streamed() -> None:
    async def echo(req: Received) -> Reply:
        return Reply(body=req.body, chunked=True)

    async with running_backends(echo) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        await client.send(
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
        )
        response = await client.read_response()
        await client.aclose()
        assert response.status == 200
        assert response.body == b"hello world"
        assert response.header("Transfer-Encoding") == "chunked"
        received = backends[0].requests[0]
        assert received.header("Transfer-Encoding") == "chunked"
        assert received.header("Content-Length") is None
        assert received.body == b"hello world"
        # Re-framed: the chunk extension never reaches the upstream.
        assert b"ext=1" not in bytes(backends[0].raw)


async def test_head_response_with_length_keeps_connection_usable() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        head = await client.request("HEAD", "/h")
        assert head.status == 200
        assert head.body == b""
        assert head.header("Content-Length") == str(len(b"b1 HEAD /h\n"))
        again = await client.request("GET", "/g")
        assert again.body == b"b1 GET /g\n"
        await client.aclose()
        assert backends[0].connections == 1


async def test_expect_100_continue_waits_for_the_backend() -> None:
    async def echo(req: Received) -> Reply:
        return Reply(body=req.body)

    async with running_backends(echo) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        await client.send(
            b"PUT /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await client.read_response(head_request=True)
        assert interim.status == 100
        await client.send(b"data")
        response = await client.read_response()
        assert response.status == 200
        assert response.body == b"data"
        await client.aclose()


async def test_server_closed_pooled_connection_is_retried_on_a_fresh_one() -> None:
    state = {"n": 0}

    async def close_after_first(req: Received) -> Reply:
        state["n"] += 1
        return Reply(body=b"ok")

    async with running_backends(close_after_first) as backends:
        settings = make_settings(backends, upstream={"retries": 0})
        async with running_proxy(settings) as app:
            assert (await request(app.addresses[0])).status == 200
            # The server drops the idle pooled connection behind PIBL's back.
            for writer in list(backends[0]._writers):
                writer.transport.abort()
            response = await request(app.addresses[0])
            assert response.status == 200
            assert response.body == b"ok"


async def test_dead_backend_is_skipped_with_retries() -> None:
    dead = await dead_address()
    async with (
        running_backends(count=1) as backends,
        running_proxy(make_settings([dead, backends[0].address])) as app,
    ):
        for _ in range(4):
            assert (await request(app.addresses[0])).status == 200


async def test_upgrade_to_a_tunnel_after_101_carries_bytes_both_ways() -> None:
    received_head = bytearray()
    upstream_closed = asyncio.Event()

    async def echo_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received_head.extend(await reader.readuntil(b"\r\n\r\n"))
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        while data := await reader.read(65536):
            writer.write(data.upper())
        writer.close()
        await writer.wait_closed()
        upstream_closed.set()

    server = await asyncio.start_server(echo_server, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        async with running_proxy(make_settings([Address(host, port)])) as app:
            client = await Client.connect(app.addresses[0])
            await client.send(
                b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly"
            )
            response = await client.read_response(head_request=True)
            assert response.status == 101
            assert response.header("Upgrade") == "echo"
            await client.send(b" and late")
            echoed = b""
            async with asyncio.timeout(5):
                while echoed != b"EARLY AND LATE":
                    echoed += await client.read_raw(100)
            await client.aclose()
            # The client's close ends the tunnel on the upstream side too.
            await asyncio.wait_for(upstream_closed.wait(), 5)
        assert b"Upgrade: echo" in received_head
    finally:
        server.close()
        await server.wait_closed()


async def test_200_to_an_upgrade_request_is_not_a_tunnel() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        response = await client.request(
            "GET", "/ws", headers=[("Host", "t"), ("Connection", "Upgrade"), ("Upgrade", "echo")]
        )
        assert response.status == 200
        assert response.header("Connection") == "close"
        assert await client.is_closed()
        await client.aclose()


async def test_event_log_records_connections_at_debug_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="pibl.server")
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        assert (await client.request()).status == 200
        await client.aclose()
        await wait_until(lambda: not app.connections)
    messages = [r.getMessage() for r in caplog.records if r.name == "pibl.server"]
    assert any(m.startswith("connection from 127.0.0.1:") for m in messages)
    assert any(m.startswith("connection from 127.0.0.1:") and "closed" in m for m in messages)


async def test_expect_100_continue_body_is_never_sent_when_the_backend_refuses() -> None:
    after_head = bytearray()
    upstream_done = asyncio.Event()

    async def refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        while data := await reader.read(65536):  # until PIBL closes this connection
            after_head.extend(data)
        writer.close()
        upstream_done.set()

    server = await asyncio.start_server(refusing, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        async with running_proxy(make_settings([Address(host, port)])) as app:
            client = await Client.connect(app.addresses[0])
            await client.send(
                b"PUT /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            )
            response = await client.read_response()
            assert response.status == 401
            # The client may still send its body; PIBL must not pass it on, and closes.
            await client.send(b"data")
            assert await client.is_closed()
            await client.aclose()
            await asyncio.wait_for(upstream_done.wait(), 5)
        assert bytes(after_head) == b""
    finally:
        server.close()
        await server.wait_closed()
