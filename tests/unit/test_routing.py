"""Routing: the first rule in order whose host and path prefix match; host normalisation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.http.head import RequestHead
from pibl.http.validate import validate_request_head
from pibl.proxy.routing import Route, Router, normalize_host


def request(
    target: bytes = b"/", host: bytes = b"example.com", version: str = "1.1"
) -> RequestHead:
    """A request as the downstream side builds it (absolute-form authority replaces Host)."""
    headers = [(b"Host", host)] if host or version == "1.1" else []
    return validate_request_head("GET", target, version, headers, keep_alive=True)


def route(name: str, host: str | None = None, prefix: bytes | None = None) -> Route[str]:
    return Route(name, name=name, host=host, path_prefix=prefix)


def matched(router: Router[str], req: RequestHead) -> str | None:
    found = router.match(req)
    return None if found is None else found.target


# --------------------------------------------------------------------------- normalize_host


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"example.com", "example.com"),
        (b"Example.COM", "example.com"),
        (b"example.com:8080", "example.com"),
        (b"EXAMPLE.com:80", "example.com"),
        (b"example.com.", "example.com"),
        (b"example.com.:8080", "example.com"),
        (b"  example.com ", "example.com"),
        (b"[::1]", "[::1]"),
        (b"[::1]:8080", "[::1]"),
        (b"[2001:DB8::1]:443", "[2001:db8::1]"),
        (b"127.0.0.1:9000", "127.0.0.1"),
        (b"", ""),
    ],
)
def test_normalize_host(raw: bytes, expected: str) -> None:
    assert normalize_host(raw) == expected


@given(
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}[a-z0-9]", fullmatch=True),
    st.one_of(st.none(), st.integers(min_value=1, max_value=65535)),
    st.booleans(),
    st.booleans(),
)
def test_normalize_host_ignores_case_port_and_trailing_dot(
    name: str, port: int | None, upper: bool, dot: bool
) -> None:
    raw = (name.upper() if upper else name) + ("." if dot else "")
    if port is not None:
        raw += f":{port}"
    assert normalize_host(raw.encode()) == normalize_host(name.encode()) == name.rstrip(".")


# --------------------------------------------------------------------------- Route.matches


def test_exact_host() -> None:
    r = route("a", host="example.com")
    assert r.matches("example.com", b"/")
    assert not r.matches("www.example.com", b"/")
    assert not r.matches("example.org", b"/")
    assert not r.matches("", b"/")


def test_wildcard_host_matches_subdomains_not_the_bare_domain() -> None:
    r = route("w", host="*.example.com")
    assert r.matches("www.example.com", b"/")
    assert r.matches("a.b.example.com", b"/")
    assert not r.matches("example.com", b"/")
    assert not r.matches(".example.com", b"/")
    assert not r.matches("badexample.com", b"/")
    assert not r.matches("www.example.com.evil", b"/")
    assert not r.matches("", b"/")


def test_path_prefix() -> None:
    r = route("p", prefix=b"/api")
    assert r.matches("any", b"/api")
    assert r.matches("any", b"/api/v1")
    assert r.matches("any", b"/apix")  # plain prefix, like nginx's prefix locations
    assert not r.matches("any", b"/")
    assert not r.matches("any", b"/ap")
    assert not r.matches("any", b"/API")


def test_host_and_prefix_must_both_match() -> None:
    r = route("hp", host="example.com", prefix=b"/api/")
    assert r.matches("example.com", b"/api/x")
    assert not r.matches("example.com", b"/web")
    assert not r.matches("other.com", b"/api/x")


def test_catch_all_matches_everything() -> None:
    r = route("all")
    assert r.matches("", b"")
    assert r.matches("x", b"/anything")


# --------------------------------------------------------------------------- Router


ROUTER = Router(
    [
        route("api-host", host="api.example.com", prefix=b"/v1/"),
        route("api-any", host="api.example.com"),
        route("wild", host="*.example.com"),
        route("static", prefix=b"/static/"),
        route("bare", host="example.com"),
    ]
)


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        (b"/v1/users", b"api.example.com", "api-host"),
        (b"/v2/users", b"api.example.com", "api-any"),
        (b"/v1/users", b"API.Example.Com:8443", "api-host"),
        (b"/v1/users", b"api.example.com.", "api-host"),
        (b"/static/x", b"api.example.com", "api-any"),  # earlier rule wins
        (b"/", b"www.example.com", "wild"),
        (b"/static/x", b"www.example.com", "wild"),
        (b"/static/x", b"other.org", "static"),
        (b"/", b"example.com", "bare"),
        (b"/", b"example.com:80", "bare"),
        (b"/static/x", b"example.com", "static"),
        (b"/", b"other.org", None),
        (b"/v1/users?x=/static/", b"other.org", None),  # the query is not the path
        (b"/static/x?q", b"other.org", "static"),
    ],
)
def test_first_matching_route_in_order(target: bytes, host: bytes, expected: str | None) -> None:
    assert matched(ROUTER, request(target, host)) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://api.example.com/v1/x", "api-host"),
        (b"http://API.EXAMPLE.COM:81/v1/x", "api-host"),
        (b"http://www.example.com", "wild"),
        (b"http://other.org/static/a", "static"),
        (b"http://other.org?next=/static/a", None),
        (b"http://other.org/", None),
        (b"https://user@example.com/", "bare"),
    ],
)
def test_absolute_form_target_routes_by_its_authority_and_path(
    target: bytes, expected: str | None
) -> None:
    # The Host field is overridden by the absolute-form authority (RFC 9112 §3.2.2).
    assert matched(ROUTER, request(target, b"ignored.invalid")) == expected


def test_ipv6_host_route() -> None:
    router = Router([route("v6", host="[::1]"), route("rest", prefix=b"/")])
    assert matched(router, request(b"/", b"[::1]:8080")) == "v6"
    assert matched(router, request(b"/", b"[::2]")) == "rest"


def test_http10_request_without_host_matches_only_host_free_rules() -> None:
    router = Router([route("h", host="example.com"), route("p", prefix=b"/x")])
    assert matched(router, request(b"/x", b"", version="1.0")) == "p"
    assert matched(router, request(b"/y", b"", version="1.0")) is None


def test_no_routes_match_returns_none() -> None:
    router = Router([route("a", host="a.example"), route("b", prefix=b"/b")])
    assert matched(router, request(b"/", b"c.example")) is None


def test_single_catch_all_route_always_matches() -> None:
    only = route("only")
    router = Router([only])
    assert router.match(request(b"/whatever", b"any.host")) is only
    assert router.match(RequestHead("OPTIONS", b"*", "1.1", [], host=b"x")) is only


def test_single_restricted_route_is_still_checked() -> None:
    router = Router([route("only", host="a.example")])
    assert matched(router, request(b"/", b"a.example")) == "only"
    assert matched(router, request(b"/", b"b.example")) is None


def test_empty_router_matches_nothing() -> None:
    assert Router[str]([]).match(request()) is None


def test_routes_are_kept_in_order() -> None:
    routes = [route(str(i), prefix=b"/") for i in range(5)]
    router = Router(routes)
    assert router.routes == tuple(routes)
    assert matched(router, request(b"/x")) == "0"


# --------------------------------------------------------------------------- RequestHead.path


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/", b"/"),
        (b"/a/b", b"/a/b"),
        (b"/a/b?c=d", b"/a/b"),
        (b"/a?b/c", b"/a"),
        (b"http://h/a/b?c", b"/a/b"),
        (b"http://h", b"/"),
        (b"http://h:80", b"/"),
        (b"http://h?x=/y", b"/"),
        (b"http://h/p?x=http://z/q", b"/p"),
        (b"*", b"*"),
    ],
)
def test_request_path(target: bytes, path: bytes) -> None:
    assert RequestHead("GET", target, "1.1", []).path == path
