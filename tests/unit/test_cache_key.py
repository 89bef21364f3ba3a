"""Primary cache keys: structure, host normalisation, digests and the stored encoding."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.cache.key import CacheKey, key_from_url, make_key, normalise_host
from pibl.http.head import RequestHead


def request(
    target: bytes = b"/",
    host: bytes = b"example.com",
    *,
    scheme: str = "http",
    header_host: bytes | None = None,
) -> RequestHead:
    headers = [(b"Host", header_host)] if header_host is not None else []
    return RequestHead("GET", target, "1.1", headers, scheme=scheme, host=host)


class TestMakeKey:
    def test_fields(self) -> None:
        key = make_key(request(b"/a/b?x=1&y=%2F"))
        assert key == CacheKey("http", "example.com", "/a/b?x=1&y=%2F")
        assert key.url == "http://example.com/a/b?x=1&y=%2F"

    @pytest.mark.parametrize(
        "targets",
        [
            (b"/a/b", b"/ab", b"/a:b", b"//ab", b"/a/b/", b"/a%2Fb", b"/A/b"),
            (b"/x?a=1", b"/x?a=2", b"/x?", b"/x", b"/x?a=1&b=2", b"/x?b=2&a=1"),
        ],
    )
    def test_distinct_targets_are_distinct_keys(self, targets: tuple[bytes, ...]) -> None:
        keys = [make_key(request(t)) for t in targets]
        assert len(set(keys)) == len(keys)
        assert len({k.digest() for k in keys}) == len(keys)

    def test_percent_escapes_are_not_decoded(self) -> None:
        assert make_key(request(b"/a%2Fb")).path_and_query == "/a%2Fb"

    def test_two_hosts_are_distinct(self) -> None:
        assert make_key(request(host=b"a.example")) != make_key(request(host=b"b.example"))
        # No concatenation ambiguity between host and path.
        assert make_key(request(b"/b", host=b"a")) != make_key(request(b"/", host=b"ab"))

    def test_host_normalisation(self) -> None:
        assert make_key(request(host=b"Example.COM:80")) == make_key(request(host=b"example.com"))
        assert make_key(request(host=b"example.com.")) == make_key(request(host=b"example.com"))
        assert make_key(request(host=b"example.com:8080")).host == "example.com:8080"

    def test_default_port_depends_on_scheme(self) -> None:
        assert make_key(request(host=b"h:443", scheme="https")).host == "h"
        assert make_key(request(host=b"h:443", scheme="http")).host == "h:443"
        assert make_key(request(host=b"h:80", scheme="https")).host == "h:80"

    def test_scheme_is_part_of_the_key(self) -> None:
        assert make_key(request(scheme="http")) != make_key(request(scheme="https"))

    def test_host_header_when_request_host_unset(self) -> None:
        key = make_key(request(host=b"", header_host=b"Other.Example"))
        assert key.host == "other.example"

    def test_absolute_form_target(self) -> None:
        key = make_key(request(b"http://Origin.Example:80/p?q=1", host=b"ignored"))
        assert key == CacheKey("http", "origin.example", "/p?q=1")
        assert make_key(request(b"https://h")).path_and_query == "/"
        assert make_key(request(b"http://h?q")).path_and_query == "/?q"
        assert make_key(request(b"http://user@h/x")).host == "h"

    def test_origin(self) -> None:
        assert make_key(request(host=b"h:8080")).origin == ("http", "h:8080")


@pytest.mark.parametrize(
    ("host", "scheme", "expected"),
    [
        ("EXAMPLE.com", "http", "example.com"),
        ("example.com:80", "http", "example.com"),
        ("example.com:0080", "http", "example.com"),
        ("example.com:", "http", "example.com"),
        ("example.com.:8080", "http", "example.com:8080"),
        ("example.com:443", "https", "example.com"),
        ("[::1]:80", "http", "[::1]"),
        ("[::1]:8080", "http", "[::1]:8080"),
        ("[::1]", "http", "[::1]"),
        ("[::1]x", "http", "[::1]x"),
        ("a:b", "http", "a:b"),
        ("", "http", ""),
    ],
)
def test_normalise_host(host: str, scheme: str, expected: str) -> None:
    assert normalise_host(host, scheme) == expected


class TestKeyFromUrl:
    def test_matches_make_key(self) -> None:
        assert key_from_url("http://Example.com:80/a?b") == make_key(request(b"/a?b"))
        assert key_from_url("https://h:443") == CacheKey("https", "h", "/")

    def test_fragment_dropped(self) -> None:
        assert key_from_url("http://h/a#frag") == CacheKey("http", "h", "/a")

    @pytest.mark.parametrize("url", ["/relative", "h/x", "http:///x", "://h/x", "1http://h/"])
    def test_invalid(self, url: str) -> None:
        with pytest.raises(ValueError, match="absolute URL"):
            key_from_url(url)


class TestEncoding:
    def test_round_trip(self) -> None:
        key = CacheKey("https", "h:8443", "/a\x00b?é")
        assert CacheKey.from_bytes(key.to_bytes()) == key

    def test_digest_is_hex_and_file_name_safe(self) -> None:
        digest = CacheKey("http", "h", "/../../etc/passwd").digest()
        assert re.fullmatch(r"[0-9a-f]{64}", digest)

    def test_digest_is_stable(self) -> None:
        assert CacheKey("http", "h", "/").digest() == CacheKey("http", "h", "/").digest()

    def test_field_boundaries_are_unambiguous(self) -> None:
        keys = [
            CacheKey("http", "ab", "/c"),
            CacheKey("http", "a", "b/c"),
            CacheKey("httpa", "b", "/c"),
        ]
        assert len({k.to_bytes() for k in keys}) == 3

    @pytest.mark.parametrize(
        "data",
        [b"", b"garbage", b"pibl-key\x01\x00\x00\x00\x05ab", b"pibl-key\x01" + b"\x00" * 12 + b"x"],
    )
    def test_from_bytes_rejects_malformed(self, data: bytes) -> None:
        with pytest.raises(ValueError, match="key"):
            CacheKey.from_bytes(data)

    def test_hashable(self) -> None:
        assert len({CacheKey("http", "h", "/"), CacheKey("http", "h", "/")}) == 1


_text = st.text(max_size=20)
_keys = st.builds(CacheKey, _text, _text, _text)


@given(st.lists(_keys, max_size=20, unique=True))
def test_digest_is_injective(keys: list[CacheKey]) -> None:
    assert len({k.digest() for k in keys}) == len(keys)


@given(_keys, _keys)
def test_equality_and_hash_follow_the_three_fields(a: CacheKey, b: CacheKey) -> None:
    fields = (a.scheme, a.host, a.path_and_query) == (b.scheme, b.host, b.path_and_query)
    assert (a == b) is fields
    assert (a != b) is not fields
    if fields:
        assert hash(a) == hash(b)
    assert a != (a.scheme, a.host, a.path_and_query)  # only a key equals a key
    copy = CacheKey(a.scheme, a.host, a.path_and_query)
    assert copy == a
    assert hash(copy) == hash(a)
    assert {copy: 1}[a] == 1


@given(_keys)
def test_bytes_round_trip(key: CacheKey) -> None:
    assert CacheKey.from_bytes(key.to_bytes()) == key


@given(st.binary(max_size=60), st.binary(max_size=30))
def test_make_key_never_raises(target: bytes, host: bytes) -> None:
    key = make_key(request(target, host))
    assert CacheKey.from_bytes(key.to_bytes()) == key
