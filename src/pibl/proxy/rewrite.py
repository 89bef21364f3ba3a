"""A route's configured rewrites: header edits and ``strip_prefix`` (pure, no I/O).

Edits are compiled once per route when the config is loaded (``HeaderEdits.compile``) and
applied per request with one pass over the fields; a route without edits compiles to ``None``
and costs nothing.

Order (DESIGN.md §1 phase 6, Go's ``ReverseProxy.Rewrite`` lesson): request edits are applied
to the fields PIBL is about to send, i.e. *after* its sanitising (hop-by-hop fields, spoofed
``X-Forwarded-*``) and after it added ``X-Forwarded-For/-Proto/-Host`` and ``Via``. An edit is
therefore never undone by the sanitiser, and an edit of one of PIBL's own fields wins: ``set``
replaces PIBL's value, ``remove`` drops it, ``add`` sends one more field. Response edits are
applied to the upstream's response head before the cache's response filter sees it, so a
stored response carries them and a cache hit is served with them (Envoy stores route-level
``response_headers_to_add`` the same way).

Framing and hop-by-hop fields (``Content-Length``, ``Transfer-Encoding``, ``Connection``, ...)
are PIBL's to manage and cannot be edited; the config loader refuses them (``UNEDITABLE``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from pibl.http.head import Headers
from pibl.http.rules import HOP_BY_HOP

__all__ = ["UNEDITABLE", "HeaderEdits", "strip_prefix"]

# PIBL re-frames every message and owns the connection: edits of these would desync framing.
UNEDITABLE: Final = HOP_BY_HOP | {b"content-length"}


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """Compiled ``set`` / ``add`` / ``remove`` edits of one message's header fields.

    ``drop``: lower-case names removed (those of ``set`` and ``remove``); ``append``: the
    fields added after the kept ones (``set``'s, then ``add``'s), names as configured.
    """

    drop: frozenset[bytes]
    append: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def compile(
        cls,
        set_: Iterable[tuple[str, str]] = (),
        add: Iterable[tuple[str, str]] = (),
        remove: Iterable[str] = (),
    ) -> HeaderEdits | None:
        """The edits, or ``None`` when there are none (the pipeline then skips the step)."""
        set_fields = [(n.encode("ascii"), v.encode("ascii")) for n, v in set_]
        add_fields = [(n.encode("ascii"), v.encode("ascii")) for n, v in add]
        drop = frozenset(
            [n.lower() for n, _ in set_fields] + [n.encode("ascii").lower() for n in remove]
        )
        if not drop and not add_fields:
            return None
        return cls(drop, (*set_fields, *add_fields))

    def apply(self, headers: Headers) -> Headers:
        """A new field list: ``headers`` without the dropped names, plus the appended fields."""
        drop = self.drop
        if drop:
            kept = [field for field in headers if field[0].lower() not in drop]
        else:
            kept = list(headers)
        kept.extend(self.append)
        return kept


def strip_prefix(target: bytes, prefix: bytes) -> bytes:
    """``target`` with ``prefix`` removed from its path; the query is kept, an empty path
    becomes ``/`` and a path left without a leading ``/`` gets one (Traefik's and Caddy's
    StripPrefix: ``/api`` → ``/``, ``/api/x?q`` → ``/x?q``).

    The caller matched ``prefix`` against the target's path (``RequestHead.path``), so the
    path starts with it. An absolute-form target keeps its ``scheme://authority``.
    """
    query_at = target.find(b"?")
    path, query = (target, b"") if query_at < 0 else (target[:query_at], target[query_at:])
    origin = b""
    if not path.startswith(b"/"):
        scheme_end = path.find(b"://")
        if scheme_end >= 0:
            slash = path.find(b"/", scheme_end + 3)
            origin, path = (path, b"/") if slash < 0 else (path[:slash], path[slash:])
    if path.startswith(prefix):
        path = path[len(prefix) :]
    if not path.startswith(b"/"):
        path = b"/" + path
    return origin + path + query
