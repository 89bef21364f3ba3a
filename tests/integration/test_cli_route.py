"""``pibl route`` (which route a request takes, and why) and ``pibl check``'s warnings, run as
real processes."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_cli import assert_clean_output, run_pibl

CONFIG = """\
[server]
listen = "127.0.0.1:8080"
max_body_size = "1MiB"

[upstreams.stable]
servers = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3 }]

[upstreams.canary]
servers = ["127.0.0.1:9003"]
balance = "consistent_hash"
hash_key = "header:X-User"

[[routes]]
host = "static.example.com"
upstream = "stable"

[[routes]]
host = "api.example.com"
path_prefix = "/api"
headers = { "X-Canary" = "1" }
upstream = "canary"
strip_prefix = true
max_body_size = "64KiB"
request_headers = { set = { "X-A" = "1" }, remove = ["X-C"] }
response_headers = { add = { "X-Route" = "canary" } }

[[routes]]
path_prefix = "/"
upstream = "stable"
cache = false
"""


# The line of each [[routes]] header, as `pibl route` and `pibl check` name them.
R0, R1, R2 = (n for n, line in enumerate(CONFIG.splitlines(), 1) if line == "[[routes]]")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pibl.toml"
    path.write_text(text)
    return path


def test_route_explains_a_header_match(tmp_path: Path) -> None:
    config = write(tmp_path, CONFIG)
    result = run_pibl(
        "route",
        "-c",
        str(config),
        "http://API.example.com:8080/api/users?id=7",
        "-H",
        "X-Canary: 1",
    )
    assert result.returncode == 0, result.stderr
    assert_clean_output(result.stdout, result.stderr)
    out = result.stdout
    assert 'routed on host "api.example.com"' in out
    assert (
        f'routes[0] (line {R0}): skipped, host "api.example.com" is not "static.example.com"' in out
    )
    assert (
        f'routes[1] (line {R1}): MATCHED (host = "api.example.com", path_prefix = "/api", '
        'header x-canary = "1")' in out
    )
    assert "the 1 rule(s) after it are not considered" in out
    assert 'upstream pool: "canary", balance consistent_hash on header:x-user' in out
    assert "server 127.0.0.1:9003" in out
    assert 'target sent upstream: /users?id=7 (strip_prefix "/api")' in out
    assert "cache: off ([cache] enabled = false)" in out
    assert "max_body_size: 65536 bytes (the route's)" in out
    assert "request header edits: set X-A: 1; remove X-C" in out
    assert "response header edits: add X-Route: canary" in out


def test_route_names_the_failed_header_condition(tmp_path: Path) -> None:
    config = write(tmp_path, CONFIG)
    result = run_pibl(
        "route", "-c", str(config), "http://api.example.com/api/users", "-H", "X-Canary: 0"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f'routes[1] (line {R1}): skipped, header x-canary is "0", not "1"' in out
    assert f'routes[2] (line {R2}): MATCHED (path_prefix = "/")' in out
    assert 'upstream pool: "stable", balance round_robin' in out
    assert "server 127.0.0.1:9001\n" in out
    assert "server 127.0.0.1:9002 weight 3" in out
    assert "target sent upstream: /api/users (unchanged)" in out
    assert "max_body_size: 1048576 bytes (the server's)" in out


def test_route_without_a_match_exits_1(tmp_path: Path) -> None:
    text = CONFIG.replace('path_prefix = "/"\n', 'path_prefix = "/web"\n')
    config = write(tmp_path, text)
    result = run_pibl("route", "-c", str(config), "/api/users")
    assert result.returncode == 1, result
    assert_clean_output(result.stdout, result.stderr)
    assert (
        f"routes[0] (line {R0}): skipped, the request names no host (the rule needs "
        '"static.example.com")' in result.stdout
    )
    assert f'routes[2] (line {R2}): skipped, path "/api/users" does not start with "/web"' in (
        result.stdout
    )
    assert "no route matches: PIBL answers 404 Not Found" in result.stdout


def test_route_with_a_host_header_and_a_path(tmp_path: Path) -> None:
    config = write(tmp_path, CONFIG)
    result = run_pibl("route", "-c", str(config), "/x", "-H", "Host: static.example.com")
    assert result.returncode == 0, result.stderr
    assert f"routes[0] (line {R0}): MATCHED" in result.stdout


def test_route_without_routes_uses_the_only_pool(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        '[server]\nlisten = "127.0.0.1:8080"\n[upstreams.app]\nservers = ["127.0.0.1:1"]\n',
    )
    result = run_pibl("route", "-c", str(config), "http://any.example/")
    assert result.returncode == 0, result.stderr
    assert 'no [[routes]]: every request goes to the upstream pool "app"' in result.stdout


def test_route_with_a_bad_header_argument_exits_2(tmp_path: Path) -> None:
    config = write(tmp_path, CONFIG)
    result = run_pibl("route", "-c", str(config), "/", "-H", "no colon")
    assert result.returncode == 2
    assert_clean_output(result.stdout, result.stderr)
    assert "pibl route: -H 'no colon': expected \"Name: value\"" in result.stderr


def test_route_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    config = write(tmp_path, CONFIG.replace("cache = false", 'strip_prefix = "yes"'))
    result = run_pibl("route", "-c", str(config), "/")
    assert result.returncode == 2
    assert "routes[2].strip_prefix: expected true or false" in result.stderr


# --------------------------------------------------------------------------- check warnings


def test_check_warns_about_a_shadowed_rule_and_still_exits_0(tmp_path: Path) -> None:
    text = (
        CONFIG
        + '\n[[routes]]\nhost = "api.example.com"\npath_prefix = "/api/v2"\n'
        + ('upstream = "canary"\n')
    )
    config = write(tmp_path, text)
    result = run_pibl("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert_clean_output(result.stdout, result.stderr)
    assert "OK (2 upstream pool(s), 4 route(s))" in result.stdout
    assert result.stderr == (
        f"{config}: warning: routes[3] (line {R2 + 5}) can never match: "
        f"routes[2] (line {R2}) before it matches every request it would (first match wins)\n"
    )


def test_check_of_a_well_ordered_table_prints_no_warning(tmp_path: Path) -> None:
    config = write(tmp_path, CONFIG)
    result = run_pibl("check", "-c", str(config))
    assert result.returncode == 0
    assert result.stderr == ""


def test_check_warns_about_cached_header_routes(tmp_path: Path) -> None:
    config = write(tmp_path, CONFIG + "\n[cache]\nenabled = true\n")
    result = run_pibl("check", "-c", str(config))
    assert result.returncode == 0
    assert f"warning: routes[1] (line {R1}) matches on X-Canary and uses the cache" in result.stderr
    assert "Vary: X-Canary" in result.stderr


def test_check_labels_inline_routes_without_lines(tmp_path: Path) -> None:
    # An inline array of routes: no [[routes]] line to name.
    text = 'routes = [{ upstream = "app" }, { upstream = "app", path_prefix = "/x" }]\n' + (
        '[server]\nlisten = "127.0.0.1:8080"\n[upstreams.app]\nservers = ["127.0.0.1:1"]\n'
    )
    config = write(tmp_path, text)
    result = run_pibl("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "warning: routes[1] can never match: routes[0] before it" in result.stderr
