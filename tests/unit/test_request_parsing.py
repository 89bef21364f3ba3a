"""Downstream request parsing (``DownstreamConnection``) driven by a fake transport.

Any bytes, split anywhere, give parsed requests or one 4xx/5xx answer and a stop — never an
exception out of ``data_received``; and what is parsed does not depend on where the input is
split (byte at a time, random splits, one piece).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from pibl.clock import TurnClock
from pibl.config import ServerSettings
from pibl.errors import status_for
from pibl.http.framing import error_response
from pibl.server.app import HEAD_READ_SLACK
from pibl.server.downstream import DownstreamConnection, RequestCycle
from pibl.writebatch import WriteBatch

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


# --------------------------------------------------------------------------- fakes


class FakeTransport:
    """Just enough of ``asyncio.Transport``: records writes, closes like the real one (soon)."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.protocol: DownstreamConnection | None = None
        self.closed = False
        self.aborted = False
        self.paused = False
        self.lost = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def writelines(self, data: Sequence[bytes]) -> None:
        for piece in data:
            self.write(piece)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self._lose)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def _lose(self) -> None:
        if not self.lost and self.protocol is not None:
            self.lost = True
            self.protocol.connection_lost(None)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50123) if name == "peername" else default


@dataclass(frozen=True)
class Parsed:
    method: str
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass
class RecordingPipeline:
    """Stands in for ``proxy.pipeline.Pipeline``: waits for each body, records, answers 200."""

    requests: list[Parsed] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    cycles: list[RequestCycle] = field(default_factory=list)
    # Whether the client's socket was paused when each request reached the pipeline (it is
    # served at once, maybe before data_received returns).
    paused_when_handled: list[bool] = field(default_factory=list)

    async def handle(self, conn: DownstreamConnection, cycle: RequestCycle) -> bool:
        self.cycles.append(cycle)
        self.paused_when_handled.append(conn.reading_paused)
        if cycle.error is None and cycle.head is not None:
            body = bytearray()
            ended = asyncio.Event()
            cycle.attach(body.extend, ended.set)
            await ended.wait()
            if cycle.error is None:
                head = cycle.head
                self.requests.append(
                    Parsed(head.method, head.target, tuple(head.headers), bytes(body))
                )
                conn.write(OK_RESPONSE)
                return head.keep_alive
        assert cycle.error is not None
        status = status_for(cycle.error)
        self.errors.append(status)
        conn.write(error_response(status, str(cycle.error)))
        return False


class FakeApp:
    """The attributes of ``ProxyApp`` that a ``DownstreamConnection`` reads."""

    def __init__(self, limits: ServerSettings) -> None:
        self.limits = limits
        self.max_head_bytes = limits.max_request_line + limits.max_header_size + HEAD_READ_SLACK
        self.keepalive_enabled = True
        self.max_connections = 0
        self.connections: set[DownstreamConnection] = set()
        self.waiting: deque[DownstreamConnection] = deque()
        self.pipeline = RecordingPipeline()
        self.write_batch = WriteBatch()
        self.clock = TurnClock()

    def is_trusted(self, ip: str) -> bool:
        return False


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def server_log() -> Iterator[list[logging.LogRecord]]:
    """Warnings and errors PIBL's server logger emits (an unexpected parser error is a bug)."""
    handler = _ListHandler()
    logger = logging.getLogger("pibl.server")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


@dataclass
class Outcome:
    requests: list[Parsed]
    errors: list[int]
    written: bytes
    closed: bool
    stopped: bool


class Harness:
    def __init__(self, **limits: Any) -> None:
        self.app = FakeApp(ServerSettings(**limits))
        self.transport = FakeTransport()
        self.conn = DownstreamConnection(self.app)  # type: ignore[arg-type]
        # The recording stand-in answers through the connection's handler hook: the
        # compiled connection only calls a real Pipeline through app.pipeline.
        self.conn.handler = self.app.pipeline.handle
        self.transport.protocol = self.conn
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    @property
    def pipeline(self) -> RecordingPipeline:
        return self.app.pipeline

    def feed(self, pieces: Sequence[bytes]) -> None:
        for piece in pieces:
            self.conn.data_received(piece)  # must never raise

    async def settle(self) -> None:
        """Run the loop until the connection's task has nothing left it can do."""
        for _ in range(1000):
            task = self.conn.task
            if task is None:
                break
            await asyncio.sleep(0)
            if task is self.conn.task and not task.done() and self._waiting_for_input():
                break
        # Let a close reach connection_lost.
        await asyncio.sleep(0)

    def _waiting_for_input(self) -> bool:
        # The pipeline waits for a body that has not fully arrived: more input is needed.
        receiving = self.conn.receiving
        return receiving is not None and not receiving.body_done

    async def aclose(self) -> None:
        task = self.conn.task
        if not self.transport.lost:
            self.transport.lost = True
            self.conn.connection_lost(None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def outcome(self) -> Outcome:
        return Outcome(
            list(self.pipeline.requests),
            list(self.pipeline.errors),
            bytes(self.transport.written),
            self.transport.closed,
            self.conn.stop_parsing,
        )


async def run(pieces: Sequence[bytes], **limits: Any) -> Outcome:
    harness = Harness(**limits)
    try:
        harness.feed(pieces)
        await harness.settle()
        return harness.outcome()
    finally:
        await harness.aclose()


# --------------------------------------------------------------------------- splitting


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [p for p in pieces if p]


_cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12)


# --------------------------------------------------------------------------- generators

_TCHAR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~"
_PCHAR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@%"
_VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))


@st.composite
def _header_value(draw: st.DrawFn) -> bytes:
    words = draw(st.lists(st.text(_VCHAR, min_size=1, max_size=10), max_size=3))
    return " ".join(words).encode()


_header_name = st.one_of(
    st.text(_TCHAR, min_size=1, max_size=10).map(lambda s: "X-" + s),
    st.sampled_from(["Accept", "User-Agent", "Cookie", "Accept-Encoding", "Cache-Control"]),
).map(str.encode)
_target = st.builds(
    lambda segments, query: ("/" + "/".join(segments) + (f"?{query}" if query else "")).encode(),
    st.lists(st.text(_PCHAR, max_size=8), max_size=4),
    st.one_of(st.none(), st.text(_PCHAR + "/?", min_size=1, max_size=12)),
)


@dataclass(frozen=True)
class WireRequest:
    parsed: Parsed
    raw: bytes


@st.composite
def wire_request(draw: st.DrawFn) -> WireRequest:
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    target = draw(_target)
    headers = [(b"Host", draw(st.sampled_from([b"example.com", b"a.example:8080", b"[::1]"])))]
    headers += draw(st.lists(st.tuples(_header_name, _header_value()), max_size=6))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b"" if framing == "none" else draw(st.binary(max_size=300))
    payload = b""
    if framing == "length":
        headers.append(
            (draw(st.sampled_from([b"Content-Length", b"content-length"])), b"%d" % len(body))
        )
        payload = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        cuts = draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=5))
        for piece in split_at(body, cuts):
            ext = draw(st.sampled_from([b"", b";name=value", b";flag"]))
            payload += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
        payload += b"0\r\n"
        if draw(st.booleans()):
            payload += b"X-Trailer: t\r\n"
        payload += b"\r\n"
    position = draw(st.integers(min_value=0, max_value=len(headers)))
    headers.insert(position, headers.pop(0))  # Host anywhere among the fields
    raw = b"%s %s HTTP/1.1\r\n" % (method.encode(), target)
    raw += b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers) + b"\r\n" + payload
    return WireRequest(Parsed(method, target, tuple(headers), body), raw)


# A valid stream of requests with a few bytes of one of them changed, removed or inserted, or
# cut short: the requests before the damage parse, the damaged one is refused.
@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    requests = [r.raw for r in draw(st.lists(wire_request(), min_size=1, max_size=4))]
    victim = draw(st.integers(min_value=0, max_value=len(requests) - 1))
    data = bytearray(requests[victim])
    if draw(st.booleans()):
        del data[draw(st.integers(min_value=0, max_value=len(data))) :]
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        index = draw(st.integers(min_value=0, max_value=len(data)))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 0x3A, 0x2C, 0x7F, 0xFF, ord("0"), ord("a")]))
        kind = draw(st.sampled_from(["replace", "delete", "insert"]))
        if kind == "insert" or index == len(data):
            data.insert(index, byte)
        elif kind == "delete":
            del data[index]
        else:
            data[index] = byte
    requests[victim] = bytes(data)
    return b"".join(requests)


_any_bytes = st.one_of(
    st.binary(max_size=200),
    mutated_stream(),
    st.lists(
        st.sampled_from(
            [
                b"GET ",
                b"POST ",
                b"/",
                b" HTTP/1.1",
                b" HTTP/1.0",
                b"\r\n",
                b"\n",
                b"Host: h",
                b"Content-Length: 3",
                b"Transfer-Encoding: chunked",
                b"Connection: upgrade",
                b"Upgrade: x",
                b"Expect: 100-continue",
                b"3\r\nabc\r\n",
                b"0\r\n\r\n",
                b":",
                b" ",
                b"\x00",
                b"HTTP/2.0",
                b"CONNECT a:1",
                b"abc",
            ]
        ),
        max_size=24,
    ).map(b"".join),
)

_FUZZ = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- properties


def assert_well_behaved(outcome: Outcome, log: list[logging.LogRecord]) -> None:
    assert not [r for r in log if r.levelno >= logging.ERROR], [r.getMessage() for r in log]
    if outcome.errors:
        # One error, answered last, and nothing read after it.
        assert len(outcome.errors) == 1
        status = outcome.errors[0]
        assert 400 <= status <= 599
        answered = OK_RESPONSE * len(outcome.requests)
        assert outcome.written.startswith(answered)
        error = outcome.written[len(answered) :]
        assert error.startswith(b"HTTP/1.1 %d " % status)
        assert b"\r\nConnection: close\r\n" in error
        assert outcome.stopped
        assert outcome.closed
    else:
        assert outcome.written == OK_RESPONSE * len(outcome.requests)


@given(data=_any_bytes, cuts=_cuts)
@_FUZZ
async def test_any_bytes_give_requests_or_one_error_never_an_exception(
    data: bytes, cuts: list[int]
) -> None:
    with server_log() as log:
        outcomes = [await run(split(data)) for split in (whole, bytewise)]
        outcomes.append(await run(split_at(data, cuts)))
    for outcome in outcomes:
        assert_well_behaved(outcome, log)
    event(f"status {outcomes[0].errors[0]}" if outcomes[0].errors else "no error")
    event(f"{min(len(outcomes[0].requests), 2)}+ requests parsed")
    # Where the input was cut changes nothing: the same requests, the same answer.
    first = outcomes[0]
    for other in outcomes[1:]:
        assert other.requests == first.requests
        assert other.errors == first.errors
        assert other.written == first.written


@given(requests=st.lists(wire_request(), min_size=1, max_size=5), cuts=_cuts)
@_FUZZ
async def test_pipelined_requests_parse_the_same_however_split(
    requests: list[WireRequest], cuts: list[int]
) -> None:
    data = b"".join(r.raw for r in requests)
    expected = [r.parsed for r in requests]
    with server_log() as log:
        for split in (whole, bytewise, lambda d: split_at(d, cuts)):
            outcome = await run(split(data))
            assert outcome.errors == []
            assert len(outcome.requests) == len(expected)
            for got, want in zip(outcome.requests, expected, strict=True):
                # Trailer fields never join the head's fields.
                assert got.headers == want.headers
                assert (got.method, got.target, got.body) == (want.method, want.target, want.body)
            assert outcome.written == OK_RESPONSE * len(requests)
            assert not outcome.closed
    assert log == []


@st.composite
def versioned_stream(draw: st.DrawFn) -> bytes:
    """Requests of HTTP/1.0 and 1.1, some lines ended by a bare LF, some after empty lines."""
    stream = b""
    for request in draw(st.lists(wire_request(), min_size=1, max_size=5)):
        line, rest = request.raw.split(b" HTTP/1.1\r\n", 1)
        version = b"1.1"
        if b"Transfer-Encoding" not in rest and draw(st.booleans()):  # refused in 1.0 (400)
            version = b"1.0"
            rest = b"Connection: keep-alive\r\n" + rest  # so that the requests after it are read
        ending = draw(st.sampled_from([b"\r\n"] * 5 + [b"\n"]))
        stream += draw(st.sampled_from([b""] * 3 + [b"\r\n", b"\n", b"\r\n\r\n"]))
        stream += line + b" HTTP/" + version + ending + rest
    return stream


class _VersionsSeen:
    """What llhttp reports for each request head (the reference for the line-reading rule)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.versions: list[str] = []

    def on_headers_complete(self) -> None:
        self.versions.append(self.parser.get_http_version())


@given(data=versioned_stream(), cuts=_cuts)
@_FUZZ
async def test_http_version_is_what_llhttp_reports_however_split(
    data: bytes, cuts: list[int]
) -> None:
    # The version is read from the request line when a read holds it whole from its first byte
    # (DownstreamConnection._http_version), else asked of llhttp: the two must agree.
    reference = _VersionsSeen()
    try:
        reference.parser.feed_data(data)
    except httptools.HttpParserError:
        assume(False)  # a form llhttp refuses (a bare LF where it wants CRLF): nothing to compare
    for split in (whole, bytewise, lambda d: split_at(d, cuts)):
        harness = Harness()
        try:
            harness.feed(split(data))
            await harness.settle()
            heads = [c.head for c in harness.pipeline.cycles]
            assert harness.pipeline.errors == []
            assert [h.version for h in heads if h is not None] == reference.versions
        finally:
            await harness.aclose()
    event("pipelined" if len(reference.versions) > 1 else "one request")


async def test_http_version_of_a_line_read_whole_is_not_asked_of_llhttp() -> None:
    harness = Harness()
    asked: list[str] = []
    ask = harness.conn._get_http_version

    def counting() -> str:
        asked.append(ask())
        return asked[-1]

    harness.conn._get_http_version = counting
    try:
        # Read whole from its first byte: from the line. The second of a read, and one whose
        # line is split between reads: asked.
        harness.feed([b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\nHost: h\r\n\r\n"])
        harness.feed([b"GET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\n\r\n"])
        harness.feed([b"GET /d HT", b"TP/1.1\r\nHost: h\r\n\r\n"])
        await harness.settle()
        heads = [c.head for c in harness.pipeline.cycles]
        assert [(h.target, h.version) for h in heads if h is not None] == [
            (b"/a", "1.0"),
            (b"/b", "1.1"),
            (b"/c", "1.1"),
            (b"/d", "1.1"),
        ]
        assert asked == ["1.1", "1.1"]
    finally:
        await harness.aclose()


# --------------------------------------------------------------------------- examples


async def test_single_request_is_parsed() -> None:
    outcome = await run([b"GET /a?b HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n"])
    assert outcome.requests == [Parsed("GET", b"/a?b", ((b"Host", b"h"), (b"X-A", b"1")), b"")]
    assert outcome.written == OK_RESPONSE
    assert not outcome.closed


async def test_request_head_fields_are_filled_in() -> None:
    harness = Harness()
    try:
        harness.feed([b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"])
        await harness.settle()
        (cycle,) = harness.pipeline.cycles
        head = cycle.head
        assert head is not None
        assert head.client_ip == "127.0.0.1"
        assert head.scheme == "http"
        assert head.content_length == 3
        assert head.keep_alive
        assert cycle.body_received == 3
        assert cycle.body_done
    finally:
        await harness.aclose()


async def test_requests_after_a_rejected_one_are_never_read() -> None:
    data = (
        b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /b HTTP/1.1\r\n\r\n"  # no Host
        b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    for split in (whole, bytewise):
        outcome = await run(split(data))
        assert [r.target for r in outcome.requests] == [b"/a"]
        assert outcome.errors == [400]
        assert outcome.written.startswith(OK_RESPONSE + b"HTTP/1.1 400 Bad Request\r\n")
        assert outcome.closed


async def test_http10_request_closes_after_its_answer() -> None:
    outcome = await run([b"GET / HTTP/1.0\r\n\r\n"])
    assert [r.target for r in outcome.requests] == [b"/"]
    assert outcome.closed


async def test_smuggling_cl_te_is_rejected() -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    outcome = await run([data])
    assert outcome.requests == []
    assert outcome.errors == [400]


async def test_content_length_over_limit_is_413_before_the_body() -> None:
    data = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n"
    outcome = await run([data], max_body_size=100)
    assert outcome.errors == [413]
    assert outcome.requests == []


async def test_regression_chunk_over_max_body_size_is_413() -> None:
    head = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"40\r\n" + b"a" * 64 + b"\r\n" + b"40\r\n" + b"b" * 64 + b"\r\n0\r\n\r\n"
    for split in (whole, bytewise):
        outcome = await run(split(head + body), max_body_size=100)
        assert outcome.errors == [413]
        assert outcome.requests == []
        assert outcome.closed
    # At the limit exactly, the body passes.
    exact = b"64\r\n" + b"c" * 100 + b"\r\n0\r\n\r\n"
    outcome = await run([head + exact], max_body_size=100)
    assert outcome.errors == []
    assert outcome.requests[0].body == b"c" * 100


async def test_regression_huge_single_chunk_is_413_while_it_streams() -> None:
    head = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    harness = Harness(max_body_size=1000)
    try:
        harness.feed([head, b"100000\r\n"])  # a 1 MiB chunk is announced
        for _ in range(10):
            harness.feed([b"z" * 200])  # 2000 bytes arrive: the limit is crossed midway
        await harness.settle()
        assert harness.pipeline.errors == [413]
        assert harness.conn.stop_parsing
        assert harness.transport.closed
    finally:
        await harness.aclose()


async def test_regression_request_line_over_8kib_is_414() -> None:
    target = b"/" + b"a" * (8 * 1024)
    data = b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    for split in (whole, bytewise, lambda d: split_at(d, [100, 5000, 8190])):
        outcome = await run(split(data))
        assert outcome.errors == [414]
        assert outcome.requests == []
        assert outcome.closed
    # Just under the limit is fine.
    ok = b"GET /" + b"a" * (8 * 1024 - 1) + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    assert (await run([ok])).errors == []


async def test_regression_request_line_without_end_is_414_without_buffering() -> None:
    harness = Harness()
    try:
        harness.feed([b"GET /"])
        fed = 5
        while not harness.conn.stop_parsing and fed < 1 << 20:
            harness.feed([b"a" * 100])
            fed += 100
        await harness.settle()
        assert harness.pipeline.errors == [414]
        assert fed <= 8 * 1024 + 200
    finally:
        await harness.aclose()


async def test_regression_large_header_value_in_small_pieces_is_431() -> None:
    value = b"v" * (16 * 1024 + 1)
    data = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + value + b"\r\n\r\n"
    for pieces in (split_at(data, list(range(0, len(data), 97))), [data], bytewise(data)):
        outcome = await run(pieces)
        assert outcome.errors == [431]
        assert outcome.requests == []
        assert outcome.closed


async def test_regression_endless_header_value_is_431_without_buffering() -> None:
    # llhttp buffers a header value until it ends: the connection must stop reading first.
    harness = Harness()
    try:
        harness.feed([b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: "])
        fed = 0
        while not harness.conn.stop_parsing and fed < 1 << 22:
            harness.feed([b"v" * 512])
            fed += 512
        await harness.settle()
        assert harness.pipeline.errors == [431]
        assert fed <= harness.app.max_head_bytes + 512
        assert harness.transport.closed
    finally:
        await harness.aclose()


async def test_too_many_header_fields_is_431() -> None:
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    outcome = await run([b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n"])
    assert outcome.errors == [431]
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(99))
    outcome = await run([b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n"])
    assert outcome.errors == []


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", None),  # llhttp or PIBL: 400 or 505
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
        (b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: teapot\r\nContent-Length: 1\r\n\r\nx", 417),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\nHost: h\n\n", 400),  # bare LF
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ],
)
async def test_rejections(data: bytes, status: int | None) -> None:
    for split in (whole, bytewise):
        outcome = await run(split(data))
        assert len(outcome.errors) == 1
        if status is None:
            assert outcome.errors[0] in (400, 505)
        else:
            assert outcome.errors == [status]
        assert outcome.requests == []
        assert outcome.closed


async def test_upgrade_request_stops_parsing_and_keeps_the_leftover() -> None:
    data = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly bytes"
    harness = Harness()
    try:
        harness.feed([data])
        assert harness.conn.stop_parsing
        assert harness.conn.upgrade_leftover == b"early bytes"
        await harness.settle()
        assert harness.pipeline.paused_when_handled == [True]
        (request,) = harness.pipeline.requests
        assert request.target == b"/ws"
        assert harness.pipeline.cycles[0].head is not None
        assert harness.pipeline.cycles[0].head.upgrade == b"echo"
    finally:
        await harness.aclose()


async def test_expect_continue_request_waits_for_its_body() -> None:
    harness = Harness()
    try:
        harness.feed(
            [b"PUT /e HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"]
        )
        await harness.settle()
        assert harness.pipeline.requests == []
        (cycle,) = harness.pipeline.cycles
        assert cycle.head is not None
        assert cycle.head.expects_continue
        harness.feed([b"da", b"ta"])
        await harness.settle()
        assert [r.body for r in harness.pipeline.requests] == [b"data"]
    finally:
        await harness.aclose()


async def test_many_pipelined_requests_pause_reading_then_resume() -> None:
    data = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" * 40
    harness = Harness()
    try:
        harness.feed([data])
        await harness.settle()
        paused = harness.pipeline.paused_when_handled
        assert paused[0]  # more than MAX_PIPELINED were queued
        assert not paused[-1]  # resumed once the queue was short again
        assert len(harness.pipeline.requests) == 40
        assert not harness.transport.paused
        assert harness.transport.written == OK_RESPONSE * 40
    finally:
        await harness.aclose()


# --------------------------------------------------------------------------- known bugs


CHUNKED_HEAD = b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_trailer_fields_do_not_join_the_request_head() -> None:
    harness = Harness()
    try:
        harness.feed([CHUNKED_HEAD + b"3\r\nabc\r\n0\r\nHost: evil.example\r\n\r\n"])
        await harness.settle()
        (request,) = harness.pipeline.requests
        assert request.body == b"abc"
        assert request.headers == ((b"Host", b"h"), (b"Transfer-Encoding", b"chunked"))
    finally:
        await harness.aclose()


async def test_endless_trailer_field_is_refused_without_buffering() -> None:
    harness = Harness()
    try:
        harness.feed([CHUNKED_HEAD + b"3\r\nabc\r\n0\r\nX-Trailer: "])
        fed = 0
        while not harness.conn.stop_parsing and fed < 1 << 20:
            harness.feed([b"v" * 4096])
            fed += 4096
        await harness.settle()
        assert harness.conn.stop_parsing
        assert fed <= harness.app.max_head_bytes + 4096
    finally:
        await harness.aclose()
