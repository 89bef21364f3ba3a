"""The fast hit path equals the slow one: ``ResponseFacts`` (what a stored response's fields
say, computed once per entry) against the pure functions of ``pibl.cache.policy`` on many
generated responses; the pre-serialised head against ``response_head_bytes``; the short
``cache_status`` against the general one; the remembered cache keys against ``make_key``."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.cache.key import make_key
from pibl.cache.memory import MemoryEntry, MemoryStorage
from pibl.cache.policy import (
    _FRESH_HIT_STATUS,
    _FRESH_HIT_STATUS_ENTRIES,
    DELTA_SECONDS_MAX,
    StoredResponse,
    _has_validators,
    age_header,
    age_seconds,
    cache_status,
    client_conditional_matches,
    current_age,
    decide,
    format_http_date,
    fresh_hit_status,
    freshness_lifetime,
    response_cache_control,
    without_surrogate_control,
)
from pibl.cache.ranges import select_range
from pibl.http.framing import response_head_bytes
from pibl.http.head import Headers, RequestHead, ResponseHead
from pibl.proxy.caching import (
    KEY_MEMO_ENTRIES,
    HttpCache,
    _asks_conditional_or_range,
    _own_fields,
    _served_head,
    _whole_head,
)

NOW = 1_700_000_000.0

# Values chosen to reach every branch of the parsers and of the freshness and age rules.
_DATES = st.one_of(
    st.integers(-100_000, 100_000).map(lambda offset: format_http_date(NOW + offset)),
    st.sampled_from(
        [b"0", b"", b"junk", b"Sunday, 06-Nov-94 08:49:37 GMT", b"Sun Nov  6 08:49:37 1994"]
    ),
)
_DIRECTIVES = st.sampled_from(
    [
        "max-age=60",
        "max-age=0",
        "max-age=abc",
        "max-age= 5",
        "max-age =5",
        "s-maxage=30",
        "s-maxage=99999999999",
        "no-cache",
        'no-cache="set-cookie"',
        "no-store",
        "private",
        'private="x-user"',
        "public",
        "must-revalidate",
        "proxy-revalidate",
        "must-understand",
        "stale-while-revalidate=30",
        "stale-if-error=60",
        "immutable",
        '"quoted, junk"',
    ]
)
_CACHE_CONTROL = st.lists(_DIRECTIVES, max_size=4).map(lambda ds: ", ".join(ds).encode())
_SURROGATE_MEMBERS = st.sampled_from(
    [
        "max-age=120",
        "max-age=10+50",
        "no-store",
        "max-age=300;pibl",
        "no-store;pibl",
        "max-age=5;other",
        'content="ESI/1.0";other',
        "must-revalidate",
    ]
)
_SURROGATE = st.lists(_SURROGATE_MEMBERS, max_size=3).map(lambda ms: ", ".join(ms).encode())
_AGES = st.sampled_from([b"0", b"10", b"3600", b"-1", b"1.5", b"abc", b"99999999999", b"5, 6"])
_FIELD = st.one_of(
    st.tuples(st.sampled_from([b"Date", b"date"]), _DATES),
    st.tuples(st.sampled_from([b"Expires", b"Last-Modified"]), _DATES),
    st.tuples(st.sampled_from([b"Age", b"AGE"]), _AGES),
    st.tuples(st.sampled_from([b"Cache-Control", b"cache-control"]), _CACHE_CONTROL),
    st.tuples(st.sampled_from([b"Surrogate-Control", b"surrogate-control"]), _SURROGATE),
    st.tuples(st.just(b"ETag"), st.sampled_from([b'"v1"', b'W/"v1"', b"", b" "])),
    st.tuples(st.sampled_from([b"Content-Length", b"Transfer-Encoding"]), st.just(b"10")),
    st.tuples(st.sampled_from([b"Set-Cookie", b"Content-Type", b"X-Other"]), st.just(b"a=b")),
)
_HEADERS = st.lists(_FIELD, max_size=8)
_STATUS = st.sampled_from([200, 203, 204, 301, 302, 404, 410, 500, 503])
_TIMES = st.tuples(st.integers(0, 300), st.integers(0, 300))  # request delay, response delay
_NOWS = st.lists(st.floats(-1_000, 10**10, allow_nan=False), min_size=1, max_size=4)


def stored(
    headers: Headers, status: int = 200, delays: tuple[int, int] = (0, 0), default_ttl: float = 0.0
) -> StoredResponse:
    request = RequestHead("GET", b"/x", "1.1", [], host=b"example.com")
    return StoredResponse(
        key=make_key(request),
        status=status,
        reason=b"OK",
        headers=headers,
        request_time=NOW + delays[0],
        response_time=NOW + delays[0] + delays[1],
        default_ttl=default_ttl,
    )


def slow_headers_for_serving(entry: StoredResponse, now: float) -> Headers:
    """``StoredResponse.headers_for_serving`` as it was before ``ResponseFacts``."""
    out = [(name, value) for name, value in entry.headers if name.lower() != b"age"]
    age = current_age(
        entry.headers,
        request_time=entry.request_time,
        response_time=entry.response_time,
        now=now,
    )
    out.append((b"Age", age_header(age)))
    return without_surrogate_control(out)


@given(_HEADERS, _STATUS, _TIMES, st.sampled_from([0.0, 30.0]), _NOWS)
def test_facts_equal_the_pure_functions(
    headers: Headers,
    status: int,
    delays: tuple[int, int],
    default_ttl: float,
    nows: list[float],
) -> None:
    entry = stored(headers, status, delays, default_ttl)
    times = {"request_time": entry.request_time, "response_time": entry.response_time}
    assert entry.cache_control == response_cache_control(headers)
    assert entry.has_validators == _has_validators(headers)
    for shared in (True, False):
        assert entry.freshness_lifetime(shared=shared) == freshness_lifetime(
            headers,
            status=status,
            response_time=entry.response_time,
            default_ttl=default_ttl,
            shared=shared,
        )
    for now in [NOW, *nows]:
        assert entry.current_age(now) == current_age(headers, now=now, **times)
        assert entry.headers_for_serving(now) == slow_headers_for_serving(entry, now)


@given(_HEADERS, _STATUS, _NOWS, st.integers(0, 5000), st.sampled_from([True, False]))
def test_whole_head_equals_the_general_serialisation(
    headers: Headers, status: int, nows: list[float], length: int, close: bool
) -> None:
    entry = stored(headers, status)
    own = [(b"Via", b"1.1 pibl"), (b"Cache-Status", b"pibl; hit; ttl=5")]
    if close:
        own.append((b"Connection", b"close"))
    for now in nows:
        fields = [
            (name, value)
            for name, value in slow_headers_for_serving(entry, now)
            if name.lower() not in (b"content-length", b"transfer-encoding")
        ]
        fields += [(b"Content-Length", b"%d" % length), *own]
        expected = response_head_bytes(status, fields, b"OK")
        age = age_header(entry.current_age(now))
        assert _whole_head(entry, age, length, own) == expected


@given(
    _HEADERS,
    st.lists(
        st.tuples(
            st.floats(0, 5),  # seconds after NOW
            st.sampled_from([b"pibl; hit; ttl=5", b"pibl; hit; ttl=4", b"pibl; hit"]),
            st.sampled_from([b"", b"close", b"keep-alive"]),
            st.sampled_from([0, 1024]),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_served_head_is_always_the_head_built_afresh(
    headers: Headers, hits: list[tuple[float, bytes, bytes, int]]
) -> None:
    # The head kept on the entry is reused only while everything it was built from holds.
    entry = stored(headers, 200)
    for offset, status, connection, length in hits:
        now = NOW + offset
        age = age_header(entry.current_age(now))
        expected = _whole_head(entry, age, length, _own_fields(status, connection))
        assert _served_head(entry, now, length, status, connection) == expected


def test_served_head_is_kept_on_the_entry_until_the_age_changes() -> None:
    entry = stored([(b"Date", format_http_date(NOW)), (b"Cache-Control", b"max-age=60")])
    first = _served_head(entry, NOW + 0.2, 4, b"pibl; hit; ttl=59", b"")
    assert _served_head(entry, NOW + 0.7, 4, b"pibl; hit; ttl=59", b"") is first
    later = _served_head(entry, NOW + 1.2, 4, b"pibl; hit; ttl=58", b"")
    assert b"Age: 1\r\n" in later
    assert b"Age: 0\r\n" in first


@given(_HEADERS, _NOWS)
def test_facts_follow_freshening_and_storage(headers: Headers, nows: list[float]) -> None:
    entry = stored([(b"Date", format_http_date(NOW)), (b"Cache-Control", b"max-age=60")])
    assert entry.freshness_lifetime() == 60  # facts computed for the old fields
    new = entry.freshened(headers, request_time=NOW + 100, response_time=NOW + 101)
    again = StoredResponse.from_bytes(new.to_bytes())
    for copy in (new, again):
        assert copy.cache_control == response_cache_control(copy.headers)
        for now in nows:
            assert copy.current_age(now) == current_age(
                copy.headers, request_time=NOW + 100, response_time=NOW + 101, now=now
            )
            assert copy.freshness_lifetime() == freshness_lifetime(
                copy.headers, status=200, response_time=NOW + 101
            )
    assert again == new  # the computed facts take no part in equality
    assert dataclasses.replace(new).facts == new.facts


def test_invalid_age_stays_very_old_at_any_time() -> None:
    entry = stored([(b"Age", b"-1"), (b"Cache-Control", b"max-age=60")])
    for now in (NOW - 10**6, NOW, NOW + 10**9):
        assert entry.current_age(now) == DELTA_SECONDS_MAX
    assert decide(entry, RequestHead("GET", b"/x", "1.1", []), NOW).ttl < 0


@given(
    st.booleans(),
    st.one_of(
        st.none(),
        st.integers(-(10**18), 10**18),
        st.floats(-1e20, 1e20, allow_nan=False),
    ),
)
def test_short_cache_status_equals_the_general_one(hit: bool, ttl: float | None) -> None:
    general = cache_status(hit, ttl=ttl, name="xpibl").replace(b"xpibl", b"pibl", 1)
    assert cache_status(hit, ttl=ttl) == general


@given(
    st.lists(
        st.one_of(st.integers(-(10**18), 10**18), st.floats(-1e20, 1e20, allow_nan=False)),
        max_size=20,
    )
)
def test_remembered_fresh_hit_status_equals_the_built_one(ttls: list[float]) -> None:
    for ttl in ttls:  # in any order, repeated or not, remembered or not
        assert fresh_hit_status(ttl) == cache_status(True, ttl=ttl)


def test_fresh_hit_statuses_are_remembered_within_a_bound() -> None:
    for ttl in range(3 * _FRESH_HIT_STATUS_ENTRIES):
        assert fresh_hit_status(ttl + 0.5) == b"pibl; hit; ttl=%d" % ttl
        assert len(_FRESH_HIT_STATUS) <= _FRESH_HIT_STATUS_ENTRIES


@given(st.floats(-1e12, 1e12, allow_nan=False))
def test_age_seconds_is_what_age_header_sends(age: float) -> None:
    assert str(age_seconds(age)).encode() == age_header(age)


_REQUEST_FIELD = st.tuples(
    st.sampled_from(
        [b"Range", b"range", b"If-None-Match", b"If-Modified-Since", b"If-Range", b"Host", b"X"]
    ),
    st.sampled_from([b"bytes=0-1", b"*", b'"v1"', format_http_date(NOW), b"junk"]),
)


@given(st.lists(_REQUEST_FIELD, max_size=4), st.sampled_from(["GET", "HEAD"]), _HEADERS)
def test_plain_requests_get_the_whole_response(
    fields: Headers, method: str, headers: Headers
) -> None:
    """The premise of the short serving path: without those fields, no 304 and no range."""
    request = RequestHead(method, b"/x", "1.1", fields, host=b"example.com")
    if not _asks_conditional_or_range(fields):
        entry = stored(headers)
        assert not client_conditional_matches(request, entry.headers, status=200, response_time=NOW)
        assert select_range(request, entry.headers, status=200, length=10) is None


_TARGETS = st.sampled_from(
    [b"/", b"/a?b=1", b"http://Example.COM:80/x", b"https://h:443", b"/" + b"x" * 2000, b"*"]
)
_HOSTS = st.sampled_from([b"", b"example.com", b"Example.com.:80", b"[::1]:8080", b"h" * 2000])


@given(st.lists(st.tuples(_TARGETS, _HOSTS, st.sampled_from(["http", "https"]), _HOSTS)))
def test_remembered_keys_equal_make_key(
    requests: list[tuple[bytes, bytes, str, bytes]],
) -> None:
    cache = HttpCache(MemoryStorage(1000, 100), default_ttl=0, max_object_size=100)
    for target, host, scheme, host_field in requests * 2:
        request = RequestHead(
            "GET", target, "1.1", [(b"Host", host_field)], scheme=scheme, host=host
        )
        assert cache.key_for(request) == make_key(request)


def test_remembered_keys_are_bounded() -> None:
    cache = HttpCache(MemoryStorage(1000, 100), default_ttl=0, max_object_size=100)
    for i in range(3 * KEY_MEMO_ENTRIES):
        request = RequestHead("GET", b"/%d" % i, "1.1", [], host=b"example.com")
        assert cache.key_for(request) == make_key(request)
        assert len(cache._keys) <= KEY_MEMO_ENTRIES


def test_memory_lookup_needs_no_coroutine() -> None:
    storage = MemoryStorage(10_000, 1_000)
    cache = HttpCache(storage, default_ttl=0, max_object_size=1_000)
    request = RequestHead("GET", b"/x", "1.1", [], host=b"example.com")
    response = ResponseHead(200, [(b"Cache-Control", b"max-age=60")], reason=b"OK")
    meta = StoredResponse.from_exchange(
        make_key(request), request, response, request_time=NOW, response_time=NOW
    )
    storage.insert(MemoryEntry(meta, b"body"))
    assert [e.meta for e in storage.lookup_now(meta.key)] == [meta]
    coroutine = cache.lookup(request)
    with pytest.raises(StopIteration) as done:  # answered without ever suspending
        coroutine.send(None)
    assert done.value.value.entry is not None
