"""Graceful shutdown of a real PIBL process: SIGTERM stops accepting, lets the request in flight
finish (up to ``shutdown_timeout``), then exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

from pibl.balancer.upstream import Address
from tests.integration.test_cli import (
    assert_clean_output,
    bounded,
    pibl_process,
    write_config,
)
from tests.support import Client, Received, Reply, request, running_backends

WAIT = 10.0


async def assert_not_served(address: Address) -> None:
    """A new connection is refused, or closed (or reset) without an answer."""
    try:
        reader, writer = await asyncio.open_connection(address.host, address.port)
    except (ConnectionRefusedError, ConnectionResetError):
        # Refused; or reset while the handshake was completing as the listener closed.
        return
    try:
        writer.write(b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n")
        async with asyncio.timeout(WAIT):
            data = await reader.read(65536)
        assert data == b"", f"a connection made after SIGTERM was answered: {data!r}"
    except (ConnectionResetError, BrokenPipeError):
        pass  # accepted by the kernel, then dropped with the listening socket
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@bounded
async def test_sigterm_finishes_the_request_in_flight_then_exits_0(tmp_path: Path) -> None:
    shutdown_timeout = 10.0
    release = asyncio.Event()

    async def handler(req: Received) -> Reply:
        if req.target == b"/slow":
            await release.wait()
            return Reply(body=b"finished after SIGTERM")
        return Reply(body=b"quick")

    async with running_backends(handler) as backends:
        origin = backends[0]
        config = write_config(
            tmp_path / "pibl.toml",
            [origin.address],
            server=f'shutdown_timeout = "{shutdown_timeout:g}s"',
        )
        async with pibl_process("run", "-c", str(config)) as pibl:
            address = await pibl.wait_listening()
            # An idle keep-alive connection: it has nothing in flight and is closed at once.
            idle = await Client.connect(address)
            busy = await Client.connect(address)
            try:
                assert (await idle.request("GET", "/quick")).body == b"quick"
                await busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
                async with asyncio.timeout(WAIT):
                    while not any(r.target == b"/slow" for r in origin.requests):
                        origin.request_event.clear()
                        await origin.request_event.wait()

                loop = asyncio.get_running_loop()
                pibl.send_signal(signal.SIGTERM)
                signalled = loop.time()
                await pibl.wait_for("shutting down")
                await assert_not_served(address)
                assert await idle.is_closed(timeout=WAIT)
                # A request pipelined behind the one in flight is not read any more.
                await busy.send(b"GET /quick HTTP/1.1\r\nHost: t\r\n\r\n")
                release.set()

                response = await busy.read_response(timeout=WAIT)
                assert response.status == 200
                assert response.body == b"finished after SIGTERM"
                assert response.header("Connection") == "close"
                assert await busy.is_closed(timeout=WAIT)
                assert busy.buffer == b"", "the pipelined request was answered"
            finally:
                await idle.aclose()
                await busy.aclose()

            assert await pibl.wait_exit(timeout=shutdown_timeout) == 0
            assert loop.time() - signalled < shutdown_timeout
            assert "stopped" in pibl.stderr, pibl.describe()
            assert_clean_output(pibl.stdout, pibl.stderr)
        assert [r.target for r in origin.requests] == [b"/quick", b"/slow"]


@bounded
async def test_shutdown_timeout_cuts_a_request_that_does_not_finish(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def hang(req: Received) -> Reply:
        await never.wait()
        return Reply()

    async with running_backends(hang) as backends:
        config = write_config(
            tmp_path / "pibl.toml", [backends[0].address], server='shutdown_timeout = "300ms"'
        )
        async with pibl_process("run", "-c", str(config)) as pibl:
            address = await pibl.wait_listening()
            client = await Client.connect(address)
            try:
                await client.send(b"GET /forever HTTP/1.1\r\nHost: t\r\n\r\n")
                async with asyncio.timeout(WAIT):
                    await backends[0].request_event.wait()
                loop = asyncio.get_running_loop()
                pibl.send_signal(signal.SIGTERM)
                signalled = loop.time()
                assert await pibl.wait_exit(timeout=WAIT) == 0, pibl.describe()
                elapsed = loop.time() - signalled
                # The in-flight request was cut: no response, the connection closed.
                assert await client.is_closed(timeout=WAIT)
                assert client.buffer == b""
            finally:
                await client.aclose()
            assert 0.25 <= elapsed < 5.0, elapsed
            assert "stopped" in pibl.stderr
            assert_clean_output(pibl.stdout, pibl.stderr)


@bounded
async def test_sigterm_with_nothing_in_flight_exits_at_once(tmp_path: Path) -> None:
    async with running_backends(count=1) as backends:
        config = write_config(
            tmp_path / "pibl.toml", [backends[0].address], server='shutdown_timeout = "30s"'
        )
        async with pibl_process("run", "-c", str(config)) as pibl:
            address = await pibl.wait_listening()
            assert (await request(address, "GET", "/")).status == 200
            loop = asyncio.get_running_loop()
            pibl.send_signal(signal.SIGTERM)
            signalled = loop.time()
            assert await pibl.wait_exit(timeout=WAIT) == 0
            # Not a wait for the 30 s shutdown_timeout: there was nothing to wait for.
            assert loop.time() - signalled < 5.0
            assert_clean_output(pibl.stdout, pibl.stderr)
