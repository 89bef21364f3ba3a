"""The admin API's routing, authentication, validation and handlers, called without sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pibl.accesslog import AccessRecord
from pibl.admin.api import AdminApi, is_loopback_host, load_static
from pibl.admin.http import AdminRequest, AdminResponse, split_path
from pibl.admin.stats import ProxyStats
from pibl.admin.status import REDACTED, redact
from pibl.balancer.upstream import Address
from pibl.cache.key import key_from_url
from pibl.cache.policy import StoredResponse
from pibl.config import Settings
from pibl.http.head import RequestHead
from pibl.server.app import ProxyApp
from tests.support import make_settings

SERVERS = [Address("127.0.0.1", 9001), Address("127.0.0.1", 9002)]
A, B = (str(s) for s in SERVERS)


def make_api(settings: Settings | None = None, *, token: str | None = None) -> AdminApi:
    app = ProxyApp(settings or make_settings(SERVERS))
    return AdminApi(app, ProxyStats(), token=token, uptime=lambda: 12.5)


async def call(
    api: AdminApi,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> AdminResponse:
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    request = AdminRequest(
        method, path, headers={"host": "localhost:9901", **(headers or {})}, body=raw
    )
    return await api.handle(request)


def payload(response: AdminResponse) -> Any:
    assert response.content_type == "application/json"
    return json.loads(response.body)


def assert_error(response: AdminResponse, status: int, fragment: str) -> None:
    assert response.status == status
    data = payload(response)
    assert data["status"] == status
    assert fragment in data["error"], data


# -- routing and errors ---------------------------------------------------------------------------


async def test_unknown_endpoint_is_a_json_404() -> None:
    api = make_api()
    assert_error(await call(api, "GET", "/api/nope"), 404, "no such endpoint: /api/nope")
    assert_error(await call(api, "GET", "/api/status/extra"), 404, "no such endpoint")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/api/status", "GET, HEAD"),
        ("DELETE", "/api/config", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("GET", "/api/cache/purge", "POST"),
        ("GET", f"/api/upstreams/app/servers/{A}/drain", "POST"),
        ("PUT", f"/api/upstreams/app/servers/{A}/enable", "POST"),
        ("POST", f"/api/upstreams/app/servers/{A}/weight", "PUT"),
        ("POST", "/", "GET, HEAD"),
    ],
)
async def test_wrong_method_is_405_with_allow(method: str, path: str, allowed: str) -> None:
    response = await call(make_api(), method, path)
    assert_error(response, 405, f"{method} is not allowed here")
    assert ("Allow", allowed) in response.headers


async def test_head_is_answered_like_get() -> None:
    response = await call(make_api(), "HEAD", "/api/status")
    assert response.status == 200
    assert payload(response)["version"]
    assert response.to_bytes(head_only=True).endswith(b"\r\n\r\n")


def test_split_path_decodes_each_segment() -> None:
    assert split_path("/") == []
    assert split_path("/api/upstreams/a%2Fb/servers/%5B%3A%3A1%5D%3A80/drain") == [
        "api",
        "upstreams",
        "a/b",
        "servers",
        "[::1]:80",
        "drain",
    ]


# -- authentication and browser guards -------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", "Basic c2VjcmV0", "Bearer secret2", "bearer secre"],
)
async def test_token_is_required_on_every_api_call(authorization: str | None) -> None:
    api = make_api(token="secret")
    headers = {} if authorization is None else {"authorization": authorization}
    for method, path in [
        ("GET", "/api/status"),
        ("GET", "/api/config"),
        ("GET", "/metrics"),
        ("GET", "/api/cache/stats"),
        ("POST", "/api/cache/purge"),
        ("POST", f"/api/upstreams/app/servers/{A}/drain"),
        ("PUT", f"/api/upstreams/app/servers/{A}/weight"),
        ("GET", "/api/nope"),  # no hint about which endpoints exist
    ]:
        response = await call(api, method, path, headers=headers)
        assert_error(response, 401, "missing or wrong bearer token")
        assert ("WWW-Authenticate", 'Bearer realm="pibl-admin"') in response.headers
    assert not api.app.groups["app"].upstreams[0].drained


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_right_token_is_accepted(scheme: str) -> None:
    api = make_api(token="secret")
    response = await call(api, "GET", "/api/status", headers={"authorization": f"{scheme} secret"})
    assert response.status == 200


async def test_dashboard_files_need_no_token() -> None:
    api = make_api(token="secret")
    page = await call(api, "GET", "/")
    assert page.status == 200
    assert page.content_type == "text/html; charset=utf-8"
    assert b"/static/dashboard.js" in page.body
    script = await call(api, "GET", "/static/dashboard.js")
    assert script.status == 200
    assert "javascript" in script.content_type
    assert b"/api/status" in script.body


async def test_dashboard_page_is_locked_down() -> None:
    headers = dict((await call(make_api(), "GET", "/")).headers)
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Frame-Options"] == "DENY"


async def test_static_files_outside_the_package_are_not_served() -> None:
    api = make_api()
    for path in ["/static/../api.py", "/static/%2E%2E/api.py", "/static/nope.js", "/static"]:
        assert (await call(api, "GET", path)).status == 404, path


def test_static_files_ship_in_the_package() -> None:
    files = load_static()
    assert {"index.html", "dashboard.js", "dashboard.css"} <= set(files)
    assert files["dashboard.css"][1] == "text/css; charset=utf-8"


async def test_cross_origin_requests_are_refused() -> None:
    api = make_api()
    response = await call(
        api,
        "POST",
        f"/api/upstreams/app/servers/{A}/drain",
        headers={"origin": "http://evil.example"},
    )
    assert_error(response, 403, "cross-origin")
    assert not api.app.groups["app"].upstreams[0].drained
    same = await call(api, "GET", "/api/status", headers={"origin": "http://localhost:9901"})
    assert same.status == 200


async def test_loopback_listener_without_token_only_answers_loopback_names() -> None:
    api = make_api()
    response = await call(api, "GET", "/api/config", headers={"host": "rebound.example:9901"})
    assert_error(response, 403, "only answers Host: localhost")
    for host in ["localhost:9901", "127.0.0.1:9901", "[::1]:9901", "LOCALHOST"]:
        assert (await call(api, "GET", "/api/status", headers={"host": host})).status == 200
    # With a token, the token is the protection and any Host is fine (a public listener).
    guarded = make_api(token="t")
    response = await call(
        guarded,
        "GET",
        "/api/status",
        headers={"host": "proxy.example:9901", "authorization": "Bearer t"},
    )
    assert response.status == 200


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("localhost:1", True),
        ("127.9.9.9:80", True),
        ("[::1]:80", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback_host(host: str, expected: bool) -> None:
    assert is_loopback_host(host) is expected


# -- status and config ----------------------------------------------------------------------------


async def test_status_lists_pools_and_servers() -> None:
    api = make_api()
    rec = AccessRecord()
    rec.route, rec.upstream_addr, rec.status, rec.upstream_time = "app", A, 200, 0.004
    api.stats.observe(rec)
    api.app.groups["app"].upstreams[0].requests = 1
    data = payload(await call(api, "GET", "/api/status"))
    assert data["version"]
    assert data["uptime"] == 12.5
    assert data["workers"] == 1
    assert data["requests"] == 1
    assert data["cache"] is None
    (pool,) = data["pools"]
    assert pool["name"] == "app"
    assert pool["balance"] == "round_robin"
    first, second = pool["servers"]
    assert first["address"] == A
    assert second["address"] == B
    assert first["state"] == "up"
    assert first["available"] is True
    assert first["drained"] is False
    assert first["health"]["is_available"] is True
    assert first["requests"] == 1
    assert first["responses"] == {"2xx": 1}
    assert first["latency"]["p50"] == first["latency"]["p99"] == 0.004
    assert first["latency"]["samples"] == 1
    assert second["latency"] == {"ewma": None, "p50": None, "p99": None, "samples": 0}
    assert first["connections"] == {"active": 0, "idle": 0}


async def test_config_is_the_effective_settings_with_secrets_redacted() -> None:
    settings = make_settings(
        SERVERS,
        admin={"listen": "127.0.0.1:0", "token": "tok3n"},
        cache={"storage": "redis", "redis_url": "redis://cache:pa55word@redis.local:6379/0"},
    )
    api = make_api(settings, token="tok3n")
    data = payload(await call(api, "GET", "/api/config", headers={"authorization": "Bearer tok3n"}))
    assert data["admin"] == {"listen": "127.0.0.1:0", "token": REDACTED}
    assert data["cache"]["redis_url"] == f"redis://cache:{REDACTED}@redis.local:6379/0"
    assert data["upstreams"]["app"]["servers"][0]["address"] == A
    assert "tok3n" not in json.dumps(data)
    assert "pa55word" not in json.dumps(data)


def test_redact_handles_nesting_and_leaves_plain_urls() -> None:
    data = {
        "a": [{"password": "x", "url": "rediss://:only-pw@h:1"}],
        "token": "",
        "url": "http://h/p",
        "n": 3,
    }
    assert redact(data) == {
        "a": [{"password": REDACTED, "url": f"rediss://:{REDACTED}@h:1"}],
        "token": "",
        "url": "http://h/p",
        "n": 3,
    }


# -- drain, enable, weight ------------------------------------------------------------------------


async def test_drain_and_enable_switch_the_server_out_and_back() -> None:
    api = make_api()
    group = api.app.groups["app"]
    first = group.upstreams[0]
    response = await call(api, "POST", f"/api/upstreams/app/servers/{A}/drain")
    data = payload(response)
    assert response.status == 200
    assert data["address"] == A
    assert data["drained"] is True
    assert data["state"] == "drained"
    assert data["available"] is False
    assert first.drained is True
    head = RequestHead("GET", b"/", "1.1", [(b"host", b"x")])
    assert {group.select(head) for _ in range(6)} == {group.upstreams[1]}
    again = await call(api, "POST", f"/api/upstreams/app/servers/{A}/drain")  # idempotent
    assert payload(again)["drained"] is True
    data = payload(await call(api, "POST", f"/api/upstreams/app/servers/{A}/enable"))
    assert data["drained"] is False
    assert data["state"] == "up"
    assert {group.select(head) for _ in range(6)} == set(group.upstreams)


async def test_every_server_drained_leaves_nothing_to_select() -> None:
    api = make_api()
    for server in (A, B):
        await call(api, "POST", f"/api/upstreams/app/servers/{server}/drain")
    head = RequestHead("GET", b"/", "1.1", [(b"host", b"x")])
    assert api.app.groups["app"].select(head) is None


async def test_servers_are_found_by_normalised_address() -> None:
    settings = make_settings([Address("::1", 9001), Address("localhost", 9002)])
    api = make_api(settings)
    for path in [
        "/api/upstreams/app/servers/%5B%3A%3A1%5D%3A9001/drain",
        "/api/upstreams/app/servers/[::1]:9001",
        "/api/upstreams/app/servers/[0:0::1]:9001",
        "/api/upstreams/app/servers/LOCALHOST:9002",
    ]:
        method = "POST" if path.endswith("drain") else "GET"
        assert (await call(api, method, path)).status == 200, path


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        (f"/api/upstreams/nope/servers/{A}/drain", "unknown upstream pool 'nope'"),
        ("/api/upstreams/app/servers/127.0.0.1:1/drain", "no server '127.0.0.1:1' in upstream"),
        ("/api/upstreams/app/servers/garbage/enable", "no server 'garbage'"),
    ],
)
async def test_unknown_pool_or_server_is_404(path: str, fragment: str) -> None:
    assert_error(await call(make_api(), "POST", path), 404, fragment)


async def test_weight_is_set_live() -> None:
    api = make_api(make_settings(SERVERS, upstream={"balance": "weighted_round_robin"}))
    group = api.app.groups["app"]
    response = await call(api, "PUT", f"/api/upstreams/app/servers/{B}/weight", {"weight": 3})
    assert payload(response)["weight"] == 3
    assert group.upstreams[1].weight == 3
    head = RequestHead("GET", b"/", "1.1", [(b"host", b"x")])
    picks = [group.select(head) for _ in range(8)]
    assert picks.count(group.upstreams[1]) == 6


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{", 400, "invalid JSON body"),
        (b"\xff\xfe", 400, "invalid JSON body"),
        (b"", 400, "expected a JSON object body"),
        ([3], 400, "expected a JSON object body"),
        ({}, 400, 'expected {"weight": N}'),
        ({"weight": 2, "extra": 1}, 400, 'expected {"weight": N}'),
        ({"weight": 0}, 400, "weight must be an integer from 1 to 1000, got 0"),
        ({"weight": 1001}, 400, "got 1001"),
        ({"weight": -1}, 400, "got -1"),
        ({"weight": 2.5}, 400, "got 2.5"),
        ({"weight": True}, 400, "got True"),
        ({"weight": "3"}, 400, "got '3'"),
    ],
)
async def test_bad_weight_bodies_are_400(body: Any, status: int, fragment: str) -> None:
    api = make_api()
    response = await call(api, "PUT", f"/api/upstreams/app/servers/{A}/weight", body)
    assert_error(response, status, fragment)
    assert api.app.groups["app"].upstreams[0].weight == 1


@pytest.mark.parametrize("weight", [1, 1000])
async def test_weight_limits_are_inclusive(weight: int) -> None:
    api = make_api()
    response = await call(api, "PUT", f"/api/upstreams/app/servers/{A}/weight", {"weight": weight})
    assert response.status == 200
    assert api.app.groups["app"].upstreams[0].weight == weight


# -- cache ----------------------------------------------------------------------------------------


async def test_cache_endpoints_are_404_when_the_cache_is_off() -> None:
    api = make_api()
    assert_error(await call(api, "GET", "/api/cache/stats"), 404, "the cache is disabled")
    assert_error(await call(api, "POST", "/api/cache/purge", {"all": True}), 404, "disabled")


def cached_api() -> AdminApi:
    return make_api(make_settings(SERVERS, cache={"enabled": True}))


async def store(api: AdminApi, url: str, accept: str = "") -> None:
    cache = api.app.cache
    assert cache is not None
    key = key_from_url(url)
    meta = StoredResponse(
        key=key,
        status=200,
        reason=b"OK",
        headers=[(b"cache-control", b"max-age=60"), (b"vary", b"accept")],
        request_time=0.0,
        response_time=0.0,
        vary=(("accept", accept),) if accept else (),
    )
    writer = cache.storage.open_writer(meta)
    writer.write(b"body")
    await writer.commit()


async def test_cache_stats() -> None:
    api = cached_api()
    assert api.app.cache is not None
    api.app.cache.hits, api.app.cache.misses, api.app.cache.stale = 6, 3, 1
    await store(api, "http://h/a")
    data = payload(await call(api, "GET", "/api/cache/stats"))
    assert data["storage"] == "memory"
    assert data["entries"] == 1
    assert data["bytes"] > 0
    assert (data["hits"], data["misses"], data["stale"]) == (6, 3, 1)
    assert data["hit_ratio"] == pytest.approx(0.7)


async def test_purge_url_removes_every_variant() -> None:
    api = cached_api()
    await store(api, "http://h/a?q=1", "text/html")
    await store(api, "http://h/a?q=1", "application/json")
    await store(api, "http://h/b")
    response = await call(api, "POST", "/api/cache/purge", {"url": "http://H:80/a?q=1"})
    assert payload(response) == {"purged": 2}
    assert await stored(api, ["http://h/a?q=1", "http://h/b"]) == ["http://h/b"]
    again = await call(api, "POST", "/api/cache/purge", {"url": "http://h/a?q=1"})
    assert payload(again) == {"purged": 0}


async def test_purge_prefix_and_all() -> None:
    api = cached_api()
    urls = ["http://h/img/1", "http://h/img/2", "http://h/imgs", "http://other/img/3"]
    for url in urls:
        await store(api, url)
    response = await call(api, "POST", "/api/cache/purge", {"prefix": "http://h/img/"})
    assert payload(response) == {"purged": 2}
    assert await stored(api, urls) == ["http://h/imgs", "http://other/img/3"]
    response = await call(api, "POST", "/api/cache/purge", {"all": True})
    assert payload(response) == {"purged": 2}
    assert await stored(api, urls) == []


async def stored(api: AdminApi, urls: list[str]) -> list[str]:
    """Those of ``urls`` that have at least one stored variant."""
    cache = api.app.cache
    assert cache is not None
    return [url for url in urls if await cache.storage.lookup(key_from_url(url))]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, 'expected {"url": "http://host/path"}'),
        ({"url": "http://h/a", "all": True}, 'expected {"url"'),
        ({"all": False}, 'expected {"url"'),
        ({"all": 1}, 'expected {"url"'),
        ({"url": 5}, 'expected {"url"'),
        ({"url": "/relative"}, "url: not an absolute URL"),
        ({"prefix": "h/img"}, "prefix: not an absolute URL"),
        ({"everything": True}, 'expected {"url"'),
        (b"not json", "invalid JSON body"),
        (["http://h/a"], "expected a JSON object body"),
    ],
)
async def test_bad_purge_bodies_are_400(body: Any, fragment: str) -> None:
    api = cached_api()
    await store(api, "http://h/a")
    assert_error(await call(api, "POST", "/api/cache/purge", body), 400, fragment)
    assert await stored(api, ["http://h/a"]) == ["http://h/a"]


# -- metrics --------------------------------------------------------------------------------------


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    api = make_api()
    rec = AccessRecord()
    rec.route, rec.upstream_addr, rec.status, rec.upstream_time = "app", A, 200, 0.004
    api.stats.observe(rec)
    response = await call(api, "GET", "/metrics")
    assert response.status == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
    samples = families["pibl_requests"].samples
    assert [(s.labels, s.value) for s in samples] == [
        ({"route": "app", "server": A, "status_class": "2xx"}, 1.0)
    ]
