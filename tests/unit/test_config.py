"""Tests for pibl.config: TOML loading, defaults, error messages and the value parsers."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.balancer.upstream import Address
from pibl.config import (
    BALANCE_NAMES,
    AccessLogSettings,
    CacheSettings,
    HealthSettings,
    LogSettings,
    RouteSettings,
    ServerEntry,
    ServerSettings,
    Settings,
    UpstreamSettings,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
    parse_size,
    quick_settings,
    settings_to_dict,
)
from pibl.errors import ConfigError

FULL = """
[server]
listen = ["127.0.0.1:8080", "[::1]:8443"]
workers = 4
trusted_proxies = ["10.0.0.0/8", "::1"]
connect_timeout = "500ms"
read_timeout = 30
send_timeout = 2.5
client_header_timeout = "1m30s"
client_body_timeout = "2m"
keepalive_timeout = 0
shutdown_timeout = "1h"
max_request_line = "4KiB"
max_header_size = "32k"
max_header_count = 50
max_body_size = "10MB"
max_connections = 1000

[upstreams.app]
servers = ["127.0.0.1:9001", { address = "backend.local:9002", weight = 3, max_connections = 10 }]
balance = "consistent_hash"
hash_key = "header:X-User"
keepalive = 0
keepalive_timeout = "10s"
retries = 1

[upstreams.app.health]
path = "/healthz"
interval = "10s"
timeout = "1s"
expect_status = [204, 200]
rise = 1
fall = 5

[upstreams.static]
servers = ["[::1]:9100"]

[[routes]]
host = "*.Example.com"
path_prefix = "/api"
upstream = "app"
cache = false

[[routes]]
upstream = "static"

[access_log]
enabled = false
path = "/var/log/pibl.log"
format = "json"

[cache]
enabled = true
storage = "disk"
path = "/var/cache/pibl"
max_size = "1GiB"
max_object_size = "1MiB"
default_ttl = "5m"

[log]
level = "DEBUG"
"""

MINIMAL = """
[server]
listen = "127.0.0.1:8080"

[upstreams.app]
servers = ["127.0.0.1:9001"]
"""


def write(tmp_path: Path, text: str, name: str = "pibl.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def minimal(**sections: Any) -> dict[str, Any]:
    """A valid config dict; ``server`` is merged into the minimal one, other sections replace."""
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:8080"},
        "upstreams": {"app": {"servers": ["127.0.0.1:9001"]}},
    }
    for name, value in sections.items():
        if name == "server" and isinstance(value, dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return data


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "pibl.toml")
    message = str(info.value)
    assert message.startswith("pibl.toml: ")
    return message


# --------------------------------------------------------------------------- loading


def test_full_file_loads_typed_values(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    settings = load_config(path)

    assert settings.source == str(path)
    server = settings.server
    assert server.listen == (Address("127.0.0.1", 8080), Address("::1", 8443))
    assert server.workers == 4
    assert server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert server.connect_timeout == 0.5
    assert server.read_timeout == 30.0
    assert isinstance(server.read_timeout, float)
    assert server.send_timeout == 2.5
    assert server.client_header_timeout == 90.0
    assert server.client_body_timeout == 120.0
    assert server.keepalive_timeout == 0.0
    assert server.shutdown_timeout == 3600.0
    assert server.max_request_line == 4096
    assert server.max_header_size == 32 * 1024
    assert server.max_header_count == 50
    assert server.max_body_size == 10_000_000
    assert server.max_connections == 1000

    assert list(settings.upstreams) == ["app", "static"]
    app = settings.upstreams["app"]
    assert app == UpstreamSettings(
        name="app",
        servers=(
            ServerEntry(Address("127.0.0.1", 9001)),
            ServerEntry(Address("backend.local", 9002), weight=3, max_connections=10),
        ),
        balance="consistent_hash",
        hash_key="header:x-user",
        keepalive=0,
        keepalive_timeout=10.0,
        retries=1,
        health=HealthSettings(
            path="/healthz", interval=10.0, timeout=1.0, expect_status=(200, 204), rise=1, fall=5
        ),
    )
    static = settings.upstreams["static"]
    assert static.servers == (ServerEntry(Address("::1", 9100)),)
    assert static.health is None
    assert settings.routes == (
        RouteSettings(upstream="app", host="*.example.com", path_prefix="/api", cache=False),
        RouteSettings(upstream="static"),
    )
    assert settings.access_log == AccessLogSettings(
        enabled=False, path="/var/log/pibl.log", format="json"
    )
    assert settings.cache == CacheSettings(
        enabled=True,
        storage="disk",
        path="/var/cache/pibl",
        max_size=1024**3,
        max_object_size=1024**2,
        default_ttl=300.0,
        redis_url="",
    )
    assert settings.log == LogSettings(level="debug")
    assert settings.default_upstream is None


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, MINIMAL))

    assert settings.server == ServerSettings(listen=(Address("127.0.0.1", 8080),))
    server = settings.server
    assert server.workers == 1
    assert server.trusted_proxies == ()
    assert (server.connect_timeout, server.read_timeout, server.send_timeout) == (5, 60, 60)
    assert (server.client_header_timeout, server.client_body_timeout) == (60, 60)
    assert (server.keepalive_timeout, server.shutdown_timeout) == (75, 30)
    assert (server.max_request_line, server.max_header_size) == (8192, 16384)
    assert (server.max_header_count, server.max_body_size, server.max_connections) == (100, 0, 0)
    app = settings.upstreams["app"]
    assert app == UpstreamSettings(name="app", servers=(ServerEntry(Address("127.0.0.1", 9001)),))
    assert (app.balance, app.hash_key, app.keepalive, app.keepalive_timeout, app.retries) == (
        "round_robin",
        "client_ip",
        128,
        60.0,
        2,
    )
    assert settings.routes == ()
    assert settings.default_upstream == "app"
    assert settings.access_log == AccessLogSettings(enabled=True, path="-", format="combined")
    assert settings.cache == CacheSettings(
        enabled=False,
        storage="memory",
        path="",
        max_size=256 * 1024**2,
        max_object_size=8 * 1024**2,
        default_ttl=0.0,
        redis_url="",
    )
    assert settings.log == LogSettings(level="info")


def test_dataclasses_are_frozen_and_constructible_with_defaults() -> None:
    server = ServerSettings(listen=(Address("127.0.0.1", 0),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        server.workers = 2  # type: ignore[misc]
    assert not hasattr(server, "__dict__")  # slots
    for cls in (
        ServerSettings,
        HealthSettings,
        UpstreamSettings,
        AccessLogSettings,
        CacheSettings,
        LogSettings,
        Settings,
    ):
        cls()
    assert RouteSettings("app") == RouteSettings(upstream="app", cache=True)
    assert ServerEntry(Address("a", 1)).weight == 1


def test_empty_health_table_enables_checks_with_defaults() -> None:
    data = minimal(upstreams={"app": {"servers": ["127.0.0.1:9001"], "health": {}}})
    health = parse_config(data).upstreams["app"].health
    assert health == HealthSettings()
    assert health is not None
    assert health.expect_status is None
    assert health.accepts(200)
    assert health.accepts(399)
    assert not health.accepts(404)
    assert HealthSettings(expect_status=(204,)).accepts(204)
    assert not HealthSettings(expect_status=(204,)).accepts(200)


def test_several_upstreams_without_routes_use_default() -> None:
    data = minimal(
        upstreams={"default": {"servers": ["127.0.0.1:1"]}, "other": {"servers": ["127.0.0.1:2"]}}
    )
    assert parse_config(data).default_upstream == "default"


def test_workers_auto_is_resolved() -> None:
    settings = parse_config(minimal(server={"workers": "auto"}))
    assert settings.server.workers >= 1


@pytest.mark.parametrize("storage", ["memory", "disk", "redis"])
def test_cache_storage_with_its_requirements(storage: str) -> None:
    cache = {"storage": storage, "path": "/tmp/c", "redis_url": "redis://localhost:6379/0"}
    assert parse_config(minimal(cache=cache)).cache.storage == storage


def test_settings_to_dict_round_trips(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, FULL))
    data = settings_to_dict(settings)

    assert data["server"]["listen"] == ["127.0.0.1:8080", "[::1]:8443"]
    assert data["server"]["trusted_proxies"] == ["10.0.0.0/8", "::1/128"]
    assert data["upstreams"]["app"]["servers"][1] == {
        "address": "backend.local:9002",
        "weight": 3,
        "max_connections": 10,
    }
    assert "name" not in data["upstreams"]["app"]
    assert "health" not in data["upstreams"]["static"]
    assert data["routes"][1] == {"upstream": "static", "cache": True}
    assert "source" not in data
    assert parse_config(data, settings.source or "") == settings


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        pytest.param(
            minimal(server={"lisen": "x"}),
            "server.lisen",
            'unknown key; did you mean "listen"?',
            id="unknown-key-suggestion",
        ),
        pytest.param(
            minimal(server={"zzz": 1}), "server.zzz", "known keys: listen, workers", id="unknown"
        ),
        pytest.param(
            minimal(upstream={}), "upstream", 'did you mean "upstreams"?', id="unknown-section"
        ),
        pytest.param(
            minimal(upstreams={"app": {"servers": ["127.0.0.1:9001"], "balanse": "random_two"}}),
            "upstreams.app.balanse",
            'did you mean "balance"?',
            id="unknown-upstream-key",
        ),
        pytest.param(
            minimal(server={"workers": "2"}),
            "server.workers",
            'expected a positive integer or "auto", got "2"',
            id="wrong-type",
        ),
        pytest.param(
            minimal(server={"max_header_count": True}),
            "server.max_header_count",
            "expected a positive integer, got true",
            id="bool-is-not-int",
        ),
        pytest.param(
            minimal(server={"listen": ":8080"}),
            "server.listen",
            'got ":8080" (missing host',
            id="address-without-host",
        ),
        pytest.param(
            minimal(server={"listen": ["127.0.0.1:80", "nohost"]}),
            "server.listen[1]",
            'missing ":port"',
            id="bad-address-in-list",
        ),
        pytest.param(
            minimal(server={"listen": "127.0.0.1:70000"}),
            "server.listen",
            'port must be 0-65535, got "70000"',
            id="bad-port",
        ),
        pytest.param(
            minimal(server={"listen": []}), "server.listen", "at least one", id="no-listen"
        ),
        pytest.param({"upstreams": {}}, "server.listen", "missing", id="listen-required"),
        pytest.param(
            minimal(server={"max_body_size": "12XB"}),
            "server.max_body_size",
            'got "12XB" (unknown unit "XB"',
            id="bad-size",
        ),
        pytest.param(
            minimal(server={"max_header_size": 0}),
            "server.max_header_size",
            "expected a positive size",
            id="zero-size",
        ),
        pytest.param(
            minimal(server={"read_timeout": "10 minutes"}),
            "server.read_timeout",
            'expected a positive duration (seconds, or a string like "500ms"',
            id="bad-duration",
        ),
        pytest.param(
            minimal(server={"connect_timeout": -1}),
            "server.connect_timeout",
            "got -1",
            id="negative-duration",
        ),
        pytest.param(
            minimal(server={"connect_timeout": float("nan")}),
            "server.connect_timeout",
            "got nan",
            id="nan-duration",
        ),
        pytest.param(
            minimal(server={"trusted_proxies": ["10.0.0.1/8"]}),
            "server.trusted_proxies[0]",
            'did you mean "10.0.0.0/8"?',
            id="bad-cidr",
        ),
        pytest.param(
            minimal(upstreams={"app": {"servers": ["127.0.0.1:9001"], "balance": "round-robin"}}),
            "upstreams.app.balance",
            'got "round-robin" (did you mean "round_robin"?)',
            id="unknown-balance",
        ),
        pytest.param(
            minimal(upstreams={"app": {"servers": ["127.0.0.1:9001"], "hash_key": "header:"}}),
            "upstreams.app.hash_key",
            'expected one of "client_ip", "uri", "header:NAME", "cookie:NAME", got "header:"',
            id="bad-hash-key",
        ),
        pytest.param(
            minimal(
                upstreams={"app": {"servers": ["127.0.0.1:1", {"address": "b:2", "weight": "x"}]}}
            ),
            "upstreams.app.servers[1].weight",
            'expected a positive integer, got "x"',
            id="bad-weight",
        ),
        pytest.param(
            minimal(upstreams={"app": {"servers": [{"weight": 2}]}}),
            "upstreams.app.servers[0].address",
            "missing",
            id="server-without-address",
        ),
        pytest.param(
            minimal(upstreams={"app": {"servers": [42]}}),
            "upstreams.app.servers[0]",
            "expected an address string or a table",
            id="server-wrong-type",
        ),
        pytest.param(
            minimal(upstreams={"app": {"servers": []}}),
            "upstreams.app.servers",
            "at least one server",
            id="empty-servers",
        ),
        pytest.param(
            minimal(upstreams={"app": {"balance": "random_two"}}),
            "upstreams.app.servers",
            "missing",
            id="no-servers",
        ),
        pytest.param(
            minimal(
                upstreams={"app": {"servers": ["127.0.0.1:1", "b:2", {"address": "127.0.0.1:1"}]}}
            ),
            "upstreams.app.servers[2]",
            "duplicate address 127.0.0.1:1, already at servers[0]",
            id="duplicate-server",
        ),
        pytest.param(
            minimal(upstreams={"app": {"servers": ["[::1]:1", "[0::0:1]:1"]}}),
            "upstreams.app.servers[1]",
            "duplicate address [::1]:1",
            id="duplicate-normalised-ipv6",
        ),
        pytest.param(minimal(upstreams={}), "upstreams", "at least one", id="no-upstreams"),
        pytest.param(
            minimal(upstreams={"a b": {"servers": ["x:1"]}}),
            'upstreams."a b"',
            "invalid name",
            id="bad-upstream-name",
        ),
        pytest.param(
            minimal(upstreams={"app": {"servers": ["x:1"], "health": {"expect_status": [99]}}}),
            "upstreams.app.health.expect_status[0]",
            "expected an HTTP status code (100-599), got 99",
            id="bad-status",
        ),
        pytest.param(
            minimal(upstreams={"app": {"servers": ["x:1"], "health": {"path": "health"}}}),
            "upstreams.app.health.path",
            'expected a path starting with "/"',
            id="bad-health-path",
        ),
        pytest.param(
            minimal(routes=[{"upstream": "ap"}]),
            "routes[0].upstream",
            'unknown upstream "ap"; did you mean "app"?',
            id="route-unknown-upstream",
        ),
        pytest.param(
            minimal(routes=[{"upstream": "app"}, {"upstream": "zzz"}]),
            "routes[1].upstream",
            'defined upstreams: "app"',
            id="route-unknown-upstream-no-hint",
        ),
        pytest.param(
            minimal(routes=[{"host": "example.com"}]),
            "routes[0].upstream",
            "missing",
            id="route-without-upstream",
        ),
        pytest.param(
            minimal(routes={"upstream": "app"}),
            "routes",
            "expected an array of tables ([[routes]]), got a table",
            id="routes-not-array",
        ),
        pytest.param(
            minimal(routes=[{"upstream": "app", "host": "bad host"}]),
            "routes[0].host",
            'expected a hostname, or "*.example.com"',
            id="bad-route-host",
        ),
        pytest.param(
            minimal(upstreams={"a": {"servers": ["x:1"]}, "b": {"servers": ["x:2"]}}),
            "routes",
            'with several upstreams ("a", "b") [[routes]] are needed',
            id="several-upstreams-need-routes",
        ),
        pytest.param(
            minimal(cache={"storage": "disk"}),
            "cache.path",
            'required when storage = "disk"',
            id="disk-cache-needs-path",
        ),
        pytest.param(
            minimal(cache={"storage": "redis"}),
            "cache.redis_url",
            'required when storage = "redis"',
            id="redis-cache-needs-url",
        ),
        pytest.param(
            minimal(cache={"max_size": "1MiB", "max_object_size": "2MiB"}),
            "cache.max_object_size",
            "at most max_size",
            id="object-larger-than-cache",
        ),
        pytest.param(
            minimal(access_log={"format": "common"}),
            "access_log.format",
            'expected one of "combined", "json", got "common"',
            id="bad-log-format",
        ),
        pytest.param(
            minimal(log={"level": "warn"}),
            "log.level",
            'did you mean "warning"?',
            id="bad-level",
        ),
        pytest.param(
            minimal(server="127.0.0.1:80"),
            "server",
            "expected a table ([server])",
            id="section-not-table",
        ),
    ],
)
def test_errors_name_key_path_and_expectation(
    data: dict[str, Any], path: str, fragment: str
) -> None:
    message = config_error(data)
    assert message.startswith(f"pibl.toml: {path}: "), message
    assert fragment in message, message


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("servers", "server"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f'{path}: upstreams.app.server: unknown key; did you mean "servers"?'
    )


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:8080"\nworkers = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: file not found$"):
        load_config(path)


def test_directory_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[log]\nlevel = "\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not valid UTF-8"):
        load_config(bad)


def test_parse_config_default_source() -> None:
    with pytest.raises(ConfigError, match=r"^<config>: upstreams: "):
        parse_config({"server": {"listen": "127.0.0.1:1"}})
    with pytest.raises(ConfigError, match=r"^<config>: expected a table, got an array"):
        parse_config([])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- value parsers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("16KiB", 16384),
        ("256MiB", 256 * 1024**2),
        ("1GiB", 1024**3),
        ("1TiB", 1024**4),
        ("10MB", 10_000_000),
        ("1KB", 1000),
        ("2GB", 2_000_000_000),
        ("16k", 16384),
        ("16K", 16384),
        ("8m", 8 * 1024**2),
        ("1g", 1024**3),
        ("1.5KiB", 1536),
        (" 2 MiB ", 2 * 1024**2),
        ("16kib", 16384),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected a number"),
        ("   ", "expected a number"),
        ("-1", "expected a number"),
        ("KiB", "expected a number"),
        ("1.", "expected a number"),
        ("12XB", 'unknown unit "XB"'),
        ("1 2", "expected a number"),
        ("0.1B", "whole number of bytes"),
        ("1e3", "expected a number"),
        ("99999999999999999999GiB", "too large"),
        ("١٢", "expected a number"),  # non-ASCII digits
    ],
)
def test_parse_size_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid size") as info:
        parse_size(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0.0),
        ("30", 30.0),
        ("1.5", 1.5),
        ("500ms", 0.5),
        ("60s", 60.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1m30s", 90.0),
        ("1h 30m", 5400.0),
        ("1h1m1s1ms", 3661.001),
        ("0.5s", 0.5),
        (" 10s ", 10.0),
        ("0ms", 0.0),
    ],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("s", "unexpected"),
        ("-1s", "unexpected"),
        ("10x", 'unknown unit "x"'),
        ("10S", 'unknown unit "S"'),
        ("30s1m", "largest to smallest"),
        ("1m1m", "largest to smallest"),
        ("1m30", "needs a unit"),
        ("99999d", "too large"),
        ("1 minute", 'unknown unit "minute"'),
    ],
)
def test_parse_duration_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as info:
        parse_duration(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", Address("127.0.0.1", 8080)),
        ("0.0.0.0:1", Address("0.0.0.0", 1)),
        ("localhost:65535", Address("localhost", 65535)),
        ("Backend-1.Example.COM:80", Address("backend-1.example.com", 80)),
        ("example.com.:443", Address("example.com", 443)),
        ("my_service:9000", Address("my_service", 9000)),
        ("[::1]:8080", Address("::1", 8080)),
        ("[::]:80", Address("::", 80)),
        ("[2001:DB8:0:0::1]:80", Address("2001:db8::1", 80)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


def test_address_str_round_trips() -> None:
    for text in ("127.0.0.1:8080", "[::1]:8080", "example.com:80"):
        assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (":8080", "missing host"),
        ("localhost", 'missing ":port"'),
        ("localhost:", "missing port"),
        ("localhost:0", "port must be 1-65535"),
        ("localhost:65536", "port must be 1-65535"),
        ("localhost:http", "port must be 1-65535"),
        ("localhost:-1", "port must be 1-65535"),
        ("localhost:123456", "port must be 1-65535"),
        ("::1:8080", "needs brackets"),
        ("[::1]", 'missing ":port" after "]"'),
        ("[::1:80", 'missing "]"'),
        ("[nope]:80", "not a valid IPv6 address"),
        ("[127.0.0.1]:80", "not a valid IPv6 address"),
        ("256.0.0.1:80", "not a valid IPv4 address"),
        ("bad host:80", "not a valid IP address or hostname"),
        ("-bad:80", "not a valid IP address or hostname"),
        ("a..b:80", "not a valid IP address or hostname"),
        ("http://localhost:80", "without a scheme"),
        ("", 'missing ":port"'),
    ],
)
def test_parse_address_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid address") as info:
        parse_address(text)
    assert fragment in str(info.value)


@given(st.text())
def test_parse_size_only_raises_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_size(text) >= 0


@given(st.text())
def test_parse_duration_only_raises_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_duration(text) >= 0


@given(st.text())
def test_parse_address_only_raises_value_error(text: str) -> None:
    try:
        address = parse_address(text)
    except ValueError:
        return
    assert 1 <= address.port <= 65535
    assert parse_address(str(address)) == address


@given(st.integers(min_value=0, max_value=2**30), st.sampled_from(["", "k", "KiB", "MB", "g"]))
def test_parse_size_scales_integers(number: int, unit: str) -> None:
    factor = {"": 1, "k": 1024, "KiB": 1024, "MB": 1000**2, "g": 1024**3}[unit]
    assert parse_size(f"{number}{unit}") == number * factor


# --------------------------------------------------------------------------- quick_settings


def test_quick_settings() -> None:
    settings = quick_settings("0.0.0.0:8080", ["127.0.0.1:9001", "[::1]:9002"], "least_connections")
    assert settings.server.listen == (Address("0.0.0.0", 8080),)
    assert list(settings.upstreams) == ["default"]
    default = settings.upstreams["default"]
    assert default.name == "default"
    assert default.balance == "least_connections"
    assert [entry.address for entry in default.servers] == [
        Address("127.0.0.1", 9001),
        Address("::1", 9002),
    ]
    assert settings.routes == ()
    assert settings.default_upstream == "default"
    assert settings.cache == CacheSettings()
    assert quick_settings("127.0.0.1:1", ["127.0.0.1:2"]).upstreams["default"].balance == (
        "round_robin"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((":8080", ["127.0.0.1:1"]), "--listen: "),
        (("127.0.0.1:8080", []), "at least one --backend"),
        (("127.0.0.1:8080", ["127.0.0.1:1", "nope"]), "--backend: expected an address"),
        (("127.0.0.1:8080", ["127.0.0.1:1", "127.0.0.1:1"]), "given twice"),
        (("127.0.0.1:8080", ["127.0.0.1:1"], "fastest"), "--balance: expected one of"),
    ],
)
def test_quick_settings_errors(args: tuple[Any, ...], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        quick_settings(*args)
    assert fragment in str(info.value)


def test_balance_names() -> None:
    assert BALANCE_NAMES == (
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "random_two",
        "consistent_hash",
    )
    for name in BALANCE_NAMES:
        data = minimal(upstreams={"app": {"servers": ["127.0.0.1:1"], "balance": name}})
        assert parse_config(data).upstreams["app"].balance == name
