"""Header rules on the wire (what the backend receives, what the client receives)."""

from __future__ import annotations

from tests.support import Received, Reply, make_settings, request, running_backends, running_proxy


async def test_hop_by_hop_and_connection_listed_fields_are_removed() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        await request(
            app.addresses[0],
            headers=[
                ("Host", "site.example"),
                ("Connection", "keep-alive, X-Secret-Hop"),
                ("Keep-Alive", "timeout=5"),
                ("X-Secret-Hop", "1"),
                ("TE", "trailers"),
                ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
                ("Proxy-Connection", "keep-alive"),
                ("X-Kept", "yes"),
            ],
        )
        names = backends[0].requests[0].header_names()
        for dropped in (
            "keep-alive",
            "x-secret-hop",
            "te",
            "proxy-authorization",
            "proxy-connection",
        ):
            assert dropped not in names
        assert "connection" not in names
        assert backends[0].requests[0].header("X-Kept") == "yes"
        assert backends[0].requests[0].header("Host") == "site.example"


async def test_forwarded_headers_are_added() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        await request(app.addresses[0], headers=[("Host", "site.example:8080")])
        got = backends[0].requests[0]
        assert got.header("X-Forwarded-For") == "127.0.0.1"
        assert got.header("X-Forwarded-Proto") == "http"
        assert got.header("X-Forwarded-Host") == "site.example:8080"
        assert got.header("Via") == "1.1 pibl"


async def test_spoofed_forwarded_headers_from_untrusted_peer_are_dropped() -> None:
    async with running_backends(count=1) as backends, running_proxy(make_settings(backends)) as app:
        await request(
            app.addresses[0],
            headers=[
                ("Host", "h"),
                ("X-Forwarded-For", "6.6.6.6"),
                ("X-Forwarded-Host", "evil.example"),
                ("X-Forwarded-Proto", "https"),
                ("Forwarded", "for=6.6.6.6"),
                ("X-Real-IP", "6.6.6.6"),
            ],
        )
        got = backends[0].requests[0]
        assert got.header("X-Forwarded-For") == "127.0.0.1"
        assert got.header("X-Forwarded-Host") == "h"
        assert got.header("X-Forwarded-Proto") == "http"
        assert got.header("Forwarded") is None
        assert got.header("X-Real-IP") is None
        assert "6.6.6.6" not in bytes(backends[0].raw).decode("latin-1")


async def test_trusted_proxy_chain_is_extended() -> None:
    async with running_backends(count=1) as backends:
        settings = make_settings(backends, server={"trusted_proxies": ["127.0.0.0/8"]})
        async with running_proxy(settings) as app:
            await request(
                app.addresses[0],
                headers=[
                    ("Host", "h"),
                    ("X-Forwarded-For", "203.0.113.7"),
                    ("X-Forwarded-Proto", "https"),
                    ("X-Forwarded-Host", "public.example"),
                ],
            )
        got = backends[0].requests[0]
        assert got.header("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
        assert got.header("X-Forwarded-Proto") == "https"
        assert got.header("X-Forwarded-Host") == "public.example"


async def test_response_hop_by_hop_fields_are_removed_and_via_added() -> None:
    def handler(req: Received) -> Reply:
        return Reply(
            headers=[
                (b"Connection", b"X-Internal"),
                (b"X-Internal", b"secret"),
                (b"Keep-Alive", b"timeout=5"),
                (b"X-App", b"1"),
            ],
            body=b"ok",
        )

    async with running_backends(handler) as backends, running_proxy(make_settings(backends)) as app:
        response = await request(app.addresses[0])
        assert response.header("X-Internal") is None
        assert response.header("Keep-Alive") is None
        assert response.header("X-App") == "1"
        assert response.header("Via") == "1.1 pibl"
        assert response.header("Content-Length") == "2"
