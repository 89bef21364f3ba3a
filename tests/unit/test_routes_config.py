"""``[[routes]]`` rules in the config: header conditions, strip_prefix, header edits,
max_body_size — what loads, and the errors that name the key path and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pibl.config import (
    HeaderEditSettings,
    RouteSettings,
    load_config,
    parse_config,
    settings_to_dict,
)
from pibl.errors import ConfigError
from pibl.proxy.routing import Route

FILE = """
[server]
listen = "127.0.0.1:8080"
max_body_size = "1MiB"

[upstreams.stable]
servers = ["127.0.0.1:9001"]

[upstreams.canary]
servers = ["127.0.0.1:9002"]

[[routes]]
host = "api.example.com"
path_prefix = "/api"
headers = { "X-Canary" = "1", "X-Debug" = "*" }
upstream = "canary"
strip_prefix = true
request_headers = { set = { "X-A" = "1" }, add = { "X-B" = "2" }, remove = ["X-C"] }
response_headers = { set = { "X-Frame-Options" = "DENY" }, remove = ["Server"] }
cache = false
max_body_size = "64KiB"

[[routes]]
upstream = "stable"
"""


def data(*routes: dict[str, Any], server: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:8080", **(server or {})},
        "upstreams": {"app": {"servers": ["127.0.0.1:9001"]}},
        "routes": list(routes),
    }


def app_route(**keys: Any) -> dict[str, Any]:
    return {"upstream": "app", **keys}


def config_error(config: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(config, "pibl.toml")
    return str(info.value)


# --------------------------------------------------------------------------- loading


def test_full_route_loads(tmp_path: Path) -> None:
    path = tmp_path / "pibl.toml"
    path.write_text(FILE)
    routes = load_config(path).routes
    assert routes[0] == RouteSettings(
        upstream="canary",
        host="api.example.com",
        path_prefix="/api",
        headers={"X-Canary": "1", "X-Debug": "*"},
        strip_prefix=True,
        request_headers=HeaderEditSettings(set={"X-A": "1"}, add={"X-B": "2"}, remove=("X-C",)),
        response_headers=HeaderEditSettings(set={"X-Frame-Options": "DENY"}, remove=("Server",)),
        cache=False,
        max_body_size=64 * 1024,
    )
    assert routes[1] == RouteSettings(upstream="stable")


def test_options_left_out_are_none_and_not_dumped() -> None:
    settings = parse_config(data(app_route()))
    route = settings.routes[0]
    assert (route.headers, route.strip_prefix, route.max_body_size) == (None, None, None)
    assert (route.request_headers, route.response_headers) == (None, None)
    assert settings_to_dict(settings)["routes"] == [{"upstream": "app", "cache": True}]


def test_round_trip_through_settings_to_dict(tmp_path: Path) -> None:
    path = tmp_path / "pibl.toml"
    path.write_text(FILE)
    settings = load_config(path)
    dumped = settings_to_dict(settings)
    assert dumped["routes"][0]["headers"] == {"X-Canary": "1", "X-Debug": "*"}
    assert dumped["routes"][0]["request_headers"]["remove"] == ["X-C"]
    assert parse_config(dumped, settings.source or "") == settings


def test_runtime_route_compiles_the_edits(tmp_path: Path) -> None:
    path = tmp_path / "pibl.toml"
    path.write_text(FILE)
    route = Route.from_settings(load_config(path).routes[0], "canary")
    assert route.headers == ((b"x-canary", b"1"), (b"x-debug", None))
    assert route.request_edits is not None
    assert route.request_edits.drop == {b"x-a", b"x-c"}
    assert route.request_edits.append == ((b"X-A", b"1"), (b"X-B", b"2"))
    assert route.response_edits is not None
    assert route.response_edits.drop == {b"x-frame-options", b"server"}
    assert (route.strip_prefix, route.max_body_size, route.cache) == (True, 65536, False)


def test_empty_edit_tables_compile_to_nothing() -> None:
    settings = parse_config(data(app_route(request_headers={}, response_headers={"set": {}})))
    route = Route.from_settings(settings.routes[0], "app")
    assert route.request_edits is None
    assert route.response_edits is None


def test_set_host_is_allowed_in_request_edits() -> None:
    settings = parse_config(data(app_route(request_headers={"set": {"Host": "backend.local"}})))
    assert settings.routes[0].request_headers == HeaderEditSettings(set={"Host": "backend.local"})


def test_forwarded_fields_and_via_may_be_edited() -> None:
    edits = {"set": {"X-Forwarded-Host": "public.example"}, "remove": ["Via"]}
    settings = parse_config(data(app_route(request_headers=edits)))
    assert settings.routes[0].request_headers is not None


def test_header_values_may_be_empty_or_contain_inner_spaces() -> None:
    route = app_route(headers={"X-A": ""}, response_headers={"add": {"X-B": "a b\tc"}})
    assert parse_config(data(route)).routes[0].headers == {"X-A": ""}


def test_max_body_size_without_a_server_limit_is_free() -> None:
    assert parse_config(data(app_route(max_body_size="10GiB"))).routes[0].max_body_size == 10 << 30


def test_max_body_size_equal_to_the_server_limit() -> None:
    config = data(app_route(max_body_size="1MiB"), server={"max_body_size": "1MiB"})
    assert parse_config(config).routes[0].max_body_size == 1 << 20


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("route", "path", "fragment"),
    [
        pytest.param(
            app_route(strip_prefx=True),
            "routes[0].strip_prefx",
            'unknown key; did you mean "strip_prefix"?',
            id="unknown-key-suggestion",
        ),
        pytest.param(
            app_route(header={"X-A": "1"}),
            "routes[0].header",
            'did you mean "headers"?',
            id="header-singular",
        ),
        pytest.param(
            app_route(strip_prefix=True),
            "routes[0].strip_prefix",
            "needs path_prefix",
            id="strip-prefix-without-path-prefix",
        ),
        pytest.param(
            app_route(path_prefix="/a", strip_prefix="yes"),
            "routes[0].strip_prefix",
            'expected true or false, got "yes"',
            id="strip-prefix-not-bool",
        ),
        pytest.param(
            app_route(headers=["X-Canary"]),
            "routes[0].headers",
            'expected a table, e.g. { "X-Canary" = "1" }, got an array',
            id="headers-not-a-table",
        ),
        pytest.param(
            app_route(headers={"X Canary": "1"}),
            'routes[0].headers."X Canary"',
            "invalid header name",
            id="header-name-with-space",
        ),
        pytest.param(
            app_route(headers={"X-Canary": 1}),
            "routes[0].headers.X-Canary",
            "expected a header value",
            id="header-value-not-a-string",
        ),
        pytest.param(
            app_route(headers={"X-Canary": " 1"}),
            "routes[0].headers.X-Canary",
            "no leading or trailing space",
            id="header-value-leading-space",
        ),
        pytest.param(
            app_route(headers={"X-Canary": "a\r\nX-Evil: 1"}),
            "routes[0].headers.X-Canary",
            "expected a header value",
            id="header-value-crlf",
        ),
        pytest.param(
            app_route(headers={"X-Canary": "é"}),
            "routes[0].headers.X-Canary",
            "visible ASCII",
            id="header-value-non-ascii",
        ),
        pytest.param(
            app_route(headers={"X-Canary": "1", "x-canary": "2"}),
            "routes[0].headers.x-canary",
            'duplicate header (names ignore case): "X-Canary"',
            id="header-condition-duplicate",
        ),
        pytest.param(
            app_route(headers={"Host": "a.example"}),
            "routes[0].headers.Host",
            'match the host with the route\'s "host" key',
            id="host-as-header-condition",
        ),
        pytest.param(
            app_route(request_headers={"sett": {"X-A": "1"}}),
            "routes[0].request_headers.sett",
            'unknown key; did you mean "set"?',
            id="edit-unknown-key",
        ),
        pytest.param(
            app_route(request_headers=["X-A"]),
            "routes[0].request_headers",
            "expected a table",
            id="edits-not-a-table",
        ),
        pytest.param(
            app_route(response_headers={"remove": "Server"}),
            "routes[0].response_headers.remove",
            'expected an array of header names, got "Server"',
            id="remove-not-an-array",
        ),
        pytest.param(
            app_route(response_headers={"remove": ["Server", "bad name"]}),
            "routes[0].response_headers.remove[1]",
            "expected a header name",
            id="remove-bad-name",
        ),
        pytest.param(
            app_route(response_headers={"remove": ["Server", "server"]}),
            "routes[0].response_headers.remove[1]",
            'duplicate header "server"',
            id="remove-duplicate",
        ),
        pytest.param(
            app_route(request_headers={"set": {"X-A": "1"}, "add": {"x-a": "2"}}),
            "routes[0].request_headers.add.x-a",
            "x-a is already in set; a header goes in one list only",
            id="set-and-add-same-name",
        ),
        pytest.param(
            app_route(response_headers={"add": {"X-A": "1"}, "remove": ["X-A"]}),
            "routes[0].response_headers.remove[0]",
            "X-A is already in add",
            id="add-and-remove-same-name",
        ),
        pytest.param(
            app_route(request_headers={"set": {"Connection": "close"}}),
            "routes[0].request_headers.set.Connection",
            "hop-by-hop or framing field that PIBL manages itself",
            id="edit-connection",
        ),
        pytest.param(
            app_route(response_headers={"set": {"Content-Length": "0"}}),
            "routes[0].response_headers.set.Content-Length",
            "hop-by-hop or framing field",
            id="edit-content-length",
        ),
        pytest.param(
            app_route(request_headers={"remove": ["Transfer-Encoding"]}),
            "routes[0].request_headers.remove[0]",
            "hop-by-hop or framing field",
            id="remove-transfer-encoding",
        ),
        pytest.param(
            app_route(request_headers={"remove": ["Host"]}),
            "routes[0].request_headers.remove[0]",
            "a request carries exactly one Host; only set can change it",
            id="remove-host",
        ),
        pytest.param(
            app_route(request_headers={"add": {"Host": "b"}}),
            "routes[0].request_headers.add.Host",
            "exactly one Host",
            id="add-host",
        ),
        pytest.param(
            app_route(request_headers={"set": {"X-A": "line\nbreak"}}),
            "routes[0].request_headers.set.X-A",
            "expected a header value",
            id="edit-value-newline",
        ),
        pytest.param(
            app_route(max_body_size=0),
            "routes[0].max_body_size",
            "expected a positive size",
            id="max-body-size-zero",
        ),
        pytest.param(
            app_route(max_body_size="lots"),
            "routes[0].max_body_size",
            'got "lots"',
            id="max-body-size-not-a-size",
        ),
    ],
)
def test_route_errors_name_the_key_path(route: dict[str, Any], path: str, fragment: str) -> None:
    message = config_error(data(route))
    assert message.startswith(f"pibl.toml: {path}: "), message
    assert fragment in message, message


def test_route_over_the_server_body_limit_is_an_error() -> None:
    config = data(app_route(), app_route(max_body_size="2MiB"), server={"max_body_size": "1MiB"})
    message = config_error(config)
    assert message.startswith("pibl.toml: routes[1].max_body_size: "), message
    assert "expected at most server.max_body_size (1048576 bytes), got 2097152" in message
    assert "applies before routing" in message


def test_the_second_route_s_error_names_its_index() -> None:
    message = config_error(data(app_route(), app_route(headers={"X-A": 2})))
    assert message.startswith("pibl.toml: routes[1].headers.X-A: ")


def test_response_edits_may_remove_host_like_any_other_field() -> None:
    # Only a request needs exactly one Host; a response field of that name is just a field.
    route = app_route(response_headers={"remove": ["Host"]})
    assert parse_config(data(route)).routes[0].response_headers is not None


def test_forgeable_forwarded_fields_need_trusted_proxies() -> None:
    route = app_route(headers={"X-Forwarded-Proto": "https"})
    message = config_error(data(route))
    assert message.startswith("pibl.toml: routes[0].headers.X-Forwarded-Proto: "), message
    assert "any client can send this field" in message
    trusted = parse_config(data(route, server={"trusted_proxies": ["10.0.0.0/8"]}))
    assert trusted.routes[0].headers == {"X-Forwarded-Proto": "https"}
