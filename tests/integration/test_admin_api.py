"""The admin API against a real in-process PIBL: sockets, backends, the cache, /metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pibl.admin.http import MAX_BODY_BYTES
from pibl.admin.service import AdminService
from pibl.balancer.upstream import Address
from pibl.server.app import ProxyApp
from tests.support import (
    Backend,
    Client,
    Received,
    Reply,
    Response,
    dead_address,
    make_settings,
    request,
    running_backends,
    running_proxy,
)

ADMIN = {"listen": "127.0.0.1:0"}


def admin_address(app: ProxyApp) -> Address:
    assert app.admin_address is not None
    return app.admin_address


async def admin(
    app: ProxyApp,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    address = admin_address(app)
    hdrs = [("Host", f"127.0.0.1:{address.port}")]
    if token is not None:
        hdrs.append(("Authorization", f"Bearer {token}"))
    hdrs += headers or []
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    if method in ("POST", "PUT"):
        hdrs.append(("Content-Length", str(len(raw))))
    return await request(address, method, path, headers=hdrs, body=raw)


def data(response: Response, status: int = 200) -> Any:
    assert response.status == status, response.body
    assert response.header("Content-Type") == "application/json"
    return json.loads(response.body)


async def proxy_get(app: ProxyApp, target: str = "/", **kw: Any) -> Response:
    return await request(app.addresses[0], "GET", target, **kw)


def served(backends: list[Backend]) -> list[int]:
    return [len(b.requests) for b in backends]


# -- the listener ---------------------------------------------------------------------------------


async def test_admin_listens_on_its_own_port_and_stops_with_the_proxy() -> None:
    async with running_backends(count=1) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            address = admin_address(app)
            assert address.port not in (0, app.addresses[0].port)
            assert [s for s in app.services if isinstance(s, AdminService)]
            response = await admin(app, "GET", "/api/status")
            assert response.header("Connection") == "close"
            assert data(response)["workers"] == 1
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(address.host, address.port)


async def test_no_admin_section_means_no_listener() -> None:
    async with running_backends(count=1) as backends:
        async with running_proxy(make_settings(backends)) as app:
            assert app.admin_address is None
            assert not [s for s in app.services if isinstance(s, AdminService)]


async def test_a_taken_admin_port_fails_the_start_naming_the_key() -> None:
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    try:
        async with running_backends(count=1) as backends:
            app = ProxyApp(make_settings(backends, admin={"listen": f"127.0.0.1:{port}"}))
            try:
                with pytest.raises(OSError, match=rf"admin\.listen 127\.0\.0\.1:{port}"):
                    await app.start()
            finally:
                await app.aclose(timeout=1.0)
    finally:
        holder.close()
        await holder.wait_closed()


# -- status, config, metrics ----------------------------------------------------------------------


async def test_status_reports_servers_requests_and_latency() -> None:
    async with running_backends(count=2) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            for _ in range(6):
                assert (await proxy_get(app)).status == 200
            status = data(await admin(app, "GET", "/api/status"))
            assert status["requests"] == 6
            assert status["errors"] == 0
            assert status["uptime"] > 0
            (pool,) = status["pools"]
            assert [s["address"] for s in pool["servers"]] == [str(b.address) for b in backends]
            for server in pool["servers"]:
                assert server["state"] == "up"
                assert server["requests"] == 3
                assert server["responses"] == {"2xx": 3}
                assert server["latency"]["samples"] == 3
                assert 0 < server["latency"]["p50"] <= server["latency"]["p99"] < 5
                assert server["latency"]["ewma"] > 0
                assert server["connections"] == {"active": 0, "idle": 1}
                assert server["in_flight"] == 0


async def test_status_shows_an_unreachable_server() -> None:
    async with running_backends(count=2) as backends:
        settings = make_settings(backends, admin=ADMIN, upstream={"retries": 1})
        async with running_proxy(settings) as app:
            await backends[1].aclose()
            for _ in range(4):
                assert (await proxy_get(app)).status == 200  # retried on the live one
            status = data(await admin(app, "GET", "/api/status"))
            down = status["pools"][0]["servers"][1]
            assert down["errors"] >= 1
            app.groups["app"].upstreams[1].is_available = False
            status = data(await admin(app, "GET", "/api/status"))
            down = status["pools"][0]["servers"][1]
            assert down["state"] == "down"
            assert down["available"] is False
            assert down["health"]["is_available"] is False


async def test_config_is_served_with_secrets_redacted() -> None:
    async with running_backends(count=1) as backends:
        settings = make_settings(backends, admin={**ADMIN, "token": "hunter2"})
        async with running_proxy(settings) as app:
            config = data(await admin(app, "GET", "/api/config", token="hunter2"))
            assert config["admin"]["token"] == "<redacted>"
            assert config["upstreams"]["app"]["servers"][0]["address"] == str(backends[0].address)
            assert b"hunter2" not in (await admin(app, "GET", "/api/config", token="hunter2")).body


async def test_metrics_count_the_requests_made() -> None:
    async with running_backends(count=2) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            for i in range(7):
                assert (await proxy_get(app, f"/m{i}")).status == 200
            response = await admin(app, "GET", "/metrics")
            assert response.status == 200
            assert response.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
            families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
            assert all(name.startswith("pibl_") for name in families)
            requests = families["pibl_requests"].samples
            assert sum(s.value for s in requests) == 7
            assert {s.labels["status_class"] for s in requests} == {"2xx"}
            by_server = {s.labels["server"]: s.value for s in requests}
            assert by_server == {str(b.address): float(len(b.requests)) for b in backends}
            latency = families["pibl_upstream_response_duration_seconds"].samples
            counts = [s.value for s in latency if s.name.endswith("_count")]
            assert sum(counts) == 7
            sent = families["pibl_sent_bytes"].samples
            bodies = [f"{b.name} GET {r.target.decode()}\n" for b in backends for r in b.requests]
            assert sent[0].value == sum(len(body) for body in bodies)
            up = families["pibl_upstream_up"].samples
            assert {s.value for s in up} == {1.0}


async def test_metrics_count_retries_on_another_server() -> None:
    dead = await dead_address()
    async with running_backends(count=1) as backends:
        # Requests that pick the dead server first are retried on the live one, until passive
        # health checking ejects the dead server (after max_fails = 5 failures in a row).
        settings = make_settings([dead, backends[0].address], admin=ADMIN)
        async with running_proxy(settings) as app:
            for i in range(6):
                assert (await proxy_get(app, f"/r{i}")).status == 200
            response = await admin(app, "GET", "/metrics")
            families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
            retries = families["pibl_retries"].samples
            failed_first = app.groups["app"].upstreams[0].errors
            assert failed_first >= 1
            assert sum(s.value for s in retries if s.name.endswith("_total")) == failed_first


# -- authentication -------------------------------------------------------------------------------


async def test_token_protects_the_api_but_not_the_page() -> None:
    async with running_backends(count=1) as backends:
        settings = make_settings(backends, admin={**ADMIN, "token": "s3cret"})
        async with running_proxy(settings) as app:
            for path in ["/api/status", "/metrics", "/api/config"]:
                response = await admin(app, "GET", path)
                assert data(response, 401) == {
                    "status": 401,
                    "error": "missing or wrong bearer token",
                }
                assert response.header("WWW-Authenticate") == 'Bearer realm="pibl-admin"'
                assert (await admin(app, "GET", path, token="nope")).status == 401
                assert (await admin(app, "GET", path, token="s3cret")).status == 200
            drained = await admin(
                app, "POST", f"/api/upstreams/app/servers/{backends[0].address}/drain"
            )
            assert drained.status == 401
            assert not app.groups["app"].upstreams[0].drained
            page = await admin(app, "GET", "/")
            assert page.status == 200
            assert page.header("Content-Type") == "text/html; charset=utf-8"


# -- drain, enable, weight ------------------------------------------------------------------------


async def test_drain_stops_traffic_and_enable_brings_it_back() -> None:
    async with running_backends(count=2) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            first = backends[0].address
            for _ in range(4):
                await proxy_get(app)
            assert served(backends) == [2, 2]
            drained = data(await admin(app, "POST", f"/api/upstreams/app/servers/{first}/drain"))
            assert drained["drained"] is True
            assert drained["state"] == "drained"
            for _ in range(6):
                assert (await proxy_get(app)).status == 200
            assert served(backends) == [2, 8]
            status = data(await admin(app, "GET", "/api/status"))
            assert status["pools"][0]["servers"][0]["drained"] is True
            enabled = data(await admin(app, "POST", f"/api/upstreams/app/servers/{first}/enable"))
            assert enabled["drained"] is False
            assert enabled["state"] == "up"
            for _ in range(4):
                await proxy_get(app)
            assert served(backends) == [4, 10]


async def test_a_drained_server_finishes_its_in_flight_request() -> None:
    release = asyncio.Event()

    async def slow(request: Received) -> Reply:
        await release.wait()
        return Reply(body=b"slow done")

    async with running_backends(slow, None) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            pending = asyncio.ensure_future(proxy_get(app, "/slow"))
            await backends[0].request_event.wait()
            path = f"/api/upstreams/app/servers/{backends[0].address}/drain"
            status = data(await admin(app, "POST", path))
            assert status["in_flight"] == 1
            assert (await proxy_get(app)).body.startswith(b"b2 ")
            release.set()
            response = await pending
            assert (response.status, response.body) == (200, b"slow done")


async def test_every_server_drained_answers_503() -> None:
    async with running_backends(count=1) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            await admin(app, "POST", f"/api/upstreams/app/servers/{backends[0].address}/drain")
            assert (await proxy_get(app)).status == 503
            await admin(app, "POST", f"/api/upstreams/app/servers/{backends[0].address}/enable")
            assert (await proxy_get(app)).status == 200


async def test_weight_change_moves_the_distribution() -> None:
    async with running_backends(count=2) as backends:
        settings = make_settings(
            backends, admin=ADMIN, upstream={"balance": "weighted_round_robin"}
        )
        async with running_proxy(settings) as app:
            path = f"/api/upstreams/app/servers/{backends[0].address}/weight"
            changed = data(await admin(app, "PUT", path, {"weight": 4}))
            assert changed["weight"] == 4
            for _ in range(20):
                await proxy_get(app)
            assert served(backends) == [16, 4]
            assert data(await admin(app, "PUT", path, {"weight": 1}))["weight"] == 1
            for _ in range(10):
                await proxy_get(app)
            assert served(backends) == [21, 9]
            bad = await admin(app, "PUT", path, {"weight": 0})
            assert data(bad, 400)["error"] == "weight must be an integer from 1 to 1000, got 0"


async def test_upstream_errors_over_http() -> None:
    async with running_backends(count=1) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            server = backends[0].address
            assert data(await admin(app, "POST", "/api/upstreams/nope/servers/x:1/drain"), 404)
            missing = await admin(app, "POST", "/api/upstreams/app/servers/127.0.0.1:1/drain")
            assert data(missing, 404)["error"] == ("no server '127.0.0.1:1' in upstream pool 'app'")
            wrong = await admin(app, "GET", f"/api/upstreams/app/servers/{server}/drain")
            assert data(wrong, 405)["status"] == 405
            assert wrong.header("Allow") == "POST"
            bad = await admin(app, "PUT", f"/api/upstreams/app/servers/{server}/weight", b"{")
            assert data(bad, 400)["error"].startswith("invalid JSON body")
            assert data(await admin(app, "GET", "/api/nothing"), 404)["status"] == 404


# -- cache ----------------------------------------------------------------------------------------


def cacheable(request: Received) -> Reply:
    body = f"v{request.target.decode()}".encode()
    return Reply(headers=[(b"Cache-Control", b"max-age=60")], body=body)


async def test_purge_makes_the_next_request_a_miss() -> None:
    async with running_backends(cacheable) as backends:
        settings = make_settings(backends, admin=ADMIN, cache={"enabled": True})
        async with running_proxy(settings) as app:
            for target in ("/a?x=1", "/dir/1", "/dir/2", "/other"):
                assert "fwd=uri-miss" in (await proxy_get(app, target)).header("Cache-Status")
            assert "hit" in (await proxy_get(app, "/a?x=1")).header("Cache-Status")
            stats = data(await admin(app, "GET", "/api/cache/stats"))
            assert (stats["entries"], stats["hits"], stats["misses"]) == (4, 1, 4)
            assert stats["hit_ratio"] == pytest.approx(0.2)

            purge = await admin(app, "POST", "/api/cache/purge", {"url": "http://test.local/a?x=1"})
            assert data(purge) == {"purged": 1}
            assert "fwd=uri-miss" in (await proxy_get(app, "/a?x=1")).header("Cache-Status")
            assert "hit" in (await proxy_get(app, "/dir/1")).header("Cache-Status")

            purge = await admin(
                app, "POST", "/api/cache/purge", {"prefix": "http://test.local/dir/"}
            )
            assert data(purge) == {"purged": 2}
            assert "fwd=uri-miss" in (await proxy_get(app, "/dir/2")).header("Cache-Status")
            assert "hit" in (await proxy_get(app, "/other")).header("Cache-Status")

            # Left: /a?x=1 and /dir/2 (fetched again) and /other.
            assert data(await admin(app, "POST", "/api/cache/purge", {"all": True})) == {
                "purged": 3
            }
            assert data(await admin(app, "GET", "/api/cache/stats"))["entries"] == 0
            assert "fwd=uri-miss" in (await proxy_get(app, "/other")).header("Cache-Status")


async def test_purge_removes_every_vary_variant() -> None:
    def varying(request: Received) -> Reply:
        language = request.header("Accept-Language") or "none"
        return Reply(
            headers=[(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept-Language")],
            body=language.encode(),
        )

    async with running_backends(varying) as backends:
        settings = make_settings(backends, admin=ADMIN, cache={"enabled": True})
        async with running_proxy(settings) as app:
            for language in ("en", "fr", "en"):
                headers = [("Host", "test.local"), ("Accept-Language", language)]
                await proxy_get(app, "/v", headers=headers)
            assert len(backends[0].requests) == 2
            purge = await admin(app, "POST", "/api/cache/purge", {"url": "http://test.local/v"})
            assert data(purge) == {"purged": 2}
            await proxy_get(app, "/v", headers=[("Host", "test.local"), ("Accept-Language", "fr")])
            assert len(backends[0].requests) == 3


async def test_cache_endpoints_are_404_without_a_cache() -> None:
    async with running_backends(count=1) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            assert data(await admin(app, "GET", "/api/cache/stats"), 404) == {
                "status": 404,
                "error": "the cache is disabled",
            }
            purge = await admin(app, "POST", "/api/cache/purge", {"all": True})
            assert data(purge, 404)["error"] == "the cache is disabled"


# -- the HTTP server's limits ---------------------------------------------------------------------


async def raw_exchange(address: Address, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes."""
    client = await Client.connect(address)
    try:
        await client.send(data)
        chunks = []
        async with asyncio.timeout(5):
            while chunk := await client.reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (
            b"POST /api/cache/purge HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1),
            413,
        ),
        (
            b"POST /api/cache/purge HTTP/1.1\r\nHost: localhost\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n"
            % (MAX_BODY_BYTES + 1, b"x" * (MAX_BODY_BYTES + 1)),
            413,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: localhost\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            400,
        ),
    ],
)
async def test_bad_requests_get_an_error_and_the_connection_closes(
    payload: bytes, status: int
) -> None:
    async with running_backends(count=1) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            answer = await raw_exchange(admin_address(app), payload)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d " % status), head
            assert json.loads(body)["status"] == status


async def test_a_request_that_never_completes_times_out() -> None:
    async with running_backends(count=1) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            (service,) = [s for s in app.services if isinstance(s, AdminService)]
            assert service.http is not None
            service.http.request_timeout = 0.2
            answer = await raw_exchange(admin_address(app), b"GET /api/status HTTP/1.1\r\n")
            assert answer.startswith(b"HTTP/1.1 408 ")


async def test_a_half_closed_client_still_gets_its_answer() -> None:
    async with running_backends(count=1) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            address = admin_address(app)
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(b"GET /api/status HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(5):
                answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 ")


async def test_the_admin_port_answers_while_the_proxy_is_busy() -> None:
    release = asyncio.Event()

    async def stuck(request: Received) -> Reply:
        await release.wait()
        return Reply(body=b"late")

    async with running_backends(stuck) as backends:
        async with running_proxy(make_settings(backends, admin=ADMIN)) as app:
            pending = [asyncio.ensure_future(proxy_get(app, f"/{i}")) for i in range(5)]
            try:
                async with asyncio.timeout(5):
                    while len(backends[0].requests) < 5:
                        backends[0].request_event.clear()
                        await backends[0].request_event.wait()
                status = data(await admin(app, "GET", "/api/status"))
                assert status["in_flight"] == 5
                assert status["pools"][0]["servers"][0]["in_flight"] == 5
                metrics = (await admin(app, "GET", "/metrics")).body.decode()
                assert "pibl_upstream_in_flight{" in metrics
            finally:
                release.set()
                await asyncio.gather(*pending)
