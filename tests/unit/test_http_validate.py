"""validate_request_head: the checks llhttp leaves to PIBL, as a table of heads → outcomes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.errors import ProtocolError
from pibl.http.head import Headers
from pibl.http.validate import validate_request_head

H: Headers = [(b"Host", b"example.com")]


def check(
    method: str = "GET",
    target: bytes = b"/",
    version: str = "1.1",
    headers: Headers | None = None,
    *,
    keep_alive: bool = True,
    max_body_size: int = 0,
) -> int:
    """The status PIBL answers for this head: 0 when it is accepted."""
    try:
        validate_request_head(
            method,
            target,
            version,
            H if headers is None else headers,
            keep_alive=keep_alive,
            max_body_size=max_body_size,
        )
    except ProtocolError as error:
        return error.status_hint
    return 0


# (method, target, version, headers, max_body_size, expected status; 0 = accepted)
CASES: list[tuple[str, str, bytes, str, Headers, int, int]] = [
    ("plain GET", "GET", b"/", "1.1", H, 0, 0),
    ("origin-form with query", "GET", b"/a/b?c=d", "1.1", H, 0, 0),
    ("HTTP/1.0 without Host", "GET", b"/", "1.0", [], 0, 0),
    ("HTTP/1.0 with Host", "GET", b"/", "1.0", H, 0, 0),
    ("missing Host in 1.1", "GET", b"/", "1.1", [], 0, 400),
    ("missing Host, absolute-form 1.1", "GET", b"http://a/", "1.1", [], 0, 400),
    ("repeated Host in 1.1", "GET", b"/", "1.1", [*H, (b"host", b"example.com")], 0, 400),
    ("repeated Host in 1.0", "GET", b"/", "1.0", [*H, *H], 0, 400),
    ("empty Host", "GET", b"/", "1.1", [(b"Host", b"")], 0, 0),
    ("Host with port", "GET", b"/", "1.1", [(b"Host", b"a.example:8080")], 0, 0),
    ("Host IPv6", "GET", b"/", "1.1", [(b"Host", b"[::1]:80")], 0, 0),
    ("Host with space", "GET", b"/", "1.1", [(b"Host", b"a b")], 0, 400),
    ("Host with slash", "GET", b"/", "1.1", [(b"Host", b"a/b")], 0, 400),
    ("Host with userinfo", "GET", b"/", "1.1", [(b"Host", b"u@a")], 0, 400),
    ("Host with obs-text", "GET", b"/", "1.1", [(b"Host", b"caf\xe9")], 0, 400),
    ("CL 0", "POST", b"/", "1.1", [*H, (b"Content-Length", b"0")], 0, 0),
    ("CL 5", "POST", b"/", "1.1", [*H, (b"Content-Length", b"5")], 0, 0),
    ("CL leading zeros", "POST", b"/", "1.1", [*H, (b"Content-Length", b"007")], 0, 0),
    ("CL +5", "POST", b"/", "1.1", [*H, (b"Content-Length", b"+5")], 0, 400),
    ("CL 0x5", "POST", b"/", "1.1", [*H, (b"Content-Length", b"0x5")], 0, 400),
    ("CL 5_0", "POST", b"/", "1.1", [*H, (b"Content-Length", b"5_0")], 0, 400),
    ("CL -1", "POST", b"/", "1.1", [*H, (b"Content-Length", b"-1")], 0, 400),
    ("CL empty", "POST", b"/", "1.1", [*H, (b"Content-Length", b"")], 0, 400),
    ("CL list", "POST", b"/", "1.1", [*H, (b"Content-Length", b"5, 5")], 0, 400),
    ("CL space inside", "POST", b"/", "1.1", [*H, (b"Content-Length", b"5 0")], 0, 400),
    ("CL unicode digit", "POST", b"/", "1.1", [*H, (b"Content-Length", "\u0665".encode())], 0, 400),
    (
        "CL repeated, same value",
        "POST",
        b"/",
        "1.1",
        [*H, (b"Content-Length", b"5"), (b"content-length", b"5")],
        0,
        400,
    ),
    ("TE chunked", "POST", b"/", "1.1", [*H, (b"Transfer-Encoding", b"chunked")], 0, 0),
    ("TE Chunked case", "POST", b"/", "1.1", [*H, (b"transfer-encoding", b" CHUNKED")], 0, 0),
    (
        "TE gzip, chunked",
        "POST",
        b"/",
        "1.1",
        [*H, (b"Transfer-Encoding", b"gzip, chunked")],
        0,
        501,
    ),
    (
        "TE chunked, gzip",
        "POST",
        b"/",
        "1.1",
        [*H, (b"Transfer-Encoding", b"chunked, gzip")],
        0,
        400,
    ),
    ("TE gzip", "POST", b"/", "1.1", [*H, (b"Transfer-Encoding", b"gzip")], 0, 400),
    ("TE identity", "POST", b"/", "1.1", [*H, (b"Transfer-Encoding", b"identity")], 0, 400),
    ("TE empty", "POST", b"/", "1.1", [*H, (b"Transfer-Encoding", b"")], 0, 400),
    (
        "TE chunked twice in one",
        "POST",
        b"/",
        "1.1",
        [*H, (b"Transfer-Encoding", b"chunked, chunked")],
        0,
        400,
    ),
    ("TE trailing comma", "POST", b"/", "1.1", [*H, (b"Transfer-Encoding", b"chunked,")], 0, 400),
    ("TE xchunked", "POST", b"/", "1.1", [*H, (b"Transfer-Encoding", b"xchunked")], 0, 400),
    (
        "TE repeated",
        "POST",
        b"/",
        "1.1",
        [*H, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
        0,
        400,
    ),
    ("TE in 1.0", "POST", b"/", "1.0", [*H, (b"Transfer-Encoding", b"chunked")], 0, 400),
    (
        "CL and TE",
        "POST",
        b"/",
        "1.1",
        [*H, (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        0,
        400,
    ),
    (
        "TE and CL",
        "POST",
        b"/",
        "1.1",
        [*H, (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")],
        0,
        400,
    ),
    ("Expect 100-continue", "PUT", b"/", "1.1", [*H, (b"Expect", b"100-continue")], 0, 0),
    ("Expect case", "PUT", b"/", "1.1", [*H, (b"expect", b"100-Continue")], 0, 0),
    ("Expect other", "PUT", b"/", "1.1", [*H, (b"Expect", b"200-ok")], 0, 417),
    ("Expect list", "PUT", b"/", "1.1", [*H, (b"Expect", b"100-continue, x")], 0, 417),
    ("version 2.0", "GET", b"/", "2.0", H, 0, 505),
    ("version 1.2", "GET", b"/", "1.2", H, 0, 505),
    ("version 0.9", "GET", b"/", "0.9", H, 0, 505),
    ("CONNECT authority-form", "CONNECT", b"example.com:443", "1.1", H, 0, 405),
    ("CONNECT origin-form", "CONNECT", b"/", "1.1", H, 0, 405),
    ("absolute-form", "GET", b"http://example.com/x", "1.1", H, 0, 0),
    ("absolute-form, bad authority", "GET", b"http://ex\xe9.com/x", "1.1", H, 0, 400),
    ("asterisk with OPTIONS", "OPTIONS", b"*", "1.1", H, 0, 0),
    ("asterisk with GET", "GET", b"*", "1.1", H, 0, 400),
    ("asterisk-prefixed with OPTIONS", "OPTIONS", b"*/x", "1.1", H, 0, 400),
    ("relative target", "GET", b"index.html", "1.1", H, 0, 400),
    ("authority-form with GET", "GET", b"example.com:80", "1.1", H, 0, 400),
    ("CL at limit", "POST", b"/", "1.1", [*H, (b"Content-Length", b"100")], 100, 0),
    ("CL over limit", "POST", b"/", "1.1", [*H, (b"Content-Length", b"101")], 100, 413),
    ("CL over, no limit", "POST", b"/", "1.1", [*H, (b"Content-Length", b"999999999")], 0, 0),
    ("chunked with limit", "POST", b"/", "1.1", [*H, (b"Transfer-Encoding", b"chunked")], 1, 0),
]


@pytest.mark.parametrize(
    ("method", "target", "version", "headers", "max_body", "status"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_request_head_table(
    method: str, target: bytes, version: str, headers: Headers, max_body: int, status: int
) -> None:
    assert check(method, target, version, headers, max_body_size=max_body) == status


def test_accepted_head_fields() -> None:
    headers: Headers = [(b"Host", b"Example.com"), (b"Content-Length", b"12")]
    head = validate_request_head("POST", b"/p?q", "1.1", headers, keep_alive=False)
    assert head.method == "POST"
    assert head.target == b"/p?q"
    assert head.version == "1.1"
    assert head.headers is headers
    assert head.keep_alive is False
    assert head.content_length == 12
    assert not head.is_chunked
    assert head.has_body
    assert head.host == b"Example.com"
    assert head.expects_continue is False
    assert head.upgrade is None


def test_zero_content_length_has_no_body() -> None:
    head = validate_request_head(
        "POST", b"/", "1.1", [*H, (b"Content-Length", b"0")], keep_alive=True
    )
    assert head.content_length == 0
    assert not head.has_body


def test_chunked_head() -> None:
    head = validate_request_head(
        "POST", b"/", "1.1", [*H, (b"Transfer-Encoding", b"chunked")], keep_alive=True
    )
    assert head.is_chunked
    assert head.content_length is None
    assert head.has_body


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"http://example.com/x", b"example.com"),
        (b"http://example.com", b"example.com"),
        (b"https://example.com:8443/a/b?c", b"example.com:8443"),
        (b"http://example.com?x=/y", b"example.com"),
        (b"http://user:pw@example.com/", b"example.com"),
        (b"http://[::1]:8080/", b"[::1]:8080"),
        (b"HTTP://Example.COM/", b"Example.COM"),
    ],
)
def test_absolute_form_authority_replaces_host(target: bytes, host: bytes) -> None:
    head = validate_request_head(
        "GET", target, "1.1", [(b"Host", b"other.example")], keep_alive=True
    )
    assert head.host == host


def test_absolute_form_names_the_host_of_an_http10_request() -> None:
    head = validate_request_head("GET", b"http://a.example:81/", "1.0", [], keep_alive=False)
    assert head.host == b"a.example:81"


def test_expect_continue_only_in_http11() -> None:
    expect: Headers = [*H, (b"Expect", b"100-continue"), (b"Content-Length", b"3")]
    assert validate_request_head("PUT", b"/", "1.1", expect, keep_alive=True).expects_continue
    assert not validate_request_head("PUT", b"/", "1.0", expect, keep_alive=True).expects_continue


@pytest.mark.parametrize(
    ("connection", "version", "upgrade"),
    [
        (b"Upgrade", "1.1", b"websocket"),
        (b"keep-alive, UPGRADE", "1.1", b"websocket"),
        (b"keep-alive", "1.1", None),
        (None, "1.1", None),
        (b"Upgrade", "1.0", None),
    ],
)
def test_upgrade_needs_connection_upgrade_and_http11(
    connection: bytes | None, version: str, upgrade: bytes | None
) -> None:
    headers: Headers = [*H, (b"Upgrade", b"websocket")]
    if connection is not None:
        headers.append((b"Connection", connection))
    head = validate_request_head("GET", b"/ws", version, headers, keep_alive=True)
    assert head.upgrade == upgrade


def test_protocol_error_messages_name_the_problem() -> None:
    with pytest.raises(ProtocolError, match="missing Host"):
        validate_request_head("GET", b"/", "1.1", [], keep_alive=True)
    with pytest.raises(ProtocolError, match="repeated Host"):
        validate_request_head("GET", b"/", "1.1", [*H, *H], keep_alive=True)
    with pytest.raises(ProtocolError, match="Content-Length"):
        validate_request_head("GET", b"/", "1.1", [*H, (b"Content-Length", b"x")], keep_alive=True)


@given(st.binary(max_size=12))
def test_content_length_accepted_iff_ascii_digits(value: bytes) -> None:
    status = check("POST", b"/", "1.1", [*H, (b"Content-Length", value)])
    is_digits = bool(value) and all(48 <= c <= 57 for c in value)
    assert status == (0 if is_digits else 400)
    if is_digits:
        head = validate_request_head(
            "POST", b"/", "1.1", [*H, (b"Content-Length", value)], keep_alive=True
        )
        assert head.content_length == int(value)


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=1, max_value=10**12))
def test_413_iff_declared_length_exceeds_limit(length: int, limit: int) -> None:
    headers: Headers = [*H, (b"Content-Length", str(length).encode())]
    assert check("POST", b"/", "1.1", headers, max_body_size=limit) == (
        413 if length > limit else 0
    )
