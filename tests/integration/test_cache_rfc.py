"""Regression tests for RFC 9111 behaviour found with the public HTTP caching test suite
(npm ``http-cache-tests``), end to end through PIBL with each storage.

Time-dependent cases never sleep: a response is made stale on arrival with an ``Age`` header
larger than its ``max-age``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pibl.config import Settings
from tests.support import Received, Reply, make_settings, request, running_backends, running_proxy

Handler = Callable[[Received], Reply]
STALE = [(b"Cache-Control", b"max-age=60"), (b"Age", b"120")]  # stale on arrival


@pytest.fixture(params=["memory", "disk"])
def cache_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "disk":
        return {"enabled": True, "storage": "disk", "path": str(tmp_path / "cache")}
    return {"enabled": True, "storage": "memory"}


def recording(respond: Callable[[Received, int], Reply]) -> tuple[Handler, list[Received]]:
    """A handler calling ``respond(request, n)`` (n counts from 1), and what it received."""
    seen: list[Received] = []

    def handle(req: Received) -> Reply:
        seen.append(req)
        return respond(req, len(seen))

    return handle, seen


def settings(backends: list[Any], cache: dict[str, Any]) -> Settings:
    return make_settings(backends, cache=cache)


def with_host(*pairs: tuple[str, str]) -> list[tuple[str, str]]:
    return [("Host", "test.local"), *pairs]


def is_hit(response: Any) -> bool:
    return (response.header("Cache-Status") or "").startswith("pibl; hit")


async def test_invalid_age_is_never_reused_as_fresh(cache_settings: dict[str, Any]) -> None:
    """age-parse-*: an Age that is not one delta-seconds makes the age unknown."""
    for age in (b"abc", b"0, 0", b"7200;foo=bar"):
        handle, seen = recording(
            lambda _r, n, age=age: Reply(
                headers=[(b"Cache-Control", b"max-age=3600"), (b"Age", age)], body=b"%d" % n
            )
        )
        async with (
            running_backends(handle) as backends,
            running_proxy(settings(backends, cache_settings)) as app,
        ):
            await request(app.addresses[0], "GET", "/age")
            second = await request(app.addresses[0], "GET", "/age")
        assert second.body == b"2", age
        assert len(seen) == 2


async def test_valid_age_counts(cache_settings: dict[str, Any]) -> None:
    handle, seen = recording(
        lambda _r, n: Reply(
            headers=[(b"Cache-Control", b"max-age=3600"), (b"Age", b"100")], body=b"%d" % n
        )
    )
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        await request(app.addresses[0], "GET", "/age")
        second = await request(app.addresses[0], "GET", "/age")
    assert is_hit(second)
    assert int(second.header("Age") or "0") >= 100
    assert len(seen) == 1


async def test_stale_forbidden_by_must_revalidate_is_not_served_when_origin_closes(
    cache_settings: dict[str, Any],
) -> None:
    """stale-close-*: must-revalidate (and proxy-revalidate, no-cache, s-maxage) forbid a
    stale response even when the origin cannot be reached (§4.2.4)."""
    for cc in (b"must-revalidate", b"proxy-revalidate", b"no-cache", b"s-maxage=60"):
        handle, _ = recording(
            lambda _r, n, cc=cc: (
                Reply(
                    headers=[
                        (b"Cache-Control", b"max-age=60, " + cc),
                        (b"Age", b"120"),
                        (b"ETag", b'"v"'),  # so that no-cache is stored too
                    ],
                    body=b"old",
                )
                if n == 1
                else Reply(raw=b"", close=True)
            )
        )
        async with (
            running_backends(handle) as backends,
            running_proxy(settings(backends, cache_settings)) as app,
        ):
            await request(app.addresses[0], "GET", "/sc")
            second = await request(app.addresses[0], "GET", "/sc")
        assert second.status == 502, cc
        assert second.body != b"old"


async def test_stale_is_served_when_origin_closes_and_nothing_forbids_it(
    cache_settings: dict[str, Any],
) -> None:
    handle, _ = recording(
        lambda _r, n: Reply(headers=STALE, body=b"old") if n == 1 else Reply(raw=b"", close=True)
    )
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        await request(app.addresses[0], "GET", "/s")
        second = await request(app.addresses[0], "GET", "/s")
    assert (second.status, second.body) == (200, b"old")
    assert "stale-if-error" in (second.header("Cache-Status") or "")


async def test_304_does_not_relabel_the_stored_bytes(cache_settings: dict[str, Any]) -> None:
    """304-etag-update-response-*: Content-Encoding, Content-MD5, Content-Range stay; other
    fields are updated (§3.2)."""

    def respond(req: Received, n: int) -> Reply:
        if req.header("If-None-Match") == '"v"':
            return Reply(
                status=304,
                headers=[
                    (b"ETag", b'"v"'),
                    (b"Cache-Control", b"max-age=600"),
                    (b"Content-Encoding", b"br"),
                    (b"Content-MD5", b"N7UdGUp1E+RbVvZSTy1R8g=="),
                    (b"X-Version", b"2"),
                ],
            )
        return Reply(
            headers=[
                *STALE,
                (b"ETag", b'"v"'),
                (b"Content-Encoding", b"gzip"),
                (b"Content-MD5", b"rL0Y20zC+Fzt72VPzMSk2A=="),
                (b"X-Version", b"1"),
            ],
            body=b"stored",
        )

    handle, seen = recording(respond)
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        await request(app.addresses[0], "GET", "/enc")
        validated = await request(app.addresses[0], "GET", "/enc")
        hit = await request(app.addresses[0], "GET", "/enc")
    for response in (validated, hit):
        assert response.body == b"stored"
        assert response.header("Content-Encoding") == "gzip"
        assert response.header("Content-MD5") == "rL0Y20zC+Fzt72VPzMSk2A=="
        assert response.header("X-Version") == "2"
        assert response.header("ETag") == '"v"'
    assert is_hit(hit)
    assert len(seen) == 2


async def test_304_with_another_etag_is_not_forwarded_and_the_request_is_resent(
    cache_settings: dict[str, Any],
) -> None:
    """§4.3.4: a 304 whose strong validator matches no stored response updates nothing; the
    client, which sent no conditional, must not receive it."""

    def respond(req: Received, n: int) -> Reply:
        if req.header("If-None-Match") is not None:
            return Reply(status=304, headers=[(b"ETag", b'"other"')])
        return Reply(headers=[*STALE, (b"ETag", b'"v%d"' % n)], body=b"body %d" % n)

    handle, seen = recording(respond)
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        await request(app.addresses[0], "GET", "/etag")
        second = await request(app.addresses[0], "GET", "/etag")
    assert (second.status, second.body) == (200, b"body 3")
    assert [r.header("If-None-Match") for r in seen] == [None, '"v1"', None]


async def test_surrogate_control_takes_precedence_and_is_consumed(
    cache_settings: dict[str, Any],
) -> None:
    handle, seen = recording(
        lambda _r, n: Reply(
            headers=[
                (b"Cache-Control", b"no-store"),
                (b"Surrogate-Control", b"max-age=600;pibl, no-store;cdn"),
            ],
            body=b"%d" % n,
        )
    )
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        first = await request(app.addresses[0], "GET", "/sc")
        second = await request(app.addresses[0], "GET", "/sc")
    assert second.body == b"1"
    assert is_hit(second)
    for response in (first, second):
        assert response.header("Cache-Control") == "no-store"  # for the caches downstream
        assert response.header("Surrogate-Control") == "no-store;cdn"  # another device's
    assert seen[0].header("Surrogate-Capability") == 'pibl="Surrogate/1.0"'


async def test_surrogate_control_no_store_beats_cache_control(
    cache_settings: dict[str, Any],
) -> None:
    handle, seen = recording(
        lambda _r, n: Reply(
            headers=[(b"Cache-Control", b"max-age=600"), (b"Surrogate-Control", b"no-store")],
            body=b"%d" % n,
        )
    )
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        first = await request(app.addresses[0], "GET", "/ns")
        second = await request(app.addresses[0], "GET", "/ns")
    assert second.body == b"2"
    assert first.header("Surrogate-Control") is None
    assert first.header("Cache-Status") == "pibl; fwd=uri-miss; detail=no-store"
    assert len(seen) == 2


async def test_range_is_answered_from_a_stored_complete_response(
    cache_settings: dict[str, Any],
) -> None:
    handle, seen = recording(
        lambda _r, _n: Reply(
            headers=[(b"Cache-Control", b"max-age=600"), (b"X-A", b"1")], body=b"0123456789A"
        )
    )
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        address = app.addresses[0]
        await request(address, "GET", "/r")
        part = await request(address, "GET", "/r", headers=with_host(("Range", "bytes=0-1")))
        suffix = await request(address, "GET", "/r", headers=with_host(("Range", "bytes=-1")))
        beyond = await request(address, "GET", "/r", headers=with_host(("Range", "bytes=20-")))
        several = await request(address, "GET", "/r", headers=with_host(("Range", "bytes=0-1,3-4")))
        head = await request(address, "HEAD", "/r", headers=with_host(("Range", "bytes=0-1")))
    assert (part.status, part.body, part.header("Content-Range")) == (206, b"01", "bytes 0-1/11")
    assert part.header("X-A") == "1"
    assert is_hit(part)
    assert (suffix.status, suffix.body, suffix.header("Content-Range")) == (
        206,
        b"A",
        "bytes 10-10/11",
    )
    assert (beyond.status, beyond.header("Content-Range")) == (416, "bytes */11")
    assert (several.status, several.body) == (200, b"0123456789A")
    assert (head.status, head.header("Content-Length")) == (200, "11")
    assert len(seen) == 1


async def test_head_200_freshens_the_stored_get(cache_settings: dict[str, Any]) -> None:
    """§4.3.5: fields of a 200 response to HEAD update the stored GET response."""

    def respond(req: Received, n: int) -> Reply:
        if req.method == "HEAD":
            return Reply(
                headers=[(b"Cache-Control", b"max-age=600"), (b"X-V", b"2")], body=b"stored"
            )
        return Reply(headers=[*STALE, (b"X-V", b"1")], body=b"stored")

    handle, seen = recording(respond)
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        await request(app.addresses[0], "GET", "/h")
        head = await request(app.addresses[0], "HEAD", "/h")
        again = await request(app.addresses[0], "GET", "/h")
    assert [r.method for r in seen] == ["GET", "HEAD"]
    assert head.header("X-V") == "2"
    assert (again.body, again.header("X-V")) == (b"stored", "2")
    assert is_hit(again)


async def test_head_200_that_contradicts_the_stored_get_invalidates_it(
    cache_settings: dict[str, Any],
) -> None:
    def respond(req: Received, n: int) -> Reply:
        if req.method == "HEAD":
            return Reply(
                headers=[(b"Cache-Control", b"max-age=600"), (b"ETag", b'"new"')],
                body=b"changed!",
            )
        return Reply(
            headers=[(b"Cache-Control", b"max-age=600"), (b"ETag", b'"v%d"' % n)],
            body=b"get %d" % n,
        )

    handle, seen = recording(respond)
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        await request(app.addresses[0], "GET", "/h")
        await request(
            app.addresses[0], "HEAD", "/h", headers=with_host(("Cache-Control", "no-cache"))
        )
        again = await request(app.addresses[0], "GET", "/h")
    assert [r.method for r in seen] == ["GET", "HEAD", "GET"]
    assert again.body == b"get 3"


async def test_post_response_naming_its_own_uri_answers_later_gets(
    cache_settings: dict[str, Any],
) -> None:
    """RFC 9110 §9.3.3: explicit freshness and Content-Location = the target URI."""

    def respond(req: Received, n: int) -> Reply:
        location = b"/elsewhere" if req.target == b"/other" else req.target
        return Reply(
            headers=[(b"Cache-Control", b"max-age=600"), (b"Content-Location", location)],
            body=b"%s %d" % (req.method.encode(), n),
        )

    handle, seen = recording(respond)
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        address = app.addresses[0]
        posted = await request(address, "POST", "/p", body=b"12345")
        get = await request(address, "GET", "/p")
        await request(address, "POST", "/other", body=b"x")
        other = await request(address, "GET", "/other")
    assert posted.header("Cache-Status") == "pibl; fwd=method; fwd-status=200; stored"
    assert (get.body, is_hit(get)) == (b"POST 1", True)
    assert other.body == b"GET 3"  # /other named another URI: its POST response was not stored
    assert len(seen) == 3


async def test_vary_on_accept_language_ignores_case(cache_settings: dict[str, Any]) -> None:
    handle, seen = recording(
        lambda _r, n: Reply(
            headers=[(b"Cache-Control", b"max-age=600"), (b"Vary", b"Accept-Language")],
            body=b"%d" % n,
        )
    )
    async with (
        running_backends(handle) as backends,
        running_proxy(settings(backends, cache_settings)) as app,
    ):
        address = app.addresses[0]
        await request(address, "GET", "/v", headers=with_host(("Accept-Language", "en, de")))
        same = await request(address, "GET", "/v", headers=with_host(("Accept-Language", "EN,De")))
        order = await request(
            address, "GET", "/v", headers=with_host(("Accept-Language", "de, en"))
        )
    assert is_hit(same)
    assert order.body == b"2"
    assert len(seen) == 2
