"""Message framing: heads, chunks, PIBL's own error responses, which responses carry a body."""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.http.framing import (
    CRLF,
    LAST_CHUNK,
    REASONS,
    chunk,
    error_response,
    request_head_bytes,
    response_has_body,
    response_head_bytes,
)


@dataclass
class ParsedResponse:
    status: int = 0
    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    keep_alive: bool = True


class _ResponseCollector:
    def __init__(self) -> None:
        self.result = ParsedResponse()
        self.parser = httptools.HttpResponseParser(self)

    def on_status(self, status: bytes) -> None:
        self.result.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.result.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.result.status = self.parser.get_status_code()
        self.result.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.result.body += body

    def on_message_complete(self) -> None:
        self.result.complete = True


def parse_response(data: bytes) -> ParsedResponse:
    """Parse with llhttp (strict), byte at a time, to prove the bytes are a valid response."""
    collector = _ResponseCollector()
    for i in range(len(data)):
        collector.parser.feed_data(data[i : i + 1])
    return collector.result


class _RequestCollector:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


# --------------------------------------------------------------------------- heads


def test_request_head_bytes() -> None:
    head = request_head_bytes("GET", b"/a?b", [(b"Host", b"h"), (b"X-A", b"1")])
    assert head == b"GET /a?b HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n"


def test_request_head_is_always_http11_and_parses() -> None:
    headers = [(b"Host", b"h"), (b"Content-Length", b"3")]
    data = request_head_bytes("POST", b"/p", headers) + b"abc"
    collector = _RequestCollector()
    collector.parser.feed_data(data)
    assert collector.complete
    assert collector.parser.get_http_version() == "1.1"
    assert collector.parser.get_method() == b"POST"
    assert collector.url == b"/p"
    assert collector.headers == headers
    assert collector.body == b"abc"


def test_response_head_bytes_default_reason() -> None:
    assert response_head_bytes(404, [(b"A", b"b")]) == b"HTTP/1.1 404 Not Found\r\nA: b\r\n\r\n"


def test_response_head_bytes_explicit_reason_and_no_headers() -> None:
    assert response_head_bytes(200, [], b"Fine") == b"HTTP/1.1 200 Fine\r\n\r\n"


def test_response_head_bytes_unknown_status() -> None:
    assert response_head_bytes(299, []) == b"HTTP/1.1 299 Unknown\r\n\r\n"


def test_reasons_cover_every_standard_status_and_499() -> None:
    for status in HTTPStatus:
        assert REASONS[status.value] == status.phrase.encode()
    assert REASONS[499] == b"Client Closed Request"


def test_response_head_bytes_keeps_header_order_and_case() -> None:
    headers = [(b"set-cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"X-UP", b"UP")]
    parsed = parse_response(response_head_bytes(204, headers))
    assert parsed.status == 204
    assert parsed.headers == headers
    assert parsed.complete


# --------------------------------------------------------------------------- chunks


def test_chunk_pieces() -> None:
    assert chunk(b"hello") == [b"5\r\n", b"hello", b"\r\n"]
    assert chunk(b"x" * 255) == [b"ff\r\n", b"x" * 255, CRLF]


def test_empty_chunk_is_not_a_last_chunk() -> None:
    # A zero-size chunk would be "0\r\n\r\n": the end of the body, not an empty piece of it.
    assert b"".join(chunk(b"")) == b""


def test_last_chunk() -> None:
    assert LAST_CHUNK == b"0\r\n\r\n"


@given(st.lists(st.binary(max_size=300), max_size=8))
def test_chunked_body_round_trips_through_llhttp(pieces: list[bytes]) -> None:
    head = response_head_bytes(200, [(b"Transfer-Encoding", b"chunked")])
    body = b"".join(b"".join(chunk(p)) for p in pieces) + LAST_CHUNK
    collector = _ResponseCollector()
    collector.parser.feed_data(head + body)
    assert collector.result.complete
    assert collector.result.body == b"".join(pieces)


# --------------------------------------------------------------------------- error_response


@pytest.mark.parametrize(
    "status", [400, 404, 405, 408, 413, 414, 417, 431, 500, 502, 503, 504, 505]
)
def test_error_response_is_well_formed(status: int) -> None:
    data = error_response(status, "details here")
    parsed = parse_response(data)
    assert parsed.complete
    assert parsed.status == status
    assert parsed.reason == REASONS[status]
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert parsed.body == body
    assert dict(parsed.headers)[b"Content-Length"] == str(len(body)).encode()
    assert body == f"{status} {HTTPStatus(status).phrase}: details here\n".encode()
    assert dict(parsed.headers)[b"Content-Type"] == b"text/plain; charset=utf-8"
    assert dict(parsed.headers)[b"Cache-Control"] == b"no-store"


def test_error_response_closes_by_default() -> None:
    parsed = parse_response(error_response(400))
    assert (b"Connection", b"close") in parsed.headers
    assert not parsed.keep_alive


def test_error_response_can_keep_the_connection() -> None:
    parsed = parse_response(error_response(404, "no route", close=False))
    assert all(name.lower() != b"connection" for name, _ in parsed.headers)
    assert parsed.keep_alive


def test_error_response_without_message() -> None:
    data = error_response(503)
    assert data.endswith(b"\r\n\r\n503 Service Unavailable\n")


def test_error_response_unknown_status_still_parses() -> None:
    parsed = parse_response(error_response(599, "odd"))
    assert parsed.status == 599
    assert parsed.reason == b"Error"
    assert parsed.body == b"599 Error: odd\n"


@given(st.text(max_size=60), st.sampled_from([400, 404, 413, 502, 504]), st.booleans())
def test_error_response_content_length_matches_any_message(
    message: str, status: int, close: bool
) -> None:
    data = error_response(status, message, close=close)
    parsed = parse_response(data)
    assert parsed.complete
    assert parsed.status == status
    assert int(dict(parsed.headers)[b"Content-Length"]) == len(parsed.body)
    assert data.endswith(parsed.body)
    # A message can never add header lines: it only ever lands in the body.
    assert len(parsed.headers) == (4 if close else 3)


# --------------------------------------------------------------------------- response_has_body


@pytest.mark.parametrize(
    ("method", "status", "expected"),
    [
        ("GET", 200, True),
        ("POST", 201, True),
        ("GET", 404, True),
        ("GET", 500, True),
        ("GET", 205, True),
        ("GET", 304, False),
        ("GET", 204, False),
        ("DELETE", 204, False),
        ("GET", 100, False),
        ("GET", 101, False),
        ("GET", 103, False),
        ("HEAD", 200, False),
        ("HEAD", 404, False),
        ("HEAD", 500, False),
    ],
)
def test_response_has_body(method: str, status: int, expected: bool) -> None:
    assert response_has_body(method, status) is expected
