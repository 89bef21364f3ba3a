"""Message heads: the parsed start line and header fields of a request or a response.

Header names keep the case they arrived in (HTTP field names are case-insensitive, RFC 9110
§5.1, but some old servers are not); every lookup lowercases.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

Headers = list[tuple[bytes, bytes]]

# Field names lower-cased, each by the same object every time: a name is looked up several
# times per message (validation, header rules, logging, the cache), and ``bytes.lower()``
# allocated a new object, hashed anew by every set lookup, on each of those passes. Bounded in
# entries and in length (names come from clients: at most 2048 x 2 x 64 bytes are kept); past
# the bounds a name costs a plain ``lower()``.
_LOWER: Final[dict[bytes, bytes]] = {}
_LOWER_MAX: Final = 2048
_LOWER_MAX_LENGTH: Final = 64  # registered field names are under 40 bytes


def lower_name(name: bytes) -> bytes:
    """``name.lower()``, one shared object per distinct name."""
    lower = _LOWER.get(name)
    if lower is None:
        lower = name.lower()
        if len(_LOWER) < _LOWER_MAX and len(name) <= _LOWER_MAX_LENGTH:
            lower = _LOWER.setdefault(lower, lower)
            _LOWER[name] = lower
    return lower


def length_mask(names: Iterable[bytes]) -> int:
    """One bit per length among ``names``: a field whose name's length has no bit set
    (``not (mask >> len(name)) & 1``) is none of them, and needs no lowering to know it.

    Most fields of a message are not the few a loop looks for, and a length costs nothing
    where ``lower_name`` costs a hash and a dict lookup per fresh name.
    """
    mask = 0
    for name in names:
        mask |= 1 << len(name)
    return mask


def get_header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of the field ``name`` (given in lower case), or None."""
    size = len(name)
    for key, value in headers:
        if len(key) == size and lower_name(key) == name:
            return value
    return None


def get_all(headers: Headers, name: bytes) -> list[bytes]:
    """Every value of the field ``name`` (given in lower case), in order."""
    size = len(name)
    return [value for key, value in headers if len(key) == size and lower_name(key) == name]


def header_tokens(headers: Headers, name: bytes) -> set[bytes]:
    """The lower-cased comma-separated tokens of every ``name`` field (e.g. ``Connection``)."""
    tokens: set[bytes] = set()
    size = len(name)
    for key, value in headers:
        if len(key) == size and lower_name(key) == name:
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def get_cookie(headers: Headers, name: bytes) -> bytes | None:
    """The value of cookie ``name`` from the ``Cookie`` fields (RFC 6265 §5.4), or None."""
    for key, value in headers:
        if len(key) != 6 or lower_name(key) != b"cookie":
            continue
        for pair in value.split(b";"):
            cookie_name, sep, cookie_value = pair.strip().partition(b"=")
            if sep and cookie_name == name:
                return cookie_value
    return None


class RequestHead:
    """A request as received from a downstream client.

    ``target`` is the raw request-target (origin-form ``/path?query`` or absolute-form);
    ``client_ip`` is the address of the peer that sent it, used by strategies that hash on it
    and by the ``X-Forwarded-For`` rule.
    """

    __slots__ = (
        "client_ip",
        "content_length",
        "expects_continue",
        "headers",
        "host",
        "is_chunked",
        "keep_alive",
        "method",
        "scheme",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        version: str,
        headers: Headers,
        *,
        client_ip: str = "",
        scheme: str = "http",
        keep_alive: bool = True,
        content_length: int | None = None,
        is_chunked: bool = False,
        host: bytes = b"",
        expects_continue: bool = False,
        upgrade: bytes | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.client_ip = client_ip
        self.scheme = scheme
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.is_chunked = is_chunked
        self.host = host
        self.expects_continue = expects_continue
        self.upgrade = upgrade

    @property
    def has_body(self) -> bool:
        return self.is_chunked or bool(self.content_length)

    @property
    def path(self) -> bytes:
        """The path part of an origin-form target (absolute-form is reduced to its path)."""
        target = self.target
        query = target.find(b"?")
        if query >= 0:
            target = target[:query]
        if not target.startswith(b"/"):
            scheme_end = target.find(b"://")
            if scheme_end >= 0:
                # The authority ends at the first "/" or "?" (RFC 3986 §3.2): a "/" inside the
                # query of "http://h?next=/admin" is not the path.
                slash = target.find(b"/", scheme_end + 3)
                target = target[slash:] if slash >= 0 else b"/"
        return target

    def header(self, name: bytes) -> bytes | None:
        return get_header(self.headers, name)

    def with_headers(self, headers: Headers) -> RequestHead:
        """The same request with other header fields (e.g. a cache's conditional request)."""
        return RequestHead(
            self.method,
            self.target,
            self.version,
            headers,
            client_ip=self.client_ip,
            scheme=self.scheme,
            keep_alive=self.keep_alive,
            content_length=self.content_length,
            is_chunked=self.is_chunked,
            host=self.host,
            expects_continue=self.expects_continue,
            upgrade=self.upgrade,
        )

    def __repr__(self) -> str:
        return f"<RequestHead {self.method} {self.target!r} HTTP/{self.version}>"


class ResponseHead:
    """A response head as received from an upstream server (or built by PIBL).

    It has no protocol version: PIBL answers in HTTP/1.1 whatever the upstream spoke, and the
    upstream's framing is read from ``keep_alive``, ``content_length`` and ``is_chunked``.
    """

    __slots__ = (
        "content_length",
        "headers",
        "is_chunked",
        "keep_alive",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int,
        headers: Headers,
        *,
        reason: bytes = b"",
        keep_alive: bool = True,
        content_length: int | None = None,
        is_chunked: bool = False,
    ) -> None:
        self.status = status
        self.headers = headers
        self.reason = reason
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.is_chunked = is_chunked

    def header(self, name: bytes) -> bytes | None:
        return get_header(self.headers, name)

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status}>"
