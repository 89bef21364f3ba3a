"""Strict request framing (RFC 9112), reject-and-close: one table of raw requests.

Each case is sent as ``<case bytes>`` followed by a smuggled request; PIBL must answer the
expected status, close the connection, and the backend must never see the smuggled request
(nor any request, unless the case says a first part was valid).
"""

from __future__ import annotations

import pytest

from tests.support import Client, make_settings, running_backends, running_proxy

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"

CASES: list[tuple[str, bytes, int]] = [
    (
        "CL and TE",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "TE and CL",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "duplicate CL",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        400,
    ),
    (
        "differing CL",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
        400,
    ),
    ("CL +5", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello", 400),
    ("CL 0x5", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello", 400),
    ("CL 5_0", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5_0\r\n\r\nhello", 400),
    ("CL negative", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    ("CL list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx", 400),
    ("TE gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (
        "TE chunked, gzip",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
    ),
    ("TE xchunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
    (
        "TE twice",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "TE with space before colon",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "TE in HTTP/1.0",
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("bare CR in header", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400),
    ("bare LF line ending", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("NUL in header value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", 400),
    ("control char in value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n", 400),
    ("NUL in header name", b"GET / HTTP/1.1\r\nHost: a\r\nX\x00A: b\r\n\r\n", 400),
    (
        "bad chunk size",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk size overflow",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nx\r\n0\r\n\r\n",
        400,
    ),
    (
        "bad chunk terminator",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        400,
    ),
    (
        "chunk size with sign",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    ("invalid method", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("invalid target", b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("space in target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("invalid version", b"GET / HTTP/1.x\r\nHost: a\r\n\r\n", 400),
    ("HTTP/2.0 request line", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("missing Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("repeated Host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("empty header name", b"GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n", 400),
]


@pytest.mark.parametrize(
    ("raw", "status"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES]
)
async def test_malformed_framing_is_rejected_and_nothing_after_it_is_forwarded(
    raw: bytes, status: int
) -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        await client.send(raw + SMUGGLED)
        response = await client.read_response()
        assert response.status == status
        assert response.header("Connection") == "close"
        assert await client.is_closed()
        await client.aclose()
    assert backends[0].requests == []
    assert b"smuggled" not in bytes(backends[0].raw)


async def test_valid_request_then_garbage_forwards_only_the_valid_one() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        await client.send(
            b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + SMUGGLED
        )
        first = await client.read_response()
        second = await client.read_response()
        assert (first.status, second.status) == (200, 400)
        assert await client.is_closed()
        await client.aclose()
    assert [r.target for r in backends[0].requests] == [b"/ok"]
    assert b"smuggled" not in bytes(backends[0].raw)


async def test_forwarded_request_is_reframed_with_exactly_one_framing_header() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        client = await Client.connect(app.addresses[0])
        await client.send(b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc")
        assert (await client.read_response()).status == 200
        await client.aclose()
    raw = bytes(backends[0].raw)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\n" not in head.replace(b"\r\n", b"")
    lines = [line.lower() for line in head.split(b"\r\n")]
    assert sum(line.startswith((b"content-length:", b"transfer-encoding:")) for line in lines) == 1


async def test_broken_response_framing_is_502_and_the_connection_is_not_reused() -> None:
    from tests.support import Reply

    answers = iter(
        [
            Reply(
                raw=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            Reply(body=b"fine"),
        ]
    )
    async with (
        running_backends(lambda r: next(answers)) as backends,
        running_proxy(make_settings(backends, upstream={"retries": 0})) as app,
    ):
        client = await Client.connect(app.addresses[0])
        assert (await client.request("POST", "/", body=b"1")).status == 502
        await client.aclose()
        client = await Client.connect(app.addresses[0])
        assert (await client.request("GET", "/")).body == b"fine"
        await client.aclose()
    assert backends[0].connections == 2
