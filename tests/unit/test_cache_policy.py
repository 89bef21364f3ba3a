"""RFC 9111 shared-cache policy: parsing, storability, freshness, age, Vary, lookup decisions,
validation, invalidation and Cache-Status. The scenario table at the end replays the relevant
cases of the public HTTP caching test suite (cache-tests.fyi) through the policy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.cache.key import make_key
from pibl.cache.policy import (
    DELTA_SECONDS_MAX,
    HEURISTIC_CAP,
    SURROGATE_CAPABILITY,
    Action,
    Decision,
    StoredResponse,
    age_header,
    cache_status,
    client_conditional_matches,
    conditional_headers,
    current_age,
    decide,
    downstream_surrogate_control,
    format_http_date,
    freshen_headers,
    freshness_lifetime,
    head_response_matches,
    invalidation_targets,
    matches_304_entry,
    not_modified_headers,
    only_if_cached,
    parse_cache_control,
    parse_http_date,
    request_cache_control,
    response_cache_control,
    revalidation_headers,
    secondary_key,
    stale_if_error_allowed,
    storable,
    strip_for_storage,
    surrogate_control,
    vary_fields,
    vary_matches,
    with_surrogate_capability,
    without_surrogate_control,
)
from pibl.cache.ranges import RangeReply, select_range
from pibl.http.head import Headers, RequestHead, ResponseHead

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT


def H(*pairs: tuple[str, str | bytes]) -> Headers:
    return [(n.encode(), v if isinstance(v, bytes) else v.encode("latin-1")) for n, v in pairs]


def date(offset: float = 0.0) -> bytes:
    return format_http_date(NOW + offset)


def req(*pairs: tuple[str, str | bytes], method: str = "GET", target: bytes = b"/x") -> RequestHead:
    return RequestHead(method, target, "1.1", H(*pairs), host=b"example.com")


def resp(*pairs: tuple[str, str | bytes], status: int = 200) -> ResponseHead:
    return ResponseHead(status, H(*pairs), reason=b"OK")


def entry(
    *pairs: tuple[str, str | bytes],
    status: int = 200,
    request: RequestHead | None = None,
    request_time: float = NOW,
    response_time: float = NOW,
    default_ttl: float = 0.0,
) -> StoredResponse:
    request = request or req()
    return StoredResponse.from_exchange(
        make_key(request),
        request,
        resp(*pairs, status=status),
        request_time=request_time,
        response_time=response_time,
        default_ttl=default_ttl,
    )


# --------------------------------------------------------------------------------------------
# Cache-Control parsing


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"max-age=60"], {"max-age": "60"}),
        ([b"Max-Age=60, No-Store"], {"max-age": "60", "no-store": None}),
        ([b"max-age=1800, max-age=1"], {"max-age": "1800"}),  # first wins (§4.2.1)
        ([b"max-age=1", b"max-age=1800"], {"max-age": "1"}),
        ([b'extension="max-age=3600", max-age=1'], {"extension": "max-age=3600", "max-age": "1"}),
        (
            [b'max-age=1, extension="a, max-age=3600"'],
            {"max-age": "1", "extension": "a, max-age=3600"},
        ),
        ([b'max-age="3600"'], {"max-age": "3600"}),
        ([b'a="x\\"y", b'], {"a": 'x"y', "b": None}),
        ([b"max-age =3600"], {}),  # whitespace before "=" makes the member malformed
        ([b"max-age= 3600"], {"max-age": " 3600"}),  # kept, but not a valid delta-seconds
        ([b"max-age=3600a"], {"max-age": "3600a"}),
        ([b"foo, , bar ,"], {"foo": None, "bar": None}),
        ([b"@@@, max-age=5"], {"max-age": "5"}),
        ([b"&&&, max-age=5"], {"&&&": None, "max-age": "5"}),  # "&" is a tchar
        ([b'a="unterminated, max-age=5'], {}),
        ([b'a="x"junk, max-age=5'], {"max-age": "5"}),
        ([b"max-age=5 junk, public"], {"max-age": "5 junk", "public": None}),
        ([b"max-age =5 junk, public"], {"public": None}),
        ([], {}),
        ([b""], {}),
    ],
)
def test_parse_cache_control(values: list[bytes], expected: dict[str, str | None]) -> None:
    assert parse_cache_control(values) == expected


@pytest.mark.parametrize(
    ("values", "no_cache"),
    [
        ([b'no-cache="a, b"'], "a, b"),
        ([b'no-cache="a"', b'no-cache="b"'], "a, b"),  # qualified lists merge
        ([b'no-cache="a"', b"no-cache"], None),  # unqualified is more restrictive (§4.2.1)
        ([b"no-cache", b'no-cache="a"'], None),
        ([b'no-cache=""'], None),  # names no field: treated as unqualified
        ([b"no-cache=a"], "a"),
    ],
)
def test_parse_qualified_no_cache(values: list[bytes], no_cache: str | None) -> None:
    assert parse_cache_control(values)["no-cache"] == no_cache


def test_request_cache_control_and_pragma() -> None:
    assert request_cache_control(req(("Pragma", "no-cache"))) == {"no-cache": None}
    assert request_cache_control(req(("Pragma", "foo"))) == {}
    # Pragma only counts when there is no Cache-Control (RFC 7234 §5.4).
    assert request_cache_control(req(("Cache-Control", "max-stale"), ("Pragma", "no-cache"))) == {
        "max-stale": None
    }
    assert only_if_cached(req(("Cache-Control", "only-if-cached")))
    assert not only_if_cached(req())


# --------------------------------------------------------------------------------------------
# HTTP-date


EPOCH_784111777 = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110 §5.6.7)


@pytest.mark.parametrize(
    "value",
    [
        b"Sun, 06 Nov 1994 08:49:37 GMT",
        b"Sunday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov  6 08:49:37 1994",
        b"  Sun, 06 Nov 1994 08:49:37 GMT ",
        b"SUN, 06 NOV 1994 08:49:37 gmt",  # names are matched case-insensitively
        b"Mon, 06 Nov 1994 08:49:37 GMT",  # the weekday is not cross-checked
    ],
)
def test_parse_http_date_valid(value: bytes) -> None:
    assert parse_http_date(value) == EPOCH_784111777


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"0",
        b"-1",
        b"Thu, 18 Aug 2050 02:01:18 UTC",
        b"Thu, 18 Aug 50 02:01:18 GMT",
        b"Thu 18 Aug 2050 02:01:18 GMT",
        b"Thu, 18  Aug  2050 02:01:18 GMT",
        b"Thu, 18-Aug-2050 02:01:18 GMT",
        b"Thu, 18 Aug 2050 02.01.18 GMT",
        b"Thu, 18 Aug 2050 2:01:18 GMT",
        b"Thu, 30 Feb 2050 02:01:18 GMT",
        b"Thu, 18 Aug 2050 24:01:18 GMT",
        b"Thu, 18 Aug 0000 02:01:18 GMT",
        b"Thu, 18 Foo 2050 02:01:18 GMT",
        b"Thu, \xd9\xa1\xd9\xa2 Aug 2050 02:01:18 GMT",
    ],
)
def test_parse_http_date_invalid(value: bytes) -> None:
    assert parse_http_date(value) is None


def test_parse_http_date_leap_second() -> None:
    assert parse_http_date(b"Sat, 31 Dec 2016 23:59:60 GMT") == 1483228800.0


def test_rfc850_two_digit_years() -> None:
    # RFC 9110 §5.6.7: more than 50 years in the future means the previous century.
    assert parse_http_date(b"Tuesday, 01-Jan-80 00:00:00 GMT", now=NOW) == 315532800.0  # 1980
    assert parse_http_date(b"Saturday, 01-Jan-50 00:00:00 GMT", now=NOW) == 2524608000.0  # 2050
    assert parse_http_date(b"Thursday, 01-Jan-70 00:00:00 GMT") == 0.0


def test_format_http_date() -> None:
    assert format_http_date(EPOCH_784111777) == b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert format_http_date(EPOCH_784111777 + 0.9) == b"Sun, 06 Nov 1994 08:49:37 GMT"


@given(st.binary(max_size=64))
def test_parse_http_date_never_raises(value: bytes) -> None:
    result = parse_http_date(value)
    assert result is None or isinstance(result, float)


@given(st.integers(min_value=-(10**10), max_value=2 * 10**11))
def test_http_date_round_trip(ts: int) -> None:
    assert parse_http_date(format_http_date(ts)) == ts


@given(st.lists(st.binary(max_size=40), max_size=4))
def test_parse_cache_control_never_raises(values: list[bytes]) -> None:
    for name in parse_cache_control(values):
        assert name == name.lower()
        assert name


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["If-None-Match", "If-Modified-Since", "ETag"]), st.binary(max_size=30)
        )
    )
)
def test_conditionals_never_raise(fields: list[tuple[str, bytes]]) -> None:
    headers = [(n.encode(), v) for n, v in fields]
    request = RequestHead("GET", b"/", "1.1", headers)
    client_conditional_matches(request, headers)
    matches_304_entry(entry(*fields), headers)


# --------------------------------------------------------------------------------------------
# Storability (§3)


@pytest.mark.parametrize(
    ("request_", "response", "reason"),
    [
        (req(), resp(("Cache-Control", "max-age=60")), ""),
        (req(method="HEAD"), resp(("Cache-Control", "max-age=60")), "method"),
        (req(method="POST"), resp(("Cache-Control", "max-age=60")), "method"),
        # status
        (req(), resp(("Cache-Control", "max-age=60"), status=206), "status"),
        (req(), resp(("Cache-Control", "max-age=60"), status=304), "status"),
        (req(), resp(("Cache-Control", "max-age=60"), status=103), "status"),
        (req(), resp(("Last-Modified", date(-3600)), status=403), "status"),
        (req(), resp(("Last-Modified", date(-3600)), status=599), "status"),
        (req(), resp(("Last-Modified", date(-3600)), status=503), "status"),
        (req(), resp(("Last-Modified", date(-3600)), ("Cache-Control", "public"), status=599), ""),
        (req(), resp(("Cache-Control", "max-age=60"), status=403), ""),
        (req(), resp(("Cache-Control", "max-age=60"), status=302), ""),
        (req(), resp(("Cache-Control", "max-age=60"), status=500), ""),
        (req(), resp(("Expires", date(60)), ("Date", date()), status=599), ""),
        (req(), resp(("Last-Modified", date(-3600)), status=404), ""),
        (req(), resp(("Last-Modified", date(-3600)), status=451), ""),
        # no-store, must-understand
        (req(), resp(("Cache-Control", "max-age=60, no-store")), "no-store"),
        (req(), resp(("Cache-Control", "No-StOrE")), "no-store"),
        (req(("Cache-Control", "no-store")), resp(("Cache-Control", "max-age=60")), "no-store"),
        (req(), resp(("Cache-Control", "max-age=60, no-store, must-understand")), ""),
        (
            req(),
            resp(("Cache-Control", "max-age=60, no-store, must-understand"), status=299),
            "status",
        ),
        # private
        (req(), resp(("Cache-Control", "private, max-age=60")), "private"),
        (req(), resp(("Cache-Control", 'private="x-user", max-age=60')), ""),
        # Authorization (§3.5)
        (
            req(("Authorization", "FOO")),
            resp(("Expires", date(60)), ("Date", date())),
            "authorization",
        ),
        (req(("Authorization", "FOO")), resp(("Cache-Control", "max-age=60")), "authorization"),
        (req(("Authorization", "FOO")), resp(("Cache-Control", "max-age=60, public")), ""),
        (req(("Authorization", "FOO")), resp(("Cache-Control", "max-age=60, must-revalidate")), ""),
        (req(("Authorization", "FOO")), resp(("Cache-Control", "s-maxage=60")), ""),
        # Vary: * (§4.1)
        (req(), resp(("Cache-Control", "max-age=60"), ("Vary", "*")), "vary-star"),
        (req(), resp(("Cache-Control", "max-age=60"), ("Vary", "Foo, *")), "vary-star"),
        (req(), resp(("Cache-Control", "max-age=60"), ("Vary", ""), ("Vary", "*")), "vary-star"),
        # Set-Cookie (policy: explicit freshness only)
        (req(), resp(("Set-Cookie", "a=b"), ("Last-Modified", date(-3600))), "set-cookie"),
        (req(), resp(("Set-Cookie", "a=b"), ("ETag", '"x"')), "set-cookie"),
        (req(), resp(("Set-Cookie", "a=b"), ("Cache-Control", "max-age=60")), ""),
        (req(), resp(("Set-Cookie", "a=b"), ("Cache-Control", "s-maxage=60")), ""),
        (req(), resp(("Set-Cookie", "a=b"), ("Expires", date(60)), ("Date", date())), ""),
        (
            req(),
            resp(
                ("Set-Cookie", "a=b"),
                ("Cache-Control", 'no-cache="Set-Cookie"'),
                ("Last-Modified", date(-3600)),
            ),
            "",
        ),
        # no-cache needs a validator
        (req(), resp(("Cache-Control", "no-cache, max-age=60")), "no-cache"),
        (req(), resp(("Cache-Control", "no-cache"), ("ETag", '"v"')), ""),
        (req(), resp(("Cache-Control", "no-cache"), ("Last-Modified", date(-10))), ""),
        # nothing makes it reusable
        (req(), resp(), "no-freshness"),
        (req(), resp(("Cache-Control", "max-age=0")), "no-freshness"),
        (req(), resp(("Cache-Control", "max-age=abc")), "no-freshness"),
        (req(), resp(("Expires", date(-60)), ("Date", date())), "no-freshness"),
        (req(), resp(("Expires", "0"), ("Date", date())), "no-freshness"),
        (req(), resp(("ETag", '"v"')), ""),
        (req(), resp(("Cache-Control", "max-age=0"), ("ETag", '"v"')), ""),
        (req(), resp(("Cache-Control", "max-age=0, stale-while-revalidate=60")), ""),
        (req(), resp(("Cache-Control", "max-age=0, stale-if-error=60")), ""),
        (req(), resp(("Expires", date(60))), ""),  # no Date, receipt time unknown: optimistic
    ],
)
def test_storable(request_: RequestHead, response: ResponseHead, reason: str) -> None:
    assert storable(request_, response) == (reason == "", reason)


def test_storable_default_ttl() -> None:
    assert storable(req(), resp(), default_ttl=60) == (True, "")
    assert storable(req(), resp(status=403), default_ttl=60) == (False, "status")
    assert storable(req(), resp(("Set-Cookie", "a=b")), default_ttl=60) == (False, "set-cookie")


def test_storable_expires_without_date_uses_response_time() -> None:
    response = resp(("Expires", date(60)))
    assert storable(req(), response, response_time=NOW) == (True, "")
    assert storable(req(), response, response_time=NOW + 120) == (False, "no-freshness")


def test_private_cache_rules() -> None:
    private = resp(("Cache-Control", "private, max-age=60"))
    assert storable(req(), private, shared=False) == (True, "")
    assert storable(
        req(("Authorization", "x")), resp(("Cache-Control", "max-age=60")), shared=False
    ) == (
        True,
        "",
    )
    assert storable(req(), resp(("Cache-Control", "s-maxage=60")), shared=False) == (
        False,
        "no-freshness",
    )


# --------------------------------------------------------------------------------------------
# Freshness lifetime (§4.2.1-§4.2.2)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (H(("Cache-Control", "max-age=60")), 60),
        (H(("Cache-Control", "max-age=60, s-maxage=10")), 10),
        (H(("Cache-Control", "s-maxage=600, max-age=1")), 600),
        (H(("Cache-Control", "max-age=60"), ("Expires", date(600)), ("Date", date())), 60),
        (H(("Cache-Control", "max-age=60"), ("Expires", date(-600)), ("Date", date())), 60),
        (H(("Cache-Control", "max-age=60"), ("Expires", "0"), ("Date", date())), 60),
        (H(("Cache-Control", "max-age=0, s-maxage=3600"), ("Expires", date(-10))), 3600),
        (H(("Cache-Control", "max-age=0"), ("Expires", date(3600)), ("Date", date())), 0),
        (H(("Expires", date(600)), ("Date", date())), 600),
        (H(("Expires", date(600)), ("Date", date(-100))), 700),  # Expires - Date, not - now
        (H(("Expires", date(600))), 600),  # no Date: the receipt time stands in
        (H(("Expires", date(600)), ("Date", "foo")), 600),
        (H(("Expires", date(300)), ("Date", date(400))), 0),
        (H(("Expires", "0"), ("Date", date())), 0),  # invalid Expires: already expired
        (H(("Expires", date(600)), ("Expires", date(60)), ("Date", date())), 600),
        (H(("Last-Modified", date(-1000)), ("Date", date())), 100),  # heuristic: 10%
        (H(("Last-Modified", date(-1000))), 100),
        (H(("Last-Modified", date(-(10**9))), ("Date", date())), HEURISTIC_CAP),
        (H(("Last-Modified", date(1000)), ("Date", date())), 0),  # in the future
        (H(("Cache-Control", "max-age=3600")), 3600),
        (H(("Cache-Control", "max-age=003600")), 3600),
        (H(("Cache-Control", 'max-age="3600"')), 3600),
        (H(("Cache-Control", "max-age=2147483647")), 2147483647),
        (H(("Cache-Control", "max-age=2147483649")), DELTA_SECONDS_MAX),
        (H(("Cache-Control", "max-age=" + "9" * 5000)), DELTA_SECONDS_MAX),
        (H(("Cache-Control", "max-age=" + "0" * 5000 + "7")), 7),
        (H(("Cache-Control", "max-age=-3600"), ("Expires", date(600)), ("Date", date())), 0),
        (H(("Cache-Control", "max-age=3600.5")), 0),
        (H(("Cache-Control", "max-age=abc"), ("Last-Modified", date(-1000))), 0),
        (H(("Cache-Control", "max-age=1800"), ("Cache-Control", "max-age=1")), 1800),
        (H(("Cache-Control", "max-age =3600")), 0),
        (H(), 0),
    ],
)
def test_freshness_lifetime(headers: Headers, expected: float) -> None:
    assert freshness_lifetime(headers, status=200, response_time=NOW) == expected


def test_s_maxage_only_for_shared_caches() -> None:
    headers = H(("Cache-Control", "max-age=60, s-maxage=10"))
    assert freshness_lifetime(headers, status=200, response_time=NOW, shared=False) == 60


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, H(), 30),
        (404, H(), 30),
        (403, H(), 0),  # not heuristically cacheable
        (599, H(("Cache-Control", "public")), 30),
        (200, H(("Set-Cookie", "a=b")), 0),  # never for cookies
        (200, H(("Last-Modified", date(-1000))), 100),  # heuristic wins over default_ttl
        (200, H(("Cache-Control", "max-age=5")), 5),
        (200, H(("Expires", "0")), 0),
    ],
)
def test_default_ttl(status: int, headers: Headers, expected: float) -> None:
    lifetime = freshness_lifetime(headers, status=status, response_time=NOW, default_ttl=30)
    assert lifetime == expected


@pytest.mark.parametrize(
    ("status", "expected"), [(200, 100), (203, 100), (410, 100), (599, 0), (201, 0)]
)
def test_heuristic_statuses(status: int, expected: float) -> None:
    headers = H(("Last-Modified", date(-1000)), ("Date", date()))
    assert freshness_lifetime(headers, status=status, response_time=NOW) == expected


# --------------------------------------------------------------------------------------------
# Age (§4.2.3)


@pytest.mark.parametrize(
    ("headers", "request_time", "now", "expected"),
    [
        (H(), NOW, NOW, 0),
        (H(), NOW, NOW + 10, 10),  # resident time
        (H(("Age", "30")), NOW, NOW + 10, 40),
        (H(("Date", date(-100))), NOW, NOW + 10, 110),  # apparent age
        (H(("Date", date(-100)), ("Age", "30")), NOW, NOW, 100),  # the larger one
        (H(("Date", date(-10)), ("Age", "30")), NOW, NOW, 30),
        (H(("Date", date(100))), NOW, NOW, 0),  # a fast origin clock is not negative age
        (H(("Age", "5")), NOW - 2, NOW, 7),  # response_delay corrects Age
        (H(("Age", " 30 ")), NOW, NOW, 30),  # OWS around the value is not part of it
        (H(("Age", "9" * 30)), NOW, NOW, DELTA_SECONDS_MAX),
        (H(), NOW, NOW - 10, 0),  # clock went backwards
    ],
)
def test_current_age(headers: Headers, request_time: float, now: float, expected: float) -> None:
    assert current_age(headers, request_time=request_time, response_time=NOW, now=now) == expected


@pytest.mark.parametrize(
    "ages",
    [
        ("abc",),
        ("-7200",),
        ("7200.0",),
        ("",),
        ("0, 7200",),  # a list in a singleton field
        ("7200,0",),
        ("0, 0",),
        ("3600, 3600",),
        ("0", "7200"),  # two field lines
        ("0", "0"),
        ("7200;foo=bar",),  # parameters are not delta-seconds
        ("7200;foo=111",),
    ],
)
def test_invalid_age_makes_the_age_unknown(ages: tuple[str, ...]) -> None:
    """§5.1 asks for the first member of a list and to ignore an invalid value; PIBL takes
    the age as unknown (maximal) instead, so such a response is never reused as fresh."""
    headers = H(*(("Age", age) for age in ages))
    assert current_age(headers, request_time=NOW, response_time=NOW, now=NOW) == DELTA_SECONDS_MAX
    stored = entry(("Date", date()), ("Cache-Control", "max-age=3600"), *(("Age", a) for a in ages))
    assert decide(stored, req(), NOW + 1).action is Action.MUST_FORWARD


def test_age_header() -> None:
    assert age_header(0) == b"0"
    assert age_header(12.9) == b"12"
    assert age_header(-3) == b"0"
    assert age_header(1e12) == b"2147483648"


def test_headers_for_serving_replace_age_keep_date() -> None:
    stored = entry(("Date", date(-5)), ("Age", "3"), ("Cache-Control", "max-age=60"))
    served = stored.headers_for_serving(NOW + 10)
    assert (b"Date", date(-5)) in served
    assert [v for n, v in served if n.lower() == b"age"] == [b"15"]


# --------------------------------------------------------------------------------------------
# Vary (§4.1)


def test_vary_fields() -> None:
    assert vary_fields(H(("Vary", "Accept-Encoding, foo"), ("vary", "FOO,Bar"))) == (
        "accept-encoding",
        "bar",
        "foo",
    )
    assert vary_fields(H(("Vary", ", *"))) == ("*",)
    assert vary_fields(H()) == ()


@pytest.mark.parametrize(
    ("stored", "presented", "matches"),
    [
        (H(("Foo", "1")), H(("Foo", "1")), True),
        (H(("Foo", "1")), H(("foo", "1")), True),  # field names are case-insensitive
        (H(("Foo", "1")), H(("Foo", "2")), False),
        (H(("Foo", "1")), H(), False),
        (H(), H(("Foo", "1")), False),
        (H(), H(), True),  # absent in both
        (H(("Foo", "1,2")), H(("Foo", " 1, 2 ")), True),
        (H(("Foo", "1, 2")), H(("Foo", "1"), ("Foo", "2")), True),
        (H(("Foo", "a")), H(("Foo", "A")), False),  # values keep their case
        (H(("Foo", "")), H(), False),  # empty is not absent
    ],
)
def test_vary_matches(stored: Headers, presented: Headers, matches: bool) -> None:
    key = secondary_key(("foo",), stored)
    assert vary_matches(key, RequestHead("GET", b"/", "1.1", presented)) is matches


@pytest.mark.parametrize(
    ("name", "stored", "presented", "matches"),
    [
        ("Accept-Language", "en, de", "eN, De", True),  # language ranges: case-insensitive
        ("Accept-Language", "en, de", " en ,   de", True),
        ("Accept-Language", "de;q=0.5, en", "DE ; Q=0.5,en", True),
        ("Accept-Language", "en, de", "de, en", False),  # order can express preference
        ("Accept-Language", "en, de", "fr;q=0.5, de;q=1.0", False),
        ("Accept-Encoding", "gzip, br", "GZIP,BR", True),
        ("Accept-Charset", "utf-8", "UTF-8", True),
        ("Accept", "text/html", "TEXT/HTML", False),  # parameters may be case-sensitive
    ],
)
def test_vary_normalises_case_insensitive_fields(
    name: str, stored: str, presented: str, matches: bool
) -> None:
    key = secondary_key((name.lower(),), H((name, stored)))
    assert vary_matches(key, req((name, presented))) is matches


def test_vary_multiple_fields_and_star() -> None:
    key = secondary_key(("bar", "foo"), H(("Foo", "1"), ("Bar", "abc"), ("Other", "2")))
    assert vary_matches(key, req(("Bar", "abc"), ("Foo", "1"), ("Other", "3")))
    assert not vary_matches(key, req(("Bar", "abc4"), ("Foo", "1")))
    assert not vary_matches(secondary_key(("*",), H()), req())


def test_entry_records_secondary_key() -> None:
    stored = entry(("Vary", "Foo"), ("Cache-Control", "max-age=60"), request=req(("Foo", "1")))
    assert stored.vary == (("foo", "1"),)
    assert decide(stored, req(("Foo", "1")), NOW + 1).action is Action.FRESH
    miss = decide(stored, req(("Foo", "2")), NOW + 1)
    assert (miss.action, miss.fwd) == (Action.MUST_FORWARD, "vary-miss")


# --------------------------------------------------------------------------------------------
# Lookup decisions (§4, §5.2.1, RFC 5861)


def act(stored: StoredResponse, *pairs: tuple[str, str], at: float = 3, **kw: bool) -> Action:
    return decide(stored, req(*pairs), NOW + at, **kw).action


class TestDecide:
    def test_fresh(self) -> None:
        d = decide(entry(("Cache-Control", "max-age=60")), req(), NOW + 10)
        assert d == Decision(Action.FRESH, 10, 50, None, False)

    def test_stale_with_and_without_validators(self) -> None:
        with_etag = decide(entry(("Cache-Control", "max-age=1"), ("ETag", '"v"')), req(), NOW + 3)
        assert (with_etag.action, with_etag.fwd, with_etag.ttl) == (
            Action.STALE_REVALIDATE,
            "stale",
            -2,
        )
        with_lm = entry(("Cache-Control", "max-age=1"), ("Last-Modified", date(-100)))
        assert act(with_lm) is Action.STALE_REVALIDATE
        assert act(entry(("Cache-Control", "max-age=1"))) is Action.MUST_FORWARD

    def test_freshness_boundary(self) -> None:
        stored = entry(("Cache-Control", "max-age=10"))
        assert act(stored, at=9.99) is Action.FRESH
        assert act(stored, at=10) is Action.MUST_FORWARD  # fresh iff lifetime > age

    def test_age_header_counts(self) -> None:
        stored = entry(("Date", date()), ("Cache-Control", "max-age=3600"), ("Age", "7200"))
        assert act(stored, at=0) is Action.MUST_FORWARD

    def test_method(self) -> None:
        d = decide(entry(("Cache-Control", "max-age=60")), req(method="POST"), NOW)
        assert (d.action, d.fwd) == (Action.MUST_FORWARD, "method")
        assert (
            decide(entry(("Cache-Control", "max-age=60")), req(method="HEAD"), NOW).action
            is Action.FRESH
        )

    @pytest.mark.parametrize(
        "pairs",
        [
            (("Cache-Control", "no-cache"),),
            (("Pragma", "no-cache"),),
            (("Cache-Control", "max-age=0"),),
            (("Cache-Control", "max-age=2"),),
            (("Cache-Control", "min-fresh=100"),),
        ],
    )
    def test_request_directives_force_validation(self, pairs: tuple[tuple[str, str], ...]) -> None:
        stored = entry(("Cache-Control", "max-age=60"), ("ETag", '"v"'))
        d = decide(stored, req(*pairs), NOW + 3)
        assert (d.action, d.fwd) == (Action.STALE_REVALIDATE, "request")
        assert act(stored, *pairs, honor_request=False) is Action.FRESH

    @pytest.mark.parametrize(
        "pairs",
        [
            (("Cache-Control", "max-age=5"),),
            (("Cache-Control", "min-fresh=50"),),
            (("Cache-Control", "max-age=abc"),),  # invalid request values are ignored
            (("Cache-Control", "foo"), ("Pragma", "no-cache")),
            (("Pragma", "x-extension"),),
            (("Cache-Control", "no-store"),),  # §5.2.1.5: may still be answered from cache
            (("Cookie", "a=b"),),
        ],
    )
    def test_request_directives_that_allow_reuse(self, pairs: tuple[tuple[str, str], ...]) -> None:
        assert act(entry(("Cache-Control", "max-age=60")), *pairs) is Action.FRESH

    def test_min_fresh_and_max_age_use_the_aged_response(self) -> None:
        stored = entry(("Cache-Control", "max-age=1500"), ("Age", "1000"))
        assert act(stored, ("Cache-Control", "min-fresh=1000"), at=0) is Action.MUST_FORWARD
        assert act(stored, ("Cache-Control", "max-age=600"), at=0) is Action.MUST_FORWARD

    @pytest.mark.parametrize(
        ("max_stale", "expected"),
        [
            ("max-stale", Action.FRESH),
            ("max-stale=10", Action.FRESH),
            ("max-stale=1", Action.MUST_FORWARD),
        ],
    )
    def test_max_stale(self, max_stale: str, expected: Action) -> None:
        stored = entry(("Cache-Control", "max-age=1"))
        d = decide(stored, req(("Cache-Control", max_stale)), NOW + 3)
        assert (d.action, d.ttl) == (expected, -2)

    def test_max_stale_with_aged_response(self) -> None:
        stored = entry(("Cache-Control", "max-age=1500"), ("Age", "2000"))
        assert act(stored, ("Cache-Control", "max-stale=1000"), at=0) is Action.FRESH

    @pytest.mark.parametrize(
        "cc", ["must-revalidate", "proxy-revalidate", "s-maxage=1", "no-cache"]
    )
    def test_max_stale_forbidden(self, cc: str) -> None:
        stored = entry(("Cache-Control", f"max-age=1, {cc}"), ("ETag", '"v"'))
        assert act(stored, ("Cache-Control", "max-stale")) is Action.STALE_REVALIDATE

    def test_response_no_cache_validates_every_time(self) -> None:
        stored = entry(("Cache-Control", "max-age=10000, no-cache"), ("ETag", '"v"'))
        d = decide(stored, req(), NOW)
        assert (d.action, d.fwd) == (Action.STALE_REVALIDATE, "stale")
        assert d.ttl == 10000
        qualified = entry(("Cache-Control", 'max-age=10000, no-cache="a"'), ("A", "1"))
        assert act(qualified) is Action.FRESH
        assert qualified.headers == H(("Cache-Control", 'max-age=10000, no-cache="a"'))

    def test_must_revalidate(self) -> None:
        stored = entry(("Cache-Control", "max-age=2, must-revalidate"), ("ETag", '"abcd"'))
        assert act(stored, at=1) is Action.FRESH
        assert act(stored, at=3) is Action.STALE_REVALIDATE

    @pytest.mark.parametrize(
        ("cc", "at", "expected"),
        [
            ("max-age=1, stale-while-revalidate=10", 5, Action.STALE_WHILE_REVALIDATE),
            ("max-age=1, stale-while-revalidate=10", 11, Action.STALE_WHILE_REVALIDATE),
            ("max-age=1, stale-while-revalidate=10", 11.5, Action.MUST_FORWARD),
            ("max-age=0, stale-while-revalidate=3600", 3, Action.STALE_WHILE_REVALIDATE),
            ("s-maxage=1, stale-while-revalidate=10", 5, Action.STALE_WHILE_REVALIDATE),
            ("max-age=1, stale-while-revalidate=10, must-revalidate", 5, Action.MUST_FORWARD),
            ("max-age=1, stale-while-revalidate=10, proxy-revalidate", 5, Action.MUST_FORWARD),
            ("max-age=1, stale-while-revalidate=abc", 5, Action.MUST_FORWARD),
        ],
    )
    def test_stale_while_revalidate(self, cc: str, at: float, expected: Action) -> None:
        assert act(entry(("Cache-Control", cc)), at=at) is expected

    def test_stale_while_revalidate_yields_to_request_no_cache(self) -> None:
        stored = entry(("Cache-Control", "max-age=1, stale-while-revalidate=10"))
        assert act(stored, ("Cache-Control", "no-cache")) is Action.MUST_FORWARD

    def test_only_if_cached(self) -> None:
        oic = ("Cache-Control", "only-if-cached")
        fresh = decide(entry(("Cache-Control", "max-age=60")), req(oic), NOW)
        assert fresh.only_if_cached
        assert not fresh.gateway_timeout
        stale = decide(entry(("Cache-Control", "max-age=1")), req(oic), NOW + 3)
        assert stale.gateway_timeout
        swr = decide(
            entry(("Cache-Control", "max-age=1, stale-while-revalidate=9")), req(oic), NOW + 3
        )
        assert not swr.gateway_timeout
        assert decide(
            entry(("Cache-Control", "max-age=1")), req(oic), NOW + 3, honor_request=False
        ).gateway_timeout

    def test_default_ttl_is_remembered_by_the_entry(self) -> None:
        stored = entry(default_ttl=30)
        assert act(stored, at=29) is Action.FRESH
        assert act(stored, at=31) is Action.MUST_FORWARD


class TestStaleIfError:
    @pytest.mark.parametrize(
        ("cc", "request_cc", "at", "allowed"),
        [
            ("max-age=0, stale-if-error=3600", None, 3, True),
            ("max-age=0, stale-if-error=1", None, 3, False),
            ("max-age=0", "stale-if-error=3600", 3, True),
            ("max-age=0", "stale-if-error=1", 3, False),
            ("max-age=0", None, 3, False),
            ("max-age=60", None, 3, True),  # still fresh
            ("max-age=0, stale-if-error=3600, must-revalidate", None, 3, False),
            ("max-age=0, stale-if-error=3600, proxy-revalidate", None, 3, False),
            ("max-age=60, no-cache", None, 3, False),
            ("s-maxage=0, stale-if-error=3600", None, 3, True),
        ],
    )
    def test_windows(self, cc: str, request_cc: str | None, at: float, allowed: bool) -> None:
        request = req(("Cache-Control", request_cc)) if request_cc else req()
        assert stale_if_error_allowed(entry(("Cache-Control", cc)), request, NOW + at) is allowed

    def test_request_window_ignored_when_not_honoured(self) -> None:
        request = req(("Cache-Control", "stale-if-error=3600"))
        stored = entry(("Cache-Control", "max-age=0"))
        assert not stale_if_error_allowed(stored, request, NOW + 3, honor_request=False)

    @pytest.mark.parametrize(
        ("cc", "allowed"),
        [
            ("max-age=2", True),
            ("max-age=2, must-revalidate", False),
            ("max-age=2, proxy-revalidate", False),
            ("max-age=2, no-cache", False),
            ("max-age=2, s-maxage=2", False),
        ],
    )
    def test_disconnected(self, cc: str, allowed: bool) -> None:
        stored = entry(("Cache-Control", cc))
        assert stale_if_error_allowed(stored, req(), NOW + 3, disconnected=True) is allowed
        assert not stale_if_error_allowed(stored, req(), NOW + 3)


# --------------------------------------------------------------------------------------------
# Validation (§4.3)


class TestConditionalHeaders:
    @pytest.mark.parametrize(
        ("pairs", "expected"),
        [
            ((("ETag", '"abc"'),), H(("If-None-Match", '"abc"'))),
            ((("ETag", 'W/"abc"'),), H(("If-None-Match", 'W/"abc"'))),
            ((("ETag", "abc"),), H(("If-None-Match", '"abc"'))),
            (
                (("Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT"),),
                H(("If-Modified-Since", "Sun, 06 Nov 1994 08:49:37 GMT")),
            ),
            ((("Last-Modified", "yesterday"),), []),
            ((), []),
            (
                (("ETag", '"a"'), ("Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT")),
                H(("If-None-Match", '"a"'), ("If-Modified-Since", "Sun, 06 Nov 1994 08:49:37 GMT")),
            ),
        ],
    )
    def test_built_from_validators(
        self, pairs: tuple[tuple[str, str], ...], expected: Headers
    ) -> None:
        assert conditional_headers(entry(*pairs)) == expected

    def test_revalidation_headers_replace_client_conditionals(self) -> None:
        stored = entry(("ETag", '"mine"'))
        client = H(("Accept", "*/*"), ("If-None-Match", '"theirs"'), ("If-Modified-Since", "x"))
        assert revalidation_headers(client, stored) == H(
            ("Accept", "*/*"), ("If-None-Match", '"mine"')
        )


class TestFreshen:
    def test_replaces_adds_and_keeps(self) -> None:
        stored = H(
            ("Cache-Control", "max-age=1"),
            ("Content-Type", "text/plain"),
            ("Content-Length", "5"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=1"),
            ("Test-Header", "A"),
        )
        new = H(
            ("Cache-Control", "max-age=3600"),
            ("Content-Length", "0"),
            ("Set-Cookie", "a=2"),
            ("Test-Header", "B"),
            ("X-New", "1"),
            ("Connection", "x-hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
        )
        assert freshen_headers(stored, new) == H(
            ("Cache-Control", "max-age=3600"),
            ("Content-Type", "text/plain"),
            ("Content-Length", "5"),
            ("Set-Cookie", "a=2"),
            ("Test-Header", "B"),
            ("X-New", "1"),
        )

    @pytest.mark.parametrize(
        ("name", "a", "b"),
        [
            ("Content-Type", "text/plain", "text/plain;charset=utf-8"),
            ("Content-Location", "/foo", "/bar"),
            ("Content-Security-Policy", "default-src 'self'", "default-src 'self' cdn.example.com"),
            ("X-Frame-Options", "deny", "sameorigin"),
            ("Expires", "Fri, 01 Jan 2038 01:01:01 GMT", "Mon, 11 Jan 2038 11:11:11 GMT"),
        ],
    )
    def test_update304_fields(self, name: str, a: str, b: str) -> None:
        assert freshen_headers(H((name, a)), H((name, b))) == H((name, b))

    @pytest.mark.parametrize(
        ("name", "a", "b"),
        [
            ("Content-Encoding", "gzip", "br"),
            ("Content-Length", "5", "10"),
            ("Content-MD5", "rL0Y20zC+Fzt72VPzMSk2A==", "N7UdGUp1E+RbVvZSTy1R8g=="),
            ("Content-Range", "bytes 0-4/10", "bytes 5-9/10"),
            ("Content-Digest", "sha-256=:AAAA:", "sha-256=:BBBB:"),
            ("ETag", '"abcdef"', '"ghijkl"'),
        ],
    )
    def test_fields_describing_the_stored_bytes_are_not_updated(
        self, name: str, a: str, b: str
    ) -> None:
        """§3.2: fields the stored response depends upon are neither replaced nor added."""
        assert freshen_headers(H((name, a)), H((name, b))) == H((name, a))
        assert freshen_headers(H(), H((name, b))) == H()

    def test_age_restarts_from_the_304(self) -> None:
        assert freshen_headers(H(("Age", "100"), ("A", "1")), H(("A", "2"))) == H(("A", "2"))
        assert freshen_headers(H(("Age", "100")), H(("Age", "3"))) == H(("Age", "3"))
        stored = entry(("Cache-Control", "max-age=600"), ("ETag", '"v"'), ("Age", "500"))
        new = stored.freshened(H(("ETag", '"v"')), request_time=NOW + 700, response_time=NOW + 700)
        assert new.current_age(NOW + 710) == 10

    def test_no_cache_fields_of_the_304_are_not_stored(self) -> None:
        merged = freshen_headers(H(("A", "1")), H(("Cache-Control", 'no-cache="a"'), ("A", "2")))
        assert merged == H(("Cache-Control", 'no-cache="a"'))

    def test_freshened_entry(self) -> None:
        stored = entry(("Cache-Control", "max-age=1"), ("ETag", '"v"'), ("Test-Header", "A"))
        assert act(stored, at=3) is Action.STALE_REVALIDATE
        new = stored.freshened(
            H(("Cache-Control", "max-age=3600"), ("ETag", '"v"'), ("Test-Header", "B")),
            request_time=NOW + 3,
            response_time=NOW + 3,
        )
        assert decide(new, req(), NOW + 6).action is Action.FRESH
        assert (b"Test-Header", b"B") in new.headers
        assert (b"Test-Header", b"A") in stored.headers  # the original is not mutated


@pytest.mark.parametrize(
    ("stored", "new", "single", "matches"),
    [
        ((("ETag", '"a"'),), (("ETag", '"a"'),), True, True),
        ((("ETag", '"a"'),), (("ETag", '"b"'),), True, False),
        ((("ETag", 'W/"a"'),), (("ETag", '"a"'),), True, False),  # strong needs strong
        ((("ETag", '"a"'),), (("ETag", 'W/"a"'),), True, True),  # weak comparison
        ((("ETag", 'W/"a"'),), (("ETag", 'W/"a"'),), True, True),
        ((), (("ETag", '"a"'),), True, False),
        (
            (("Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT"),),
            (("Last-Modified", "Sunday, 06-Nov-94 08:49:37 GMT"),),
            True,
            True,
        ),
        (
            (("Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT"),),
            (("Last-Modified", "Sun, 06 Nov 1994 08:49:38 GMT"),),
            True,
            False,
        ),
        ((("ETag", '"a"'),), (), True, True),
        ((("ETag", '"a"'),), (), False, False),
    ],
)
def test_matches_304_entry(
    stored: tuple[tuple[str, str], ...],
    new: tuple[tuple[str, str], ...],
    single: bool,
    matches: bool,
) -> None:
    assert matches_304_entry(entry(*stored), H(*new), single=single) is matches


LM = "Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.mark.parametrize(
    ("request_pairs", "stored", "matches"),
    [
        ((("If-None-Match", '"abc"'),), (("ETag", '"abc"'),), True),
        ((("If-None-Match", '"abd"'),), (("ETag", '"abc"'),), False),
        ((("If-None-Match", 'W/"abc"'),), (("ETag", '"abc"'),), True),  # weak comparison
        ((("If-None-Match", '"abc"'),), (("ETag", 'W/"abc"'),), True),
        ((("If-None-Match", '"1", "abc", "2"'),), (("ETag", '"abc"'),), True),
        ((("If-None-Match", '"1"'), ("If-None-Match", '"abc"')), (("ETag", '"abc"'),), True),
        ((("If-None-Match", '"a,b"'),), (("ETag", '"a,b"'),), True),
        ((("If-None-Match", "*"),), (("ETag", '"abc"'),), True),
        ((("If-None-Match", "*"),), (), True),
        ((("If-None-Match", '"abc"'),), (), False),
        ((("If-None-Match", "abc"),), (("ETag", '"abc"'),), True),  # lenient: unquoted
        ((("If-None-Match", '"abc"'),), (("ETag", "abc"),), True),
        ((("If-None-Match", 'w/"abc"'),), (("ETag", 'w/"abc"'),), True),
        ((("If-None-Match", '"abcdefü"'),), (("ETag", '"abcdefü"'),), True),
        # If-None-Match takes precedence over If-Modified-Since (RFC 9110 §13.2.2).
        (
            (("If-None-Match", '"x"'), ("If-Modified-Since", LM)),
            (("ETag", '"abc"'), ("Last-Modified", LM)),
            False,
        ),
        (
            (("If-None-Match", '"abc"'), ("If-Modified-Since", "Sun, 06 Nov 1980 08:49:37 GMT")),
            (("ETag", '"abc"'), ("Last-Modified", LM)),
            True,
        ),
        ((("If-Modified-Since", LM),), (("Last-Modified", LM),), True),
        ((("If-Modified-Since", "Mon, 07 Nov 1994 08:49:37 GMT"),), (("Last-Modified", LM),), True),
        (
            (("If-Modified-Since", "Sat, 05 Nov 1994 08:49:37 GMT"),),
            (("Last-Modified", LM),),
            False,
        ),
        (
            (("If-Modified-Since", "Sunday, 06-Nov-94 08:49:37 GMT"),),
            (("Last-Modified", LM),),
            True,
        ),
        ((("If-Modified-Since", LM),), (("Date", "Sat, 05 Nov 1994 08:49:37 GMT"),), True),  # Date
        ((("If-Modified-Since", LM),), (("Date", "Mon, 07 Nov 1994 08:49:37 GMT"),), False),
        ((("If-Modified-Since", "garbage"),), (("Last-Modified", LM),), False),
        ((("If-Modified-Since", LM), ("If-Modified-Since", LM)), (("Last-Modified", LM),), False),
        ((), (("ETag", '"abc"'), ("Last-Modified", LM)), False),
    ],
)
def test_client_conditional_matches(
    request_pairs: tuple[tuple[str, str], ...], stored: tuple[tuple[str, str], ...], matches: bool
) -> None:
    request = RequestHead("GET", b"/", "1.1", H(*request_pairs))
    assert client_conditional_matches(request, H(*stored)) is matches


def test_client_conditional_only_for_get_head_and_2xx() -> None:
    inm = H(("If-None-Match", '"abc"'))
    stored = H(("ETag", '"abc"'))
    assert client_conditional_matches(RequestHead("HEAD", b"/", "1.1", inm), stored)
    assert not client_conditional_matches(RequestHead("POST", b"/", "1.1", inm), stored)
    assert not client_conditional_matches(RequestHead("GET", b"/", "1.1", inm), stored, status=404)


def test_client_ims_falls_back_to_response_time() -> None:
    request = RequestHead("GET", b"/", "1.1", H(("If-Modified-Since", date(-10))))
    assert client_conditional_matches(request, [], response_time=NOW - 20)
    assert not client_conditional_matches(request, [], response_time=NOW)
    assert not client_conditional_matches(request, [])


def test_not_modified_headers() -> None:
    stored = H(
        ("Date", LM),
        ("ETag", '"a"'),
        ("Last-Modified", LM),
        ("Content-Type", "text/html"),
        ("Cache-Control", "max-age=60"),
        ("Vary", "Accept"),
        ("Content-Location", "/x"),
        ("Expires", LM),
    )
    assert not_modified_headers(stored) == H(
        ("Date", LM),
        ("ETag", '"a"'),
        ("Cache-Control", "max-age=60"),
        ("Vary", "Accept"),
        ("Content-Location", "/x"),
        ("Expires", LM),
    )
    assert not_modified_headers(H(("Last-Modified", LM))) == H(("Last-Modified", LM))


# --------------------------------------------------------------------------------------------
# Storage of header fields (§3.1)


def test_strip_for_storage() -> None:
    headers = H(
        ("Connection", "a, B"),
        ("a", "1"),
        ("b", "2"),
        ("c", "3"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authenticate", "Basic"),
        ("Proxy-Authentication-Info", "x"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Trailer", "x"),
        ("Upgrade", "h2c"),
        ("Set-Cookie", "a=b"),
        ("WWW-Authenticate", "Basic"),
        ("Content-Length", "10"),
    )
    assert strip_for_storage(headers) == H(
        ("c", "3"), ("Set-Cookie", "a=b"), ("WWW-Authenticate", "Basic"), ("Content-Length", "10")
    )


def test_strip_qualified_no_cache_and_private() -> None:
    headers = H(
        ("Cache-Control", 'no-cache="a, b", private="Set-Cookie"'),
        ("a", "1"),
        ("B", "2"),
        ("c", "3"),
        ("Set-Cookie", "x"),
    )
    assert strip_for_storage(headers) == [headers[0], *H(("c", "3"))]
    assert strip_for_storage(headers, shared=False) == [
        headers[0],
        *H(("c", "3"), ("Set-Cookie", "x")),
    ]


# --------------------------------------------------------------------------------------------
# Invalidation (§4.4)


def _invalidated(method: str, status: int, *pairs: tuple[str, str]) -> list[str]:
    request = req(method=method, target=b"/a/b?q")
    targets = invalidation_targets(request, resp(*pairs, status=status), make_key(request))
    return [key.url for key in targets]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "M-SEARCH"])
def test_unsafe_methods_invalidate_the_target(method: str) -> None:
    assert _invalidated(method, 200) == ["http://example.com/a/b?q"]
    assert _invalidated(method, 303) == ["http://example.com/a/b?q"]
    assert _invalidated(method, 500) == []
    assert _invalidated(method, 404) == []


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE"])
def test_safe_methods_invalidate_nothing(method: str) -> None:
    assert _invalidated(method, 200, ("Location", "/c")) == []


def test_location_and_content_location_same_origin_only() -> None:
    assert _invalidated("POST", 201, ("Location", "c"), ("Content-Location", "/d")) == [
        "http://example.com/a/b?q",
        "http://example.com/a/c",
        "http://example.com/d",
    ]
    assert _invalidated("POST", 201, ("Location", "http://EXAMPLE.com:80/e")) == [
        "http://example.com/a/b?q",
        "http://example.com/e",
    ]
    for other in (
        "http://other.example/e",
        "//other.example/e",
        "https://example.com/e",
        "http://example.com:81/e",
    ):
        assert _invalidated("POST", 201, ("Location", other)) == ["http://example.com/a/b?q"]
    assert _invalidated("POST", 200, ("Content-Location", "/a/b?q")) == ["http://example.com/a/b?q"]
    assert _invalidated("POST", 200, ("Location", "http://[bad")) == ["http://example.com/a/b?q"]


# --------------------------------------------------------------------------------------------
# Cache-Status (RFC 9211)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"hit": True, "ttl": 42.9}, b"pibl; hit; ttl=42"),
        ({"hit": True, "ttl": -5}, b"pibl; hit; ttl=-5"),
        ({"hit": False, "fwd": "uri-miss", "stored": True}, b"pibl; fwd=uri-miss; stored"),
        ({"hit": False, "fwd": "stale", "fwd_status": 304}, b"pibl; fwd=stale; fwd-status=304"),
        (
            {"hit": False, "fwd": "uri-miss", "detail": "no-store"},
            b"pibl; fwd=uri-miss; detail=no-store",
        ),
        (
            {"hit": False, "fwd": "uri-miss", "detail": "two words"},
            b'pibl; fwd=uri-miss; detail="two words"',
        ),
        (
            {"hit": False, "fwd": "bypass", "detail": 'a"\\é'},
            b'pibl; fwd=bypass; detail="a\\"\\\\?"',
        ),
        ({"hit": True, "name": "edge 1"}, b'"edge 1"; hit'),
        (
            {
                "hit": False,
                "fwd": "stale",
                "fwd_status": 200,
                "stored": True,
                "ttl": 60,
                "detail": "x",
            },
            b"pibl; fwd=stale; fwd-status=200; stored; ttl=60; detail=x",
        ),
    ],
)
def test_cache_status(kwargs: dict[str, object], expected: bytes) -> None:
    assert cache_status(**kwargs) == expected  # type: ignore[arg-type]


def test_cache_status_rejects_bad_fwd() -> None:
    with pytest.raises(ValueError, match="token"):
        cache_status(False, fwd="not a token")


# --------------------------------------------------------------------------------------------
# Stored entries


def test_stored_response_round_trip() -> None:
    stored = entry(
        ("Cache-Control", "max-age=60"),
        ("Vary", "Accept, Foo"),
        ("X-Bin", b"\xff\x00"),
        request=req(("Accept", "text/html")),
        default_ttl=5,
    )
    assert stored.vary == (("accept", "text/html"), ("foo", None))
    assert StoredResponse.from_bytes(stored.to_bytes()) == stored


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"{}",
        b'{"v": 2}',
        b"\xff",
        entry().to_bytes().replace(b'"status":200', b'"status":"200"'),
    ],
)
def test_stored_response_from_bytes_rejects_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - several messages
        StoredResponse.from_bytes(data)


# --------------------------------------------------------------------------------------------
# Scenarios from the public HTTP caching test suite (cache-tests.fyi): store the first
# response, wait (the suite's pause is a few seconds), then look up. None means "not stored".

PAUSE = 3.0


def reuse(
    *pairs: tuple[str, str | bytes],
    status: int = 200,
    request: RequestHead | None = None,
    again: RequestHead | None = None,
) -> Action | None:
    request = request or req()
    response = resp(*pairs, status=status)
    if not storable(request, response, response_time=NOW)[0]:
        return None
    stored = StoredResponse.from_exchange(
        make_key(request), request, response, request_time=NOW, response_time=NOW
    )
    return decide(stored, again or req(), NOW + PAUSE).action


FRESH, REVAL, FORWARD, SWR = (
    Action.FRESH,
    Action.STALE_REVALIDATE,
    Action.MUST_FORWARD,
    Action.STALE_WHILE_REVALIDATE,
)
CC = "Cache-Control"


@pytest.mark.parametrize(
    ("test_id", "pairs", "status", "expected"),
    [
        ("freshness-none", (), 200, None),
        ("freshness-max-age", ((CC, "max-age=3600"),), 200, FRESH),
        ("freshness-max-age-stale", ((CC, "max-age=2"),), 200, FORWARD),
        ("freshness-max-age-0", ((CC, "max-age=0"),), 200, None),
        ("freshness-max-age-max", ((CC, "max-age=2147483648"),), 200, FRESH),
        ("freshness-max-age-max-plus", ((CC, "max-age=99999999999"),), 200, FRESH),
        (
            "freshness-max-age-age",
            (("Date", date()), (CC, "max-age=3600"), ("Age", "7200")),
            200,
            FORWARD,
        ),
        ("freshness-max-age-date", (("Date", date(-7200)), (CC, "max-age=3600")), 200, FORWARD),
        (
            "freshness-max-age-expires",
            ((CC, "max-age=3600"), ("Expires", date(-7200)), ("Date", date())),
            200,
            FRESH,
        ),
        (
            "freshness-max-age-expires-invalid",
            ((CC, "max-age=3600"), ("Expires", "0"), ("Date", date())),
            200,
            FRESH,
        ),
        (
            "freshness-max-age-0-expires",
            (("Expires", date(3600)), (CC, "max-age=0"), ("Date", date())),
            200,
            None,
        ),
        ("freshness-max-age-extension", ((CC, "foobar, max-age=3600"),), 200, FRESH),
        ("freshness-max-age-case-insenstive", ((CC, "MaX-aGe=3600"),), 200, FRESH),
        ("freshness-max-age-negative", ((CC, "max-age=-3600"),), 200, None),
        ("freshness-s-maxage-shared", ((CC, "s-maxage=3600"),), 200, FRESH),
        (
            "freshness-max-age-s-maxage-shared-longer",
            ((CC, "max-age=3600, s-maxage=1"),),
            200,
            FORWARD,
        ),
        (
            "freshness-max-age-s-maxage-shared-longer-multiple",
            ((CC, "max-age=3600"), (CC, "s-maxage=1")),
            200,
            FORWARD,
        ),
        (
            "freshness-max-age-s-maxage-shared-shorter",
            ((CC, "max-age=1, s-maxage=3600"),),
            200,
            FRESH,
        ),
        (
            "freshness-max-age-s-maxage-shared-shorter-expires",
            (("Expires", date(-10)), (CC, "max-age=0, s-maxage=3600")),
            200,
            FRESH,
        ),
        (
            "freshness-max-age-ignore-quoted",
            ((CC, 'extension="max-age=3600", max-age=1'),),
            200,
            FORWARD,
        ),
        (
            "freshness-max-age-ignore-quoted-rev",
            ((CC, 'max-age=1, extension="max-age=3600"'),),
            200,
            FORWARD,
        ),
        ("freshness-max-age-single-quoted", ((CC, "max-age='3600'"),), 200, None),
        ("freshness-max-age-space-before-equals", ((CC, "max-age =3600"),), 200, None),
        ("freshness-max-age-space-after-equals", ((CC, "max-age= 3600"),), 200, None),
        ("freshness-max-age-leading-zero", ((CC, "max-age=003600"),), 200, FRESH),
        ("freshness-max-age-quoted", ((CC, 'max-age="3600"'),), 200, FRESH),
        (
            "freshness-max-age-two-fresh-stale-sameline",
            ((CC, "max-age=1800, max-age=1"),),
            200,
            FRESH,
        ),
        ("freshness-expires-future", (("Expires", date(30 * 86400)), ("Date", date())), 200, FRESH),
        ("freshness-expires-past", (("Expires", date(-30 * 86400)), ("Date", date())), 200, None),
        ("freshness-expires-present", (("Expires", date()), ("Date", date())), 200, None),
        ("freshness-expires-old-date", (("Expires", date(300)), ("Date", date(400))), 200, None),
        ("freshness-expires-invalid", (("Expires", "0"), ("Date", date())), 200, None),
        (
            "freshness-expires-invalid-utc",
            (("Expires", "Thu, 18 Aug 2050 02:01:18 UTC"), ("Date", date())),
            200,
            None,
        ),
        (
            "freshness-expires-wrong-case-month",
            (("Expires", "Thu, 18 AUG 2050 02:01:18 GMT"), ("Date", date())),
            200,
            FRESH,
        ),
        ("freshness-expires-invalid-date", (("Date", "foo"), ("Expires", date(10))), 200, FRESH),
        (
            "freshness-expires-age-slow-date",
            (("Date", date(-10)), ("Expires", date(10)), ("Age", "25")),
            200,
            FORWARD,
        ),
        (
            "freshness-expires-age-fast-date",
            (("Date", date(10)), ("Expires", date(20)), ("Age", "15")),
            200,
            FORWARD,
        ),
        ("cc-resp-private-shared", ((CC, "private, max-age=3600"),), 200, None),
        ("cc-resp-no-store", ((CC, "no-store"),), 200, None),
        (
            "cc-resp-no-store-fresh",
            ((CC, "max-age=10000, no-store"), ("Expires", date(10000)), ("Date", date())),
            200,
            None,
        ),
        (
            "cc-resp-no-cache",
            ((CC, "max-age=10000, no-cache"), ("Expires", date(10000)), ("Date", date())),
            200,
            None,
        ),
        ("cc-resp-no-cache-revalidate", ((CC, "no-cache"), ("ETag", '"abcd"')), 200, REVAL),
        (
            "cc-resp-no-cache-revalidate-fresh",
            ((CC, "max-age=10000, no-cache"), ("ETag", '"abcd"')),
            200,
            REVAL,
        ),
        (
            "cc-resp-must-revalidate-fresh",
            ((CC, "max-age=10000, must-revalidate"), ("ETag", '"abcd"')),
            200,
            FRESH,
        ),
        (
            "cc-resp-must-revalidate-stale",
            ((CC, "max-age=2, must-revalidate"), ("ETag", '"abcd"')),
            200,
            REVAL,
        ),
        (
            "headers-omit-headers-listed-in-Cache-Control-no-cache",
            ((CC, 'no-cache="a, b"'), ("a", "1"), (CC, "max-age=3600")),
            200,
            FRESH,
        ),
        ("heuristic-200-cached", (("Last-Modified", date(-86400)), ("Date", date())), 200, FRESH),
        ("heuristic-204-cached", (("Last-Modified", date(-86400)), ("Date", date())), 204, FRESH),
        ("heuristic-404-cached", (("Last-Modified", date(-86400)), ("Date", date())), 404, FRESH),
        ("heuristic-501-cached", (("Last-Modified", date(-86400)), ("Date", date())), 501, FRESH),
        (
            "heuristic-201-not_cached",
            (("Last-Modified", date(-86400)), ("Date", date())),
            201,
            None,
        ),
        (
            "heuristic-403-not_cached",
            (("Last-Modified", date(-86400)), ("Date", date())),
            403,
            None,
        ),
        (
            "heuristic-502-not_cached",
            (("Last-Modified", date(-86400)), ("Date", date())),
            502,
            None,
        ),
        (
            "heuristic-599-not_cached",
            (("Last-Modified", date(-86400)), ("Date", date())),
            599,
            None,
        ),
        (
            "heuristic-599-cached",
            (("Last-Modified", date(-86400)), ("Date", date()), (CC, "public")),
            599,
            FRESH,
        ),
        (
            "status-299-fresh",
            ((CC, "max-age=100000"), ("Expires", date(100000)), ("Date", date())),
            299,
            FRESH,
        ),
        ("status-307-fresh", ((CC, "max-age=100000"), ("Date", date())), 307, FRESH),
        ("status-503-fresh", ((CC, "max-age=100000"), ("Date", date())), 503, FRESH),
        (
            "status-599-stale",
            (("Expires", date(-5000)), ("Last-Modified", date(-100000)), ("Date", date())),
            599,
            REVAL,
        ),
        (
            "status-200-stale",
            (("Expires", date(-5000)), ("Last-Modified", date(-100000)), ("Date", date())),
            200,
            REVAL,
        ),
        (
            "stale-while-revalidate",
            ((CC, "max-age=0, stale-while-revalidate=3600"), ("ETag", '"abc"')),
            200,
            SWR,
        ),
        ("other-set-cookie", ((CC, "max-age=3600"), ("Set-Cookie", "a=b")), 200, FRESH),
        (
            "other-fresh-content-disposition-attachment",
            ((CC, "max-age=3600"), ("Content-Disposition", "attachment")),
            200,
            FRESH,
        ),
        ("pragma-response-no-cache", ((CC, "max-age=3600"), ("Pragma", "no-cache")), 200, FRESH),
    ],
)
def test_cache_tests_scenarios(
    test_id: str, pairs: tuple[tuple[str, str], ...], status: int, expected: Action | None
) -> None:
    assert reuse(*pairs, status=status) is expected, test_id


@pytest.mark.parametrize(
    ("test_id", "first", "second", "expected"),
    [
        ("vary-match", (("Foo", "1"),), (("Foo", "1"),), FRESH),
        ("vary-no-match", (("Foo", "1"),), (("Foo", "2"),), FORWARD),
        ("vary-omit", (("Foo", "1"),), (), FORWARD),
        ("vary-cache-key", (("Foo", "1"), ("Other", "2")), (("Foo", "1"), ("Other", "3")), FRESH),
        ("vary-normalise-space", (("Foo", "1,2"),), (("Foo", " 1, 2 "),), FRESH),
        ("vary-normalise-combine", (("Foo", "1, 2"),), (("Foo", "1"), ("Foo", "2")), FRESH),
        ("other-cookie", (), (("Cookie", "a=b"),), FRESH),
    ],
)
def test_cache_tests_vary_scenarios(
    test_id: str,
    first: tuple[tuple[str, str], ...],
    second: tuple[tuple[str, str], ...],
    expected: Action,
) -> None:
    pairs = (
        (CC, "max-age=5000"),
        ("Last-Modified", date(-3000)),
        ("Date", date()),
        ("Vary", "Foo"),
    )
    assert reuse(*pairs, request=req(*first), again=req(*second)) is expected, test_id


def test_cache_tests_authorization_scenarios() -> None:
    auth = req(("Authorization", "FOO"))
    assert reuse(("Expires", date(30 * 86400)), ("Date", date()), request=auth) is None
    assert reuse((CC, "max-age=3600, public"), ("Date", date()), request=auth) is FRESH
    assert reuse((CC, "max-age=3600, must-revalidate"), ("Date", date()), request=auth) is FRESH
    assert reuse((CC, "s-maxage=3600"), ("Date", date()), request=auth) is FRESH


# --------------------------------------------------------------------------------------------
# Surrogate-Control (W3C Edge Architecture)

SC = "Surrogate-Control"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["max-age=60"], {"max-age": "60"}),
        (["MaX-aGe=60, foo"], {"max-age": "60", "foo": None}),
        (["max-age=60;pibl"], {"max-age": "60"}),
        (["max-age=60;PIBL"], {"max-age": "60"}),
        (["max-age=60;other"], {}),
        (["no-store, max-age=60;pibl"], {"max-age": "60"}),  # targeted members win
        (["max-age=60;pibl, no-store;cdn"], {"max-age": "60"}),
        (["no-store;cdn, max-age=5"], {"max-age": "5"}),
        (['content="ESI/1.0;x", max-age=5'], {"content": "ESI/1.0;x", "max-age": "5"}),
        (["max-age=1", "no-store"], {"max-age": "1", "no-store": None}),
        ([], {}),
    ],
)
def test_surrogate_control_targeting(values: list[str], expected: dict[str, str | None]) -> None:
    assert surrogate_control(H(*((SC, v) for v in values))) == expected


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (((CC, "max-age=1"), (SC, "max-age=3600")), {"max-age": "3600"}),
        (((CC, "no-store"), (SC, "max-age=10;pibl")), {"max-age": "10"}),
        (
            ((CC, "max-age=60, must-revalidate, public"), (SC, "no-store")),
            {"public": None, "no-store": None},
        ),
        (((CC, "private, no-cache"), (SC, "max-age=10")), {"private": None, "max-age": "10"}),
        (((CC, "max-age=1"), (SC, "max-age=10+30")), {"max-age": "10", "stale-if-error": "30"}),
        (((CC, "max-age=1"), (SC, "content=x")), {"max-age": "1"}),  # no caching directive
        (((CC, "max-age=1"), (SC, "max-age=10;other")), {"max-age": "1"}),
    ],
)
def test_surrogate_control_takes_precedence(
    pairs: tuple[tuple[str, str], ...], expected: dict[str, str | None]
) -> None:
    assert response_cache_control(H(*pairs)) == expected
    assert response_cache_control(H(*pairs), shared=False) == parse_cache_control(
        [v.encode() for n, v in pairs if n == CC]
    )


def test_surrogate_control_is_consumed_and_other_targets_pass_on() -> None:
    assert downstream_surrogate_control(H((SC, "max-age=60"))) is None
    rest = downstream_surrogate_control(H((SC, "max-age=60;pibl, no-store;cdn, foo")))
    assert rest == b"no-store;cdn"
    served = without_surrogate_control(H(("A", "1"), (SC, "max-age=60, no-store;cdn")))
    assert served == H(("A", "1"), (SC, "no-store;cdn"))
    assert without_surrogate_control(H(("A", "1"))) == H(("A", "1"))
    stored = entry((SC, "max-age=60"), ("A", "1"))
    assert SC.encode() not in [n for n, _ in stored.headers_for_serving(NOW)]
    assert (SC.encode(), b"max-age=60") in stored.headers  # kept for the policy


def test_surrogate_capability_is_appended() -> None:
    assert with_surrogate_capability(H(("A", "1"))) == [
        (b"A", b"1"),
        (b"Surrogate-Capability", SURROGATE_CAPABILITY),
    ]
    assert with_surrogate_capability(H(("Surrogate-Capability", 'cdn="Surrogate/1.0"'))) == [
        (b"Surrogate-Capability", b'cdn="Surrogate/1.0", ' + SURROGATE_CAPABILITY)
    ]
    assert SURROGATE_CAPABILITY == b'pibl="Surrogate/1.0"'


@pytest.mark.parametrize(
    ("test_id", "pairs", "expected"),
    [
        ("surrogate-max-age", ((SC, "max-age=3600"),), FRESH),
        ("surrogate-max-age-max", ((SC, "max-age=2147483648"),), FRESH),
        ("surrogate-max-age-max-plus", ((SC, "max-age=99999999999"),), FRESH),
        ("surrogate-max-age-me-target", ((SC, "max-age=3600;pibl"),), FRESH),
        (
            "surrogate-max-age-other-target",
            (("Date", date()), (SC, "max-age=3600;not-for-you"), ("Age", "7200")),
            None,
        ),
        (
            "surrogate-max-age-age",
            (("Date", date()), (SC, "max-age=3600"), ("Age", "7200")),
            FORWARD,
        ),
        (
            "surrogate-max-age-space-before-equals",
            ((CC, "max-age=1"), (SC, "max-age =100")),
            FORWARD,
        ),
        ("surrogate-max-age-0", ((SC, "max-age=0"),), None),
        ("surrogate-max-age-extension", ((SC, "foobar, max-age=3600"),), FRESH),
        ("surrogate-max-age-case-insensitive", ((SC, "MaX-aGe=3600"),), FRESH),
        (
            "surrogate-max-age-expires",
            ((SC, "max-age=3600"), ("Expires", date(-10000)), ("Date", date())),
            FRESH,
        ),
        (
            "surrogate-max-age-cc-max-age-invalid-expires",
            ((SC, "max-age=3600"), ("Expires", "0"), ("Date", date())),
            FRESH,
        ),
        (
            "surrogate-max-age-0-expires",
            ((SC, "max-age=0"), ("Expires", date(10000)), ("Date", date())),
            None,
        ),
        ("surrogate-max-age-short-cc-max-age", ((CC, "max-age=1"), (SC, "max-age=3600")), FRESH),
        ("surrogate-max-age-long-cc-max-age", ((CC, "max-age=3600"), (SC, "max-age=1")), FORWARD),
        ("surrogate-no-store", ((SC, "no-store"),), None),
        (
            "surrogate-no-store-cc-fresh",
            ((CC, "max-age=10000"), (SC, "no-store"), ("Expires", date(10000)), ("Date", date())),
            None,
        ),
        ("surrogate-fresh-cc-nostore", ((CC, "no-store"), (SC, "max-age=10000;pibl")), FRESH),
    ],
)
def test_cache_tests_surrogate_scenarios(
    test_id: str, pairs: tuple[tuple[str, str], ...], expected: Action | None
) -> None:
    assert reuse(*pairs) is expected, test_id


# --------------------------------------------------------------------------------------------
# HEAD (§4.3.5) and POST (RFC 9110 §9.3.3)


@pytest.mark.parametrize(
    ("head", "matches"),
    [
        ((), True),
        ((("Content-Length", "5"),), True),
        ((("Content-Length", "6"),), False),
        ((("ETag", '"v"'),), True),
        ((("ETag", '"w"'),), False),
        ((("ETag", 'W/"v"'),), False),
        ((("Last-Modified", LM),), True),
        ((("Last-Modified", "Sun, 06 Nov 1994 08:49:38 GMT"),), False),
        ((("Last-Modified", "garbage"),), False),
        ((("ETag", '"v"'), ("Last-Modified", LM), ("Content-Length", "5")), True),
    ],
)
def test_head_response_matches(head: tuple[tuple[str, str], ...], matches: bool) -> None:
    stored = entry(("ETag", '"v"'), ("Last-Modified", LM), ("Cache-Control", "max-age=1"))
    assert head_response_matches(stored, 5, H(*head)) is matches


def test_head_response_without_stored_validators() -> None:
    stored = entry(("Cache-Control", "max-age=1"))
    assert head_response_matches(stored, 5, H(("Cache-Control", "max-age=1000")))
    assert not head_response_matches(stored, 5, H(("ETag", '"new"')))


@pytest.mark.parametrize(
    ("location", "cc", "reason"),
    [
        ("/x", "max-age=60", ""),
        ("http://example.com/x", "max-age=60", ""),
        ("http://EXAMPLE.com:80/x", "max-age=60", ""),
        ("/x", None, "method"),  # explicit freshness is required
        ("/y", "max-age=60", "method"),
        ("http://other.example/x", "max-age=60", "method"),
        (None, "max-age=60", "method"),
        ("/x", "no-store, max-age=60", "no-store"),
    ],
)
def test_post_response_is_stored_only_for_its_own_uri(
    location: str | None, cc: str | None, reason: str
) -> None:
    pairs = [("Date", date()), ("Last-Modified", date(-86400))]
    if location is not None:
        pairs.append(("Content-Location", location))
    if cc is not None:
        pairs.append((CC, cc))
    assert storable(req(method="POST"), resp(*pairs)) == (reason == "", reason)
    assert storable(req(method="POST"), resp(*pairs, status=400))[1] in ("method", "no-store")
    assert storable(req(method="PUT"), resp(*pairs))[1] in ("method", "no-store")


# --------------------------------------------------------------------------------------------
# Range requests answered from a stored 200 (RFC 9110 §14)

BODY = b"0123456789A"


def ranged(
    *pairs: tuple[str, str], stored: Headers | None = None, method: str = "GET", status: int = 200
) -> RangeReply | None:
    return select_range(req(*pairs, method=method), stored or H(), status=status, length=len(BODY))


@pytest.mark.parametrize(
    ("value", "part", "content_range"),
    [
        ("bytes=0-1", b"01", b"bytes 0-1/11"),
        ("bytes=1-", b"123456789A", b"bytes 1-10/11"),
        ("bytes=-1", b"A", b"bytes 10-10/11"),
        ("bytes=-100", BODY, b"bytes 0-10/11"),
        ("bytes=5-100", b"56789A", b"bytes 5-10/11"),
        ("BYTES=2-2", b"2", b"bytes 2-2/11"),
        ("bytes= 3-4", b"34", b"bytes 3-4/11"),  # lenient about whitespace
        ("bytes=0-1, 20-30", b"01", b"bytes 0-1/11"),  # only one member is satisfiable
    ],
)
def test_range_from_complete_response(value: str, part: bytes, content_range: bytes) -> None:
    reply = ranged(("Range", value))
    assert reply is not None
    assert (reply.status, reply.slice(BODY), reply.content_range) == (206, part, content_range)


@pytest.mark.parametrize("value", ["bytes=11-", "bytes=20-30", "bytes=-0", "bytes=11-, 12-13"])
def test_unsatisfiable_range(value: str) -> None:
    reply = ranged(("Range", value))
    assert reply is not None
    assert (reply.status, reply.content_range, reply.slice(BODY)) == (416, b"bytes */11", b"")


@pytest.mark.parametrize(
    "value", ["bytes=2-1", "bytes=a-b", "items=0-1", "bytes", "bytes=", "bytes=0-1,2-3", "0-1"]
)
def test_range_ignored_when_invalid_or_multiple(value: str) -> None:
    assert ranged(("Range", value)) is None


def test_range_only_for_get_of_a_stored_200() -> None:
    assert ranged(("Range", "bytes=0-1"), method="HEAD") is None
    assert ranged(("Range", "bytes=0-1"), status=203) is None
    assert ranged(("Range", "bytes=0-1"), ("Range", "bytes=0-2")) is None
    assert ranged() is None


@pytest.mark.parametrize(
    ("if_range", "applies"),
    [
        ('"v"', True),
        ('W/"v"', False),  # weak tags never match (§13.1.5)
        ('"w"', False),
        (LM, True),
        ("Sun, 06 Nov 1994 08:49:38 GMT", False),
        ("not a date", False),
    ],
)
def test_if_range(if_range: str, applies: bool) -> None:
    stored = H(("ETag", '"v"'), ("Last-Modified", LM), ("Date", "Sun, 06 Nov 1994 09:00:00 GMT"))
    reply = ranged(("Range", "bytes=0-1"), ("If-Range", if_range), stored=stored)
    assert (reply is not None) is applies


def test_if_range_date_needs_a_strong_last_modified() -> None:
    weak = H(("Last-Modified", LM), ("Date", LM))  # modified in the second it was sent
    assert ranged(("Range", "bytes=0-1"), ("If-Range", LM), stored=weak) is None
    assert ranged(("Range", "bytes=0-1"), ("If-Range", '"v"'), stored=H(("ETag", 'W/"v"'))) is None
