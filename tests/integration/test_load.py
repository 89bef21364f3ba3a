"""Bounded load: what a failure under load costs, and what it must not cost.

- A backend killed under load costs only the requests in flight to it; every later request
  succeeds on the others.
- SIGTERM under load lets every request in flight finish, then PIBL exits 0.
- Ten reloads under load lose no request: ``test_reload.py::test_ten_reloads_during_load_lose_
  no_request`` (not repeated here).

``test_shutdown.py`` covers one request in flight in detail (idle connections closed at once,
a pipelined request not read, ``shutdown_timeout`` cutting a request that never ends); here it is
many requests at once, spread over several backends. Every test is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pibl.balancer.upstream import Address
from tests.integration.test_cli import assert_clean_output, bounded, pibl_process, write_config
from tests.integration.test_faults import Snapshot, assert_proxy_clean
from tests.integration.test_shutdown import assert_not_served
from tests.support import (
    Client,
    Received,
    Reply,
    make_settings,
    running_backends,
    running_proxy,
    wait_until,
)

CLIENTS = 20
WAIT = 10.0

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- a killed backend


class LoadBackend:
    """Answers every request with its name. While ``holding``, a response stops after its head
    and half its body, as a slow response would, and stays in flight until the backend dies."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.body = f"{name} says ok\n".encode() * 4
        self.in_flight = 0  # requests read whose response is not completely written
        self.held = 0
        self.served = 0
        self.holding = False
        self.address = Address("127.0.0.1", 0)
        self._server: asyncio.AbstractServer | None = None
        self._killed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> LoadBackend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = Address(*self._server.sockets[0].getsockname()[:2])
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._killed.is_set():
            writer.transport.abort()  # accepted just before the listener closed
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        head = b"HTTP/1.1 200 OK\r\nX-Backend: %s\r\nContent-Length: %d\r\n\r\n" % (
            self.name.encode(),
            len(self.body),
        )
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")  # PIBL sends GETs without a body
                self.in_flight += 1
                try:
                    if self.holding:
                        writer.write(head + self.body[: len(self.body) // 2])
                        await writer.drain()
                        self.held += 1
                        await self._killed.wait()
                        return  # dies with the backend, its response unfinished
                    writer.write(head + self.body)
                    await writer.drain()
                    self.served += 1
                finally:
                    self.in_flight -= 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def kill(self) -> None:
        """Close the listener and abort every open connection, responses in flight included."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self._killed.set()
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks)
        await server.wait_closed()


@dataclass
class Outcome:
    started_after_kill: bool
    status: int | None  # None: the connection was cut
    backend: str | None


async def client_loop(
    address: Address, outcomes: list[Outcome], killed: asyncio.Event, stop: asyncio.Event
) -> None:
    """GETs one after the other on a keep-alive connection; a cut one is counted, and the
    client reconnects."""
    client = await Client.connect(address)
    try:
        i = 0
        while not stop.is_set():
            i += 1
            after_kill = killed.is_set()
            try:
                response = await client.request("GET", f"/{i}")
            except ConnectionError:
                outcomes.append(Outcome(after_kill, None, None))
                await client.aclose()
                client = await Client.connect(address)
                continue
            outcomes.append(Outcome(after_kill, response.status, response.header("X-Backend")))
    finally:
        await client.aclose()


@bounded
async def test_a_backend_killed_under_load_costs_only_its_requests_in_flight() -> None:
    backends = [await LoadBackend(f"b{i}").start() for i in (1, 2, 3)]
    victim = backends[1]
    outcomes: list[Outcome] = []
    killed, stop = asyncio.Event(), asyncio.Event()
    try:
        settings = make_settings([b.address for b in backends])
        async with running_proxy(settings) as app:
            before = Snapshot.take()
            loops = [
                asyncio.create_task(client_loop(app.addresses[0], outcomes, killed, stop))
                for _ in range(CLIENTS)
            ]
            try:
                # Steady load over all three.
                await wait_until(
                    lambda: len(outcomes) >= 200 and all(b.served >= 10 for b in backends),
                    timeout=WAIT,
                )
                # Responses under way on the victim when it dies.
                victim.holding = True
                await wait_until(lambda: victim.held >= 3, timeout=WAIT)
                in_flight_at_kill = victim.in_flight
                killed.set()
                await victim.kill()
                # Load goes on: 200 more answers after the kill.
                target = len(outcomes) + 200
                await wait_until(lambda: len(outcomes) >= target, timeout=WAIT)
            finally:
                stop.set()
                await asyncio.gather(*loops)
            await assert_proxy_clean(app, before)
    finally:
        for backend in backends:
            await backend.kill()

    failed = [o for o in outcomes if o.status != 200]
    # Each response under way on the victim was cut (the client must not take it as whole);
    # nothing else failed: what was queued or sent to the victim went to another server.
    assert victim.held <= len(failed) <= in_flight_at_kill, (failed, in_flight_at_kill)
    assert all(o.status is None for o in failed)
    assert not any(o.started_after_kill for o in failed)
    after = [o for o in outcomes if o.started_after_kill]
    assert len(after) >= 200
    assert {o.backend for o in after} == {"b1", "b3"}


# --------------------------------------------------------------------------- SIGTERM under load


@bounded
async def test_sigterm_under_load_lets_every_request_in_flight_finish(tmp_path: Path) -> None:
    release = asyncio.Event()
    all_arrived = asyncio.Event()
    arrived: list[bytes] = []

    async def hold_until_released(req: Received) -> Reply:
        arrived.append(req.target)
        if len(arrived) == CLIENTS:
            all_arrived.set()
        await release.wait()
        return Reply(body=b"done " + req.target)

    async with running_backends(hold_until_released, hold_until_released) as backends:
        config = write_config(
            tmp_path / "pibl.toml",
            [b.address for b in backends],
            server='shutdown_timeout = "30s"',
        )
        async with pibl_process("run", "-c", str(config)) as pibl:
            address = await pibl.wait_listening()
            clients: list[Client] = []
            try:
                for i in range(CLIENTS):
                    client = await Client.connect(address)
                    clients.append(client)
                    await client.send(f"GET /{i} HTTP/1.1\r\nHost: load.test\r\n\r\n".encode())
                async with asyncio.timeout(WAIT):
                    await all_arrived.wait()  # every request is in flight at a backend

                loop = asyncio.get_running_loop()
                pibl.send_signal(signal.SIGTERM)
                signalled = loop.time()
                await pibl.wait_for("shutting down")
                await assert_not_served(address)
                release.set()
                responses = await asyncio.gather(
                    *(client.read_response(timeout=WAIT) for client in clients)
                )
                for client in clients:
                    assert await client.is_closed(timeout=WAIT)
            finally:
                for client in clients:
                    await client.aclose()
            assert await pibl.wait_exit(timeout=WAIT) == 0, pibl.describe()
            # It exited once the requests were answered, not at the 30 s shutdown_timeout.
            assert loop.time() - signalled < WAIT
            assert_clean_output(pibl.stdout, pibl.stderr)

    assert [r.status for r in responses] == [200] * CLIENTS
    assert [r.body for r in responses] == [b"done /%d" % i for i in range(CLIENTS)]
    assert all(r.header("Connection") == "close" for r in responses)
    assert sorted(arrived) == sorted(b"/%d" % i for i in range(CLIENTS))
    assert all(b.requests for b in backends)  # the load was spread over both
