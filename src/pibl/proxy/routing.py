"""Route matching: the first rule in file order whose host, path prefix and header conditions
all match; host normalisation; and, for ``pibl route`` and ``pibl check``, why a request takes
a route (``explain``) and which rules can never match (``shadowed``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pibl.http.head import RequestHead
from pibl.proxy.rewrite import HeaderEdits

if TYPE_CHECKING:
    from pibl.config import HeaderEditSettings, RouteSettings

T = TypeVar("T")

Fields = Sequence[tuple[bytes, bytes]]
# A header condition: the lower-case name, and the exact value, or None for "present".
HeaderCondition = tuple[bytes, bytes | None]
# In the config, a header condition's value "*" means "present, with any value".
ANY_VALUE = "*"


def normalize_host(host: bytes) -> str:
    """Host without port or trailing dot, lower-cased (RFC 9110 §4.2.3)."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end > 0 else text
    return text.rsplit(":", 1)[0].rstrip(".") if ":" in text else text.rstrip(".")


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        # "*.example.com" matches any subdomain, not the bare domain (nginx, Caddy).
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def _has_field(headers: Fields, name: bytes, value: bytes | None) -> bool:
    """Whether a field ``name`` (lower case) is present with ``value`` (None: any value).

    Names are case-insensitive (RFC 9110 §5.1), values exact; a repeated field matches when
    any of its lines has the value.
    """
    return any(key.lower() == name and (value is None or got == value) for key, got in headers)


def _edits(settings: HeaderEditSettings | None) -> HeaderEdits | None:
    if settings is None:
        return None
    return HeaderEdits.compile(settings.set.items(), settings.add.items(), settings.remove)


@dataclass(frozen=True, slots=True)
class Route(Generic[T]):
    """One routing rule and what it does: ``target`` is the upstream pool (its name in tests
    and in ``pibl check``); ``max_body_size`` 0 leaves only the server's limit."""

    target: T
    name: str
    host: str | None = None
    path_prefix: bytes | None = None
    cache: bool = True
    headers: tuple[HeaderCondition, ...] = ()
    strip_prefix: bool = False
    request_edits: HeaderEdits | None = None
    response_edits: HeaderEdits | None = None
    max_body_size: int = 0

    @classmethod
    def from_settings(cls, settings: RouteSettings, target: T) -> Route[T]:
        """The runtime form of a ``[[routes]]`` entry: values encoded and edits compiled once."""
        return cls(
            target,
            name=settings.upstream,
            host=settings.host.lower() if settings.host else None,
            path_prefix=settings.path_prefix.encode() if settings.path_prefix else None,
            cache=settings.cache,
            headers=tuple(
                (name.lower().encode("ascii"), None if value == ANY_VALUE else value.encode())
                for name, value in (settings.headers or {}).items()
            ),
            strip_prefix=bool(settings.strip_prefix),
            request_edits=_edits(settings.request_headers),
            response_edits=_edits(settings.response_headers),
            max_body_size=settings.max_body_size or 0,
        )

    def matches(self, host: str, path: bytes, headers: Fields = ()) -> bool:
        if self.host is not None and not _host_matches(self.host, host):
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        return not self.headers or all(_has_field(headers, n, v) for n, v in self.headers)

    def first_mismatch(self, host: str, path: bytes, headers: Fields = ()) -> str | None:
        """The first condition that ``matches`` finds false, as text; None when it matches."""
        if self.host is not None and not _host_matches(self.host, host):
            if not host:
                return f"the request names no host (the rule needs {_quote(self.host)})"
            if self.host.startswith("*."):
                return f"host {_quote(host)} is not a subdomain of {_quote(self.host[2:])}"
            return f"host {_quote(host)} is not {_quote(self.host)}"
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return f"path {_quote(path)} does not start with {_quote(self.path_prefix)}"
        for name, value in self.headers:
            if not _has_field(headers, name, value):
                values = [v for k, v in headers if k.lower() == name]
                if not values:
                    return f"header {name.decode()} is missing"
                shown = " and ".join(_quote(v) for v in values)
                return f"header {name.decode()} is {shown}, not {_quote(value or b'')}"
        return None

    def conditions(self) -> list[str]:
        """This route's conditions as text, in the order they are checked."""
        out = []
        if self.host is not None:
            out.append(f"host = {_quote(self.host)}")
        if self.path_prefix is not None:
            out.append(f"path_prefix = {_quote(self.path_prefix)}")
        for name, value in self.headers:
            shown = "present" if value is None else f"= {_quote(value)}"
            out.append(f"header {name.decode()} {shown}")
        return out


class Router(Generic[T]):
    def __init__(self, routes: Sequence[Route[T]]) -> None:
        self.routes = tuple(routes)
        self._single = self.routes[0] if len(self.routes) == 1 and self._is_catch_all() else None

    def _is_catch_all(self) -> bool:
        only = self.routes[0]
        return only.host is None and only.path_prefix is None and not only.headers

    def match(self, request: RequestHead) -> Route[T] | None:
        if self._single is not None:
            return self._single
        host = normalize_host(request.host)
        path = request.path
        headers = request.headers
        for route in self.routes:
            if route.matches(host, path, headers):
                return route
        return None


def _quote(value: str | bytes) -> str:
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return json.dumps(text, ensure_ascii=False)


# --------------------------------------------------------------------------- explanations


@dataclass(frozen=True, slots=True)
class Explanation:
    """How the router decides one request: ``skipped`` lists (route index, first condition
    that failed) in order, up to ``matched``, the index of the route taken (None: no match)."""

    skipped: tuple[tuple[int, str], ...]
    matched: int | None


def explain(routes: Sequence[Route[Any]], request: RequestHead) -> Explanation:
    """Why ``request`` takes the route it takes: the same checks as ``Router.match``."""
    host = normalize_host(request.host)
    path = request.path
    skipped: list[tuple[int, str]] = []
    for index, route in enumerate(routes):
        reason = route.first_mismatch(host, path, request.headers)
        if reason is None:
            return Explanation(tuple(skipped), index)
        skipped.append((index, reason))
    return Explanation(tuple(skipped), None)


# --------------------------------------------------------------------------- shadowed rules


def _host_covers(earlier: str | None, later: str | None) -> bool:
    if earlier is None:
        return True
    if later is None:
        return False
    if later.startswith("*."):
        # Every host "*.a.example.com" matches also matches "*.example.com".
        return earlier.startswith("*.") and later[1:].endswith(earlier[1:])
    return _host_matches(earlier, later)


def _headers_cover(earlier: Iterable[HeaderCondition], later: Iterable[HeaderCondition]) -> bool:
    required = dict(later)
    for name, value in earlier:
        if name not in required:
            return False
        if value is not None and required[name] != value:
            return False  # "present" (None) does not imply an exact value
    return True


def _prefix_covers(earlier: bytes | None, later: bytes | None) -> bool:
    # "/" counts as no prefix: it misses only the asterisk-form "OPTIONS *" (RFC 9112 §3.2.4),
    # which no one writes a rule for.
    if earlier is None or earlier == b"/":
        return True
    return later is not None and later.startswith(earlier)


def covers(earlier: Route[Any], later: Route[Any]) -> bool:
    """Whether every request that ``later`` matches is matched by ``earlier`` (its host,
    path prefix and header conditions are each equal or broader), so that ``later``, placed
    after ``earlier``, can never be taken."""
    return (
        _host_covers(earlier.host, later.host)
        and _prefix_covers(earlier.path_prefix, later.path_prefix)
        and _headers_cover(earlier.headers, later.headers)
    )


def shadowed(routes: Sequence[Route[Any]]) -> list[tuple[int, int]]:
    """``(index, by)`` for each route that can never match because the earlier route ``by``
    (the first such one) takes every request it would: first match wins."""
    found = []
    for index, later in enumerate(routes):
        for by in range(index):
            if covers(routes[by], later):
                found.append((index, by))
                break
    return found


def cached_by_header(routes: Sequence[Route[Any]]) -> list[int]:
    """Indices of routes that match on header fields and use the cache: the cache key is the
    URL, so their responses are shared with requests for the same URL that take another route
    (unless the upstream sends ``Vary`` on those fields)."""
    return [i for i, route in enumerate(routes) if route.headers and route.cache]
