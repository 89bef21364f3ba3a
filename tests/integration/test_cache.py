"""The cache in the proxy pipeline, end to end: what is stored, reused, revalidated, refused."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from pibl.balancer.upstream import Address
from pibl.cache.policy import format_http_date
from tests.support import (
    Client,
    Received,
    Reply,
    make_settings,
    request,
    running_backends,
    running_proxy,
    wait_until,
)


def counting(
    headers: list[tuple[bytes, bytes]] | Callable[[Received], list[tuple[bytes, bytes]]],
    **reply: Any,
) -> tuple[Callable[[Received], Reply], list[Received]]:
    """A handler answering ``<n> <target>`` with ``headers``, and the list of what it got."""
    seen: list[Received] = []

    def handle(req: Received) -> Reply:
        seen.append(req)
        hdrs = headers(req) if callable(headers) else headers
        return Reply(headers=list(hdrs), body=b"%d %s" % (len(seen), req.target), **reply)

    return handle, seen


def cached(backends: list[Any], **cache: Any) -> Any:
    return make_settings(backends, cache={"enabled": True, **cache})


async def test_fresh_response_is_served_from_cache_with_age() -> None:
    handler, seen = counting([(b"Cache-Control", b"max-age=600")])
    async with running_backends(handler) as backends, running_proxy(cached(backends)) as app:
        first = await request(app.addresses[0], "GET", "/page")
        second = await request(app.addresses[0], "GET", "/page")
        head = await request(app.addresses[0], "HEAD", "/page")
    assert first.header("Cache-Status") == "pibl; fwd=uri-miss; stored"
    assert second.body == first.body == b"1 /page"
    assert (second.header("Cache-Status") or "").startswith("pibl; hit")
    assert second.header("Age") is not None
    # HEAD is answered from the stored GET, with its length and no body.
    assert (head.header("Cache-Status") or "").startswith("pibl; hit")
    assert head.header("Content-Length") == str(len(first.body))
    assert len(seen) == 1


async def test_distinct_urls_and_hosts_never_share_an_entry() -> None:
    handler, seen = counting([(b"Cache-Control", b"max-age=600")])
    paths = ["/a/b", "/ab", "/a:b", "//ab", "/ab?x=1", "/ab?x=2"]
    async with running_backends(handler) as backends, running_proxy(cached(backends)) as app:
        bodies = {}
        for host in ("one.example", "two.example"):
            for path in paths:
                first = await request(app.addresses[0], "GET", path, headers=[("Host", host)])
                again = await request(app.addresses[0], "GET", path, headers=[("Host", host)])
                assert again.body == first.body
                assert (again.header("Cache-Status") or "").startswith("pibl; hit")
                bodies[(host, path)] = first.body
    assert len(set(bodies.values())) == len(bodies) == 12
    assert len(seen) == 12


async def test_request_with_authorization_is_not_stored() -> None:
    handler, seen = counting([(b"Cache-Control", b"max-age=600")])
    async with running_backends(handler) as backends, running_proxy(cached(backends)) as app:
        auth = [("Host", "h"), ("Authorization", "Bearer secret")]
        first = await request(app.addresses[0], "GET", "/private", headers=auth)
        second = await request(app.addresses[0], "GET", "/private", headers=auth)
    assert first.header("Cache-Status") == "pibl; fwd=uri-miss; detail=authorization"
    assert second.body == b"2 /private"
    assert len(seen) == 2


async def test_authorization_with_public_response_is_stored() -> None:
    handler, seen = counting([(b"Cache-Control", b"public, max-age=600")])
    async with running_backends(handler) as backends, running_proxy(cached(backends)) as app:
        auth = [("Host", "h"), ("Authorization", "Bearer secret")]
        await request(app.addresses[0], "GET", "/shared", headers=auth)
        second = await request(app.addresses[0], "GET", "/shared", headers=auth)
    assert (second.header("Cache-Status") or "").startswith("pibl; hit")
    assert len(seen) == 1


async def test_set_cookie_is_stored_only_with_explicit_freshness() -> None:
    def headers(req: Received) -> list[tuple[bytes, bytes]]:
        cookie = [(b"Set-Cookie", b"session=abc")]
        if req.target == b"/explicit":
            return [*cookie, (b"Cache-Control", b"max-age=600")]
        return cookie  # only default_ttl could make it reusable: it must not

    handler, seen = counting(headers)
    async with running_backends(handler) as backends:
        settings = cached(backends, default_ttl="60s")
        async with running_proxy(settings) as app:
            implicit = await request(app.addresses[0], "GET", "/implicit")
            await request(app.addresses[0], "GET", "/implicit")
            await request(app.addresses[0], "GET", "/explicit")
            explicit = await request(app.addresses[0], "GET", "/explicit")
    assert implicit.header("Cache-Status") == "pibl; fwd=uri-miss; detail=set-cookie"
    assert (explicit.header("Cache-Status") or "").startswith("pibl; hit")
    assert [r.target for r in seen] == [b"/implicit", b"/implicit", b"/explicit"]


async def test_default_ttl_applies_only_without_freshness_information() -> None:
    def headers(req: Received) -> list[tuple[bytes, bytes]]:
        return [(b"Cache-Control", b"max-age=0")] if req.target == b"/zero" else []

    handler, seen = counting(headers)
    async with running_backends(handler) as backends:
        async with running_proxy(cached(backends, default_ttl="60s")) as app:
            for _ in range(2):
                await request(app.addresses[0], "GET", "/plain")
                await request(app.addresses[0], "GET", "/zero")
        async with running_proxy(cached(backends)) as app:  # default_ttl = 0: pure RFC
            first = await request(app.addresses[0], "GET", "/plain")
            await request(app.addresses[0], "GET", "/plain")
    # /plain reused via default_ttl; /zero (explicit max-age=0) fetched each time.
    assert [r.target for r in seen[:3]] == [b"/plain", b"/zero", b"/zero"]
    assert first.header("Cache-Status") == "pibl; fwd=uri-miss; detail=no-freshness"
    assert len(seen) == 5


async def test_no_store_response_reports_why() -> None:
    handler, seen = counting([(b"Cache-Control", b"no-store")])
    async with running_backends(handler) as backends, running_proxy(cached(backends)) as app:
        response = await request(app.addresses[0], "GET", "/ns")
        await request(app.addresses[0], "GET", "/ns")
    assert response.header("Cache-Status") == "pibl; fwd=uri-miss; detail=no-store"
    assert len(seen) == 2


async def test_stale_entry_is_revalidated_and_refreshed_by_304() -> None:
    def handle(req: Received) -> Reply:
        seen.append(req)
        old = format_http_date(0).decode()
        if req.header("If-None-Match") == '"v1"':
            now = format_http_date(time.time())
            return Reply(
                status=304,
                headers=[(b"ETag", b'"v1"'), (b"Cache-Control", b"max-age=600"), (b"Date", now)],
            )
        # Already stale when stored: Date far in the past, max-age=1.
        return Reply(
            headers=[(b"ETag", b'"v1"'), (b"Cache-Control", b"max-age=1"), (b"Date", old.encode())],
            body=b"original",
        )

    seen: list[Received] = []
    async with running_backends(handle) as backends, running_proxy(cached(backends)) as app:
        await request(app.addresses[0], "GET", "/r")
        refreshed = await request(app.addresses[0], "GET", "/r")
        hit = await request(app.addresses[0], "GET", "/r")
    assert seen[1].header("If-None-Match") == '"v1"'
    assert refreshed.status == 200
    assert refreshed.body == b"original"
    assert refreshed.header("Cache-Status") == "pibl; fwd=stale; fwd-status=304"
    assert (hit.header("Cache-Status") or "").startswith("pibl; hit")
    assert len(seen) == 2


async def test_client_conditional_on_fresh_entry_is_answered_304_from_cache() -> None:
    handler, seen = counting([(b"Cache-Control", b"max-age=600"), (b"ETag", b'"abc"')])
    async with running_backends(handler) as backends, running_proxy(cached(backends)) as app:
        await request(app.addresses[0], "GET", "/c")
        response = await request(
            app.addresses[0],
            "GET",
            "/c",
            headers=[("Host", "test.local"), ("If-None-Match", 'W/"abc"')],
        )
    assert response.status == 304
    assert response.body == b""
    assert len(seen) == 1


async def test_stale_if_error_serves_stale_when_origin_fails() -> None:
    def handle(req: Received) -> Reply:
        seen.append(req)
        if len(seen) > 1:
            return Reply(status=503, body=b"down")
        # Stored already stale (Date 100 s ago), inside its stale-if-error window.
        old = format_http_date(time.time() - 100)
        return Reply(
            headers=[(b"Cache-Control", b"max-age=1, stale-if-error=3600"), (b"Date", old)],
            body=b"good",
        )

    seen: list[Received] = []
    async with running_backends(handle) as backends, running_proxy(cached(backends)) as app:
        await request(app.addresses[0], "GET", "/sie")
        response = await request(app.addresses[0], "GET", "/sie")
    assert response.status == 200
    assert response.body == b"good"
    assert "stale-if-error" in (response.header("Cache-Status") or "")


async def test_stale_while_revalidate_serves_stale_and_refreshes_in_background() -> None:
    refreshed = asyncio.Event()

    def handle(req: Received) -> Reply:
        seen.append(req)
        if len(seen) == 2:
            refreshed.set()
        # The first version is stored already stale (Date 100 s ago) but inside its window.
        date = format_http_date(time.time() - (100 if len(seen) == 1 else 0))
        return Reply(
            headers=[
                (b"Cache-Control", b"max-age=60, stale-while-revalidate=3600"),
                (b"Date", date),
            ],
            body=b"version %d" % len(seen),
        )

    seen: list[Received] = []
    async with running_backends(handle) as backends, running_proxy(cached(backends)) as app:
        await request(app.addresses[0], "GET", "/swr")
        stale = await request(app.addresses[0], "GET", "/swr")
        await asyncio.wait_for(refreshed.wait(), 5)
        # Wait until the background fetch is committed (the proxy's background task ends).
        await asyncio.wait_for(_background_done(app), 5)
        fresh = await request(app.addresses[0], "GET", "/swr")
    assert stale.body == b"version 1"
    assert "stale-while-revalidate" in (stale.header("Cache-Status") or "")
    assert fresh.body == b"version 2"


async def _background_done(app: Any) -> None:
    tasks = list(app.pipeline._background)
    if tasks:
        await asyncio.gather(*tasks)


async def test_concurrent_misses_are_coalesced_into_one_upstream_request() -> None:
    release = asyncio.Event()
    seen: list[Received] = []

    async def slow(req: Received) -> Reply:
        seen.append(req)
        await release.wait()
        return Reply(headers=[(b"Cache-Control", b"max-age=600")], body=b"shared")

    async with running_backends(slow) as backends, running_proxy(cached(backends)) as app:
        tasks = [asyncio.create_task(request(app.addresses[0], "GET", "/hot")) for _ in range(20)]
        # Every request has reached the proxy and waits (one upstream fetch in flight).
        await wait_until(
            lambda: bool(seen) and sum(c.task is not None for c in app.connections) == 20
        )
        release.set()
        responses = await asyncio.gather(*tasks)
    assert [r.body for r in responses] == [b"shared"] * 20
    assert len(seen) == 1


async def test_unsafe_request_invalidates_the_stored_response() -> None:
    handler, _ = counting([(b"Cache-Control", b"max-age=600")])
    async with running_backends(handler) as backends, running_proxy(cached(backends)) as app:
        await request(app.addresses[0], "GET", "/doc")
        hit = await request(app.addresses[0], "GET", "/doc")
        await request(app.addresses[0], "POST", "/doc", body=b"edit")
        after = await request(app.addresses[0], "GET", "/doc")
    assert (hit.header("Cache-Status") or "").startswith("pibl; hit")
    assert after.header("Cache-Status") == "pibl; fwd=uri-miss; stored"
    assert after.body == b"3 /doc"


async def test_client_gone_mid_body_leaves_no_entry() -> None:
    release = asyncio.Event()
    upstream_done = asyncio.Event()

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 200000\r\n\r\n"
        )
        writer.write(b"a" * 100_000)
        await release.wait()  # the rest only after the client has gone
        writer.write(b"b" * 100_000)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.transport.abort()
        upstream_done.set()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        settings = make_settings([Address(host, port)], cache={"enabled": True})
        async with running_proxy(settings) as app:
            client = await Client.connect(app.addresses[0])
            await client.send(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
            await client.reader.readexactly(50_000)
            # A reset, as when a client process dies (a FIN alone is a legal half-close, after
            # which PIBL still delivers the response, like HAProxy without abortonclose).
            sock = client.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.writer.transport.abort()
            await client.aclose()
            await wait_until(lambda: not app.connections)  # PIBL saw the client leave
            release.set()
            await asyncio.wait_for(upstream_done.wait(), 5)
            assert app.cache.storage.stats()["entries"] == 0
            # The next request is a miss that fetches again.
            assert (await app.cache.storage.lookup(make_key_for("h", "/big"))) == []
    finally:
        server.close()
        await server.wait_closed()


def make_key_for(host: str, path: str) -> Any:
    from pibl.cache.key import CacheKey

    return CacheKey("http", host, path)


async def test_upstream_reset_mid_body_leaves_no_entry() -> None:
    def short(req: Received) -> Reply:
        return Reply(
            raw=b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 100\r\n\r\npart",
            close=True,
        )

    async with running_backends(short) as backends, running_proxy(cached(backends)) as app:
        client = await Client.connect(app.addresses[0])
        await client.send(b"GET /torn HTTP/1.1\r\nHost: h\r\n\r\n")
        assert await client.is_closed()
        await client.aclose()
        assert app.cache.storage.stats()["entries"] == 0


async def test_object_over_max_object_size_streams_through_uncached() -> None:
    def big(req: Received) -> Reply:
        return Reply(headers=[(b"Cache-Control", b"max-age=600")], stream_size=3 << 20)

    async with (
        running_backends(big) as backends,
        running_proxy(cached(backends, max_object_size="1MiB")) as app,
    ):
        response = await request(app.addresses[0], "GET", "/huge")
        assert len(response.body) == 3 << 20
        assert response.header("Cache-Status") == "pibl; fwd=uri-miss; detail=too-large"
        assert app.cache.storage.stats()["entries"] == 0


async def test_route_with_cache_off_bypasses_the_cache() -> None:
    handler, _ = counting([(b"Cache-Control", b"max-age=600")])
    async with running_backends(handler) as backends:
        settings = make_settings(
            backends,
            cache={"enabled": True},
            routes=[
                {"path_prefix": "/live", "upstream": "app", "cache": False},
                {"upstream": "app"},
            ],
        )
        async with running_proxy(settings) as app:
            live = [await request(app.addresses[0], "GET", "/live/x") for _ in range(2)]
            await request(app.addresses[0], "GET", "/other")
            other = await request(app.addresses[0], "GET", "/other")
    assert live[0].header("Cache-Status") is None
    assert live[1].body == b"2 /live/x"
    assert (other.header("Cache-Status") or "").startswith("pibl; hit")


async def test_pipelined_hits_and_misses_are_answered_in_order() -> None:
    # A hit queued behind a miss waits its turn.
    handler, seen = counting([(b"Cache-Control", b"max-age=600")])
    async with running_backends(handler) as backends, running_proxy(cached(backends)) as app:
        await request(app.addresses[0], "GET", "/hot")
        client = await Client.connect(app.addresses[0])
        await client.send(
            b"GET /hot HTTP/1.1\r\nHost: test.local\r\n\r\n"
            b"GET /cold HTTP/1.1\r\nHost: test.local\r\n\r\n"
            b"GET /hot HTTP/1.1\r\nHost: test.local\r\n\r\n"
        )
        answers = [await client.read_response() for _ in range(3)]
        head = await client.request("HEAD", "/hot")
        await client.aclose()
    assert [r.body for r in answers] == [b"1 /hot", b"2 /cold", b"1 /hot"]
    statuses = [(r.header("Cache-Status") or "").split(";")[1].strip() for r in answers]
    assert statuses == ["hit", "fwd=uri-miss", "hit"]
    assert head.header("Content-Length") == "6"
    assert len(seen) == 2


async def test_entry_failing_its_checks_at_serve_time_is_dropped_and_fetched_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pibl.cache.memory import MemoryEntry
    from pibl.cache.storage import CorruptEntry

    handler, seen = counting([(b"Cache-Control", b"max-age=600")])
    async with running_backends(handler) as backends, running_proxy(cached(backends)) as app:
        await request(app.addresses[0], "GET", "/c")

        def corrupt(self: MemoryEntry) -> bytes:
            raise CorruptEntry("simulated damage")

        with monkeypatch.context() as patch:
            patch.setattr(MemoryEntry, "read_body", corrupt)
            response = await request(app.addresses[0], "GET", "/c")
        again = await request(app.addresses[0], "GET", "/c")
        cache = app.pipeline.cache
        assert cache is not None
        # The damaged entry counts as the miss it became, not also as a hit.
        assert (cache.hits, cache.misses) == (1, 2)
    # Nothing of the damaged entry went out: the request was fetched and stored anew.
    assert response.status == 200
    assert response.body == b"2 /c"
    assert response.header("Cache-Status") == "pibl; fwd=uri-miss; stored"
    assert again.body == b"2 /c"
    assert len(seen) == 2


@pytest.mark.parametrize("storage", ["memory", "disk"])
async def test_only_if_cached_is_answered_from_the_store_or_with_504(
    storage: str, tmp_path: Any
) -> None:
    # RFC 9111 §5.2.1.7. Memory hits are answered before the cache phase's coroutines, disk
    # ones inside them: both must give the same answers.
    def handle(req: Received) -> Reply:
        fresh = req.target.startswith(b"/fresh")
        cache_control = b"max-age=600" if fresh else b"max-age=0"  # stored, stale at once
        return Reply(headers=[(b"Cache-Control", cache_control), (b"ETag", b'"v1"')])

    only = [("Host", "test.local"), ("Cache-Control", "only-if-cached")]
    options: dict[str, Any] = {"storage": storage}
    if storage == "disk":
        options["path"] = str(tmp_path / "cache")
    async with (
        running_backends(handle) as backends,
        running_proxy(cached(backends, **options)) as app,
    ):
        nothing = await request(app.addresses[0], "GET", "/fresh", headers=only)
        await request(app.addresses[0], "GET", "/fresh")
        await request(app.addresses[0], "GET", "/stale")
        stored = await request(app.addresses[0], "GET", "/fresh", headers=only)
        stale = await request(app.addresses[0], "GET", "/stale", headers=only)
        revalidated = await request(app.addresses[0], "GET", "/stale")
    assert nothing.status == 504
    assert stored.status == 200
    assert (stored.header("Cache-Status") or "").startswith("pibl; hit")
    assert stale.status == 504  # stored, but stale
    assert "fwd=stale" in (revalidated.header("Cache-Status") or "")
    assert len(backends[0].requests) == 3
