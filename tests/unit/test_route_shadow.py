"""Routing rules beyond host and path: header conditions, ``explain`` (``pibl route``) and the
shadowed-rule analysis (``pibl check``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.config import RouteSettings, parse_config
from pibl.http.head import Headers, RequestHead
from pibl.http.validate import validate_request_head
from pibl.proxy.routing import (
    Route,
    Router,
    cached_by_header,
    covers,
    explain,
    shadowed,
)


def route(
    name: str = "r",
    host: str | None = None,
    prefix: bytes | None = None,
    headers: dict[str, str | None] | None = None,
    cache: bool = True,
) -> Route[str]:
    conditions = tuple(
        (n.lower().encode(), None if v is None else v.encode()) for n, v in (headers or {}).items()
    )
    return Route(name, name=name, host=host, path_prefix=prefix, headers=conditions, cache=cache)


def request(target: bytes = b"/", host: bytes = b"example.com", *fields: str) -> RequestHead:
    headers: Headers = [(b"Host", host)]
    for field in fields:
        name, _, value = field.partition(":")
        headers.append((name.encode(), value.strip().encode()))
    return validate_request_head("GET", target, "1.1", headers, keep_alive=True)


# --------------------------------------------------------------------------- header conditions


def test_header_condition_value_is_exact_and_the_name_ignores_case() -> None:
    r = route(headers={"X-Canary": "1"})
    assert r.matches("h", b"/", [(b"x-canary", b"1")])
    assert r.matches("h", b"/", [(b"X-CANARY", b"1")])
    assert not r.matches("h", b"/", [(b"X-Canary", b"0")])
    assert not r.matches("h", b"/", [(b"X-Canary", b"1 ")])
    assert not r.matches("h", b"/", [(b"X-Other", b"1")])
    assert not r.matches("h", b"/", [])


def test_header_condition_value_is_case_sensitive() -> None:
    r = route(headers={"X-Env": "Beta"})
    assert r.matches("h", b"/", [(b"X-Env", b"Beta")])
    assert not r.matches("h", b"/", [(b"X-Env", b"beta")])


def test_repeated_field_matches_when_any_line_has_the_value() -> None:
    r = route(headers={"X-Canary": "1"})
    assert r.matches("h", b"/", [(b"X-Canary", b"0"), (b"X-Canary", b"1")])


def test_present_condition_matches_any_value_even_empty() -> None:
    r = route(headers={"X-Debug": None})
    assert r.matches("h", b"/", [(b"X-Debug", b"")])
    assert r.matches("h", b"/", [(b"x-debug", b"anything")])
    assert not r.matches("h", b"/", [(b"X-Debugger", b"1")])


def test_all_conditions_must_match() -> None:
    r = route(host="api.example.com", prefix=b"/v1", headers={"X-A": "1", "X-B": None})
    fields = [(b"X-A", b"1"), (b"X-B", b"2")]
    assert r.matches("api.example.com", b"/v1/x", fields)
    assert not r.matches("api.example.com", b"/v1/x", fields[:1])
    assert not r.matches("api.example.com", b"/v2/x", fields)
    assert not r.matches("www.example.com", b"/v1/x", fields)


def test_router_routes_on_headers_first_match_in_order() -> None:
    router = Router(
        [
            route("canary", prefix=b"/api", headers={"X-Canary": "1"}),
            route("debug", headers={"X-Debug": None}),
            route("stable"),
        ]
    )

    def taken(req: RequestHead) -> str | None:
        found = router.match(req)
        return None if found is None else found.target

    assert taken(request(b"/api/x", b"h", "X-Canary: 1")) == "canary"
    assert taken(request(b"/api/x", b"h", "X-Canary: 1", "X-Debug: 1")) == "canary"
    assert taken(request(b"/web", b"h", "X-Canary: 1", "X-Debug: 1")) == "debug"
    assert taken(request(b"/api/x", b"h", "X-Canary: 2")) == "stable"


def test_a_single_header_route_is_not_taken_as_a_catch_all() -> None:
    router = Router([route("only", headers={"X-Canary": "1"})])
    assert router.match(request(b"/", b"h")) is None
    assert router.match(request(b"/", b"h", "X-Canary: 1")) is router.routes[0]


def test_from_settings_compiles_conditions_and_edits() -> None:
    settings = RouteSettings(
        upstream="app",
        host="*.Example.com",
        path_prefix="/api",
        headers={"X-Canary": "1", "X-Debug": "*"},
        strip_prefix=True,
        max_body_size=10,
    )
    r = Route.from_settings(settings, "target")
    assert (r.target, r.name, r.host, r.path_prefix) == ("target", "app", "*.example.com", b"/api")
    assert r.headers == ((b"x-canary", b"1"), (b"x-debug", None))
    assert r.strip_prefix
    assert r.max_body_size == 10
    assert r.request_edits is None
    assert r.response_edits is None
    plain = Route.from_settings(RouteSettings(upstream="app"), "t")
    assert (plain.headers, plain.strip_prefix, plain.max_body_size) == ((), False, 0)


# --------------------------------------------------------------------------- explain


def test_explain_names_the_first_failed_condition_of_each_skipped_rule() -> None:
    routes = [
        route("a", host="api.example.com"),
        route("w", host="*.static.example"),
        route("p", prefix=b"/v1"),
        route("h", headers={"X-Canary": "1"}),
        route("d", headers={"X-Debug": None}),
        route("all"),
        route("never"),
    ]
    decision = explain(routes, request(b"/v2/x?q", b"www.example.com:8080", "X-Canary: 0"))
    assert decision.matched == 5
    assert decision.skipped == (
        (0, 'host "www.example.com" is not "api.example.com"'),
        (1, 'host "www.example.com" is not a subdomain of "static.example"'),
        (2, 'path "/v2/x" does not start with "/v1"'),
        (3, 'header x-canary is "0", not "1"'),
        (4, "header x-debug is missing"),
    )


def test_explain_without_a_match() -> None:
    decision = explain([route("a", host="a.example")], request(b"/", b""))
    assert decision.matched is None
    assert decision.skipped == ((0, 'the request names no host (the rule needs "a.example")'),)


def test_explain_of_an_empty_table() -> None:
    decision = explain([], request())
    assert (decision.matched, decision.skipped) == (None, ())


def test_conditions_text() -> None:
    r = route(host="a.example", prefix=b"/x", headers={"X-A": "1", "X-B": None})
    assert r.conditions() == [
        'host = "a.example"',
        'path_prefix = "/x"',
        'header x-a = "1"',
        "header x-b present",
    ]
    assert route().conditions() == []


# --------------------------------------------------------------------------- shadowed rules


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        pytest.param(route(), route(host="a.example", prefix=b"/x"), id="catch-all-first"),
        pytest.param(route(prefix=b"/"), route(host="a.example"), id="prefix-slash-no-host"),
        pytest.param(route(prefix=b"/"), route(prefix=b"/"), id="duplicate"),
        pytest.param(
            route(host="a.example", prefix=b"/api"),
            route(host="a.example", prefix=b"/api/v1"),
            id="same-host-shorter-prefix",
        ),
        pytest.param(
            route(host="*.example.com", prefix=b"/api"),
            route(host="a.example.com", prefix=b"/api/v1"),
            id="wildcard-before-exact",
        ),
        pytest.param(
            route(host="*.example.com"),
            route(host="*.a.example.com"),
            id="wildcard-before-narrower-wildcard",
        ),
        pytest.param(
            route(prefix=b"/api"),
            route(prefix=b"/api", headers={"X-Canary": "1"}),
            id="no-headers-before-headers",
        ),
        pytest.param(
            route(headers={"X-Canary": None}),
            route(headers={"x-canary": "1", "X-Other": "2"}),
            id="present-before-exact",
        ),
        pytest.param(
            route(headers={"X-Canary": "1"}),
            route(prefix=b"/x", headers={"X-Canary": "1"}),
            id="same-header-broader-path",
        ),
    ],
)
def test_covers(earlier: Route[str], later: Route[str]) -> None:
    assert covers(earlier, later)
    assert shadowed([earlier, later]) == [(1, 0)]


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        pytest.param(route(host="a.example"), route(), id="host-before-catch-all"),
        pytest.param(route(prefix=b"/api"), route(prefix=b"/"), id="longer-prefix-first"),
        pytest.param(route(prefix=b"/api/v1"), route(prefix=b"/api"), id="longer-prefix-first-2"),
        pytest.param(route(prefix=b"/api"), route(), id="prefix-before-no-prefix"),
        pytest.param(route(host="a.example"), route(host="b.example"), id="other-host"),
        pytest.param(
            route(host="a.example.com"), route(host="*.example.com"), id="exact-before-wildcard"
        ),
        pytest.param(
            route(host="*.example.com"), route(host="example.com"), id="wildcard-not-bare-domain"
        ),
        pytest.param(
            route(host="*.a.example.com"), route(host="*.example.com"), id="narrow-wildcard-first"
        ),
        pytest.param(
            route(host="*.example.com"), route(host="*.badexample.com"), id="suffix-not-label"
        ),
        pytest.param(route(headers={"X-Canary": "1"}), route(), id="header-rule-before-catch-all"),
        pytest.param(
            route(headers={"X-Canary": "1"}),
            route(headers={"X-Canary": None}),
            id="exact-before-present",
        ),
        pytest.param(
            route(headers={"X-Canary": "1"}),
            route(headers={"X-Canary": "2"}),
            id="other-value",
        ),
        pytest.param(
            route(host="a.example", prefix=b"/api"),
            route(prefix=b"/api/v1"),
            id="host-rule-before-host-free",
        ),
    ],
)
def test_does_not_cover(earlier: Route[str], later: Route[str]) -> None:
    assert not covers(earlier, later)
    assert shadowed([earlier, later]) == []


def test_shadowed_reports_the_first_shadowing_rule_for_each() -> None:
    routes = [
        route("api", prefix=b"/api"),
        route("all"),
        route("v1", prefix=b"/api/v1"),
        route("static", prefix=b"/static"),
        route("host", host="a.example"),
    ]
    assert shadowed(routes) == [(2, 0), (3, 1), (4, 1)]


def test_a_well_ordered_table_has_nothing_shadowed() -> None:
    routes = [
        route("canary", host="api.example.com", prefix=b"/v1", headers={"X-Canary": "1"}),
        route("v1", host="api.example.com", prefix=b"/v1"),
        route("api", host="api.example.com"),
        route("a", host="a.example.com", prefix=b"/admin"),
        route("wild", host="*.example.com"),
        route("static", prefix=b"/static"),
        route("all"),
    ]
    assert shadowed(routes) == []


def test_shadowing_from_parsed_settings() -> None:
    data = {
        "server": {"listen": "127.0.0.1:0"},
        "upstreams": {"app": {"servers": ["127.0.0.1:1"]}},
        "routes": [
            {"upstream": "app", "host": "*.Example.com", "path_prefix": "/api"},
            {"upstream": "app", "host": "A.example.com", "path_prefix": "/api/v1"},
            {"upstream": "app", "headers": {"X-Canary": "*"}},
            {"upstream": "app", "headers": {"x-canary": "1"}, "path_prefix": "/x"},
        ],
    }
    routes = [Route.from_settings(r, r.upstream) for r in parse_config(data).routes]
    assert shadowed(routes) == [(1, 0), (3, 2)]


def test_cached_by_header() -> None:
    routes = [
        route(headers={"X-Canary": "1"}),
        route(headers={"X-Canary": "1"}, cache=False),
        route(prefix=b"/x"),
    ]
    assert cached_by_header(routes) == [0]


# --------------------------------------------------------------------------- properties

_HOSTS = st.sampled_from(["a.example.com", "b.example.com", "x.a.example.com", "example.com", ""])
_PATTERNS = st.one_of(
    st.none(),
    st.sampled_from(["a.example.com", "example.com", "*.example.com", "*.a.example.com"]),
)
_PATHS = st.sampled_from([b"/", b"/api", b"/api/v1", b"/api/v1/x", b"/apix", b"/static/a"])
_PREFIXES = st.one_of(st.none(), st.sampled_from([b"/", b"/api", b"/api/", b"/api/v1", b"/st"]))
_NAMES = st.sampled_from([b"x-a", b"x-b"])
_CONDITIONS = st.dictionaries(_NAMES, st.one_of(st.none(), st.sampled_from([b"1", b"2"])))
_FIELDS = st.lists(st.tuples(_NAMES, st.sampled_from([b"1", b"2", b""])), max_size=3)


@st.composite
def routes(draw: st.DrawFn) -> Route[str]:
    return Route(
        "r",
        name="r",
        host=draw(_PATTERNS),
        path_prefix=draw(_PREFIXES),
        headers=tuple(draw(_CONDITIONS).items()),
    )


@given(routes(), routes(), _HOSTS, _PATHS, _FIELDS)
def test_a_covered_rule_never_matches_alone(
    earlier: Route[str], later: Route[str], host: str, path: bytes, fields: Headers
) -> None:
    # Soundness of the analysis: a request the later rule matches, the earlier one takes.
    if covers(earlier, later) and later.matches(host, path, fields):
        assert earlier.matches(host, path, fields)


@given(routes(), _HOSTS, _PATHS, _FIELDS)
def test_first_mismatch_agrees_with_matches(
    r: Route[str], host: str, path: bytes, fields: Headers
) -> None:
    assert (r.first_mismatch(host, path, fields) is None) == r.matches(host, path, fields)


@given(routes())
def test_every_rule_covers_itself(r: Route[str]) -> None:
    assert covers(r, r)
