"""Header rules: what PIBL strips from and adds to forwarded requests and responses."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.http.head import Headers, RequestHead, ResponseHead
from pibl.http.rules import (
    HOP_BY_HOP,
    VIA_VALUE,
    downstream_response_headers,
    upstream_request_headers,
)

FORWARDED = {b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
SPOOFABLE = {*FORWARDED, b"x-real-ip"}
FRAMING = {b"content-length", b"transfer-encoding"}
# The fields PIBL itself appends after the client's (re-)sanitised ones.
ADDED = {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"}


def req(
    headers: Headers,
    *,
    target: bytes = b"/",
    version: str = "1.1",
    client_ip: str = "192.0.2.10",
    scheme: str = "http",
    host: bytes | None = None,
    upgrade: bytes | None = None,
) -> RequestHead:
    if host is None:
        host = next((v for k, v in headers if k.lower() == b"host"), b"")
    return RequestHead(
        "GET",
        target,
        version,
        headers,
        client_ip=client_ip,
        scheme=scheme,
        host=host,
        upgrade=upgrade,
    )


def names(headers: Headers) -> list[bytes]:
    return [k.lower() for k, _ in headers]


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def one(headers: Headers, name: bytes) -> bytes:
    found = values(headers, name)
    assert len(found) == 1, (name, headers)
    return found[0]


# --------------------------------------------------------------------------- request: hop-by-hop


@pytest.mark.parametrize(
    "name",
    [
        b"Connection",
        b"Proxy-Connection",
        b"Keep-Alive",
        b"Proxy-Authenticate",
        b"Proxy-Authorization",
        b"TE",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
    ],
)
@pytest.mark.parametrize("case", [bytes.lower, bytes.upper, bytes.title])
def test_request_hop_by_hop_fields_are_removed_in_any_case(
    name: bytes, case: Callable[[bytes], bytes]
) -> None:
    field = case(name)
    out = upstream_request_headers(
        req([(b"Host", b"h"), (field, b"x"), (b"X-Kept", b"1")]), trusted_peer=False
    )
    assert name.lower() not in names(out)
    assert (b"X-Kept", b"1") in out


def test_connection_listed_fields_are_removed_case_insensitively() -> None:
    headers: Headers = [
        (b"Host", b"h"),
        (b"connection", b"keep-alive, X-Secret ,x-other\t"),
        (b"CONNECTION", b"  X-Third  "),
        (b"x-secret", b"1"),
        (b"X-OTHER", b"2"),
        (b"X-Third", b"3"),
        (b"X-Kept", b"4"),
    ]
    out = upstream_request_headers(req(headers), trusted_peer=False)
    got = names(out)
    for gone in (b"connection", b"x-secret", b"x-other", b"x-third", b"keep-alive"):
        assert gone not in got
    assert out[:2] == [(b"Host", b"h"), (b"X-Kept", b"4")]


def test_connection_with_empty_list_elements_removes_only_named_fields() -> None:
    headers: Headers = [
        (b"Host", b"h"),
        (b"Connection", b", ,x-a,,"),
        (b"X-A", b"1"),
        (b"X-B", b"2"),
    ]
    out = upstream_request_headers(req(headers), trusted_peer=False)
    assert b"x-a" not in names(out)
    assert (b"X-B", b"2") in out


def test_framing_fields_are_never_copied() -> None:
    headers: Headers = [
        (b"Host", b"h"),
        (b"Content-Length", b"5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Kept", b"1"),
    ]
    out = upstream_request_headers(req(headers), trusted_peer=False)
    assert not FRAMING & set(names(out))


def test_host_is_kept_as_sent_and_in_place() -> None:
    headers: Headers = [(b"X-A", b"1"), (b"hOsT", b"Site.Example:8080"), (b"X-B", b"2")]
    out = upstream_request_headers(req(headers), trusted_peer=False)
    assert out[:3] == headers
    assert values(out, b"host") == [b"Site.Example:8080"]


# --------------------------------------------------------------------------- request: forwarding


def test_forwarding_fields_are_added() -> None:
    out = upstream_request_headers(
        req([(b"Host", b"site.example:8080")], client_ip="198.51.100.7"), trusted_peer=False
    )
    assert out == [
        (b"Host", b"site.example:8080"),
        (b"X-Forwarded-For", b"198.51.100.7"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"site.example:8080"),
        (b"Via", VIA_VALUE),
    ]


def test_forwarded_proto_follows_the_scheme() -> None:
    out = upstream_request_headers(req([(b"Host", b"h")], scheme="https"), trusted_peer=False)
    assert one(out, b"x-forwarded-proto") == b"https"


def test_ipv6_client_address_is_forwarded() -> None:
    out = upstream_request_headers(
        req([(b"Host", b"h")], client_ip="2001:db8::1"), trusted_peer=False
    )
    assert one(out, b"x-forwarded-for") == b"2001:db8::1"


def test_untrusted_peer_cannot_spoof_forwarding_fields() -> None:
    headers: Headers = [
        (b"Host", b"h"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"x-forwarded-for", b"7.7.7.7"),
        (b"X-Forwarded-Host", b"evil.example"),
        (b"X-Forwarded-Proto", b"https"),
        (b"Forwarded", b"for=6.6.6.6;proto=https"),
        (b"X-Real-IP", b"6.6.6.6"),
    ]
    out = upstream_request_headers(req(headers, client_ip="192.0.2.1"), trusted_peer=False)
    assert one(out, b"x-forwarded-for") == b"192.0.2.1"
    assert one(out, b"x-forwarded-host") == b"h"
    assert one(out, b"x-forwarded-proto") == b"http"
    assert values(out, b"forwarded") == []
    assert values(out, b"x-real-ip") == []
    assert all(b"6.6.6.6" not in v and b"7.7.7.7" not in v for _, v in out)


def test_trusted_peer_chain_is_extended() -> None:
    headers: Headers = [
        (b"Host", b"internal"),
        (b"X-Forwarded-For", b"203.0.113.7"),
        (b"X-Forwarded-For", b"10.0.0.2, 10.0.0.3"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"public.example"),
        (b"Forwarded", b"for=203.0.113.7"),
        (b"X-Real-IP", b"203.0.113.7"),
    ]
    out = upstream_request_headers(req(headers, client_ip="10.0.0.4"), trusted_peer=True)
    assert one(out, b"x-forwarded-for") == b"203.0.113.7, 10.0.0.2, 10.0.0.3, 10.0.0.4"
    assert one(out, b"x-forwarded-proto") == b"https"
    assert one(out, b"x-forwarded-host") == b"public.example"
    assert one(out, b"forwarded") == b"for=203.0.113.7"
    assert one(out, b"x-real-ip") == b"203.0.113.7"
    assert one(out, b"host") == b"internal"


def test_trusted_peer_without_prior_fields_gets_fresh_ones() -> None:
    out = upstream_request_headers(req([(b"Host", b"h")], client_ip="10.0.0.4"), trusted_peer=True)
    assert one(out, b"x-forwarded-for") == b"10.0.0.4"
    assert one(out, b"x-forwarded-proto") == b"http"
    assert one(out, b"x-forwarded-host") == b"h"


def test_prior_via_is_extended_and_moved_last() -> None:
    headers: Headers = [
        (b"Host", b"h"),
        (b"Via", b"1.0 fred"),
        (b"VIA", b"1.1 p.example (Apache/1.1)"),
        (b"X-A", b"1"),
    ]
    for trusted in (False, True):
        out = upstream_request_headers(req(headers), trusted_peer=trusted)
        assert one(out, b"via") == b"1.0 fred, 1.1 p.example (Apache/1.1), " + VIA_VALUE
        assert out[-1][0] == b"Via"


def test_http10_request_without_host_gets_one_from_absolute_target() -> None:
    request = req(
        [(b"Accept", b"*/*")],
        target=b"http://origin.example:81/x",
        version="1.0",
        host=b"origin.example:81",
    )
    out = upstream_request_headers(request, trusted_peer=False)
    assert one(out, b"host") == b"origin.example:81"
    assert one(out, b"x-forwarded-host") == b"origin.example:81"
    assert out[0] == (b"Accept", b"*/*")


def test_via_names_the_version_the_request_came_in() -> None:
    # RFC 9110 §7.6.3: received-protocol is the version of the message as received.
    out = upstream_request_headers(req([(b"Via", b"1.0 fred")], version="1.0"), trusted_peer=False)
    assert one(out, b"via") == b"1.0 fred, 1.0 pibl"
    assert one(upstream_request_headers(req([]), trusted_peer=False), b"via") == b"1.1 pibl"


def test_http10_request_without_any_host_sends_none() -> None:
    out = upstream_request_headers(req([], version="1.0", host=b""), trusted_peer=False)
    assert values(out, b"host") == []
    assert values(out, b"x-forwarded-host") == []
    assert one(out, b"x-forwarded-for") == b"192.0.2.10"


def test_host_listed_in_connection_is_still_sent() -> None:
    # A Host cannot be hop-by-hop: the next hop needs it (RFC 9112 §3.2).
    out = upstream_request_headers(
        req([(b"Host", b"h"), (b"Connection", b"host")]), trusted_peer=False
    )
    assert one(out, b"host") == b"h"


def test_upgrade_is_resent_only_when_the_request_upgrades() -> None:
    headers: Headers = [(b"Host", b"h"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    plain = upstream_request_headers(req(headers), trusted_peer=False)
    assert b"upgrade" not in names(plain)
    assert b"connection" not in names(plain)

    upgrading = upstream_request_headers(req(headers, upgrade=b"websocket"), trusted_peer=False)
    assert upgrading[-2:] == [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")]
    assert names(upgrading).count(b"upgrade") == 1
    assert names(upgrading).count(b"connection") == 1


def test_input_headers_are_not_mutated() -> None:
    headers: Headers = [(b"Host", b"h"), (b"Connection", b"x"), (b"X", b"1")]
    snapshot = list(headers)
    upstream_request_headers(req(headers), trusted_peer=True)
    assert headers == snapshot


# --------------------------------------------------------------------------- response


def resp(headers: Headers) -> ResponseHead:
    return ResponseHead(200, headers)


def test_response_hop_by_hop_connection_listed_and_framing_fields_are_removed() -> None:
    headers: Headers = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"close, X-Hop"),
        (b"connection", b"X-Other"),
        (b"Keep-Alive", b"timeout=5"),
        (b"x-hop", b"1"),
        (b"X-OTHER", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"10"),
        (b"Trailer", b"X-T"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    out = downstream_response_headers(resp(headers))
    assert out == [
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Via", VIA_VALUE),
    ]


def test_response_via_is_extended() -> None:
    out = downstream_response_headers(
        resp([(b"Via", b"1.1 cdn"), (b"X", b"1"), (b"via", b"1.0 b")])
    )
    assert out == [(b"X", b"1"), (b"Via", b"1.1 cdn, 1.0 b, " + VIA_VALUE)]


def test_response_forwarding_like_fields_pass_through() -> None:
    # Only requests are sanitised against spoofing; a response's fields are the origin's own.
    headers: Headers = [(b"X-Forwarded-For", b"1.2.3.4"), (b"X-Real-IP", b"1.2.3.4")]
    assert downstream_response_headers(resp(headers))[:2] == headers


# --------------------------------------------------------------------------- properties

_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"
_custom_name = st.text(_TOKEN_CHARS, min_size=1, max_size=8).map(lambda s: ("x-" + s).encode())
_special = st.sampled_from(
    sorted(HOP_BY_HOP | FRAMING | SPOOFABLE | {b"via", b"host", b"accept", b"cookie"})
)


@st.composite
def _cased(draw: st.DrawFn, name_strategy: st.SearchStrategy[bytes]) -> bytes:
    name = draw(name_strategy)
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return bytes(
        c ^ 0x20 if flip and 97 <= c <= 122 else c for c, flip in zip(name, flips, strict=True)
    )


_value = st.binary(max_size=12).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E))


@st.composite
def _connection_value(draw: st.DrawFn, pool: list[bytes]) -> bytes:
    tokens = draw(st.lists(_cased(st.sampled_from(pool)), max_size=4))
    seps = draw(
        st.lists(st.sampled_from([b",", b", ", b" , ", b",\t", b",,"]), min_size=len(tokens))
    )
    out = b""
    for i, token in enumerate(tokens):
        out += (seps[i] if i else b"") + token
    return draw(st.sampled_from([b"", b" "])) + out + draw(st.sampled_from([b"", b" ", b","]))


@st.composite
def _header_list(draw: st.DrawFn) -> Headers:
    customs = draw(st.lists(_custom_name, min_size=1, max_size=5, unique=True))
    name_pool = [*customs, *sorted(HOP_BY_HOP), b"keep-alive", b"x-forwarded-for"]
    fields = draw(
        st.lists(
            st.one_of(
                st.tuples(_cased(st.sampled_from(customs)), _value),
                st.tuples(_cased(_special), _value),
                st.tuples(_cased(st.just(b"connection")), _connection_value(name_pool)),
            ),
            max_size=14,
        )
    )
    return list(fields)


def _listed(headers: Headers) -> set[bytes]:
    return {
        t.strip().lower()
        for k, v in headers
        if k.lower() == b"connection"
        for t in v.split(b",")
        if t.strip()
    }


@given(_header_list(), st.booleans())
def test_request_property_hop_by_hop_removed_others_kept_in_order(
    headers: Headers, trusted: bool
) -> None:
    listed = _listed(headers)
    request = req(headers, host=b"fallback.example")
    out = upstream_request_headers(request, trusted_peer=trusted)

    def passes(name: bytes) -> bool:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in FRAMING or lname in listed or lname == b"via":
            return False
        if lname in SPOOFABLE:
            return trusted and lname in {b"forwarded", b"x-real-ip"}
        return True

    expected = [(k, v) for k, v in headers if passes(k)]
    assert out[: len(expected)] == expected
    appended = out[len(expected) :]
    assert set(names(appended)) <= ADDED
    # Each added field appears exactly once, and nothing hop-by-hop comes back.
    assert len(names(appended)) == len(set(names(appended)))
    assert not (set(names(out)) & HOP_BY_HOP)
    assert values(out, b"host")  # a Host always reaches the upstream
    assert out[-1] == (b"Via", out[-1][1])
    assert out[-1][1].endswith(VIA_VALUE)
    xff = one(out, b"x-forwarded-for")
    assert xff.endswith(b"192.0.2.10")
    if not trusted:
        assert xff == b"192.0.2.10"


@given(_header_list())
def test_response_property_hop_by_hop_removed_others_kept_in_order(headers: Headers) -> None:
    listed = _listed(headers)
    out = downstream_response_headers(resp(headers))
    expected = [
        (k, v)
        for k, v in headers
        if k.lower() not in HOP_BY_HOP | FRAMING | listed and k.lower() != b"via"
    ]
    assert out[:-1] == expected
    assert out[-1][0] == b"Via"
    assert out[-1][1].endswith(VIA_VALUE)
