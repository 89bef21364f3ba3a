"""Routing rules end to end: header conditions, strip_prefix, header edits, per-route body
limits and cache switches, checked on the wire (what the backends receive, what the client
gets)."""

from __future__ import annotations

from typing import Any

from pibl.config import Settings, parse_config
from tests.support import (
    Backend,
    Client,
    Received,
    Reply,
    request,
    running_backends,
    running_proxy,
    wait_until,
)


def two_pools(
    stable: Backend, canary: Backend, *routes: dict[str, Any], **sections: Any
) -> Settings:
    """A proxy on 127.0.0.1:0 with pools "stable" and "canary" and ``routes``."""
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", **sections.pop("server", {})},
        "upstreams": {
            "stable": {"servers": [str(stable.address)]},
            "canary": {"servers": [str(canary.address)]},
        },
        "routes": list(routes),
        "access_log": {"enabled": False},
        **sections,
    }
    return parse_config(data, source="<test>")


def one_pool(backend: Backend, *routes: dict[str, Any], **sections: Any) -> Settings:
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", **sections.pop("server", {})},
        "upstreams": {"app": {"servers": [str(backend.address)]}},
        "routes": [{"upstream": "app", **route} for route in routes],
        "access_log": {"enabled": False},
        **sections,
    }
    return parse_config(data, source="<test>")


def replying(*headers: tuple[bytes, bytes], **reply: Any) -> Any:
    def handle(req: Received) -> Reply:
        return Reply(headers=list(headers), body=b"got " + req.target, **reply)

    return handle


# --------------------------------------------------------------------------- header conditions


async def test_requests_are_routed_on_header_conditions() -> None:
    async with running_backends(count=2) as (stable, canary):
        settings = two_pools(
            stable,
            canary,
            {"path_prefix": "/api", "headers": {"X-Canary": "1"}, "upstream": "canary"},
            {"headers": {"X-Debug": "*"}, "upstream": "canary"},
            {"upstream": "stable"},
        )
        async with running_proxy(settings) as app:
            address = app.addresses[0]

            async def backend_for(target: str, *fields: tuple[str, str]) -> str | None:
                response = await request(address, "GET", target, headers=[("Host", "h"), *fields])
                assert response.status == 200
                return response.header("X-Backend")

            assert await backend_for("/api/a", ("X-Canary", "1")) == "b2"
            assert await backend_for("/api/a", ("x-canary", "1")) == "b2"  # name ignores case
            assert await backend_for("/api/a", ("X-Canary", "0")) == "b1"
            assert await backend_for("/api/a") == "b1"
            assert await backend_for("/web", ("X-Canary", "1")) == "b1"  # prefix must match too
            assert await backend_for("/web", ("X-Debug", "")) == "b2"  # "*": present, any value
    assert [r.target for r in canary.requests] == [b"/api/a", b"/api/a", b"/web"]


async def test_no_matching_header_rule_is_404_and_the_connection_stays() -> None:
    async with running_backends(count=2) as (stable, canary):
        settings = two_pools(stable, canary, {"headers": {"X-Canary": "1"}, "upstream": "canary"})
        async with running_proxy(settings) as app:
            client = await Client.connect(app.addresses[0])
            assert (await client.request("GET", "/", [("Host", "h")])).status == 404
            ok = await client.request("GET", "/", [("Host", "h"), ("X-Canary", "1")])
            assert ok.status == 200
            await client.aclose()


# --------------------------------------------------------------------------- strip_prefix


async def test_strip_prefix_keeps_the_query_and_an_empty_path_becomes_slash() -> None:
    async with running_backends(count=2) as (stable, canary):
        settings = two_pools(
            stable,
            canary,
            {"path_prefix": "/api", "strip_prefix": True, "upstream": "canary"},
            {"upstream": "stable"},
        )
        async with running_proxy(settings) as app:
            for target in ("/api/users?id=7&next=/api/x", "/api", "/api?x=1", "/api/", "/other?q"):
                response = await request(app.addresses[0], "GET", target)
                assert response.status == 200
    assert [r.target for r in canary.requests] == [
        b"/users?id=7&next=/api/x",
        b"/",
        b"/?x=1",
        b"/",
    ]
    assert [r.target for r in stable.requests] == [b"/other?q"]


async def test_strip_prefix_applies_to_requests_with_a_body() -> None:
    async with running_backends(count=1) as (backend,):
        settings = one_pool(backend, {"path_prefix": "/up/", "strip_prefix": True})
        async with running_proxy(settings) as app:
            response = await request(app.addresses[0], "POST", "/up/file?x", body=b"payload")
            assert response.status == 200
    assert backend.requests[0].target == b"/file?x"
    assert backend.requests[0].body == b"payload"


# --------------------------------------------------------------------------- header edits


async def test_request_edits_apply_after_sanitising_and_win() -> None:
    edits = {
        "set": {"X-A": "configured", "X-Forwarded-Host": "public.example"},
        "add": {"X-B": "2"},
        "remove": ["X-C", "Via"],
    }
    async with running_backends(count=1) as (backend,):
        settings = one_pool(backend, {"request_headers": edits})
        async with running_proxy(settings) as app:
            await request(
                app.addresses[0],
                headers=[
                    ("Host", "site.example"),
                    # listed in Connection: the sanitiser drops the client's X-A; the
                    # configured one, applied after it, is sent all the same
                    ("Connection", "keep-alive, X-A"),
                    ("X-A", "client"),
                    ("X-B", "client"),
                    ("X-C", "client"),
                    ("X-Forwarded-Host", "spoofed.example"),
                ],
            )
    got = backend.requests[0]
    assert [v for k, v in got.headers if k.lower() == b"x-a"] == [b"configured"]
    assert [v for k, v in got.headers if k.lower() == b"x-b"] == [b"client", b"2"]
    assert got.header("X-C") is None
    assert [v for k, v in got.headers if k.lower() == b"x-forwarded-host"] == [b"public.example"]
    assert got.header("Via") is None
    assert got.header("X-Forwarded-For") == "127.0.0.1"  # PIBL's, not edited
    assert got.header("Host") == "site.example"
    assert "spoofed" not in bytes(backend.raw).decode("latin-1")


async def test_request_edits_are_per_route() -> None:
    async with running_backends(count=2) as (stable, canary):
        settings = two_pools(
            stable,
            canary,
            {
                "path_prefix": "/c",
                "upstream": "canary",
                "request_headers": {"set": {"Host": "canary.internal"}},
            },
            {"upstream": "stable"},
        )
        async with running_proxy(settings) as app:
            await request(app.addresses[0], "GET", "/c", headers=[("Host", "site.example")])
            await request(app.addresses[0], "GET", "/s", headers=[("Host", "site.example")])
    assert canary.requests[0].header("Host") == "canary.internal"
    assert canary.requests[0].header("X-Forwarded-Host") == "site.example"
    assert stable.requests[0].header("Host") == "site.example"


async def test_response_edits() -> None:
    edits = {"set": {"X-Frame-Options": "DENY"}, "add": {"X-Route": "app"}, "remove": ["Server"]}
    handler = replying((b"Server", b"origin/1.0"), (b"X-Frame-Options", b"ALLOW"))
    async with running_backends(handler) as (backend,):
        settings = one_pool(backend, {"response_headers": edits})
        async with running_proxy(settings) as app:
            response = await request(app.addresses[0], "GET", "/x")
    assert response.status == 200
    assert response.body == b"got /x"
    assert response.header("Server") is None
    assert [v for k, v in response.headers if k.lower() == "x-frame-options"] == ["DENY"]
    assert response.header("X-Route") == "app"
    assert response.header("Via") == "1.1 pibl"


async def test_response_edits_are_stored_with_a_cached_response() -> None:
    edits = {"set": {"X-Edited": "yes"}, "remove": ["Server"]}
    handler = replying((b"Cache-Control", b"max-age=600"), (b"Server", b"origin"))
    async with running_backends(handler) as (backend,):
        settings = one_pool(backend, {"response_headers": edits}, cache={"enabled": True})
        async with running_proxy(settings) as app:
            first = await request(app.addresses[0], "GET", "/page")
            second = await request(app.addresses[0], "GET", "/page")
    assert (first.header("Cache-Status") or "").endswith("stored")
    assert (second.header("Cache-Status") or "").startswith("pibl; hit")
    for response in (first, second):
        assert response.header("X-Edited") == "yes"
        assert response.header("Server") is None
    assert len(backend.requests) == 1


async def test_cache_false_route_bypasses_the_cache() -> None:
    handler = replying((b"Cache-Control", b"max-age=600"))
    async with running_backends(handler) as (backend,):
        settings = one_pool(
            backend,
            {"path_prefix": "/live", "cache": False},
            {"path_prefix": "/"},
            cache={"enabled": True},
        )
        async with running_proxy(settings) as app:
            live = [await request(app.addresses[0], "GET", "/live/x") for _ in range(2)]
            cached = [await request(app.addresses[0], "GET", "/page") for _ in range(2)]
    assert all(r.status == 200 and r.header("Cache-Status") is None for r in live)
    assert (cached[1].header("Cache-Status") or "").startswith("pibl; hit")
    assert [r.target for r in backend.requests] == [b"/live/x", b"/live/x", b"/page"]


# --------------------------------------------------------------------------- max_body_size

LIMITED = ({"path_prefix": "/small", "max_body_size": 100}, {"path_prefix": "/"})
CHUNKED_POST = b"POST /small/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_content_length_over_the_route_limit_is_413_before_forwarding() -> None:
    async with running_backends(count=1) as (backend,):
        async with running_proxy(one_pool(backend, *LIMITED)) as app:
            client = await Client.connect(app.addresses[0])
            response = await client.request("POST", "/small/x", [("Host", "h")], body=b"x" * 101)
            assert response.status == 413
            assert response.header("Connection") == "close"
            assert await client.is_closed()
            await client.aclose()
            # The limit is the route's: another route takes the same body.
            ok = await request(app.addresses[0], "POST", "/big", body=b"x" * 101)
            assert ok.status == 200
            at_limit = await request(app.addresses[0], "POST", "/small/y", body=b"x" * 100)
            assert at_limit.status == 200
    assert [r.target for r in backend.requests] == [b"/big", b"/small/y"]


async def test_expect_100_continue_over_the_route_limit_gets_413_without_100() -> None:
    async with running_backends(count=1) as (backend,):
        async with running_proxy(one_pool(backend, *LIMITED)) as app:
            client = await Client.connect(app.addresses[0])
            await client.send(
                b"PUT /small/x HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            response = await client.read_response()
            assert response.status == 413
            assert await client.is_closed()
            await client.aclose()
    assert backend.connections == 0


async def test_chunked_body_over_the_route_limit_is_413() -> None:
    async with running_backends(count=1) as (backend,):
        async with running_proxy(one_pool(backend, *LIMITED)) as app:
            client = await Client.connect(app.addresses[0])
            await client.send(CHUNKED_POST + chunk(b"a" * 64) + chunk(b"b" * 64) + b"0\r\n\r\n")
            response = await client.read_response()
            assert response.status == 413
            assert response.header("Connection") == "close"
            assert await client.is_closed()
            await client.aclose()
            under = await request(
                app.addresses[0],
                "POST",
                "/small/y",
                headers=[("Host", "h"), ("Transfer-Encoding", "chunked")],
                body=chunk(b"c" * 64) + b"0\r\n\r\n",
            )
            assert under.status == 200
    # The upstream never saw the oversized body end (no complete request).
    assert [(r.target, r.body) for r in backend.requests] == [(b"/small/y", b"c" * 64)]
    assert b"b" * 64 not in bytes(backend.raw)


async def test_chunked_body_crossing_the_route_limit_while_streaming_is_413() -> None:
    async with running_backends(count=1) as (backend,):
        async with running_proxy(one_pool(backend, *LIMITED)) as app:
            client = await Client.connect(app.addresses[0])
            await client.send(CHUNKED_POST + chunk(b"a" * 64))
            # The first 64 bytes, under the limit, stream up as they come.
            await wait_until(lambda: b"a" * 64 in bytes(backend.raw))
            await client.send(chunk(b"b" * 64))
            response = await client.read_response()
            assert response.status == 413
            assert await client.is_closed()
            await client.aclose()
            await wait_until(lambda: backend.connections == 1 and not backend._writers)
    assert backend.requests == []  # the body never ended upstream
    assert b"b" * 64 not in bytes(backend.raw)
    assert not bytes(backend.raw).endswith(b"0\r\n\r\n")
