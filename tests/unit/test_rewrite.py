"""A route's rewrites (pibl.proxy.rewrite): header edits and strip_prefix, pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.http.head import Headers, RequestHead
from pibl.http.rules import upstream_request_headers
from pibl.proxy.rewrite import UNEDITABLE, HeaderEdits, strip_prefix


def edits(
    set_: dict[str, str] | None = None,
    add: dict[str, str] | None = None,
    remove: tuple[str, ...] = (),
) -> HeaderEdits:
    compiled = HeaderEdits.compile((set_ or {}).items(), (add or {}).items(), remove)
    assert compiled is not None
    return compiled


# --------------------------------------------------------------------------- HeaderEdits


def test_no_edits_compile_to_none() -> None:
    assert HeaderEdits.compile() is None
    assert HeaderEdits.compile({}.items(), {}.items(), ()) is None


def test_compiled_form() -> None:
    compiled = edits({"X-A": "1"}, {"X-B": "2"}, ("X-C",))
    assert compiled.drop == {b"x-a", b"x-c"}
    assert compiled.append == ((b"X-A", b"1"), (b"X-B", b"2"))


def test_set_replaces_every_field_of_the_name_ignoring_case() -> None:
    headers: Headers = [(b"x-a", b"old"), (b"Keep", b"k"), (b"X-A", b"older")]
    assert edits({"X-A": "new"}).apply(headers) == [(b"Keep", b"k"), (b"X-A", b"new")]


def test_set_of_an_absent_field_adds_it() -> None:
    assert edits({"X-A": "1"}).apply([(b"Keep", b"k")]) == [(b"Keep", b"k"), (b"X-A", b"1")]


def test_add_keeps_existing_fields() -> None:
    headers: Headers = [(b"X-B", b"client")]
    assert edits(add={"X-B": "2"}).apply(headers) == [(b"X-B", b"client"), (b"X-B", b"2")]


def test_remove_drops_every_field_of_the_name_ignoring_case() -> None:
    headers: Headers = [(b"X-C", b"1"), (b"Keep", b"k"), (b"x-c", b"2")]
    assert edits(remove=("X-c",)).apply(headers) == [(b"Keep", b"k")]


def test_remove_of_an_absent_field_is_harmless() -> None:
    assert edits(remove=("X-C",)).apply([(b"Keep", b"k")]) == [(b"Keep", b"k")]


def test_set_then_add_order_and_other_fields_keep_their_order() -> None:
    headers: Headers = [(b"A", b"1"), (b"X-S", b"s"), (b"B", b"2"), (b"X-R", b"r")]
    result = edits({"X-S": "S"}, {"X-N": "n"}, ("X-R",)).apply(headers)
    assert result == [(b"A", b"1"), (b"B", b"2"), (b"X-S", b"S"), (b"X-N", b"n")]


def test_apply_returns_a_new_list() -> None:
    headers: Headers = [(b"X-C", b"1")]
    for compiled in (edits(remove=("X-C",)), edits(add={"X-B": "2"})):
        result = compiled.apply(headers)
        assert result is not headers
    assert headers == [(b"X-C", b"1")]


def test_uneditable_covers_framing_and_hop_by_hop_fields() -> None:
    for name in (b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"te"):
        assert name in UNEDITABLE
    for name in (b"host", b"via", b"x-forwarded-for", b"cache-control"):
        assert name not in UNEDITABLE


# --------------------------------------------------------------------------- order with rules


def client_request(headers: Headers) -> RequestHead:
    return RequestHead("GET", b"/", "1.1", headers, client_ip="192.0.2.7", host=b"site.example")


def sent(request: RequestHead, compiled: HeaderEdits, *, trusted: bool = False) -> Headers:
    """What the pipeline sends: PIBL's rules first, then the route's edits."""
    return compiled.apply(upstream_request_headers(request, trusted_peer=trusted))


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def test_an_edit_of_a_connection_listed_field_survives_the_sanitiser() -> None:
    # Go's lesson: an edit made before sanitising is removed when the client lists the name in
    # Connection. After it, the configured field is sent.
    request = client_request([(b"Host", b"site.example"), (b"Connection", b"X-A"), (b"X-A", b"c")])
    result = sent(request, edits({"X-A": "configured"}))
    assert values(result, b"x-a") == [b"configured"]


def test_configured_forwarded_fields_win_over_pibl_s_own() -> None:
    request = client_request([(b"Host", b"site.example"), (b"X-Forwarded-Host", b"spoofed")])
    result = sent(request, edits({"X-Forwarded-Host": "public.example"}, remove=("Via",)))
    assert values(result, b"x-forwarded-host") == [b"public.example"]
    assert values(result, b"via") == []
    assert values(result, b"x-forwarded-for") == [b"192.0.2.7"]  # untouched: PIBL's


def test_spoofed_fields_stay_dropped_when_edits_touch_other_names() -> None:
    request = client_request([(b"Host", b"site.example"), (b"X-Forwarded-For", b"6.6.6.6")])
    result = sent(request, edits(add={"X-Route": "canary"}))
    assert values(result, b"x-forwarded-for") == [b"192.0.2.7"]
    assert values(result, b"x-route") == [b"canary"]


def test_set_host_replaces_the_client_host_but_not_x_forwarded_host() -> None:
    request = client_request([(b"Host", b"site.example")])
    result = sent(request, edits({"Host": "backend.internal"}))
    assert values(result, b"host") == [b"backend.internal"]
    assert values(result, b"x-forwarded-host") == [b"site.example"]


# --------------------------------------------------------------------------- strip_prefix


@pytest.mark.parametrize(
    ("target", "prefix", "expected"),
    [
        (b"/api/users", b"/api", b"/users"),
        (b"/api/users?id=7&x=/api/y", b"/api", b"/users?id=7&x=/api/y"),
        (b"/api", b"/api", b"/"),
        (b"/api?x=1", b"/api", b"/?x=1"),
        (b"/api/", b"/api", b"/"),
        (b"/api/", b"/api/", b"/"),
        (b"/api/a/b", b"/api/", b"/a/b"),
        (b"/apix", b"/api", b"/x"),  # a path left without "/" gets one (Traefik, Caddy)
        (b"/x", b"/", b"/x"),
        (b"/", b"/", b"/"),
        (b"/api//x", b"/api", b"//x"),
        (b"http://h.example/api/x?q=1", b"/api", b"http://h.example/x?q=1"),
        (b"http://h.example:8080/api", b"/api", b"http://h.example:8080/"),
        (b"http://h.example?next=/api", b"/", b"http://h.example/?next=/api"),
    ],
)
def test_strip_prefix(target: bytes, prefix: bytes, expected: bytes) -> None:
    assert strip_prefix(target, prefix) == expected


_SEGMENT = st.text("abz019-._~%", min_size=0, max_size=6)


@given(
    st.lists(_SEGMENT, min_size=1, max_size=3),
    st.lists(_SEGMENT, min_size=0, max_size=3),
    st.one_of(st.none(), st.text("a=&/?z", max_size=8)),
)
def test_strip_prefix_keeps_the_rest_of_the_path_and_the_query(
    prefix_parts: list[str], rest_parts: list[str], query: str | None
) -> None:
    prefix = ("/" + "/".join(prefix_parts)).encode()
    rest = "".join("/" + part for part in rest_parts).encode()
    target = prefix + rest + (b"" if query is None else b"?" + query.encode())
    result = strip_prefix(target, prefix)
    path, _, _ = result.partition(b"?")
    assert path.startswith(b"/")
    assert path == (rest or b"/")
    if query is not None:
        assert result.endswith(b"?" + query.encode())
    assert RequestHead("GET", result, "1.1", []).path == path
