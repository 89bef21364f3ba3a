"""Answering a ``Range`` request from a complete stored response (RFC 9110 §14), sans-I/O.

PIBL stores only complete responses (a 206 is never stored), and slices one on the way out:
a GET with a single byte range that the stored 200 satisfies gets a 206 with ``Content-Range``
(§14.4, §15.3.7); a range set none of whose members it satisfies gets a 416 with
``Content-Range: bytes */length`` (§15.5.17). Everything else is answered with the whole
response, which §14.2 allows ("a server MAY ignore the Range header field"): a malformed
specifier, another unit, several satisfiable ranges (no ``multipart/byteranges``; one
satisfiable member among unsatisfiable ones is served alone), a method other than GET, a
stored status other than 200, and an ``If-Range`` that does not match strongly (§13.1.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from pibl.cache.policy import parse_http_date
from pibl.http.head import Headers, RequestHead, get_all, get_header

__all__ = ["RangeReply", "select_range"]

_INT_RANGE: Final = re.compile(r"([0-9]+)-([0-9]*)", re.ASCII)
_SUFFIX_RANGE: Final = re.compile(r"-([0-9]+)", re.ASCII)
# RFC 9110 §8.8.2.2: a Last-Modified is strong only if at least this long before Date.
_STRONG_LM_SECONDS: Final = 1.0


@dataclass(frozen=True, slots=True)
class RangeReply:
    """A 206 for bytes ``first..last`` (inclusive) of ``length``, or a 416 when
    ``satisfiable`` is False."""

    length: int
    first: int = 0
    last: int = -1
    satisfiable: bool = True

    @property
    def status(self) -> int:
        return 206 if self.satisfiable else 416

    @property
    def reason(self) -> bytes:
        return b"Partial Content" if self.satisfiable else b"Range Not Satisfiable"

    @property
    def content_range(self) -> bytes:
        """The ``Content-Range`` value (RFC 9110 §14.4)."""
        if not self.satisfiable:
            return b"bytes */%d" % self.length
        return b"bytes %d-%d/%d" % (self.first, self.last, self.length)

    def slice(self, body: bytes) -> bytes:
        return body[self.first : self.last + 1] if self.satisfiable else b""


def _spec(member: str, length: int) -> tuple[int, int] | bool | None:
    """One range-spec → (first, last) when satisfiable, False when valid but unsatisfiable,
    None when invalid."""
    if match := _INT_RANGE.fullmatch(member):
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else None
        if last is not None and last < first:
            return None  # §14.1.1: invalid
        if first >= length:
            return False
        return first, length - 1 if last is None else min(last, length - 1)
    if match := _SUFFIX_RANGE.fullmatch(member):
        suffix = int(match.group(1))
        if suffix == 0 or length == 0:
            return False
        return max(0, length - suffix), length - 1
    return None


def _if_range_matches(value: bytes, stored_headers: Headers) -> bool:
    """§13.1.5: a strong match of an entity-tag, or a date equal to a strong Last-Modified."""
    value = value.strip(b" \t")
    if value.startswith((b'"', b"W/")):
        etag = get_header(stored_headers, b"etag")
        return (
            etag is not None
            and value.startswith(b'"')
            and not etag.strip().startswith(b"W/")
            and etag.strip() == value
        )
    since = parse_http_date(value)
    raw_lm = get_header(stored_headers, b"last-modified")
    modified = parse_http_date(raw_lm) if raw_lm is not None else None
    if since is None or modified is None or since != modified:
        return False
    raw_date = get_header(stored_headers, b"date")
    date = parse_http_date(raw_date) if raw_date is not None else None
    return date is not None and date - modified >= _STRONG_LM_SECONDS


def select_range(
    request: RequestHead, stored_headers: Headers, *, status: int, length: int
) -> RangeReply | None:
    """How to answer ``request`` from a stored response of ``length`` bytes: a
    :class:`RangeReply`, or None for the whole response."""
    if request.method != "GET" or status != 200:
        return None  # §14.2: range handling is defined for GET only
    values = get_all(request.headers, b"range")
    if len(values) != 1:
        return None
    unit, sep, range_set = values[0].decode("latin-1").strip(" \t").partition("=")
    if not sep or unit.lower() != "bytes":
        return None
    if_range = get_all(request.headers, b"if-range")
    if if_range and (len(if_range) != 1 or not _if_range_matches(if_range[0], stored_headers)):
        return None
    members = [m.strip(" \t") for m in range_set.split(",")]
    members = [m for m in members if m]
    if not members:
        return None
    specs = [_spec(m, length) for m in members]
    if any(spec is None for spec in specs):
        return None  # one invalid member makes the whole field invalid (§14.1.1)
    satisfiable = [spec for spec in specs if isinstance(spec, tuple)]
    if not satisfiable:
        return RangeReply(length, satisfiable=False)
    if len(satisfiable) > 1:
        return None  # several ranges: the whole response rather than multipart/byteranges
    first, last = satisfiable[0]
    return RangeReply(length, first, last)
