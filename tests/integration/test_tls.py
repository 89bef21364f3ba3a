"""TLS end to end: HTTPS clients through PIBL (certificates chosen by SNI, old protocols
refused, plain HTTP redirected) and PIBL speaking HTTPS to its upstreams. Certificates come from
a throwaway ``trustme`` CA; everything runs on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import asyncio
import socket
import ssl
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from pibl.balancer.upstream import Address
from pibl.server.app import ProxyApp
from tests.support import (
    Backend,
    Client,
    Received,
    Reply,
    Response,
    make_settings,
    running_backends,
    running_proxy,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, folder: Path, stem: str, *names: str) -> dict[str, str]:
    leaf = ca.issue_cert(*names)
    cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return {"cert": str(cert), "key": str(key)}


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["http/1.1"])
    return context


def tls_section(certificates: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "certificates": certificates, **extra}


async def https_client(
    address: Address, context: ssl.SSLContext, server_hostname: str | None = "a.test"
) -> Client:
    reader, writer = await asyncio.open_connection(
        address.host, address.port, ssl=context, server_hostname=server_hostname
    )
    return Client(reader, writer)


async def https_get(
    address: Address, context: ssl.SSLContext, target: str = "/", host: str = "a.test"
) -> Response:
    client = await https_client(address, context, host)
    try:
        return await client.request("GET", target, headers=[("Host", host)])
    finally:
        await client.aclose()


@pytest.fixture
async def site(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[tuple[ProxyApp, Backend]]:
    """PIBL with one certificate (a.test) in front of one plain backend."""
    certificates = [write_cert(ca, tmp_path, "a", "a.test")]
    async with running_backends(count=1) as backends:
        settings = make_settings(backends, server={"tls": tls_section(certificates)})
        async with running_proxy(settings) as app:
            yield app, backends[0]


# --------------------------------------------------------------------------- termination


async def test_https_request_reaches_a_plain_backend_as_https(
    site: tuple[ProxyApp, Backend], ca: trustme.CA
) -> None:
    app, backend = site
    client = await https_client(app.tls_addresses[0], client_context(ca))
    try:
        tls = client.writer.get_extra_info("ssl_object")
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.selected_alpn_protocol() == "http/1.1"
        for i in range(2):  # keep-alive over TLS
            response = await client.request("GET", f"/x?{i}", headers=[("Host", "a.test")])
            assert response.status == 200
            assert response.body == f"b1 GET /x?{i}\n".encode()
    finally:
        await client.aclose()
    assert [r.header("X-Forwarded-Proto") for r in backend.requests] == ["https", "https"]
    assert backend.requests[0].header("X-Forwarded-Host") == "a.test"
    # The plain listener keeps serving http (no redirect unless asked for).
    plain = await Client.connect(app.addresses[0])
    assert (await plain.request("GET", "/plain")).status == 200
    await plain.aclose()
    assert backend.requests[-1].header("X-Forwarded-Proto") == "http"


async def test_large_bodies_stream_both_ways_over_tls(
    site: tuple[ProxyApp, Backend], ca: trustme.CA
) -> None:
    app, backend = site
    backend.handler = lambda request: Reply(stream_size=3_000_000)
    client = await https_client(app.tls_addresses[0], client_context(ca))
    try:
        body = b"y" * 2_000_000
        response = await client.request("POST", "/up", headers=[("Host", "a.test")], body=body)
    finally:
        await client.aclose()
    assert response.status == 200
    assert len(response.body) == 3_000_000
    assert backend.requests[0].body_size == 2_000_000


async def test_sni_chooses_among_certificates(ca: trustme.CA, tmp_path: Path) -> None:
    certificates = [
        write_cert(ca, tmp_path, "a", "a.test"),
        write_cert(ca, tmp_path, "b", "b.test", "*.b.test"),
        {**write_cert(ca, tmp_path, "c", "c.test"), "names": ["configured.test"]},
    ]
    context = client_context(ca)
    lenient = client_context(ca)
    lenient.check_hostname = False  # to see which certificate a name without one gets

    async def names_for(server_name: str | None, ctx: ssl.SSLContext) -> list[str]:
        client = await https_client(app.tls_addresses[0], ctx, server_name)
        try:
            cert = client.writer.get_extra_info("peercert")
            assert (await client.request("GET", "/")).status == 200
        finally:
            await client.aclose()
        return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]

    async with running_backends(count=1) as backends:
        settings = make_settings(backends, server={"tls": tls_section(certificates)})
        async with running_proxy(settings) as app:
            assert await names_for("a.test", context) == ["a.test"]
            assert await names_for("b.test", context) == ["b.test", "*.b.test"]
            assert await names_for("www.b.test", context) == ["b.test", "*.b.test"]
            assert await names_for("configured.test", lenient) == ["c.test"]
            assert await names_for("c.test", lenient) == ["a.test"]  # names= replaced its own
            assert await names_for("other.test", lenient) == ["a.test"]  # the default
            assert await names_for(None, lenient) == ["a.test"]  # no SNI at all


def _tls_1_1_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # setting TLS 1.0/1.1 warns
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 allows 1.1 only at level 0
    return context


def _handshake(address: Address, context: ssl.SSLContext) -> str | None:
    """A blocking handshake (the stdlib reports the TLS alert, uvloop only a reset)."""
    with (
        socket.create_connection((address.host, address.port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        return tls.version()


async def test_tls_1_1_client_is_refused(
    site: tuple[ProxyApp, Backend], ca: trustme.CA, tmp_path: Path
) -> None:
    app, backend = site
    context = _tls_1_1_context()
    # Control: this client does speak TLS 1.1 to a server that still allows it.
    old_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old_server.minimum_version = ssl.TLSVersion.TLSv1
    old_server.set_ciphers("DEFAULT:@SECLEVEL=0")
    files = write_cert(ca, tmp_path, "old", "old.test")
    old_server.load_cert_chain(files["cert"], files["key"])
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=old_server)
    try:
        control = Address(*server.sockets[0].getsockname()[:2])
        assert await asyncio.to_thread(_handshake, control, context) == "TLSv1.1"
    finally:
        server.close()
        await server.wait_closed()
    with pytest.raises(ssl.SSLError) as info:
        await asyncio.to_thread(_handshake, app.tls_addresses[0], context)
    # OpenSSL answers with a protocol_version alert; uvloop may close before it is flushed.
    assert info.value.reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING")
    assert backend.requests == []


async def test_plain_http_is_redirected_with_308(ca: trustme.CA, tmp_path: Path) -> None:
    certificates = [write_cert(ca, tmp_path, "a", "a.test")]
    async with running_backends(count=1) as backends:
        tls = tls_section(certificates, redirect_http=True)
        async with running_proxy(make_settings(backends, server={"tls": tls})) as app:
            port = app.tls_addresses[0].port
            client = await Client.connect(app.addresses[0])
            try:
                response = await client.request(
                    "GET", "/path/x?q=1&r=/s", headers=[("Host", "Example.COM:8080")]
                )
                assert response.status == 308
                assert response.header("Location") == f"https://example.com:{port}/path/x?q=1&r=/s"
                assert response.header("Connection") is None  # keep-alive goes on
                # The method and body are kept by a 308 client; PIBL only redirects.
                response = await client.request(
                    "POST", "/form", headers=[("Host", "[::1]")], body=b"a=1"
                )
                assert response.status == 308
                assert response.header("Location") == f"https://[::1]:{port}/form"
                response = await client.request("GET", "/", headers=[("Host", "bad host")])
                assert response.status == 400
            finally:
                await client.aclose()
            # The redirect target answers over TLS.
            followed = await https_get(app.tls_addresses[0], client_context(ca), "/path/x")
            assert followed.status == 200
        assert [r.target for r in backends[0].requests] == [b"/path/x"]


async def test_cache_keys_tell_https_from_http(ca: trustme.CA, tmp_path: Path) -> None:
    certificates = [write_cert(ca, tmp_path, "a", "a.test")]

    def cacheable(request: Received) -> Reply:
        proto = request.header("X-Forwarded-Proto") or "-"
        return Reply(headers=[(b"Cache-Control", b"max-age=60")], body=proto.encode())

    async with running_backends(cacheable) as backends:
        settings = make_settings(
            backends, server={"tls": tls_section(certificates)}, cache={"enabled": True}
        )
        async with running_proxy(settings) as app:
            context = client_context(ca)
            assert (await https_get(app.tls_addresses[0], context, "/c")).body == b"https"
            assert (await https_get(app.tls_addresses[0], context, "/c")).body == b"https"
            plain = await Client.connect(app.addresses[0])
            assert (await plain.request("GET", "/c", headers=[("Host", "a.test")])).body == b"http"
            await plain.aclose()
        assert len(backends[0].requests) == 2  # one per scheme; the second https was a hit


# --------------------------------------------------------------------------- to upstreams


def backend_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
async def tls_backend(ca: trustme.CA) -> AsyncIterator[Backend]:
    backend = Backend(name="secure", ssl=backend_context(ca, "127.0.0.1", "backend.test"))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


async def test_upstream_tls_verified_against_tls_ca(
    tls_backend: Backend, ca: trustme.CA, tmp_path: Path
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    for extra in ({}, {"tls_server_name": "backend.test"}):
        upstream = {"tls": True, "tls_ca": str(tmp_path / "ca.pem"), **extra}
        async with running_proxy(make_settings([tls_backend], upstream=upstream)) as app:
            client = await Client.connect(app.addresses[0])
            for _ in range(2):  # the second one reuses the pooled TLS connection
                response = await client.request("GET", "/secure")
                assert response.status == 200
                assert response.body == b"secure GET /secure\n"
            await client.aclose()
            pool = app.groups["app"].pool_for(app.groups["app"].upstreams[0])
            assert (pool.connects, pool.reuses) == (1, 1)
    assert len(tls_backend.requests) == 4


async def test_upstream_tls_health_check_speaks_tls(
    tls_backend: Backend, ca: trustme.CA, tmp_path: Path
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    upstream = {"tls": True, "tls_ca": str(tmp_path / "ca.pem"), "health": {"interval": "1h"}}
    app = ProxyApp(make_settings([tls_backend], upstream=upstream))
    group = app.groups["app"]
    assert await app.health_checkers[0].check(group.upstreams[0]) == (True, "status 200")
    group.close()


async def test_untrusted_upstream_certificate_is_a_502(
    tls_backend: Backend, tmp_path: Path
) -> None:
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    upstream = {"tls": True, "tls_ca": str(tmp_path / "other.pem"), "max_fails": 0}
    async with running_proxy(make_settings([tls_backend], upstream=upstream)) as app:
        response = await Client.connect(app.addresses[0])
        try:
            assert (await response.request("GET", "/")).status == 502
        finally:
            await response.aclose()
    assert tls_backend.requests == []


async def test_wrong_server_name_is_a_502(
    tls_backend: Backend, ca: trustme.CA, tmp_path: Path
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    upstream = {"tls": True, "tls_ca": str(tmp_path / "ca.pem"), "tls_server_name": "evil.test"}
    async with running_proxy(make_settings([tls_backend], upstream=upstream)) as app:
        client = await Client.connect(app.addresses[0])
        assert (await client.request("GET", "/")).status == 502
        await client.aclose()
    assert tls_backend.requests == []


async def test_tls_verify_false_accepts_any_certificate(tls_backend: Backend) -> None:
    upstream = {"tls": True, "tls_verify": False}
    async with running_proxy(make_settings([tls_backend], upstream=upstream)) as app:
        client = await Client.connect(app.addresses[0])
        assert (await client.request("GET", "/")).status == 200
        await client.aclose()


async def test_reload_swaps_certificates_for_new_handshakes(ca: trustme.CA, tmp_path: Path) -> None:
    first = [write_cert(ca, tmp_path, "a", "a.test")]
    second = [write_cert(ca, tmp_path, "b", "b.test")]
    lenient = client_context(ca)
    lenient.check_hostname = False

    async def served_names() -> list[str]:
        client = await https_client(app.tls_addresses[0], lenient, "a.test")
        cert = client.writer.get_extra_info("peercert")
        await client.aclose()
        return [value for _, value in cert["subjectAltName"]]

    async with running_backends(count=1) as backends:
        async with running_proxy(
            make_settings(backends, server={"tls": tls_section(first)})
        ) as app:
            assert await served_names() == ["a.test"]
            await app.reload(make_settings(backends, server={"tls": tls_section(second)}))
            assert await served_names() == ["b.test"]
            assert app.settings.server.tls is not None
            assert app.settings.server.tls.certificates[0].cert == second[0]["cert"]
