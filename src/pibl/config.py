"""Settings: a TOML file (stdlib ``tomllib``) turned into typed, validated, frozen dataclasses.

Every problem is a :class:`~pibl.errors.ConfigError` whose message names the file, the key path
and what was expected, e.g.::

    pibl.toml: upstreams.app.servers[1].weight: expected a positive integer, got "x"

The loader is table-driven: each section is a :class:`_Section` mapping its TOML keys (the
dataclass field names) to converters; absent keys take the dataclass defaults, which follow nginx
where nginx has one. Converters of plain values raise ``ValueError`` ("expected ..., got ...")
and the walker adds the key path; converters of nested values raise :class:`_Invalid` with the
deeper path themselves.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from fractions import Fraction
from typing import Any, Final, Generic, TypeAlias, TypeVar
from urllib.parse import urlsplit

from pibl.balancer.upstream import Address
from pibl.errors import ConfigError
from pibl.proxy.rewrite import UNEDITABLE
from pibl.tls import CertificateError, client_context, load_certificate

__all__ = [
    "ACCESS_LOG_FORMATS",
    "BALANCE_NAMES",
    "CACHE_STORAGES",
    "LOG_LEVELS",
    "AccessLogSettings",
    "AdminSettings",
    "CacheSettings",
    "CertificateSettings",
    "HeaderEditSettings",
    "HealthSettings",
    "LogSettings",
    "RouteSettings",
    "ServerEntry",
    "ServerSettings",
    "Settings",
    "TlsSettings",
    "UpstreamSettings",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
    "parse_size",
    "quick_settings",
    "settings_to_dict",
]

BALANCE_NAMES: Final = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "random_two",
    "consistent_hash",
)
ACCESS_LOG_FORMATS: Final = ("combined", "json")
CACHE_STORAGES: Final = ("memory", "disk", "redis")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
# Health-check statuses accepted when ``expect_status`` is omitted: every 2xx and 3xx.
DEFAULT_EXPECT_STATUS: Final = range(200, 400)

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

_KIB = 1024
_MIB = 1024 * _KIB
# Fields that are not TOML keys (the table name, the file name): left out of settings_to_dict.
_NOT_A_KEY: Final = {"toml": False}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """``[server]``: listeners, timeouts (seconds) and limits (bytes / counts; 0 = unlimited)."""

    listen: tuple[Address, ...] = (Address("127.0.0.1", 8080),)
    workers: int = 1
    trusted_proxies: tuple[IPNetwork, ...] = ()
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    send_timeout: float = 60.0
    client_header_timeout: float = 60.0
    client_body_timeout: float = 60.0
    keepalive_timeout: float = 75.0  # 0 disables downstream keep-alive
    shutdown_timeout: float = 30.0
    max_request_line: int = 8 * _KIB
    max_header_size: int = 16 * _KIB
    max_header_count: int = 100
    max_body_size: int = 0
    max_connections: int = 0
    # A tunnel (after 101 Switching Protocols) with no byte either way for this long is closed
    # on both sides; 0 = never. HAProxy's ``timeout tunnel`` plays this part.
    tunnel_idle_timeout: float = 3600.0
    tls: TlsSettings | None = None


@dataclass(frozen=True, slots=True)
class CertificateSettings:
    """One of ``server.tls.certificates``: PEM files (absolute once loaded) and, optionally,
    the SNI names it answers for instead of those read from the certificate."""

    cert: str
    key: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """``[server.tls]``: HTTPS listeners; the first certificate is the default for SNI."""

    listen: tuple[Address, ...]
    certificates: tuple[CertificateSettings, ...]
    redirect_http: bool = False  # plain listeners answer 308 to https://host/path


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """One server of an upstream pool."""

    address: Address
    weight: int = 1
    max_connections: int = 0  # 0 = unlimited


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """``[upstreams.NAME.health]``: active checks; ``expect_status=None`` means 200-399."""

    path: str = "/health"
    interval: float = 5.0
    timeout: float = 2.0
    expect_status: tuple[int, ...] | None = None
    rise: int = 2
    fall: int = 3

    def accepts(self, status: int) -> bool:
        """Whether a check answered with ``status`` counts as a success."""
        expected = DEFAULT_EXPECT_STATUS if self.expect_status is None else self.expect_status
        return status in expected


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """``[upstreams.NAME]``: a pool of servers and how to spread requests over it."""

    name: str = field(default="default", metadata=_NOT_A_KEY)
    servers: tuple[ServerEntry, ...] = ()
    balance: str = "round_robin"
    hash_key: str = "client_ip"
    # Idle pooled connections kept per server; 0 disables pooling. Above nginx's usual 32 so
    # that a few hundred concurrent clients do not churn connections (HAProxy keeps all).
    keepalive: int = 128
    keepalive_timeout: float = 60.0
    retries: int = 2
    health: HealthSettings | None = None
    # Passive outlier detection: ``max_fails`` failed attempts in a row (connect errors or 5xx;
    # Envoy's consecutive_5xx default is 5; 0 disables) eject a server for ``fail_timeout`` *
    # the number of ejections in a row, at most 300 s (see pibl.balancer.health).
    max_fails: int = 5
    fail_timeout: float = 10.0
    # Requests waiting when every server is at its ``max_connections``; beyond ``queue`` or
    # after ``queue_timeout`` they are answered 503. 0 = no queue.
    queue: int = 100
    queue_timeout: float = 10.0
    # HTTPS to the servers: verified against ``tls_ca`` (else the system's CAs) and
    # ``tls_server_name`` (else each server's host), which is also the SNI sent.
    tls: bool = False
    tls_verify: bool = True
    tls_ca: str | None = None
    tls_server_name: str | None = None


@dataclass(frozen=True, slots=True)
class HeaderEditSettings:
    """A route's ``request_headers`` / ``response_headers``: ``set`` replaces every field of a
    name with one, ``add`` appends one, ``remove`` drops them all (names case-insensitive; a
    name appears in one of the three at most). See ``pibl.proxy.rewrite``."""

    set: Mapping[str, str] = field(default_factory=dict)
    add: Mapping[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """``[[routes]]``: first match wins; ``host`` is exact or ``*.example.com``.

    ``headers``: fields the request must carry, name → exact value (``"*"``: any value).
    Options left out are None (``strip_prefix`` None is false, ``max_body_size`` None leaves
    the server's limit), so that ``settings_to_dict`` shows what was written.
    """

    upstream: str
    host: str | None = None
    path_prefix: str | None = None
    cache: bool = True
    headers: Mapping[str, str] | None = None
    strip_prefix: bool | None = None
    request_headers: HeaderEditSettings | None = None
    response_headers: HeaderEditSettings | None = None
    max_body_size: int | None = None


@dataclass(frozen=True, slots=True)
class AccessLogSettings:
    """``[access_log]``: ``path = "-"`` is stdout."""

    enabled: bool = True
    path: str = "-"
    format: str = "combined"


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """``[cache]``: the shared response cache."""

    enabled: bool = False
    storage: str = "memory"
    path: str = ""
    max_size: int = 256 * _MIB
    max_object_size: int = 8 * _MIB
    default_ttl: float = 0.0
    redis_url: str = ""
    redis_prefix: str = "pibl"  # namespace of every Redis key PIBL uses


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]``."""

    level: str = "info"


# The admin listener's default: loopback only, Envoy's admin port.
DEFAULT_ADMIN_LISTEN: Final = Address("127.0.0.1", 9901)


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """``[admin]``: the admin API, metrics and dashboard listener (off when the table is absent).

    ``token`` (when set) must be sent as ``Authorization: Bearer <token>`` on every call; a
    listener on a non-loopback address requires one.
    """

    listen: Address = DEFAULT_ADMIN_LISTEN
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole configuration. ``upstreams`` is keyed by name; treat it as read-only."""

    server: ServerSettings = field(default_factory=ServerSettings)
    upstreams: Mapping[str, UpstreamSettings] = field(default_factory=dict)
    routes: tuple[RouteSettings, ...] = ()
    access_log: AccessLogSettings = field(default_factory=AccessLogSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    log: LogSettings = field(default_factory=LogSettings)
    admin: AdminSettings | None = None
    source: str | None = field(default=None, metadata=_NOT_A_KEY)

    @property
    def default_upstream(self) -> str | None:
        """The pool for requests no route matches: the only one, or the one named "default"."""
        if len(self.upstreams) == 1:
            return next(iter(self.upstreams))
        return "default" if "default" in self.upstreams else None


# --------------------------------------------------------------------------- value parsers

_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
_SIZE_RE = re.compile(rf"{_NUMBER}\s*([A-Za-z]*)", re.ASCII)
_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    # nginx style: k, m, g are 1024-based
    "k": _KIB,
    "m": _MIB,
    "g": 1024 * _MIB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": _KIB,
    "mib": _MIB,
    "gib": 1024 * _MIB,
    "tib": 1024**4,
}
_SIZE_UNIT_HINT = "use B, KB, MB, GB, KiB, MiB, GiB, or k, m, g"
_MAX_SIZE: Final = 2**63 - 1

_DURATION_PART_RE = re.compile(rf"{_NUMBER}\s*([A-Za-z]*)\s*", re.ASCII)
# Largest first: a compound duration must list its units in this order ("1h30m", not "30m1h").
_DURATION_UNITS: Final[dict[str, Fraction]] = {
    "d": Fraction(86400),
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
}
_DURATION_UNIT_HINT = "use ms, s, m, h or d"
_MAX_DURATION: Final = 3650 * 86400  # ten years: anything longer is a typo

_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)", re.ASCII)
# RFC 9110 §5.6.2 token: header and cookie names.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)


def _show(value: Any) -> str:
    """``value`` as the user wrote it, for "got ..." in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:57] + "...", ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _quote_all(names: Sequence[str]) -> str:
    return ", ".join(json.dumps(name) for name in names)


def _suggest(word: str, options: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, options, n=1)
    return f"did you mean {json.dumps(close[0])}?" if close else None


def _size_value(text: str) -> int:
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError("expected a number of bytes with an optional unit")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown unit {json.dumps(unit)}; {_SIZE_UNIT_HINT}")
    value = Fraction(number) * factor
    if value.denominator != 1:
        raise ValueError("not a whole number of bytes")
    if value > _MAX_SIZE:
        raise ValueError("too large")
    return int(value)


def _duration_value(text: str) -> float:
    text = text.strip()
    if not text:
        raise ValueError("empty")
    total = Fraction(0)
    previous: int | None = None  # index in _DURATION_UNITS of the last unit used
    units = list(_DURATION_UNITS)
    pos = 0
    while pos < len(text):
        match = _DURATION_PART_RE.match(text, pos)
        if match is None:
            raise ValueError(f"unexpected {json.dumps(text[pos:])}; expected e.g. 500ms or 1m30s")
        number, unit = match.groups()
        if not unit:
            if pos != 0 or match.end() != len(text):
                raise ValueError(f"{number} needs a unit in a compound duration")
            unit = "s"  # a bare number is seconds
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown unit {json.dumps(unit)}; {_DURATION_UNIT_HINT}")
        index = units.index(unit)
        if previous is not None and index <= previous:
            raise ValueError("units must go from largest to smallest, each at most once")
        previous = index
        total += Fraction(number) * _DURATION_UNITS[unit]
        pos = match.end()
    if total > _MAX_DURATION:
        raise ValueError("too large (at most 3650d)")
    return float(total)


def _host_value(text: str) -> str:
    """An IP address (normalised) or a hostname (lower-cased)."""
    if re.fullmatch(r"[0-9.]+", text):
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError(f"{json.dumps(text)} is not a valid IPv4 address") from None
    name = text[:-1] if text.endswith(".") else text
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{json.dumps(text)} is not a valid IP address or hostname")
    return name.lower()


def _address_value(text: str, *, allow_port_zero: bool = False) -> Address:
    text = text.strip()
    if "://" in text:
        raise ValueError('write "host:port" without a scheme')
    if text.startswith("["):
        host_text, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError('missing "]" after the IPv6 address')
        if not rest.startswith(":"):
            raise ValueError('missing ":port" after "]"')
        port_text = rest[1:]
        try:
            host = str(ipaddress.IPv6Address(host_text))
        except ValueError:
            raise ValueError(f"{json.dumps(host_text)} is not a valid IPv6 address") from None
    else:
        host_text, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError('missing ":port"')
        if ":" in host_text:
            raise ValueError('an IPv6 address needs brackets, e.g. "[::1]:8080"')
        if not host_text:
            raise ValueError('missing host; use e.g. "0.0.0.0:8080" for all interfaces')
        host = _host_value(host_text)
    if not port_text:
        raise ValueError("missing port")
    lowest = 0 if allow_port_zero else 1
    if not _PORT_RE.fullmatch(port_text) or not lowest <= int(port_text) <= 65535:
        raise ValueError(f"port must be {lowest}-65535, got {json.dumps(port_text)}")
    return Address(host, int(port_text))


def _public(kind: str, parse: Callable[[str], Any], text: str) -> Any:
    if not isinstance(text, str):
        raise ValueError(f"invalid {kind}: expected a string, got {_show(text)}")
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"invalid {kind} {_show(text)}: {exc}") from None


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``"512"``, ``"10MB"`` (1000-based), ``"16KiB"`` / ``"16k"`` (1024-based).

    Raises ``ValueError`` with a human-readable message.
    """
    result: int = _public("size", _size_value, text)
    return result


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``"30"``, ``"1.5s"``, ``"500ms"``, ``"2m"``, ``"1h"``, ``"1m30s"``.

    Raises ``ValueError`` with a human-readable message.
    """
    result: float = _public("duration", _duration_value, text)
    return result


def parse_address(text: str) -> Address:
    """``"host:port"`` or ``"[ipv6]:port"``: host an IP or hostname, port 1-65535.

    IP hosts are normalised (``[::0:1]`` becomes ``::1``) and hostnames lower-cased, so equal
    addresses compare equal. Raises ``ValueError`` with a human-readable message.
    """
    result: Address = _public("address", _address_value, text)
    return result


# --------------------------------------------------------------------------- converters


class _Invalid(Exception):
    """A problem at ``path``; ``parse_config`` turns it into a ConfigError naming the source."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message


# (value, key path) -> converted value. Raise ValueError for the value at ``path`` itself, or
# _Invalid for something nested deeper.
Converter: TypeAlias = Callable[[Any, str], Any]
T = TypeVar("T")


def _join(path: str, key: str) -> str:
    shown = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key)
    return f"{path}.{shown}" if path else shown


def _expected(what: str, value: Any, detail: str | None = None) -> ValueError:
    message = f"expected {what}, got {_show(value)}"
    return ValueError(f"{message} ({detail})" if detail else message)


def _convert(convert: Converter, value: Any, path: str) -> Any:
    try:
        return convert(value, path)
    except ValueError as exc:
        raise _Invalid(path, str(exc)) from None


def _integer(minimum: int, what: str) -> Converter:
    def convert(value: Any, _path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _expected(what, value)
        return value

    return convert


_positive = _integer(1, "a positive integer")
_non_negative = _integer(0, "a non-negative integer")


def _bool(value: Any, _path: str) -> bool:
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def _string(value: Any, _path: str) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    return value


def _choice(names: Sequence[str]) -> Converter:
    what = f"one of {_quote_all(names)}"

    def convert(value: Any, _path: str) -> str:
        if not isinstance(value, str):
            raise _expected(what, value)
        if value.lower() not in names:
            raise _expected(what, value, _suggest(value.lower(), names))
        return value.lower()

    return convert


def _size(minimum: int) -> Converter:
    what = 'a size (bytes, or a string like "16KiB", "10MB", "1g")'
    if minimum > 0:
        what = "a positive " + what[2:]

    def convert(value: Any, _path: str) -> int:
        if isinstance(value, str):
            try:
                size = _size_value(value)
            except ValueError as exc:
                raise _expected(what, value, str(exc)) from None
        elif isinstance(value, int) and not isinstance(value, bool):
            size = value
        else:
            raise _expected(what, value)
        if size < minimum:
            raise _expected(what, value)
        return size

    return convert


def _duration(positive: bool) -> Converter:
    what = 'a duration (seconds, or a string like "500ms", "60s", "1m30s")'
    if positive:
        what = "a positive " + what[2:]

    def convert(value: Any, _path: str) -> float:
        if isinstance(value, str):
            try:
                seconds = _duration_value(value)
            except ValueError as exc:
                raise _expected(what, value, str(exc)) from None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if not 0 <= value <= _MAX_DURATION:  # also rejects nan
                raise _expected(what, value)
            seconds = float(value)
        else:
            raise _expected(what, value)
        if positive and seconds <= 0:
            raise _expected(what, value)
        return seconds

    return convert


_ADDRESS_WHAT = 'an address "host:port" or "[ipv6]:port"'


def _address(value: Any, _path: str) -> Address:
    if not isinstance(value, str):
        raise _expected(_ADDRESS_WHAT, value)
    try:
        return _address_value(value)
    except ValueError as exc:
        raise _expected(_ADDRESS_WHAT, value, str(exc)) from None


def _array(value: Any, path: str, what: str, item: Converter) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise _Invalid(path, str(_expected(what, value)))
    return tuple(_convert(item, element, f"{path}[{i}]") for i, element in enumerate(value))


def _unique(items: Sequence[Any], path: str, key: Callable[[Any], Any] = lambda x: x) -> None:
    seen: dict[Any, int] = {}
    name = path.rsplit(".", 1)[-1]
    for i, element in enumerate(items):
        first = seen.setdefault(key(element), i)
        if first != i:
            raise _Invalid(
                f"{path}[{i}]", f"duplicate address {key(element)}, already at {name}[{first}]"
            )


def _listen_address(value: Any, _path: str) -> Address:
    # Port 0 asks the kernel for a free port (tests, ``pibl run --listen 127.0.0.1:0``); the
    # bound port is logged at startup.
    if not isinstance(value, str):
        raise _expected(_ADDRESS_WHAT, value)
    try:
        return _address_value(value, allow_port_zero=True)
    except ValueError as exc:
        raise _expected(_ADDRESS_WHAT, value, str(exc)) from None


def _listen(value: Any, path: str) -> tuple[Address, ...]:
    if isinstance(value, str):
        return (_convert(_listen_address, value, path),)
    addresses = _array(value, path, f"{_ADDRESS_WHAT} or an array of them", _listen_address)
    if not addresses:
        raise _Invalid(path, "expected at least one address, got an empty array")
    _unique(addresses, path)
    return addresses


def _network(value: Any, _path: str) -> IPNetwork:
    what = 'an IP address or CIDR network like "10.0.0.0/8"'
    if not isinstance(value, str):
        raise _expected(what, value)
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError as exc:
        detail = str(exc)
        with contextlib.suppress(ValueError):
            detail += f"; did you mean {json.dumps(str(ipaddress.ip_network(value, False)))}?"
        raise _expected(what, value, detail) from None


def _networks(value: Any, path: str) -> tuple[IPNetwork, ...]:
    networks: tuple[IPNetwork, ...] = _array(value, path, "an array of IPs/CIDRs", _network)
    return networks


def _workers(value: Any, path: str) -> int:
    if value == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on every platform
            return os.cpu_count() or 1
    try:
        workers: int = _positive(value, path)
    except ValueError:
        raise _expected('a positive integer or "auto"', value) from None
    return workers


def _hash_key(value: Any, _path: str) -> str:
    what = 'one of "client_ip", "uri", "header:NAME", "cookie:NAME"'
    if not isinstance(value, str):
        raise _expected(what, value)
    if value in ("client_ip", "uri"):
        return value
    kind, colon, name = value.partition(":")
    if colon and kind in ("header", "cookie") and _TOKEN_RE.fullmatch(name):
        # Header names are case-insensitive (RFC 9110 §5.1); cookie names are not.
        return f"header:{name.lower()}" if kind == "header" else value
    detail = _suggest(value, ("client_ip", "uri")) if not colon else None
    raise _expected(what, value, detail)


def _route_host(value: Any, _path: str) -> str:
    what = 'a hostname, or "*.example.com"'
    if not isinstance(value, str):
        raise _expected(what, value)
    wildcard = value.startswith("*.")
    try:
        host = _host_value(value[2:] if wildcard else value)
    except ValueError as exc:
        raise _expected(what, value, str(exc)) from None
    return f"*.{host}" if wildcard else host


# RFC 9110 §5.5 field-value, ASCII only: visible characters with spaces or tabs between them
# (leading or trailing whitespace would be stripped by the receiving parser).
_HEADER_VALUE_RE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?", re.ASCII)
_HEADER_NAME_WHAT = "a header name (letters, digits and !#$%&'*+-.^_`|~)"


def _header_value(value: Any, _path: str) -> str:
    if not isinstance(value, str) or not _HEADER_VALUE_RE.fullmatch(value):
        raise _expected(
            "a header value (visible ASCII and spaces, no leading or trailing space)", value
        )
    return value


def _header_name(value: Any, _path: str) -> str:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        raise _expected(_HEADER_NAME_WHAT, value)
    return value


def _header_fields(value: Any, path: str) -> dict[str, str]:
    """A table of header name → value, names unique regardless of case."""
    if not isinstance(value, Mapping):
        raise _Invalid(path, str(_expected('a table, e.g. { "X-Canary" = "1" }', value)))
    fields_: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name, raw in value.items():
        key = _join(path, name)
        if not _TOKEN_RE.fullmatch(name):
            raise _Invalid(key, f"invalid header name; expected {_HEADER_NAME_WHAT}")
        first = seen.setdefault(name.lower(), name)
        if first != name:
            raise _Invalid(key, f"duplicate header (names ignore case): {json.dumps(first)}")
        fields_[name] = _convert(_header_value, raw, key)
    return fields_


def _route_headers(value: Any, path: str) -> dict[str, str]:
    conditions = _header_fields(value, path)
    for name in conditions:
        if name.lower() == "host":
            raise _Invalid(_join(path, name), 'match the host with the route\'s "host" key')
    return conditions


def _header_names(value: Any, path: str) -> tuple[str, ...]:
    names: tuple[str, ...] = _array(value, path, "an array of header names", _header_name)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        first = seen.setdefault(name.lower(), i)
        if first != i:
            raise _Invalid(f"{path}[{i}]", f"duplicate header {json.dumps(name)}")
    return names


def _check_edits(*, request: bool) -> Callable[[HeaderEditSettings, str], None]:
    def check(edits: HeaderEditSettings, path: str) -> None:
        used: dict[str, str] = {}  # lower-case name → the list that has it
        entries = [(_join(_join(path, "set"), name), "set", name) for name in edits.set]
        entries += [(_join(_join(path, "add"), name), "add", name) for name in edits.add]
        entries += [(f"{path}.remove[{i}]", "remove", n) for i, n in enumerate(edits.remove)]
        for key, kind, name in entries:
            lname = name.lower()
            if lname.encode("ascii") in UNEDITABLE:
                raise _Invalid(
                    key, f"{name} is a hop-by-hop or framing field that PIBL manages itself"
                )
            if request and lname == "host" and kind != "set":
                raise _Invalid(key, "a request carries exactly one Host; only set can change it")
            if lname in used:
                raise _Invalid(
                    key, f"{name} is already in {used[lname]}; a header goes in one list only"
                )
            used[lname] = kind

    return check


_EDITS_WHAT = 'a table, e.g. { set = { "X-A" = "1" }, add = { "X-B" = "2" }, remove = ["X-C"] }'


def _request_edits(value: Any, path: str) -> HeaderEditSettings:
    if not isinstance(value, Mapping):
        raise _expected(_EDITS_WHAT, value)
    return _REQUEST_EDITS.load(value, path)


def _response_edits(value: Any, path: str) -> HeaderEditSettings:
    if not isinstance(value, Mapping):
        raise _expected(_EDITS_WHAT, value)
    return _RESPONSE_EDITS.load(value, path)


# Fields PIBL drops from untrusted peers (pibl.http.rules): a route may only rely on them
# behind trusted proxies.
_FORGEABLE: Final = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}
)


def _check_route(route: RouteSettings, path: str) -> None:
    if route.strip_prefix and route.path_prefix is None:
        raise _Invalid(_join(path, "strip_prefix"), "needs path_prefix (the prefix to strip)")


def _url_path(value: Any, _path: str) -> str:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or re.search(r"[\s\x00-\x1f]", value)
    ):
        raise _expected('a path starting with "/" (no spaces)', value)
    return value


def _non_empty(value: Any, _path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _expected("a non-empty string", value)
    return value


def _redis_url(value: Any, _path: str) -> str:
    if not isinstance(value, str) or (
        value
        and not value.startswith(
            ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        )
    ):
        raise _expected(
            'a "redis://", "rediss://", "unix://", "redis+cluster://" or "rediss+cluster://" URL',
            value,
        )
    return value


_REDIS_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}", re.ASCII)


def _redis_prefix(value: Any, _path: str) -> str:
    if not isinstance(value, str) or not _REDIS_PREFIX_RE.fullmatch(value):
        raise _expected("1-64 letters, digits or _ . : { } - (a Redis key prefix)", value)
    return value


def _status(value: Any, _path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise _expected("an HTTP status code (100-599)", value)
    return value


def _statuses(value: Any, path: str) -> tuple[int, ...]:
    codes = _array(value, path, "an array of HTTP status codes", _status)
    if not codes:
        raise _Invalid(path, "expected at least one status code, got an empty array")
    return tuple(sorted(set(codes)))


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class _Section(Generic[T]):
    """How to read one TOML table into ``build``: converters per key, required keys (with what
    they expect), and a check of the finished object (cross-field rules)."""

    build: Callable[..., T]
    keys: Mapping[str, Converter]
    required: Mapping[str, str] = field(default_factory=dict)
    check: Callable[[T, str], None] | None = None

    def load(self, value: Any, path: str, **extra: Any) -> T:
        table = _table(value, path)
        for key in table:
            if key not in self.keys:
                hint = _suggest(key, list(self.keys)) or f"known keys: {', '.join(self.keys)}"
                raise _Invalid(_join(path, key), f"unknown key; {hint}")
        for key, what in self.required.items():
            if key not in table:
                raise _Invalid(_join(path, key), f"missing; expected {what}")
        kwargs = {
            key: _convert(self.keys[key], raw, _join(path, key)) for key, raw in table.items()
        }
        result = self.build(**kwargs, **extra)
        if self.check is not None:
            self.check(result, path)
        return result


def _table(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(path, str(_expected(f"a table ([{path}])" if path else "a table", value)))
    return value


def _server_entry(value: Any, path: str) -> ServerEntry:
    if isinstance(value, str):
        return ServerEntry(_convert(_address, value, path))
    if isinstance(value, Mapping):
        return _SERVER_ENTRY.load(value, path)
    raise _expected("an address string or a table {address = ..., weight = ...}", value)


def _servers(value: Any, path: str) -> tuple[ServerEntry, ...]:
    entries: tuple[ServerEntry, ...] = _array(
        value, path, "an array of addresses or {address = ...} tables", _server_entry
    )
    if not entries:
        raise _Invalid(path, "expected at least one server, got an empty array")
    _unique(entries, path, key=lambda entry: entry.address)
    return entries


def _health(value: Any, path: str) -> HealthSettings:
    return _HEALTH.load(value, path)


def _admin_token(value: Any, _path: str) -> str:
    # Sent in an Authorization header: visible ASCII only, so it survives copy-paste and HTTP.
    if not isinstance(value, str) or not re.fullmatch(r"[\x21-\x7e]+", value):
        raise _expected("a non-empty string of visible ASCII characters (no spaces)", value)
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as public


def _check_admin(admin: AdminSettings, path: str) -> None:
    # The admin API can drain servers and purge the cache: never expose it without a token.
    if admin.token is None and not _is_loopback(admin.listen.host):
        raise _Invalid(
            _join(path, "token"),
            f"missing; required when listen ({admin.listen}) is not a loopback address",
        )


def _admin(value: Any, server: ServerSettings) -> AdminSettings:
    admin = _ADMIN.load(value, "admin")
    if admin.listen.port != 0 and admin.listen in server.listen:
        raise _Invalid("admin.listen", f"{admin.listen} is already server.listen")
    # With server.workers > 1, worker 1 alone listens and merges the others' figures
    # (pibl.admin.cluster).
    return admin


def _check_cache(cache: CacheSettings, path: str) -> None:
    if cache.storage == "disk" and not cache.path:
        raise _Invalid(_join(path, "path"), 'missing; required when storage = "disk"')
    if cache.storage == "redis" and not cache.redis_url:
        raise _Invalid(_join(path, "redis_url"), 'missing; required when storage = "redis"')
    if cache.redis_url.startswith(("redis+cluster://", "rediss+cluster://")):
        if "{" in cache.redis_prefix or "}" in cache.redis_prefix:
            raise _Invalid(
                _join(path, "redis_prefix"),
                "must not contain { or } with a Redis Cluster URL (PIBL puts each entry's "
                f"digest in a hash tag), got {cache.redis_prefix!r}",
            )
        if urlsplit(cache.redis_url).path not in ("", "/", "/0"):
            raise _Invalid(
                _join(path, "redis_url"),
                f"Redis Cluster has database 0 only, got {cache.redis_url!r}",
            )
    if cache.max_object_size > cache.max_size:
        raise _Invalid(
            _join(path, "max_object_size"),
            f"expected at most max_size ({cache.max_size} bytes), got {cache.max_object_size}",
        )


def _hostname(value: Any, _path: str) -> str:
    what = "a hostname or IP address"
    if not isinstance(value, str):
        raise _expected(what, value)
    try:
        return _host_value(value)
    except ValueError as exc:
        raise _expected(what, value, str(exc)) from None


def _names(value: Any, path: str) -> tuple[str, ...]:
    names: tuple[str, ...] = _array(
        value, path, 'an array of hostnames (or "*.example.com")', _route_host
    )
    return names


def _certificate(value: Any, path: str) -> CertificateSettings:
    return _CERTIFICATE.load(value, path)


def _certificates(value: Any, path: str) -> tuple[CertificateSettings, ...]:
    what = "an array of {cert = ..., key = ...} tables"
    certificates: tuple[CertificateSettings, ...] = _array(value, path, what, _certificate)
    if not certificates:
        raise _Invalid(path, "expected at least one certificate, got an empty array")
    return certificates


def _tls(value: Any, path: str) -> TlsSettings:
    return _TLS.load(value, path)


def _check_upstream_tls(upstream: UpstreamSettings, path: str) -> None:
    if not upstream.tls:
        for key in ("tls_ca", "tls_server_name"):
            if getattr(upstream, key) is not None:
                raise _Invalid(_join(path, key), "only used with tls = true")


def _file_path(base_dir: str, path: str) -> str:
    # Relative to the configuration file's folder, like nginx's paths relative to its prefix.
    return os.path.normpath(os.path.join(base_dir, path))


def _server_tls_files(server: ServerSettings, base_dir: str) -> ServerSettings:
    """``server.tls`` with absolute file paths, once every certificate and key loads."""
    tls = server.tls
    if tls is None:
        return server
    for address in tls.listen:
        if address.port != 0 and address in server.listen:
            raise _Invalid("server.tls.listen", f"{address} is already server.listen")
        if address.port == 0 and server.workers > 1:
            raise _Invalid("server.tls.listen", "port 0 needs workers = 1 (each would get its own)")
    certificates = []
    for i, entry in enumerate(tls.certificates):
        entry = replace(
            entry, cert=_file_path(base_dir, entry.cert), key=_file_path(base_dir, entry.key)
        )
        try:
            load_certificate(entry.cert, entry.key, entry.names)
        except CertificateError as exc:
            raise _Invalid(f"server.tls.certificates[{i}].{exc.key}", exc.message) from None
        certificates.append(entry)
    return replace(server, tls=replace(tls, certificates=tuple(certificates)))


def _upstream_tls_files(upstream: UpstreamSettings, base_dir: str) -> UpstreamSettings:
    """``upstream`` with an absolute ``tls_ca``, once it loads."""
    if not upstream.tls:
        return upstream
    ca = _file_path(base_dir, upstream.tls_ca) if upstream.tls_ca is not None else None
    try:
        client_context(verify=upstream.tls_verify, ca=ca)
    except CertificateError as exc:
        raise _Invalid(_join(f"upstreams.{upstream.name}", exc.key), exc.message) from None
    return replace(upstream, tls_ca=ca)


_SERVER: Final = _Section(
    ServerSettings,
    {
        "listen": _listen,
        "workers": _workers,
        "trusted_proxies": _networks,
        "connect_timeout": _duration(positive=True),
        "read_timeout": _duration(positive=True),
        "send_timeout": _duration(positive=True),
        "client_header_timeout": _duration(positive=True),
        "client_body_timeout": _duration(positive=True),
        "keepalive_timeout": _duration(positive=False),
        "shutdown_timeout": _duration(positive=False),
        "max_request_line": _size(1),
        "max_header_size": _size(1),
        "max_header_count": _positive,
        "max_body_size": _size(0),
        "max_connections": _non_negative,
        "tunnel_idle_timeout": _duration(positive=False),
        "tls": _tls,
    },
    required={"listen": f'{_ADDRESS_WHAT} (e.g. "127.0.0.1:8080") or an array of them'},
)
_SERVER_ENTRY: Final = _Section(
    ServerEntry,
    {"address": _address, "weight": _positive, "max_connections": _non_negative},
    required={"address": _ADDRESS_WHAT},
)
_HEALTH: Final = _Section(
    HealthSettings,
    {
        "path": _url_path,
        "interval": _duration(positive=True),
        "timeout": _duration(positive=True),
        "expect_status": _statuses,
        "rise": _positive,
        "fall": _positive,
    },
)
_UPSTREAM: Final = _Section(
    UpstreamSettings,
    {
        "servers": _servers,
        "balance": _choice(BALANCE_NAMES),
        "hash_key": _hash_key,
        "keepalive": _non_negative,
        "keepalive_timeout": _duration(positive=False),
        "retries": _non_negative,
        "health": _health,
        "max_fails": _non_negative,
        "fail_timeout": _duration(positive=True),
        "queue": _non_negative,
        "queue_timeout": _duration(positive=True),
        "tls": _bool,
        "tls_verify": _bool,
        "tls_ca": _non_empty,
        "tls_server_name": _hostname,
    },
    required={"servers": 'an array of addresses, e.g. ["127.0.0.1:9001"]'},
    check=_check_upstream_tls,
)
_CERTIFICATE: Final = _Section(
    CertificateSettings,
    {"cert": _non_empty, "key": _non_empty, "names": _names},
    required={"cert": "the path of a PEM certificate chain", "key": "the path of its PEM key"},
)
_TLS: Final = _Section(
    TlsSettings,
    {"listen": _listen, "certificates": _certificates, "redirect_http": _bool},
    required={
        "listen": f'{_ADDRESS_WHAT} (e.g. "0.0.0.0:443") or an array of them',
        "certificates": 'an array like [{cert = "site.pem", key = "site.key"}]',
    },
)
_EDIT_KEYS: Final[Mapping[str, Converter]] = {
    "set": _header_fields,
    "add": _header_fields,
    "remove": _header_names,
}
_REQUEST_EDITS: Final = _Section(HeaderEditSettings, _EDIT_KEYS, check=_check_edits(request=True))
_RESPONSE_EDITS: Final = _Section(HeaderEditSettings, _EDIT_KEYS, check=_check_edits(request=False))
_ROUTE: Final = _Section(
    RouteSettings,
    {
        "host": _route_host,
        "path_prefix": _url_path,
        "headers": _route_headers,
        "upstream": _non_empty,
        "strip_prefix": _bool,
        "request_headers": _request_edits,
        "response_headers": _response_edits,
        "cache": _bool,
        "max_body_size": _size(1),
    },
    required={"upstream": "the name of an upstream"},
    check=_check_route,
)
_ACCESS_LOG: Final = _Section(
    AccessLogSettings,
    {"enabled": _bool, "path": _non_empty, "format": _choice(ACCESS_LOG_FORMATS)},
)
_CACHE: Final = _Section(
    CacheSettings,
    {
        "enabled": _bool,
        "storage": _choice(CACHE_STORAGES),
        "path": _string,
        "max_size": _size(1),
        "max_object_size": _size(1),
        "default_ttl": _duration(positive=False),
        "redis_url": _redis_url,
        "redis_prefix": _redis_prefix,
    },
    check=_check_cache,
)
_LOG: Final = _Section(LogSettings, {"level": _choice(LOG_LEVELS)})
_ADMIN: Final = _Section(
    AdminSettings,
    {"listen": _listen_address, "token": _admin_token},
    check=_check_admin,
)
_TOP_LEVEL: Final = ("server", "upstreams", "routes", "access_log", "cache", "log", "admin")


def _upstreams(value: Any) -> dict[str, UpstreamSettings]:
    pools = _table(value, "upstreams")
    if not pools:
        raise _Invalid("upstreams", "expected at least one upstream pool ([upstreams.NAME])")
    for name in pools:
        if not _NAME_RE.fullmatch(name):
            raise _Invalid(
                _join("upstreams", name),
                'invalid name; expected 1-64 letters, digits, "_" or "-"',
            )
    return {
        name: _UPSTREAM.load(raw, f"upstreams.{name}", name=name) for name, raw in pools.items()
    }


def _routes(
    value: Any, upstreams: Mapping[str, UpstreamSettings], server: ServerSettings
) -> tuple[RouteSettings, ...]:
    if not isinstance(value, list | tuple):
        raise _Invalid("routes", str(_expected("an array of tables ([[routes]])", value)))
    routes = tuple(_ROUTE.load(raw, f"routes[{i}]") for i, raw in enumerate(value))
    for i, route in enumerate(routes):
        if route.upstream not in upstreams:
            hint = _suggest(route.upstream, list(upstreams))
            raise _Invalid(
                f"routes[{i}].upstream",
                f"unknown upstream {json.dumps(route.upstream)}; "
                + (hint or f"defined upstreams: {_quote_all(list(upstreams))}"),
            )
        limit = server.max_body_size
        if limit and route.max_body_size is not None and route.max_body_size > limit:
            # The server's limit is enforced while the head is read, before routing.
            raise _Invalid(
                f"routes[{i}].max_body_size",
                f"expected at most server.max_body_size ({limit} bytes), got "
                f"{route.max_body_size}; the server's limit applies before routing: raise it "
                "and give the other routes lower limits",
            )
        for name in route.headers or {}:
            if name.lower() in _FORGEABLE and not server.trusted_proxies:
                raise _Invalid(
                    _join(f"routes[{i}].headers", name),
                    "any client can send this field (PIBL drops it after routing unless the "
                    "peer is in server.trusted_proxies, and none are set)",
                )
    if not routes and len(upstreams) > 1 and "default" not in upstreams:
        raise _Invalid(
            "routes",
            f"missing; with several upstreams ({_quote_all(list(upstreams))}) [[routes]] are "
            'needed to choose between them, or name one of them "default"',
        )
    return routes


def _parse(data: Any, source: str, base_dir: str) -> Settings:
    top = _table(data, "")
    for key in top:
        if key not in _TOP_LEVEL:
            hint = _suggest(key, _TOP_LEVEL) or f"known sections: {', '.join(_TOP_LEVEL)}"
            raise _Invalid(_join("", key), f"unknown key; {hint}")
    server = _server_tls_files(_SERVER.load(top.get("server", {}), "server"), base_dir)
    if "upstreams" not in top:
        raise _Invalid("upstreams", "missing; expected at least one [upstreams.NAME] table")
    upstreams = {
        name: _upstream_tls_files(upstream, base_dir)
        for name, upstream in _upstreams(top["upstreams"]).items()
    }
    return Settings(
        server=server,
        upstreams=upstreams,
        routes=_routes(top.get("routes", []), upstreams, server),
        access_log=_ACCESS_LOG.load(top.get("access_log", {}), "access_log"),
        cache=_CACHE.load(top.get("cache", {}), "cache"),
        log=_LOG.load(top.get("log", {}), "log"),
        admin=_admin(top["admin"], server) if "admin" in top else None,
        source=source,
    )


# --------------------------------------------------------------------------- entry points


def parse_config(
    data: Mapping[str, Any], source: str = "<config>", *, base_dir: str | None = None
) -> Settings:
    """Validate already-decoded TOML data; errors are ConfigErrors prefixed with ``source``.

    Relative file paths (TLS certificates, keys, CAs) are resolved against ``base_dir``, the
    current directory when None.
    """
    try:
        return _parse(data, source, base_dir or os.getcwd())
    except _Invalid as exc:
        raise ConfigError(
            f"{source}: {exc.path}: {exc.message}" if exc.path else f"{source}: {exc.message}"
        ) from None


def load_config(path: str | os.PathLike[str]) -> Settings:
    """Read and validate the TOML file at ``path``."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not valid UTF-8 (at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    return parse_config(data, source, base_dir=os.path.dirname(os.path.abspath(source)))


def quick_settings(listen: str, backends: Sequence[str], balance: str = "round_robin") -> Settings:
    """Settings for ``pibl run --listen A --backend B --backend C``: one upstream "default"."""
    checks: list[tuple[str, str, Converter]] = [("--listen", listen, _listen_address)]
    checks += [("--backend", backend, _address) for backend in backends]
    checks.append(("--balance", balance, _choice(BALANCE_NAMES)))
    for option, value, convert in checks:
        try:
            convert(value, option)
        except ValueError as exc:
            raise ConfigError(f"{option}: {exc}") from None
    if not backends:
        raise ConfigError("at least one --backend is required")
    addresses = [_address_value(b) for b in backends]
    for i, address in enumerate(addresses):
        if address in addresses[:i]:
            raise ConfigError(f"--backend: {address} is given twice")
    data = {
        "server": {"listen": listen},
        "upstreams": {"default": {"servers": list(backends), "balance": balance}},
    }
    return parse_config(data, "<command line>")


def _plain(value: Any) -> Any:
    if isinstance(value, Address | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in fields(value)
            if f.metadata.get("toml", True) and getattr(value, f.name) is not None
        }
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain TOML-like data (``None`` values left out).

    Durations are seconds, sizes bytes, addresses strings; ``parse_config`` reads it back into
    equal settings.
    """
    result: dict[str, Any] = _plain(settings)
    return result
