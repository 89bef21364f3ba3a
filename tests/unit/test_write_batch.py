"""Output written while the loop runs a turn's callbacks is sent after them, one call per
connection (``server.downstream.WriteBatch``), without reordering, delaying or losing any of it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pibl.server.app import ProxyApp
from pibl.server.downstream import HOLD_OUTPUT_BELOW, DownstreamConnection, RequestCycle
from tests.support import make_settings

REQUEST = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


def head(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)


def answer(body: bytes) -> bytes:
    return head(body) + body


class RecordingTransport:
    """Records each ``writelines`` call (the one ``writev`` a real transport makes of it)."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.closed_after: int | None = None  # how many calls had been made when closed
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writelines([data])

    def writelines(self, data: list[bytes]) -> None:
        assert self.closed_after is None, "write after close"
        self.calls.append(b"".join(data))

    def close(self) -> None:
        if self.closed_after is None:
            self.closed_after = len(self.calls)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool:
        return self.closed_after is not None

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50123) if name == "peername" else default


def connect(
    app: ProxyApp, *bodies: bytes, keep_open: bool = True
) -> tuple[DownstreamConnection, RecordingTransport]:
    """A connection whose requests are answered, in order, with ``bodies``."""
    replies = list(bodies)

    async def handler(conn: DownstreamConnection, cycle: RequestCycle) -> bool:
        body = replies.pop(0)
        conn.writelines([head(body), body])
        return keep_open

    conn = app._plain_connection()
    conn.handler = handler
    transport = RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


async def next_turn() -> None:
    await asyncio.sleep(0)


@pytest.fixture
async def app() -> ProxyApp:
    return ProxyApp(make_settings(["127.0.0.1:9"]))


async def test_answers_go_out_after_the_turn_one_call_per_connection(app: ProxyApp) -> None:
    first, one = connect(app, b"a", b"b")
    second, two = connect(app, b"c")
    first.data_received(REQUEST * 2)  # two pipelined requests
    second.data_received(REQUEST)
    assert one.calls == []
    assert two.calls == []
    await next_turn()
    assert one.calls == [answer(b"a") + answer(b"b")]  # both answers, in order, in one call
    assert two.calls == [answer(b"c")]


async def test_a_later_turn_gets_its_own_call(app: ProxyApp) -> None:
    conn, transport = connect(app, b"a", b"b")
    conn.data_received(REQUEST)
    await next_turn()
    conn.data_received(REQUEST)
    await next_turn()
    assert transport.calls == [answer(b"a"), answer(b"b")]


async def test_large_output_is_written_at_once_after_what_was_held(app: ProxyApp) -> None:
    big = b"x" * HOLD_OUTPUT_BELOW
    conn, transport = connect(app, b"small", big)
    conn.data_received(REQUEST * 2)
    # Not held: the held small answer and the large one go out together, in order, at once.
    assert transport.calls == [answer(b"small") + answer(big)]
    await next_turn()
    assert transport.calls == [answer(b"small") + answer(big)]


async def test_close_sends_held_output_before_closing(app: ProxyApp) -> None:
    conn, transport = connect(app, b"last", keep_open=False)
    conn.data_received(REQUEST)
    assert transport.calls == [answer(b"last")]
    assert transport.closed_after == 1
    await next_turn()  # the batch finds nothing left to send, and writes nothing after close
    assert transport.calls == [answer(b"last")]


async def test_output_of_a_lost_connection_is_dropped(app: ProxyApp) -> None:
    conn, transport = connect(app, b"a")
    conn.data_received(REQUEST)
    conn.connection_lost(ConnectionResetError())
    await next_turn()
    assert transport.calls == []


async def test_abort_drops_held_output(app: ProxyApp) -> None:
    conn, transport = connect(app, b"a")
    conn.data_received(REQUEST)
    conn.abort()
    await next_turn()
    assert transport.calls == []
    assert transport.aborted
