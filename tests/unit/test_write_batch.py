"""Output written while the loop runs a turn's callbacks is sent after them, one call per
connection (``server.downstream.WriteBatch``), without reordering, delaying or losing any of it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pibl.pool.connection import UpstreamConnection
from pibl.server.app import ProxyApp
from pibl.server.downstream import DownstreamConnection, RequestCycle
from pibl.writebatch import HOLD_BELOW, HeldOutput, WriteBatch
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
        self.eof_after: int | None = None  # ... when half-closed
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writelines([data])

    def writelines(self, data: list[bytes]) -> None:
        assert self.closed_after is None, "write after close"
        assert self.eof_after is None, "write after write_eof"
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
        return True

    def write_eof(self) -> None:
        self.eof_after = len(self.calls)

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
    big = b"x" * HOLD_BELOW
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


# -- upstream connections ----------------------------------------------------------------------
def upstream(batch: WriteBatch | None) -> tuple[UpstreamConnection, RecordingTransport]:
    conn = UpstreamConnection(batch)
    transport = RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


async def test_upstream_requests_are_held_for_the_turn() -> None:
    conn, transport = upstream(WriteBatch())
    conn.write(b"GET /a HTTP/1.1\r\n\r\n")
    conn.writelines([b"GET /b ", b"HTTP/1.1\r\n\r\n"])
    assert transport.calls == []
    await next_turn()
    assert transport.calls == [b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"]


async def test_an_upstream_connection_without_a_batch_writes_at_once() -> None:
    conn, transport = upstream(None)
    conn.write(b"GET / HTTP/1.1\r\n\r\n")
    assert transport.calls == [b"GET / HTTP/1.1\r\n\r\n"]


async def test_upstream_half_close_and_close_send_what_is_held_first() -> None:
    conn, transport = upstream(WriteBatch())
    conn.write(b"tunnelled bytes")
    assert conn.write_eof()
    assert transport.calls == [b"tunnelled bytes"]
    assert transport.eof_after == 1
    conn, transport = upstream(WriteBatch())
    conn.write(b"GET / HTTP/1.1\r\n\r\n")
    conn.close()
    assert transport.calls == [b"GET / HTTP/1.1\r\n\r\n"]
    assert transport.closed_after == 1


async def test_aborted_or_lost_upstream_connections_drop_what_is_held() -> None:
    batch = WriteBatch()
    aborted, aborted_transport = upstream(batch)
    lost, lost_transport = upstream(batch)
    aborted.write(b"GET / HTTP/1.1\r\n\r\n")
    lost.write(b"GET / HTTP/1.1\r\n\r\n")
    aborted.abort()
    lost.connection_lost(ConnectionResetError())
    await next_turn()
    assert aborted_transport.calls == []
    assert lost_transport.calls == []


async def test_pool_connections_hold_their_writes_in_the_apps_batch(app: ProxyApp) -> None:
    (group,) = app.groups.values()
    (pool,) = group.pools.values()
    conn = pool._new_connection()
    transport = RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    down, client = connect(app, b"a")
    down.data_received(REQUEST)
    conn.write(b"GET / HTTP/1.1\r\n\r\n")
    assert transport.calls == []
    await next_turn()  # one turn's end sends both
    assert transport.calls == [b"GET / HTTP/1.1\r\n\r\n"]
    assert client.calls == [answer(b"a")]


# -- the batch ---------------------------------------------------------------------------------
class BrokenTransport(RecordingTransport):
    def writelines(self, data: list[bytes]) -> None:
        raise RuntimeError("unable to perform operation on a closed handle")


async def test_one_failing_transport_does_not_hold_back_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    batch = WriteBatch()
    broken = HeldOutput(BrokenTransport(), batch)  # type: ignore[arg-type]
    transport = RecordingTransport()
    healthy = HeldOutput(transport, batch)  # type: ignore[arg-type]
    broken.writelines([b"lost"])
    healthy.writelines([b"kept"])
    await next_turn()
    assert transport.calls == [b"kept"]
    assert "writing to" in caplog.text
    healthy.writelines([b"next turn"])  # the batch is scheduled again
    await next_turn()
    assert transport.calls == [b"kept", b"next turn"]


async def test_output_is_held_again_after_each_flush() -> None:
    batch = WriteBatch()
    transport = RecordingTransport()
    output = HeldOutput(transport, batch)  # type: ignore[arg-type]
    output.writelines([b"a"])
    output.flush()
    output.writelines([b"b"])
    assert transport.calls == [b"a"]
    await next_turn()
    assert transport.calls == [b"a", b"b"]
