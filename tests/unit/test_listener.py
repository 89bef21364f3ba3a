"""Listener: every pending connection is accepted when the socket is readable, not one per
loop iteration (what uvloop's servers do, which left bursts waiting in the accept queue)."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from pibl.server.listener import ACCEPT_PAUSE, Listener


class Counting(asyncio.Protocol):
    made = 0
    all_made: asyncio.Event

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Counting.made += 1
        if Counting.made == BURST:
            Counting.all_made.set()


BURST = 100


async def test_a_burst_of_pending_connections_is_accepted_in_one_go() -> None:
    loop = asyncio.get_running_loop()
    Counting.made = 0
    Counting.all_made = asyncio.Event()
    listener = await Listener.bind(loop, Counting, "127.0.0.1", 0, backlog=512)
    port = listener.sockets[0].getsockname()[1]
    clients = []
    try:
        # The handshakes complete in the kernel; nothing is accepted until the loop runs.
        for _ in range(BURST):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        await asyncio.wait_for(Counting.all_made.wait(), 10)
        assert listener.accept_calls == 1
    finally:
        listener.close()
        await listener.wait_closed()
        for client in clients:
            client.close()


async def test_a_taken_address_is_named_in_the_error() -> None:
    loop = asyncio.get_running_loop()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"127.0.0.1', {port}.*address already in use"):
            await Listener.bind(loop, Counting, "127.0.0.1", port, backlog=16)
    finally:
        taken.close()


async def test_closed_listener_refuses_connections() -> None:
    loop = asyncio.get_running_loop()
    listener = await Listener.bind(loop, Counting, "127.0.0.1", 0, backlog=16)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


class OutOfDescriptorsOnce(socket.socket):
    """A listening socket whose first accept fails as when the process has no fd left."""

    failed = False

    def accept(self) -> tuple[socket.socket, object]:
        if not OutOfDescriptorsOnce.failed:
            OutOfDescriptorsOnce.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


async def test_out_of_descriptors_pauses_accepting_then_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    Counting.made = 0
    Counting.all_made = asyncio.Event()
    sock = OutOfDescriptorsOnce(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.setblocking(False)
    listener = Listener(loop, [sock], Counting)
    listener.start()
    port = sock.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(BURST)]
    started = loop.time()
    try:
        await asyncio.wait_for(Counting.all_made.wait(), 10)
        # Accepting stopped for the pause (no busy loop on EMFILE), then took everyone.
        assert loop.time() - started >= ACCEPT_PAUSE - 0.05
        assert "cannot accept connections" in caplog.text
    finally:
        listener.close()
        await listener.wait_closed()
        for client in clients:
            client.close()
