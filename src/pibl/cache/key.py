"""Primary cache keys (RFC 9111 §2, §4): the target URI of a request, normalised just enough.

A key is a structure, never a concatenated string, so ``/a/b`` and ``/ab`` (or two hosts whose
names happen to share a prefix) cannot collide. GET and HEAD share one entry (a HEAD is answered
from a stored GET, RFC 9111 §4.3.5), so the method is not part of the key; secondary keys (Vary)
live in :mod:`pibl.cache.policy`.

Normalisation is limited to what RFC 3986 §6.2.2-§6.2.3 and RFC 9110 §4.2.3 call equivalent and
is cheap to do safely: scheme and host are case-insensitive, a default port is the same as no
port, a trailing dot on a host name is dropped, and an empty path is ``/``. The path and query are
kept byte-for-byte (decoded as latin-1, which is lossless): percent-escapes are *not* decoded,
because an origin may treat ``%2F`` and ``/`` differently. Two spellings of one resource can then
miss each other, which costs a fetch; merging two resources would serve the wrong content.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Final

from pibl.http.head import RequestHead, get_header

__all__ = ["CacheKey", "key_from_url", "make_key", "normalise_host"]

_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}
# Version tag of the canonical encoding: bump it if the fields change, so old entries miss.
_MAGIC: Final = b"pibl-key\x01"
_LEN: Final = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class CacheKey:
    """The primary key of a cache entry: ``scheme://host`` + raw path and query."""

    scheme: str
    host: str
    path_and_query: str

    @property
    def url(self) -> str:
        """The key as an absolute URI (for logs and for resolving relative references)."""
        return f"{self.scheme}://{self.host}{self.path_and_query}"

    @property
    def origin(self) -> tuple[str, str]:
        """Scheme and normalised authority: RFC 9110 §4.3.1's origin, used by §4.4."""
        return (self.scheme, self.host)

    def to_bytes(self) -> bytes:
        """A canonical, length-prefixed encoding, stored with an entry so every read checks it."""
        out = bytearray(_MAGIC)
        for field in (self.scheme, self.host, self.path_and_query):
            data = field.encode("utf-8", "surrogatepass")
            out += _LEN.pack(len(data))
            out += data
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> CacheKey:
        """The inverse of :meth:`to_bytes`; raises ``ValueError`` on anything else."""
        if not data.startswith(_MAGIC):
            raise ValueError("not a PIBL cache key")
        fields: list[str] = []
        pos = len(_MAGIC)
        for _ in range(3):
            if pos + _LEN.size > len(data):
                raise ValueError("truncated cache key")
            (length,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            if pos + length > len(data):
                raise ValueError("truncated cache key")
            fields.append(data[pos : pos + length].decode("utf-8", "surrogatepass"))
            pos += length
        if pos != len(data):
            raise ValueError("trailing bytes after cache key")
        return cls(fields[0], fields[1], fields[2])

    def digest(self) -> str:
        """Hex SHA-256 of :meth:`to_bytes`: safe as a file name or a Redis key.

        The encoding is injective (length prefixes), so distinct keys have distinct digests
        unless SHA-256 collides; readers still compare the stored full key.
        """
        return hashlib.sha256(self.to_bytes()).hexdigest()


def normalise_host(host: str, scheme: str) -> str:
    """Lower-case, drop a trailing dot and a default (or empty) port (RFC 3986 §6.2.3).

    ``Example.COM.:80`` → ``example.com`` for http; IPv6 literals keep their brackets. A value
    that is not ``name[:digits]`` is only lower-cased.
    """
    host = host.strip().lower()
    if host.startswith("["):  # IP-literal (RFC 3986 §3.2.2)
        end = host.find("]")
        name, rest = (host[: end + 1], host[end + 1 :]) if end >= 0 else (host, "")
        if rest and not rest.startswith(":"):
            return host
        port = rest[1:]
    else:
        name, sep, port = host.rpartition(":")
        if not sep:
            name, port = host, ""
        name = name.rstrip(".")  # "example.com." names the same host (RFC 1034 §3.1)
    if port and not (port.isascii() and port.isdigit()):
        return host
    if port:
        port = str(int(port))  # ":0080" is ":80"
    if not port or port == _DEFAULT_PORTS.get(scheme):
        return name
    return f"{name}:{port}"


_ABSOLUTE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^#]*)", re.ASCII | re.DOTALL)


def _split_absolute(target: str) -> tuple[str, str, str] | None:
    """``scheme://authority/path?q`` → (scheme, authority, path?q); None if not absolute."""
    match = _ABSOLUTE.fullmatch(target.split("#", 1)[0])
    if match is None:
        return None
    scheme, authority, path = match.groups()
    authority = authority.rpartition("@")[2]  # drop userinfo (RFC 9110 §4.2.4)
    if not path.startswith("/"):
        path = "/" + path  # an empty path is "/" (RFC 9110 §4.2.3)
    return scheme.lower(), authority, path


def make_key(request: RequestHead) -> CacheKey:
    """The primary key for ``request``'s target URI (RFC 9110 §7.1 reconstruction).

    An absolute-form target names its own scheme and authority (RFC 9112 §3.2.2); otherwise
    the connection's scheme and the ``Host`` are used.
    """
    target = request.target.decode("latin-1")
    absolute = _split_absolute(target) if not target.startswith("/") else None
    if absolute is not None:
        scheme, authority, path = absolute
        return CacheKey(scheme, normalise_host(authority, scheme), path)
    scheme = request.scheme.lower()
    host = request.host or get_header(request.headers, b"host") or b""
    return CacheKey(scheme, normalise_host(host.decode("latin-1"), scheme), target)


def key_from_url(url: str) -> CacheKey:
    """The key for an absolute ``http(s)://host/path?q`` URL (e.g. a purge request).

    Raises ``ValueError`` for anything that is not an absolute URL with a host. URLs are
    expected in their transmitted (ASCII, percent-encoded) form, as in a request-target.
    """
    parts = _split_absolute(url.strip())
    if parts is None or not parts[1]:
        raise ValueError(f"not an absolute URL: {url!r}")
    scheme, authority, path = parts
    return CacheKey(scheme, normalise_host(authority, scheme), path)
