"""Serialising message heads and bodies. PIBL re-frames everything it forwards (RFC 9112 §6):
CRLF line endings, exactly one framing header, never the peer's bytes copied verbatim.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

from pibl.http.head import Headers

REASONS: Final[dict[int, bytes]] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
# RFC 9110 §15.5.21 (421) exists in HTTPStatus; 499 is nginx's log-only "client closed request".
REASONS.setdefault(499, b"Client Closed Request")

CRLF: Final = b"\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"

# Statuses whose responses never carry content (RFC 9110 §6.4.1).
NO_CONTENT_STATUSES: Final = frozenset({204, 304})


def response_has_body(request_method: str, status: int) -> bool:
    """Whether a response of ``status`` to ``request_method`` carries content (RFC 9112 §6.3)."""
    return not (request_method == "HEAD" or status < 200 or status in NO_CONTENT_STATUSES)


def serialize_headers(parts: list[bytes], headers: Headers) -> None:
    # Four appends: compiled, each is a C call, where ``parts += (...)`` builds a tuple first.
    for name, value in headers:
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(CRLF)


def request_head_bytes(method: str, target: bytes, headers: Headers) -> bytes:
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    serialize_headers(parts, headers)
    parts.append(CRLF)
    return b"".join(parts)


# Status lines built once: a handful of (status, reason) pairs cover nearly every response.
_STATUS_LINES: Final[dict[tuple[int, bytes], bytes]] = {}
_STATUS_LINES_MAX: Final = 256


def response_head_bytes(status: int, headers: Headers, reason: bytes = b"") -> bytes:
    # PIBL always speaks HTTP/1.1 (RFC 9110 §6.2: a server sends its highest conformant version).
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, b"Unknown"))
        if len(_STATUS_LINES) < _STATUS_LINES_MAX:  # reasons come from upstreams: bounded
            _STATUS_LINES[(status, reason)] = line
    parts = [line]
    serialize_headers(parts, headers)
    parts.append(CRLF)
    return b"".join(parts)


def chunk(data: bytes) -> list[bytes]:
    """One chunk of a chunked body (RFC 9112 §7.1), as pieces for ``writelines``.

    Empty data gives no pieces: a zero-size chunk is the last-chunk and would end the body.
    """
    if not data:
        return []
    return [b"%x\r\n" % len(data), data, CRLF]


def error_response(status: int, message: str = "", *, close: bool = True) -> bytes:
    """A small plain-text response PIBL sends on its own behalf (errors, 404 from routing)."""
    reason = REASONS.get(status, b"Error")
    body = f"{status} {reason.decode()}{': ' + message if message else ''}\n".encode(
        "utf-8", "replace"
    )
    headers: list[tuple[bytes, bytes]] = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Cache-Control", b"no-store"),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    return response_head_bytes(status, headers, reason) + body
