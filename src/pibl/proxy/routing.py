"""Route matching: the first rule in file order whose host and path prefix match."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pibl.http.head import RequestHead

T = TypeVar("T")


def normalize_host(host: bytes) -> str:
    """Host without port or trailing dot, lower-cased (RFC 9110 §4.2.3)."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end > 0 else text
    return text.rsplit(":", 1)[0].rstrip(".") if ":" in text else text.rstrip(".")


@dataclass(frozen=True, slots=True)
class Route(Generic[T]):
    target: T
    name: str
    host: str | None = None
    path_prefix: bytes | None = None
    cache: bool = True

    def matches(self, host: str, path: bytes) -> bool:
        if self.host is not None:
            pattern = self.host
            if pattern.startswith("*."):
                # "*.example.com" matches any subdomain, not the bare domain (nginx, Caddy).
                if not host.endswith(pattern[1:]) or len(host) <= len(pattern) - 1:
                    return False
            elif host != pattern:
                return False
        return self.path_prefix is None or path.startswith(self.path_prefix)


class Router(Generic[T]):
    def __init__(self, routes: Sequence[Route[T]]) -> None:
        self.routes = tuple(routes)
        self._single = self.routes[0] if len(self.routes) == 1 and self._is_catch_all() else None

    def _is_catch_all(self) -> bool:
        only = self.routes[0]
        return only.host is None and only.path_prefix is None

    def match(self, request: RequestHead) -> Route[T] | None:
        if self._single is not None:
            return self._single
        host = normalize_host(request.host)
        path = request.path
        for route in self.routes:
            if route.matches(host, path):
                return route
        return None
