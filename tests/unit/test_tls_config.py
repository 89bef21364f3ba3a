"""``[server.tls]``, the pools' ``tls*`` keys and ``tunnel_idle_timeout``: parsing, file checks,
error messages that name the file and the key, and the SNI choice among certificates."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from pibl.balancer.upstream import Address
from pibl.config import load_config, parse_config, settings_to_dict
from pibl.errors import ConfigError
from pibl.server.app import ProxyApp
from pibl.tls import (
    MINIMUM_VERSION,
    ServerCertificates,
    TlsTermination,
    certificate_names,
    client_context,
    load_certificate,
    server_context,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, folder: Path, stem: str, *names: str) -> tuple[Path, Path]:
    leaf = ca.issue_cert(*names)
    cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def write_config(folder: Path, tls: str, upstream: str = "") -> Path:
    path = folder / "pibl.toml"
    path.write_text(
        '[server]\nlisten = "127.0.0.1:8080"\n'
        f"[server.tls]\n{tls}\n"
        f'[upstreams.app]\nservers = ["127.0.0.1:9001"]\n{upstream}\n'
    )
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# --------------------------------------------------------------------------- server.tls


def test_relative_paths_resolve_against_the_config_folder(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "certs").mkdir()
    cert, key = write_cert(ca, tmp_path / "certs", "site", "example.com")
    path = write_config(
        tmp_path,
        'listen = "127.0.0.1:8443"\n'
        'certificates = [{ cert = "certs/site.pem", key = "certs/site.key" }]\n'
        "redirect_http = true",
    )
    monkeypatch.chdir("/")  # not the config's folder
    tls = load_config(path).server.tls
    assert tls is not None
    assert tls.listen == (Address("127.0.0.1", 8443),)
    assert tls.redirect_http
    assert [(c.cert, c.key, c.names) for c in tls.certificates] == [(str(cert), str(key), ())]


def test_tls_is_off_by_default_and_tunnels_idle_for_an_hour() -> None:
    data = {
        "server": {"listen": "127.0.0.1:8080"},
        "upstreams": {"app": {"servers": ["127.0.0.1:9001"]}},
    }
    server = parse_config(data).server
    assert server.tls is None
    assert server.tunnel_idle_timeout == 3600.0


@pytest.mark.parametrize(
    ("value", "seconds"), [("30s", 30.0), ("1h30m", 5400.0), (0, 0.0), (2.5, 2.5)]
)
def test_tunnel_idle_timeout(value: object, seconds: float) -> None:
    data = {
        "server": {"listen": "127.0.0.1:8080", "tunnel_idle_timeout": value},
        "upstreams": {"app": {"servers": ["127.0.0.1:9001"]}},
    }
    assert parse_config(data).server.tunnel_idle_timeout == seconds


def test_tunnel_idle_timeout_rejects_nonsense() -> None:
    data = {
        "server": {"listen": "127.0.0.1:8080", "tunnel_idle_timeout": "soon"},
        "upstreams": {"app": {"servers": ["127.0.0.1:9001"]}},
    }
    with pytest.raises(ConfigError, match=r"<config>: server\.tunnel_idle_timeout: expected"):
        parse_config(data)


def test_missing_certificate_file_names_file_and_key(ca: trustme.CA, tmp_path: Path) -> None:
    write_cert(ca, tmp_path, "site", "example.com")
    path = write_config(
        tmp_path,
        'listen = "127.0.0.1:8443"\ncertificates = [{ cert = "nope.pem", key = "site.key" }]',
    )
    assert config_error(path) == (
        f'{path}: server.tls.certificates[0].cert: file not found: "{tmp_path / "nope.pem"}"'
    )


def test_missing_key_file_names_file_and_key(ca: trustme.CA, tmp_path: Path) -> None:
    write_cert(ca, tmp_path, "a", "a.test")
    write_cert(ca, tmp_path, "b", "b.test")
    path = write_config(
        tmp_path,
        'listen = "127.0.0.1:8443"\ncertificates = [\n'
        '  { cert = "a.pem", key = "a.key" },\n  { cert = "b.pem", key = "missing.key" },\n]',
    )
    assert config_error(path) == (
        f'{path}: server.tls.certificates[1].key: file not found: "{tmp_path / "missing.key"}"'
    )


def test_key_of_another_certificate_is_a_mismatch(ca: trustme.CA, tmp_path: Path) -> None:
    write_cert(ca, tmp_path, "a", "a.test")
    write_cert(ca, tmp_path, "b", "b.test")
    path = write_config(
        tmp_path, 'listen = "127.0.0.1:8443"\ncertificates = [{ cert = "a.pem", key = "b.key" }]'
    )
    assert config_error(path) == (
        f'{path}: server.tls.certificates[0].key: "{tmp_path / "b.key"}" is not the private key '
        f'of the certificate in "{tmp_path / "a.pem"}"'
    )


def test_unreadable_key_is_reported(ca: trustme.CA, tmp_path: Path) -> None:
    write_cert(ca, tmp_path, "a", "a.test")
    (tmp_path / "garbage.key").write_text("not a key\n")
    path = write_config(
        tmp_path,
        'listen = "127.0.0.1:8443"\ncertificates = [{ cert = "a.pem", key = "garbage.key" }]',
    )
    assert config_error(path) == (
        f'{path}: server.tls.certificates[0].key: "{tmp_path / "garbage.key"}" holds no PEM '
        "private key"
    )


def test_a_directory_as_key_cannot_be_read(ca: trustme.CA, tmp_path: Path) -> None:
    write_cert(ca, tmp_path, "a", "a.test")
    path = write_config(
        tmp_path, 'listen = "127.0.0.1:8443"\ncertificates = [{ cert = "a.pem", key = "." }]'
    )
    assert config_error(path).startswith(
        f'{path}: server.tls.certificates[0].key: cannot read "{tmp_path}": '
    )


def test_encrypted_key_is_refused_without_a_prompt(ca: trustme.CA, tmp_path: Path) -> None:
    leaf = ca.issue_cert("a.test")
    (tmp_path / "a.pem").write_bytes(leaf.cert_chain_pems[0].bytes())
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    (tmp_path / "a.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    path = write_config(
        tmp_path, 'listen = "127.0.0.1:8443"\ncertificates = [{ cert = "a.pem", key = "a.key" }]'
    )
    assert config_error(path) == (
        f'{path}: server.tls.certificates[0].key: "{tmp_path / "a.key"}" is encrypted; PIBL '
        "needs a key without a passphrase"
    )


def test_a_key_given_as_certificate_is_no_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    write_cert(ca, tmp_path, "a", "a.test")
    path = write_config(
        tmp_path, 'listen = "127.0.0.1:8443"\ncertificates = [{ cert = "a.key", key = "a.key" }]'
    )
    assert config_error(path).startswith(
        f'{path}: server.tls.certificates[0].cert: "{tmp_path / "a.key"}" holds no PEM certificate'
    )


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        (
            {"certificates": [{"cert": "a.pem", "key": "a.key"}]},
            "server.tls.listen: missing; expected",
        ),
        ({"listen": "127.0.0.1:8443"}, "server.tls.certificates: missing; expected"),
        (
            {"listen": "127.0.0.1:8443", "certificates": []},
            "server.tls.certificates: expected at least one certificate, got an empty array",
        ),
        (
            {"listen": "127.0.0.1:8443", "certificates": [{"cert": "a.pem"}]},
            "server.tls.certificates[0].key: missing; expected the path of its PEM key",
        ),
        (
            {"listen": "127.0.0.1:8443", "certificates": [{"cert": "a", "key": "b", "name": []}]},
            'server.tls.certificates[0].name: unknown key; did you mean "names"?',
        ),
        (
            {"listen": "127.0.0.1:8443", "certificates": ["a.pem"]},
            "server.tls.certificates[0]: expected a table",
        ),
        (
            {"listen": "127.0.0.1:8080", "certificates": [{"cert": "a.pem", "key": "a.key"}]},
            "server.tls.listen: 127.0.0.1:8080 is already server.listen",
        ),
        (
            {"listen": "127.0.0.1:8443", "certificates": [], "redirect": True},
            'server.tls.redirect: unknown key; did you mean "redirect_http"?',
        ),
    ],
)
def test_tls_table_shape_errors(tls: dict[str, object], message: str) -> None:
    data = {
        "server": {"listen": "127.0.0.1:8080", "tls": tls},
        "upstreams": {"app": {"servers": ["127.0.0.1:9001"]}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in str(info.value)


def test_tls_port_zero_needs_a_single_worker(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_cert(ca, tmp_path, "a", "a.test")
    data = {
        "server": {
            "listen": "127.0.0.1:8080",
            "workers": 2,
            "tls": {
                "listen": "127.0.0.1:0",
                "certificates": [{"cert": str(cert), "key": str(key)}],
            },
        },
        "upstreams": {"app": {"servers": ["127.0.0.1:9001"]}},
    }
    with pytest.raises(ConfigError, match=r"server\.tls\.listen: port 0 needs workers = 1"):
        parse_config(data)


def test_tls_settings_round_trip(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_cert(ca, tmp_path, "a", "a.test")
    data = {
        "server": {
            "listen": "127.0.0.1:8080",
            "tunnel_idle_timeout": "5m",
            "tls": {
                "listen": ["127.0.0.1:8443", "[::1]:8443"],
                "certificates": [{"cert": str(cert), "key": str(key), "names": ["*.A.test"]}],
            },
        },
        "upstreams": {
            "app": {
                "servers": ["127.0.0.1:9001"],
                "tls": True,
                "tls_verify": False,
                "tls_server_name": "Backend.Example",
            }
        },
    }
    settings = parse_config(data)
    assert settings.server.tls is not None
    assert settings.server.tls.certificates[0].names == ("*.a.test",)
    assert settings.upstreams["app"].tls_server_name == "backend.example"
    assert parse_config(settings_to_dict(settings)) == settings


# --------------------------------------------------------------------------- upstream tls


def test_upstream_tls_ca_resolves_and_loads(ca: trustme.CA, tmp_path: Path) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    path = tmp_path / "pibl.toml"
    path.write_text(
        '[server]\nlisten = "127.0.0.1:8080"\n'
        '[upstreams.app]\nservers = ["127.0.0.1:9001"]\ntls = true\ntls_ca = "ca.pem"\n'
    )
    upstream = load_config(path).upstreams["app"]
    assert (upstream.tls, upstream.tls_verify, upstream.tls_ca) == (
        True,
        True,
        str(tmp_path / "ca.pem"),
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            'tls = true\ntls_ca = "none.pem"',
            'upstreams.app.tls_ca: file not found: "{dir}/none.pem"',
        ),
        (
            'tls = true\ntls_ca = "junk.pem"',
            'upstreams.app.tls_ca: "{dir}/junk.pem" holds no PEM CA certificate',
        ),
        ('tls_ca = "ca.pem"', "upstreams.app.tls_ca: only used with tls = true"),
        ('tls_server_name = "a.test"', "upstreams.app.tls_server_name: only used with tls = true"),
        (
            'tls = true\ntls_server_name = "not a name"',
            "upstreams.app.tls_server_name: expected a hostname or IP address",
        ),
        ('tls = "yes"', 'upstreams.app.tls: expected true or false, got "yes"'),
    ],
)
def test_upstream_tls_errors(tmp_path: Path, keys: str, message: str) -> None:
    (tmp_path / "junk.pem").write_text("junk\n")
    path = tmp_path / "pibl.toml"
    path.write_text(
        '[server]\nlisten = "127.0.0.1:8080"\n'
        f'[upstreams.app]\nservers = ["127.0.0.1:9001"]\n{keys}\n'
    )
    assert f"{path}: {message.format(dir=tmp_path)}" in config_error(path)


def test_client_context_verifies_by_default() -> None:
    context = client_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version == MINIMUM_VERSION
    relaxed = client_context(verify=False)
    assert relaxed.verify_mode == ssl.CERT_NONE
    assert not relaxed.check_hostname


# --------------------------------------------------------------------------- certificates, SNI


def test_server_context_has_modern_defaults() -> None:
    context = server_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert context.verify_mode == ssl.CERT_NONE  # no client certificates asked


def test_names_come_from_the_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    cert, key = write_cert(ca, tmp_path, "a", "A.test", "*.wild.test", "127.0.0.1")
    assert load_certificate(str(cert), str(key)).names == ("a.test", "*.wild.test")
    assert load_certificate(str(cert), str(key), ["only.test"]).names == ("only.test",)


def test_common_name_when_there_is_no_dns_name() -> None:
    decoded = {"subject": ((("countryName", "FR"),), (("commonName", "CN.Example"),))}
    assert certificate_names(decoded) == ("cn.example",)


def test_sni_selects_exact_then_wildcard_then_default(ca: trustme.CA, tmp_path: Path) -> None:
    first = load_certificate(*map(str, write_cert(ca, tmp_path, "a", "a.test")))
    second = load_certificate(*map(str, write_cert(ca, tmp_path, "b", "b.test", "*.b.test")))
    third = load_certificate(*map(str, write_cert(ca, tmp_path, "c", "x.b.test")))
    certificates = ServerCertificates([first, second, third])
    assert certificates.select(None) is first
    assert certificates.select("unknown.test") is first
    assert certificates.select("B.TEST.") is second
    assert certificates.select("y.b.test") is second
    assert certificates.select("x.b.test") is third  # an exact name beats a wildcard
    assert certificates.select("deep.y.b.test") is first  # a wildcard covers one label only
    termination = TlsTermination(certificates)
    assert termination.context is first.context


def test_app_reports_a_certificate_that_vanished_after_validation(
    ca: trustme.CA, tmp_path: Path
) -> None:
    _, key = write_cert(ca, tmp_path, "a", "a.test")
    path = write_config(
        tmp_path, 'listen = "127.0.0.1:8443"\ncertificates = [{ cert = "a.pem", key = "a.key" }]'
    )
    settings = load_config(path)
    os.remove(key)
    with pytest.raises(ConfigError, match=r"server\.tls\.certificates\[0\]\.key: file not found"):
        ProxyApp(settings)
