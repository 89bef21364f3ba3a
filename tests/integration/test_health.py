"""Active health checks, passive ejection, panic mode and connection caps with real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from pibl.balancer.checker import HealthChecker
from pibl.balancer.group import UpstreamGroup
from pibl.balancer.strategies import make_strategy
from pibl.balancer.upstream import Address, Upstream
from pibl.config import HealthSettings, Settings
from tests.support import (
    Client,
    Handler,
    Received,
    Reply,
    dead_address,
    make_settings,
    request,
    running_backends,
    running_proxy,
    wait_until,
)

FAST_CHECKS = {"path": "/health", "interval": "50ms", "timeout": "1s", "rise": 2, "fall": 2}


def switchable(name: str, state: dict[str, bool]) -> Handler:
    """A backend whose /health answers 200 while ``state["healthy"]``, else 500; other paths
    answer 200 while ``state["serving"]`` (default True), else 503."""

    def handle(req: Received) -> Reply:
        if req.target == b"/health":
            return Reply(status=200 if state.get("healthy", True) else 500)
        if not state.get("serving", True):
            return Reply(status=503, headers=[(b"X-Backend", name.encode())])
        return Reply(headers=[(b"X-Backend", name.encode())], body=name.encode())

    return handle


async def backends_hit(app_address: Address, count: int) -> list[str | None]:
    client = await Client.connect(app_address)
    try:
        seen = []
        for i in range(count):
            response = await client.request("GET", f"/{i}")
            assert response.status == 200
            seen.append(response.header("X-Backend"))
        return seen
    finally:
        await client.aclose()


def messages(caplog: pytest.LogCaptureFixture, fragment: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if fragment in r.getMessage()]


# --------------------------------------------------------------------------- active checks


async def test_failing_health_check_takes_a_server_out_until_it_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pibl.balancer")
    state: dict[str, bool] = {"healthy": True}
    handlers = [switchable("b1", {}), switchable("b2", state), switchable("b3", {})]
    async with running_backends(*handlers) as backends:
        settings = make_settings(backends, upstream={"health": FAST_CHECKS})
        async with running_proxy(settings) as app:
            group = app.groups["app"]
            b2 = group.upstreams[1]
            await wait_until(lambda: all(u.health.successes >= 1 for u in group.upstreams))

            state["healthy"] = False
            await wait_until(lambda: not b2.is_healthy)
            assert set(await backends_hit(app.addresses[0], 12)) == {"b1", "b3"}

            state["healthy"] = True
            await wait_until(lambda: b2.is_healthy)
            assert set(await backends_hit(app.addresses[0], 9)) == {"b1", "b2", "b3"}

    checks = [r for r in backends[1].requests if r.target == b"/health"]
    assert len(checks) >= 5  # one pass, two failures, two passes
    check = checks[0]
    assert (check.method, check.version) == ("GET", "1.1")
    assert check.header("Host") == str(backends[1].address)
    assert check.header("Connection") == "close"
    [down] = messages(caplog, "is DOWN")
    assert down.levelno == logging.WARNING
    assert str(backends[1].address) in down.getMessage()
    assert "status 500" in down.getMessage()
    [up] = messages(caplog, "is UP")
    assert up.levelno == logging.INFO


async def test_health_check_status_set_and_stop_on_close() -> None:
    async with running_backends(lambda req: Reply(status=204)) as backends:
        health = {**FAST_CHECKS, "expect_status": [204], "rise": 1, "fall": 1}
        async with running_proxy(make_settings(backends, upstream={"health": health})) as app:
            (upstream,) = app.groups["app"].upstreams
            await wait_until(lambda: upstream.health.successes >= 2)
            assert upstream.health.last_result == "status 204"
            [checker] = app.services
            assert isinstance(checker, HealthChecker)
            tasks = list(checker.tasks)
            assert len(tasks) == 1
        assert all(task.done() for task in tasks)  # stopped with the proxy
        assert checker.tasks == []


@contextlib.asynccontextmanager
async def raw_server(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[Address]:
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await serve(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        yield Address(host, port)
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # never answers


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
    await writer.drain()


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.0 301 Moved\r\nLocation: /x\r\n\r\n")
    await writer.drain()


@pytest.mark.parametrize(
    ("serve", "ok", "reason"),
    [
        (_silent, False, "no answer within 0.2s"),
        (_garbage, False, "invalid response (no HTTP/1.x status line)"),
        (_hang_up, False, "connection closed before a status line"),
        (_ok, True, "status 301"),
    ],
)
async def test_check_reports_what_happened(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ok: bool,
    reason: str,
) -> None:
    async with raw_server(serve) as address:
        upstream = Upstream(address)
        group = UpstreamGroup("app", [upstream], make_strategy("round_robin"), {})
        checker = HealthChecker(group, HealthSettings(timeout=0.2))
        assert await checker.check(upstream) == (ok, reason)


async def test_check_of_a_refusing_server_is_a_connect_failure() -> None:
    upstream = Upstream(await dead_address())
    group = UpstreamGroup("app", [upstream], make_strategy("round_robin"), {})
    ok, reason = await HealthChecker(group, HealthSettings()).check(upstream)
    assert not ok
    assert reason.startswith("connect failed")


# --------------------------------------------------------------------------- passive ejection


async def test_a_killed_backend_is_ejected_and_requests_keep_succeeding(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pibl.balancer")
    async with running_backends(count=3) as backends:
        settings = make_settings(
            backends, upstream={"max_fails": 2, "fail_timeout": "60s", "retries": 2}
        )
        async with running_proxy(settings) as app:
            group = app.groups["app"]
            b2 = group.upstreams[1]
            assert set(await backends_hit(app.addresses[0], 3)) == {"b1", "b2", "b3"}

            await backends[1].aclose()
            seen = await backends_hit(app.addresses[0], 6)  # every one retried elsewhere
            assert set(seen) == {"b1", "b3"}
            assert b2.is_ejected
            assert b2.ejections == 1
            assert b2.ejected_until_wall is not None
            attempts = b2.requests
            assert set(await backends_hit(app.addresses[0], 12)) == {"b1", "b3"}
            assert b2.requests == attempts  # not even tried while ejected
    [ejected] = messages(caplog, "ejected for 60s")
    assert ejected.levelno == logging.WARNING
    assert str(backends[1].address) in ejected.getMessage()


# --------------------------------------------------------------------------- panic mode


async def test_all_servers_down_are_still_tried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pibl.balancer")
    state = {"healthy": False}
    async with running_backends(switchable("b2", state)) as backends:
        dead = await dead_address()
        # One check at start, the next in an hour: whatever answers now does so on its own.
        health = {**FAST_CHECKS, "interval": "1h", "fall": 1}
        settings = make_settings([dead, backends[0].address], upstream={"health": health})
        async with running_proxy(settings) as app:
            group = app.groups["app"]
            await wait_until(lambda: not any(u.is_healthy for u in group.upstreams))
            for _ in range(6):
                response = await request(app.addresses[0])
                assert response.status == 200
                assert response.header("X-Backend") == "b2"
            assert group.in_panic
            assert not group.upstreams[1].is_healthy  # the checker has not looked again
    [panic] = messages(caplog, "panic mode:")
    assert panic.levelno == logging.WARNING


async def test_a_recovered_server_answers_while_everything_is_ejected() -> None:
    state = {"serving": False}
    async with running_backends(switchable("b2", state)) as backends:
        dead = await dead_address()
        settings = make_settings(
            [dead, backends[0].address],
            upstream={"max_fails": 1, "fail_timeout": "60s", "retries": 1},
        )
        async with running_proxy(settings) as app:
            group = app.groups["app"]
            # dead: connect refused, then b2: 503. Both are ejected for a minute.
            assert (await request(app.addresses[0])).status == 503
            assert all(u.is_ejected for u in group.upstreams)

            state["serving"] = True
            for _ in range(4):
                response = await request(app.addresses[0])
                assert response.status == 200
                assert response.header("X-Backend") == "b2"
            assert group.in_panic
            assert all(u.is_ejected for u in group.upstreams)  # the minute is not over


# --------------------------------------------------------------------------- connection caps


class SlowBackend:
    """Holds every request until ``gate`` opens; records arrival order and concurrency."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.active = 0
        self.max_active = 0
        self.order: list[str] = []

    async def __call__(self, req: Received) -> Reply:
        self.order.append(req.target.decode())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.gate.wait()
        finally:
            self.active -= 1
        return Reply(body=req.target)


def capped_settings(backend_address: Address, **upstream: Any) -> Settings:
    server = {"address": str(backend_address), "max_connections": 1}
    return make_settings([backend_address], upstream={"servers": [server], **upstream})


async def queued(group: UpstreamGroup, count: int) -> None:
    await wait_until(lambda: group.queued == count)


async def test_requests_over_the_cap_queue_and_succeed_in_order() -> None:
    slow = SlowBackend()
    async with running_backends(slow) as backends:
        settings = capped_settings(backends[0].address, queue=10)
        async with running_proxy(settings) as app:
            group = app.groups["app"]
            tasks = [asyncio.create_task(request(app.addresses[0], "GET", "/1"))]
            await wait_until(lambda: slow.order == ["/1"])
            for i in range(2, 5):
                tasks.append(asyncio.create_task(request(app.addresses[0], "GET", f"/{i}")))
                await queued(group, i - 1)
            slow.gate.set()
            responses = await asyncio.gather(*tasks)
    assert [r.status for r in responses] == [200] * 4
    assert [r.body for r in responses] == [b"/1", b"/2", b"/3", b"/4"]
    assert slow.order == ["/1", "/2", "/3", "/4"]
    assert slow.max_active == 1


async def test_a_full_queue_answers_503_at_once() -> None:
    slow = SlowBackend()
    async with running_backends(slow) as backends:
        settings = capped_settings(backends[0].address, queue=1)
        async with running_proxy(settings) as app:
            group = app.groups["app"]
            first = asyncio.create_task(request(app.addresses[0], "GET", "/1"))
            await wait_until(lambda: slow.order == ["/1"])
            second = asyncio.create_task(request(app.addresses[0], "GET", "/2"))
            await queued(group, 1)
            extra = await request(app.addresses[0], "GET", "/3")
            assert extra.status == 503
            slow.gate.set()
            assert [(await first).status, (await second).status] == [200, 200]
    assert slow.order == ["/1", "/2"]


async def test_a_queued_request_gives_up_after_queue_timeout() -> None:
    slow = SlowBackend()
    async with running_backends(slow) as backends:
        settings = capped_settings(backends[0].address, queue_timeout="100ms")
        async with running_proxy(settings) as app:
            first = asyncio.create_task(request(app.addresses[0], "GET", "/1"))
            await wait_until(lambda: slow.order == ["/1"])
            assert (await request(app.addresses[0], "GET", "/2")).status == 503
            assert app.groups["app"].rejected == 1
            slow.gate.set()
            assert (await first).status == 200
    assert slow.order == ["/1"]
