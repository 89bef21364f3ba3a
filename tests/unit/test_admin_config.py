"""The ``[admin]`` section: listener, token, and the refusal to expose it without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pibl.balancer.upstream import Address
from pibl.config import (
    DEFAULT_ADMIN_LISTEN,
    AdminSettings,
    Settings,
    load_config,
    parse_config,
    settings_to_dict,
)
from pibl.errors import ConfigError


def config(admin: Any = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:8080"},
        "upstreams": {"app": {"servers": ["127.0.0.1:9001"]}},
        **extra,
    }
    if admin is not None:
        data["admin"] = admin
    return data


def error_for(admin: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(config(admin), "pibl.toml")
    return str(info.value)


def test_admin_is_off_without_the_section() -> None:
    assert parse_config(config()).admin is None
    assert Settings().admin is None
    assert "admin" not in settings_to_dict(parse_config(config()))


def test_empty_section_listens_on_loopback_9901_without_token() -> None:
    admin = parse_config(config({})).admin
    assert admin == AdminSettings(listen=Address("127.0.0.1", 9901), token=None)
    assert admin.listen == DEFAULT_ADMIN_LISTEN


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9901", Address("127.0.0.1", 9901)),
        ("127.0.0.1:0", Address("127.0.0.1", 0)),  # tests: the kernel picks the port
        ("127.0.0.2:9901", Address("127.0.0.2", 9901)),  # all of 127/8 is loopback
        ("[::1]:9901", Address("::1", 9901)),
        ("localhost:9901", Address("localhost", 9901)),
    ],
)
def test_loopback_listen_needs_no_token(listen: str, expected: Address) -> None:
    admin = parse_config(config({"listen": listen})).admin
    assert admin is not None
    assert admin.listen == expected
    assert admin.token is None


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9901", "[::]:9901", "10.1.2.3:9901", "admin.example.com:9901"]
)
def test_non_loopback_listen_without_token_is_refused(listen: str) -> None:
    message = error_for({"listen": listen})
    assert message.startswith("pibl.toml: admin.token: missing; required when listen ("), message
    assert "is not a loopback address" in message


def test_non_loopback_listen_with_token_is_accepted() -> None:
    admin = parse_config(config({"listen": "0.0.0.0:9901", "token": "s3cret-Token_1"})).admin
    assert admin == AdminSettings(Address("0.0.0.0", 9901), "s3cret-Token_1")


@pytest.mark.parametrize(
    ("admin", "path", "fragment"),
    [
        ({"token": ""}, "admin.token", "expected a non-empty string of visible ASCII"),
        ({"token": "two words"}, "admin.token", "(no spaces)"),
        ({"token": "caf\u00e9"}, "admin.token", "visible ASCII"),
        ({"token": 1234}, "admin.token", "got 1234"),
        ({"listen": "127.0.0.1"}, "admin.listen", 'missing ":port"'),
        ({"listen": 9901}, "admin.listen", "got 9901"),
        ({"listen": "127.0.0.1:8080"}, "admin.listen", "127.0.0.1:8080 is already server.listen"),
        ({"lisen": "127.0.0.1:9901"}, "admin.lisen", 'unknown key; did you mean "listen"?'),
        ("127.0.0.1:9901", "admin", "expected a table ([admin])"),
    ],
)
def test_errors_name_the_admin_key(admin: Any, path: str, fragment: str) -> None:
    message = error_for(admin)
    assert message.startswith(f"pibl.toml: {path}: "), message
    assert fragment in message, message


@pytest.mark.parametrize("workers", [2, 8])
def test_admin_with_several_workers_is_accepted(workers: int) -> None:
    # Worker 1 alone listens and merges every worker's figures (pibl.admin.cluster).
    data = config({"listen": "127.0.0.1:9901"})
    data["server"]["workers"] = workers
    settings = parse_config(data, "pibl.toml")
    assert settings.server.workers == workers
    assert settings.admin is not None
    assert str(settings.admin.listen) == "127.0.0.1:9901"


def test_round_trips_through_settings_to_dict() -> None:
    settings = parse_config(config({"listen": "[::1]:0", "token": "abc"}))
    data = settings_to_dict(settings)
    assert data["admin"] == {"listen": "[::1]:0", "token": "abc"}
    assert parse_config(data) == settings


def test_loads_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pibl.toml"
    path.write_text(
        '[server]\nlisten = "127.0.0.1:8080"\n'
        '[upstreams.app]\nservers = ["127.0.0.1:9001"]\n'
        '[admin]\nlisten = "0.0.0.0:9901"\ntoken = "t0ken"\n'
    )
    assert load_config(path).admin == AdminSettings(Address("0.0.0.0", 9901), "t0ken")
    path.write_text(path.read_text().replace('token = "t0ken"\n', ""))
    with pytest.raises(ConfigError, match=r"pibl\.toml: admin\.token: missing"):
        load_config(path)
