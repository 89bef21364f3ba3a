"""The supervisor's pure parts: restart backoff, port placeholders (real sockets, no process)."""

from __future__ import annotations

import socket
import sys

import pytest

from pibl.balancer.upstream import Address
from pibl.server.workers import (
    RESTART_BACKOFF_MAX,
    RESTART_BACKOFF_MIN,
    bind_placeholders,
    restart_delay,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT")


def test_restart_delay_doubles_from_the_minimum_up_to_the_maximum() -> None:
    delays = [restart_delay(n) for n in range(10)]
    assert delays[0] == RESTART_BACKOFF_MIN
    assert delays[1] == 2 * RESTART_BACKOFF_MIN
    assert delays == sorted(delays)
    assert delays[-1] == RESTART_BACKOFF_MAX
    assert restart_delay(10_000) == RESTART_BACKOFF_MAX  # no overflow in a long crash loop


def _reuseport_listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@linux_only
def test_a_placeholder_turns_port_0_into_a_port_that_only_reuseport_sockets_can_share() -> None:
    (placeholder,) = bind_placeholders([Address("127.0.0.1", 0)])
    with placeholder:
        port = placeholder.getsockname()[1]
        assert port != 0
        # Not listening: a connection is refused until a worker listens on the port.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with _reuseport_listener(port) as worker:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                accepted, _ = worker.accept()  # the worker's socket gets it, not the placeholder
                accepted.close()
            with socket.socket() as intruder, pytest.raises(OSError, match="already in use"):
                intruder.bind(("127.0.0.1", port))


@linux_only
def test_placeholders_of_one_name_share_the_port_chosen_for_the_first_address() -> None:
    sockets = bind_placeholders([Address("localhost", 0)])
    try:
        assert sockets
        assert len({s.getsockname()[1] for s in sockets}) == 1
    finally:
        for sock in sockets:
            sock.close()


@linux_only
def test_a_port_in_use_fails_at_once() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="already in use"):
            bind_placeholders([Address("127.0.0.1", taken.getsockname()[1])])
