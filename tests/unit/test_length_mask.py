"""The length pre-filter (``length_mask``): loops that act on a few field names skip the others
by length alone. Whatever the case and the mix of fields, every function gives what a plain
``name.lower()`` comparison gives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pibl.accesslog import AccessRecord
from pibl.cache.policy import request_cache_control
from pibl.errors import ProtocolError
from pibl.http.head import (
    Headers,
    RequestHead,
    ResponseHead,
    get_all,
    get_header,
    header_tokens,
    length_mask,
)
from pibl.http.rules import HOP_BY_HOP, downstream_response_headers, upstream_request_headers
from pibl.http.validate import validate_request_head
from pibl.proxy.caching import _asks_conditional_or_range
from pibl.proxy.pipeline import _describe_request

# The names the filtered loops act on, and others of the same lengths (which must still be
# looked at and found to be different).
ACTED_ON = [
    b"host",
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"via",
    b"upgrade",
    b"expect",
    b"user-agent",
    b"referer",
    b"cache-control",
    b"pragma",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"forwarded",
    b"if-none-match",
    b"range",
    *sorted(HOP_BY_HOP),
]
SAME_LENGTHS = [b"hozt", b"content-lengtx", b"connectiox", b"vix", b"user-agenx", b"pragmx"]
OTHERS = [b"accept", b"x-custom-field", b"date", b"server", b"x" * 70]


def mixed_case(name: bytes, flips: list[bool]) -> bytes:
    flips = (flips + [False] * len(name))[: len(name)]
    return bytes(
        c - 32 if 97 <= c <= 122 and flip else c for c, flip in zip(name, flips, strict=True)
    )


field_names = st.builds(
    mixed_case, st.sampled_from(ACTED_ON + SAME_LENGTHS + OTHERS), st.lists(st.booleans())
)
field_values = st.sampled_from([b"1", b"chunked", b"close", b"no-cache", b"a.test", b"x, y"])
header_lists = st.lists(st.tuples(field_names, field_values), max_size=8)


@given(st.sets(st.binary(max_size=40), max_size=10), st.binary(max_size=60))
def test_a_name_of_another_length_has_no_bit(names: set[bytes], other: bytes) -> None:
    mask = length_mask(names)
    for name in names:
        assert (mask >> len(name)) & 1
    if all(len(name) != len(other) for name in names):
        assert not (mask >> len(other)) & 1


@given(header_lists, st.sampled_from(ACTED_ON + SAME_LENGTHS))
def test_lookups_match_a_plain_lower(headers: Headers, name: bytes) -> None:
    values = [v for n, v in headers if n.lower() == name]
    assert get_all(headers, name) == values
    assert get_header(headers, name) == (values[0] if values else None)
    tokens = {t.strip().lower() for v in values for t in v.split(b",")} - {b""}
    assert header_tokens(headers, name) == tokens


def plain_names(headers: Headers) -> list[bytes]:
    return [n.lower() for n, _ in headers]


@given(header_lists)
def test_the_response_rules_drop_hop_by_hop_fields_whatever_their_case(headers: Headers) -> None:
    out = downstream_response_headers(ResponseHead(200, headers))
    names = plain_names(out)
    assert not (set(names) & (HOP_BY_HOP | {b"content-length"}))
    assert names.count(b"via") == 1
    kept = [
        (n, v)
        for n, v in headers
        if n.lower() not in HOP_BY_HOP | {b"content-length", b"via"}
        and n.lower() not in header_tokens(headers, b"connection")
    ]
    assert out[:-1] == kept


@given(header_lists)
def test_the_request_rules_drop_hop_by_hop_and_spoofable_fields(headers: Headers) -> None:
    request = RequestHead("GET", b"/", "1.1", headers, client_ip="192.0.2.1", host=b"a.test")
    names = plain_names(upstream_request_headers(request, trusted_peer=False))
    assert not (set(names) & (HOP_BY_HOP | {b"content-length"}))
    assert names.count(b"x-forwarded-for") == 1
    assert names.count(b"via") == 1
    assert b"forwarded" not in names
    listed = header_tokens(headers, b"connection")
    for name in plain_names(headers):
        if name in (b"accept", b"x-custom-field", b"hozt", b"pragmx") and name not in listed:
            assert name in names


@given(header_lists)
def test_validation_sees_framing_and_host_whatever_their_case(headers: Headers) -> None:
    lowered = plain_names(headers)
    try:
        head = validate_request_head("GET", b"/", "1.1", headers, keep_alive=True)
    except ProtocolError:
        return  # refused: checked for every case by test_http_validate
    assert lowered.count(b"host") == 1
    assert head.host == get_header(headers, b"host")
    assert head.is_chunked == (b"transfer-encoding" in lowered)
    if b"content-length" in lowered:
        assert head.content_length == int(get_header(headers, b"content-length") or b"")


@given(header_lists)
def test_cache_and_log_lookups_whatever_the_case(headers: Headers) -> None:
    lowered = plain_names(headers)
    request = RequestHead("GET", b"/", "1.1", headers)
    directives = request_cache_control(request)
    if b"cache-control" not in lowered:
        pragma = header_tokens(headers, b"pragma")
        assert directives == ({"no-cache": None} if b"no-cache" in pragma else {})
    else:
        assert directives == request_cache_control(
            RequestHead("GET", b"/", "1.1", [(n.lower(), v) for n, v in headers])
        )
    assert _asks_conditional_or_range(headers) == bool(
        {b"if-none-match", b"if-modified-since", b"range"} & set(lowered)
    )
    record = AccessRecord()
    _describe_request(record, request)
    agents = [v.decode("latin-1") for n, v in headers if n.lower() == b"user-agent"]
    referers = [v.decode("latin-1") for n, v in headers if n.lower() == b"referer"]
    assert record.user_agent == (agents[-1] if agents else AccessRecord().user_agent)
    assert record.referer == (referers[-1] if referers else AccessRecord().referer)
