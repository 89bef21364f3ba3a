"""The policy of an RFC 9111 *shared* cache, sans-I/O: pure functions over message heads.

Nothing here reads a clock or touches a socket: every time-dependent function takes the times it
needs (``now``, ``request_time``, ``response_time``, all epoch seconds). Section numbers refer to
RFC 9111 (HTTP Caching) unless another RFC is named: RFC 9110 (HTTP Semantics), RFC 5861
(stale-while-revalidate / stale-if-error), RFC 9211 (Cache-Status).

Choices where the RFCs leave room (each is repeated where it is implemented):

* Duplicate Cache-Control directives: the first occurrence wins (§4.2.1), except ``no-cache``
  and ``private``, where an unqualified occurrence beats a qualified one (the most restrictive,
  §4.2.1) and qualified field lists are merged.
* An invalid delta-seconds (``max-age=abc``, ``max-age=-1``, ``max-age= 5``) makes the response
  stale (§4.2.1 "caches are encouraged to consider responses that have invalid freshness
  information to be stale"); a malformed directive name (``max-age =5``) is ignored.
* Qualified ``no-cache="f"`` / ``private="f"`` strip the named fields before storage and let the
  rest be stored and reused (§5.2.2.4, §5.2.2.7), as the cache-tests.fyi "headers" tests expect.
* A ``Set-Cookie`` response is stored only with explicit freshness (max-age, s-maxage or
  Expires), never by heuristics or the configured default TTL: per-user cookies must not be
  replayed to everybody just because an origin forgot Cache-Control.
* Heuristic freshness (§4.2.2) is 10% of ``Date - Last-Modified``, capped at 24 hours.
* ``s-maxage`` implies ``proxy-revalidate`` (§5.2.2.10), so it forbids serving stale through
  ``max-stale`` or disconnection; the origin's explicit ``stale-while-revalidate`` /
  ``stale-if-error`` (RFC 5861) still apply alongside it (the usual CDN reading of
  ``s-maxage=60, stale-while-revalidate=30``). ``must-revalidate``, ``proxy-revalidate`` and
  ``no-cache`` forbid stale responses of every kind.
* Request directives (§5.2.1) are honoured unless ``honor_request=False``; a request
  ``no-store`` stops storage but not reuse of an already stored response (§5.2.1.5). ``Pragma:
  no-cache`` counts as ``Cache-Control: no-cache`` when the request has no Cache-Control
  (RFC 7234 §5.4; deprecated by §5.4 but still sent by HTTP/1.0 clients).
* GET responses are stored, and POST responses whose Content-Location is their own target URI
  and that have explicit freshness (RFC 9110 §9.3.3); both answer later GET and HEAD requests.
  206 is never stored (a Range request is answered from a stored 200, see
  :mod:`pibl.cache.ranges`) and 304 only freshens.
* An ``Age`` that is not a single delta-seconds makes the response's age unknown, hence stale
  (see ``_age_value``).
* A Surrogate-Control (Edge Architecture) meant for PIBL takes precedence over Cache-Control
  (see :func:`response_cache_control`).
* A 304 never updates the fields that describe the stored bytes (Content-Encoding, -Length,
  -Range, -MD5, digests, ETag; §3.2 "fields that the cache's stored response depends upon"),
  and one whose validators identify no stored response updates nothing (§4.3.4): the pipeline
  then repeats the request without PIBL's validators. The stored ``Age`` restarts from the 304.
* A 200 response to HEAD freshens the stored GET response it agrees with and invalidates one it
  contradicts (§4.3.5, :func:`head_response_matches`).
* Vary: Accept-Language, Accept-Encoding and Accept-Charset match case-insensitively (§4.1);
  list order is kept, as it may express preference.
"""

from __future__ import annotations

import calendar
import dataclasses
import enum
import json
import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from email.utils import formatdate
from typing import Any, Final
from urllib.parse import urljoin

from pibl.cache.key import CacheKey, key_from_url, make_key
from pibl.errors import caused_by
from pibl.http.framing import response_head_bytes
from pibl.http.head import (
    Headers,
    RequestHead,
    ResponseHead,
    get_all,
    get_header,
    header_tokens,
    lower_name,
)

__all__ = [
    "DELTA_SECONDS_MAX",
    "ERROR_STATUSES",
    "HEURISTIC_CAP",
    "HEURISTIC_STATUSES",
    "SAFE_METHODS",
    "SURROGATE_CAPABILITY",
    "SURROGATE_DEVICE",
    "UNDERSTOOD_STATUSES",
    "Action",
    "CacheControl",
    "Decision",
    "ResponseFacts",
    "SecondaryKey",
    "StoredResponse",
    "age_header",
    "cache_status",
    "client_conditional_matches",
    "conditional_headers",
    "current_age",
    "decide",
    "downstream_surrogate_control",
    "format_http_date",
    "freshen_headers",
    "freshness_lifetime",
    "head_response_matches",
    "invalidation_targets",
    "matches_304_entry",
    "not_modified_headers",
    "only_if_cached",
    "parse_cache_control",
    "parse_http_date",
    "request_cache_control",
    "response_cache_control",
    "revalidation_headers",
    "secondary_key",
    "stale_if_error_allowed",
    "storable",
    "strip_for_storage",
    "surrogate_control",
    "vary_fields",
    "vary_matches",
    "with_surrogate_capability",
    "without_surrogate_control",
]

CacheControl = dict[str, str | None]
# The request's values of the fields a response varies on: ((lower-case name, value|None), ...).
SecondaryKey = tuple[tuple[str, str | None], ...]

# §1.2.2: a delta-seconds too large to represent is taken as 2^31.
DELTA_SECONDS_MAX: Final = 2**31
# §4.2.2 suggests 10% of the time since Last-Modified; the cap is PIBL's choice.
HEURISTIC_FRACTION: Final = 0.1
HEURISTIC_CAP: Final = 24 * 3600.0
# RFC 9110 §15.1 "heuristically cacheable" codes, minus 206 (PIBL has no range support), plus
# 451 (RFC 7725 §3: "cacheable by default").
HEURISTIC_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 451, 501})
# Final codes whose caching rules PIBL implements, for ``must-understand`` (§5.2.2.3).
UNDERSTOOD_STATUSES: Final = HEURISTIC_STATUSES | frozenset(
    {201, 202, 205, 302, 303, 307, *range(400, 418), 421, 422, 426, 500, 502, 503, 504, 505}
)
# RFC 5861 §4: "an error is any situation that would result in a 500, 502, 503, or 504".
ERROR_STATUSES: Final = frozenset({500, 502, 503, 504})
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 §9.2.1

# §3.1: hop-by-hop fields (RFC 9110 §7.6.1) and fields specific to the proxy hop are not stored.
_NOT_STORED: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authentication-info",
        b"proxy-authorization",
    }
)
# §3.2: fields a 304 (or a 200 to HEAD, §4.3.5) never updates: those §3.1 keeps out,
# Content-Length, and "header fields that the cache's stored response depends upon" -- the ones
# describing the stored bytes themselves: their coding, digests and range, and the entity-tag
# that identifies them (a 304 confirms the stored representation; it cannot relabel it). These
# are the fields draft-ietf-httpbis-cache listed before RFC 9111 made the list a judgement call.
_NOT_UPDATED: Final = _NOT_STORED | {
    b"content-length",
    b"content-encoding",
    b"content-range",
    b"content-md5",
    b"content-digest",
    b"repr-digest",
    b"digest",
    b"etag",
}
# RFC 9110 §15.4.5: what a 304 carries (Last-Modified only to help when there is no ETag).
_NOT_MODIFIED_FIELDS: Final = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)
_UNKNOWN_LIFETIME: Final = 1.0  # see _lifetime
_ABSENT: Final = "\x00absent"  # a ``dict.get`` default no directive value can equal

# --------------------------------------------------------------------------------------------
# Cache-Control (§5.2)

_TCHAR: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _skip_element(text: str, i: int) -> int:
    """Index of the next top-level comma from ``i`` (quoted strings may contain commas)."""
    n = len(text)
    while i < n and text[i] != ",":
        if text[i] == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        i += 1
    return min(i, n)


def _quoted_string(text: str, i: int) -> tuple[str | None, int]:
    """Unquote the quoted-string at ``text[i] == '"'`` (RFC 9110 §5.6.4); None if unterminated."""
    out: list[str] = []
    i += 1
    while i < len(text):
        char = text[i]
        if char == '"':
            return "".join(out), i + 1
        if char == "\\" and i + 1 < len(text):
            i += 1
            char = text[i]
        out.append(char)
        i += 1
    return None, i


def _directives(text: str) -> Iterator[tuple[str, str | None]]:
    """``token [ "=" ( token / quoted-string ) ]`` list members; malformed members are skipped."""
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t,":
            i += 1
            continue
        start = i
        while i < n and text[i] in _TCHAR:
            i += 1
        name, value, ok = text[start:i].lower(), None, i > start
        if ok and i < n and text[i] == "=":  # no whitespace around "=" (§5.2)
            if i + 1 < n and text[i + 1] == '"':
                value, i = _quoted_string(text, i + 1)
                ok = value is not None
            else:
                end = _skip_element(text, i + 1)
                value, i = text[i + 1 : end].rstrip(" \t"), end
        j = i
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] != ",":  # junk after the member, e.g. "max-age =5"
            ok, j = False, _skip_element(text, j)
        i = j
        if ok:
            yield name, value


def parse_cache_control(values: Iterable[bytes]) -> CacheControl:
    """Cache-Control field lines → ``{directive: value or None}`` (names lower-case).

    Quoted-string values are unquoted. The first occurrence of a directive wins (§4.2.1), but
    an unqualified ``no-cache``/``private`` beats a qualified one and qualified lists merge.
    Values are not validated here; see ``_delta`` for how freshness directives are read.
    """
    directives: CacheControl = {}
    for name, value in _directives(b",".join(values).decode("latin-1")):
        if name in ("no-cache", "private"):
            if value is not None and not value.strip(" \t,"):
                value = None  # `no-cache=""` names no field: treat as unqualified (safer)
            if name in directives:
                prior = directives[name]
                value = None if prior is None or value is None else f"{prior}, {value}"
            directives[name] = value
        elif name not in directives:
            directives[name] = value
    return directives


def _delta(value: str | None) -> int | None:
    """delta-seconds (§1.2.2): ``1*DIGIT``, capped at 2^31; None if absent or invalid."""
    if not value or not value.isascii() or not value.isdigit():
        return None
    digits = value.lstrip("0") or "0"
    return DELTA_SECONDS_MAX if len(digits) > 10 else min(int(digits), DELTA_SECONDS_MAX)


def _is_unqualified(cc: CacheControl, name: str) -> bool:
    return cc.get(name, _ABSENT) is None


def _qualified_fields(cc: CacheControl, name: str) -> set[bytes]:
    """Field names listed by a qualified ``no-cache="..."`` / ``private="..."`` (§5.2.2.4/7)."""
    value = cc.get(name)
    if not value:
        return set()
    return {f.strip(" \t").lower().encode("latin-1") for f in value.split(",") if f.strip(" \t")}


def request_cache_control(request: RequestHead) -> CacheControl:
    """The request's directives; ``Pragma: no-cache`` counts when there is no Cache-Control."""
    values: list[bytes] | None = None
    has_pragma = False
    for name, value in request.headers:  # one pass: most requests carry neither field
        size = len(name)
        if size == 13 and lower_name(name) == b"cache-control":
            if values is None:
                values = []
            values.append(value)
        elif size == 6 and lower_name(name) == b"pragma":
            has_pragma = True
    if values is not None:
        return parse_cache_control(values)
    if has_pragma and b"no-cache" in header_tokens(request.headers, b"pragma"):
        return {"no-cache": None}  # RFC 7234 §5.4 (HTTP/1.0 clients)
    return {}


def only_if_cached(request: RequestHead) -> bool:
    """§5.2.1.7: answer from storage or with 504 (Gateway Timeout), never contact the origin."""
    return "only-if-cached" in request_cache_control(request)


# --------------------------------------------------------------------------------------------
# Surrogate-Control (W3C Edge Architecture 1.0, §2): directives for reverse proxies
#
# PIBL is a surrogate: it advertises itself upstream with ``Surrogate-Capability:
# pibl="Surrogate/1.0"`` (§2.1) and obeys the ``Surrogate-Control`` members meant for it (§2.2):
# those targeted ``;pibl`` when there are any, else the untargeted ones; members targeted at
# another device are ignored and passed on (§2.3; Varnish's reading). When they carry
# ``max-age`` or ``no-store`` they replace Cache-Control's freshness, storage and revalidation
# directives for PIBL (Fastly, Varnish and Akamai give Surrogate-Control precedence): the origin
# addressed its own reverse proxy, and Cache-Control is left for the caches downstream.
# ``private``, the Authorization rule (§3.5) and qualified ``no-cache``/``private`` still hold:
# they protect per-user content, not a lifetime. ``max-age=A+B`` gives lifetime A and a B-second
# ``stale-if-error`` (§2.2.3's freshness extension). The members PIBL consumed are removed
# before the response goes downstream.

SURROGATE_DEVICE: Final = "pibl"
SURROGATE_CAPABILITY: Final = SURROGATE_DEVICE.encode("ascii") + b'="Surrogate/1.0"'
# The Cache-Control directives a Surrogate-Control addressed to PIBL replaces.
_SURROGATE_REPLACES: Final = frozenset(
    {
        "max-age",
        "s-maxage",
        "no-store",
        "no-cache",
        "must-revalidate",
        "proxy-revalidate",
        "must-understand",
        "stale-while-revalidate",
        "stale-if-error",
    }
)


def _surrogate_members(headers: Headers) -> Iterator[tuple[str, str | None]]:
    """``Surrogate-Control`` list members as (directive text, lower-case target or None)."""
    text = b",".join(get_all(headers, b"surrogate-control")).decode("latin-1")
    i, n = 0, len(text)
    while i < n:
        end = _skip_element(text, i)
        member = text[i:end].strip(" \t")
        i = end + 1
        if not member:
            continue
        split, quoted = -1, False
        for j, char in enumerate(member):
            if char == '"':
                quoted = not quoted
            elif char == ";" and not quoted:
                split = j
        if split < 0:
            yield member, None
        else:
            yield member[:split].rstrip(" \t"), member[split + 1 :].strip(" \t").lower()


def surrogate_control(headers: Headers, device: str = SURROGATE_DEVICE) -> CacheControl:
    """The ``Surrogate-Control`` directives meant for ``device`` (names lower-case)."""
    mine: list[str] = []
    everyone: list[str] = []
    for member, target in _surrogate_members(headers):
        if target is None:
            everyone.append(member)
        elif target == device:
            mine.append(member)
    chosen = mine or everyone
    return parse_cache_control([", ".join(chosen).encode("latin-1")]) if chosen else {}


def response_cache_control(headers: Headers, *, shared: bool = True) -> CacheControl:
    """The response directives PIBL obeys: Cache-Control, with its freshness, storage and
    revalidation directives replaced by a Surrogate-Control ``max-age``/``no-store`` meant for
    PIBL (shared caches only; see above)."""
    cc = parse_cache_control(get_all(headers, b"cache-control"))
    if not shared:
        return cc
    sc = surrogate_control(headers)
    if "max-age" not in sc and "no-store" not in sc:
        return cc
    merged = {
        name: value
        for name, value in cc.items()
        if name not in _SURROGATE_REPLACES or (name == "no-cache" and value is not None)
    }
    for name, value in sc.items():
        if name in _SURROGATE_REPLACES:
            merged[name] = value
    lifetime = sc.get("max-age")
    if lifetime is not None and "+" in lifetime:
        merged["max-age"], extension = lifetime.split("+", 1)
        merged.setdefault("stale-if-error", extension)
    return merged


def downstream_surrogate_control(headers: Headers, device: str = SURROGATE_DEVICE) -> bytes | None:
    """What remains of ``Surrogate-Control`` for the next hop: the members targeted at other
    devices (PIBL consumed its own and the untargeted ones); None when nothing remains."""
    others = [
        f"{member};{target}"
        for member, target in _surrogate_members(headers)
        if target is not None and target != device
    ]
    return ", ".join(others).encode("latin-1") if others else None


def without_surrogate_control(headers: Headers) -> Headers:
    """``headers`` as PIBL sends them downstream (see :func:`downstream_surrogate_control`)."""
    out = [(name, value) for name, value in headers if lower_name(name) != b"surrogate-control"]
    if len(out) != len(headers):
        rest = downstream_surrogate_control(headers)
        if rest is not None:
            out.append((b"Surrogate-Control", rest))
    return out


def with_surrogate_capability(headers: Headers) -> Headers:
    """The request's fields with PIBL's capability appended to ``Surrogate-Capability`` (§2.1:
    "surrogates MUST append their capabilities")."""
    out: Headers = []
    prior: list[bytes] = []
    for name, value in headers:
        if lower_name(name) == b"surrogate-capability":
            if value.strip():
                prior.append(value.strip())
        else:
            out.append((name, value))
    out.append((b"Surrogate-Capability", b", ".join([*prior, SURROGATE_CAPABILITY])))
    return out


# --------------------------------------------------------------------------------------------
# HTTP-date (RFC 9110 §5.6.7)

_MONTH_NAMES: Final = (
    "jan",
    "feb",
    "mar",
    "apr",
    "may",
    "jun",
    "jul",
    "aug",
    "sep",
    "oct",
    "nov",
    "dec",
)
_MONTHS: Final = {name: number for number, name in enumerate(_MONTH_NAMES, 1)}
_DAY: Final = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY: Final = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MON: Final = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME: Final = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_FLAGS: Final = re.ASCII | re.IGNORECASE  # names are matched case-insensitively, for robustness
_IMF_FIXDATE: Final = re.compile(rf"{_DAY}, ([0-9]{{2}}) {_MON} ([0-9]{{4}}) {_TIME} GMT", _FLAGS)
_RFC850: Final = re.compile(rf"{_LONG_DAY}, ([0-9]{{2}})-{_MON}-([0-9]{{2}}) {_TIME} GMT", _FLAGS)
_ASCTIME: Final = re.compile(rf"{_DAY} {_MON} ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})", _FLAGS)


def _rfc850_year(yy: int, now: float | None) -> int:
    """RFC 9110 §5.6.7: a two-digit year more than 50 years ahead is in the past century."""
    if now is None:
        return 1900 + yy if yy >= 70 else 2000 + yy  # POSIX pivot when no clock is given
    current = time.gmtime(now).tm_year
    year = current - current % 100 + yy
    return year - 100 if year > current + 50 else year


def parse_http_date(value: bytes, *, now: float | None = None) -> float | None:
    """IMF-fixdate, RFC 850 or asctime → epoch seconds; None if invalid (never raises).

    ``now`` only resolves RFC 850's two-digit years (§5.6.7); without it, 70-99 are 19xx.
    """
    text = value.decode("latin-1").strip(" \t")
    try:
        if match := _IMF_FIXDATE.fullmatch(text):
            day, mon, year, hh, mm, ss = match.groups()
        elif match := _RFC850.fullmatch(text):
            day, mon, yy, hh, mm, ss = match.groups()
            year = str(_rfc850_year(int(yy), now))
        elif match := _ASCTIME.fullmatch(text):
            mon, day, hh, mm, ss, year = match.groups()
        else:
            return None
        y, m, d = int(year), _MONTHS[mon.lower()], int(day)
        if y < 1 or not 1 <= d <= calendar.monthrange(y, m)[1]:
            return None
        hour, minute, second = int(hh), int(mm), int(ss)
        if hour > 23 or minute > 59 or second > 60:  # 60: a leap second
            return None
        return float(calendar.timegm((y, m, d, hour, minute, second, 0, 0, 0)))
    except (ValueError, OverflowError, OSError):
        return None


def format_http_date(ts: float) -> bytes:
    """Epoch seconds → IMF-fixdate, e.g. ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    return formatdate(math.floor(ts), usegmt=True).encode("ascii")


# --------------------------------------------------------------------------------------------
# Field helpers


def _date_value(headers: Headers, response_time: float) -> float:
    """The Date value, or the receipt time when absent or invalid (RFC 9110 §6.6.1)."""
    raw = get_header(headers, b"date")
    parsed = parse_http_date(raw) if raw is not None else None
    return response_time if parsed is None else parsed


def _age_value(headers: Headers) -> int | None:
    """§5.1: ``Age`` is a singleton delta-seconds; 0 when absent, None when it is not exactly
    one field line holding ``1*DIGIT`` (a list, a second line, a sign, a fraction, a
    parameter). PIBL then takes the age as unknown, hence stale, rather than ignoring the
    field: an intermediary that garbled it may have held the response for any time, and
    assuming zero would serve it as new. This is stricter than §5.1's advice to use the
    first list member; it costs a validation, never a wrong reuse."""
    values = get_all(headers, b"age")
    if not values:
        return 0
    if len(values) > 1:
        return None
    return _delta(values[0].strip(b" \t").decode("latin-1"))


def _last_modified(headers: Headers) -> float | None:
    raw = get_header(headers, b"last-modified")
    return parse_http_date(raw) if raw is not None else None


def _has_validators(headers: Headers) -> bool:
    etag = get_header(headers, b"etag")
    return bool(etag and etag.strip()) or _last_modified(headers) is not None


# §4.1 allows "normalizing both header field values in a way that is known to have identical
# semantics ... case-normalization, where values are defined to be case-insensitive": language
# ranges (RFC 4647 §2), content-codings (RFC 9110 §8.4.1) and charsets (§8.3.2) are, and so is
# the ``q`` weight, whose ``;`` may have whitespace around it (RFC 9110 §12.4.2). Member order is
# kept: some origins read it as a preference among equal weights (RFC 9110 §12.5.4).
_CASE_INSENSITIVE_FIELDS: Final = frozenset(
    {b"accept-language", b"accept-encoding", b"accept-charset"}
)
_PARAMETER_SPACE: Final = re.compile(r"[ \t]*;[ \t]*")


def _normalised_field(headers: Headers, name: bytes) -> str | None:
    """§4.1: field lines combined, list members trimmed of whitespace (and, for the fields
    above, lower-cased without whitespace around ``;``); None if absent."""
    values = get_all(headers, name)
    if not values:
        return None
    text = b",".join(values).decode("latin-1")
    if lower_name(name) in _CASE_INSENSITIVE_FIELDS:
        text = _PARAMETER_SPACE.sub(";", text.lower())
    members = (m.strip(" \t") for m in text.split(","))
    return ",".join(m for m in members if m)


# --------------------------------------------------------------------------------------------
# Storage (§3)


def strip_for_storage(headers: Headers, *, shared: bool = True) -> Headers:
    """The fields to store (§3.1): without hop-by-hop fields, those listed in ``Connection``,
    proxy-hop fields, and fields named by ``no-cache="..."`` (or, shared, ``private="..."``).
    """
    cc = parse_cache_control(get_all(headers, b"cache-control"))
    drop = _NOT_STORED | header_tokens(headers, b"connection") | _qualified_fields(cc, "no-cache")
    if shared:
        drop |= _qualified_fields(cc, "private")
    return [(name, value) for name, value in headers if lower_name(name) not in drop]


def _explicit_freshness(cc: CacheControl, headers: Headers, shared: bool) -> bool:
    return (
        (shared and "s-maxage" in cc)
        or "max-age" in cc
        or get_header(headers, b"expires") is not None
    )


def _names_itself(request: RequestHead, response: ResponseHead) -> bool:
    """RFC 9110 §9.3.3: a 2xx response whose Content-Location is the request's own target URI
    represents that resource as a later GET retrieves it (§8.7: only a 2xx response says so)."""
    raw = get_header(response.headers, b"content-location")
    if not 200 <= response.status < 300 or raw is None or not raw.strip():
        return False
    own = make_key(request)
    try:
        named = key_from_url(urljoin(own.url, raw.decode("latin-1").strip()))
    except ValueError:
        return False
    return named == own


def storable(
    request: RequestHead,
    response: ResponseHead,
    *,
    default_ttl: float = 0.0,
    shared: bool = True,
    response_time: float | None = None,
) -> tuple[bool, str]:
    """May ``response`` to ``request`` be stored (§3)? ``(True, "")`` or ``(False, reason)``.

    ``reason`` is a token for Cache-Status ``detail=``: ``method``, ``status``, ``no-store``,
    ``private``, ``authorization``, ``vary-star``, ``set-cookie``, ``no-cache`` (must always be
    revalidated but has no validator) or ``no-freshness`` (nothing would make it reusable).
    ``response_time`` (when the head arrived) lets ``Expires`` without ``Date`` be judged;
    without it such a response is assumed to have some freshness.
    """
    post = request.method == "POST"
    if request.method != "GET" and not (post and _names_itself(request, response)):
        return False, "method"  # §3 "understood method"; HEAD is answered from a stored GET
    status = response.status
    if not 200 <= status <= 599 or status in (206, 304):
        return False, "status"  # §3: final, and no range support (§3.3-3.4)
    if "no-store" in request_cache_control(request):
        return False, "no-store"  # §5.2.1.5
    cc = response_cache_control(response.headers, shared=shared)
    if "must-understand" in cc:  # §5.2.2.3: overrides no-store for understood codes
        if status not in UNDERSTOOD_STATUSES:
            return False, "status"
    elif "no-store" in cc:
        return False, "no-store"  # §5.2.2.5
    if shared and _is_unqualified(cc, "private"):
        return False, "private"  # §5.2.2.7 (a qualified private only strips fields)
    if (
        shared
        and get_header(request.headers, b"authorization") is not None
        and not {"must-revalidate", "public", "s-maxage"} & cc.keys()
    ):
        return False, "authorization"  # §3.5
    if "*" in vary_fields(response.headers):
        return False, "vary-star"  # §4.1: never matches, so never reusable
    explicit = _explicit_freshness(cc, response.headers, shared)
    if post and not explicit:
        return False, "method"  # RFC 9110 §9.3.3: a POST response needs explicit freshness
    if not explicit and status not in HEURISTIC_STATUSES and "public" not in cc:
        return False, "status"  # §3: nothing else allows this code to be stored
    headers = strip_for_storage(response.headers, shared=shared)
    if not explicit and get_header(headers, b"set-cookie") is not None:
        return False, "set-cookie"  # PIBL policy: cookies only with explicit freshness
    validators = _has_validators(headers)
    if _is_unqualified(cc, "no-cache") and not validators:
        return False, "no-cache"  # §5.2.2.4: every reuse needs validation, which needs one
    lifetime = _lifetime(
        cc,
        headers,
        status=status,
        response_time=response_time,
        default_ttl=default_ttl,
        shared=shared,
    )
    stale_ok = _delta(cc.get("stale-while-revalidate")) or _delta(cc.get("stale-if-error"))
    if lifetime <= 0 and not validators and not stale_ok:
        return False, "no-freshness"
    return True, ""


# --------------------------------------------------------------------------------------------
# Freshness (§4.2)


def _lifetime(
    cc: CacheControl,
    headers: Headers,
    *,
    status: int,
    response_time: float | None,
    default_ttl: float,
    shared: bool,
) -> float:
    if shared and "s-maxage" in cc:  # §5.2.2.10
        return float(_delta(cc["s-maxage"]) or 0)
    if "max-age" in cc:  # §5.2.2.1; an invalid value means stale (§4.2.1)
        return float(_delta(cc["max-age"]) or 0)
    raw_date = get_header(headers, b"date")
    date = parse_http_date(raw_date) if raw_date is not None else None
    if date is None:
        date = response_time  # RFC 9110 §6.6.1
    # `date` is None only when storable() is not told the receipt time of a Date-less
    # response: a valid Expires or Last-Modified then counts as *some* freshness (lookups
    # always know the receipt time and compute the real lifetime).
    expires = get_header(headers, b"expires")
    if expires is not None:  # §5.3: an invalid Expires (e.g. "0") is in the past
        expires_at = parse_http_date(expires)
        if expires_at is None:
            return 0.0
        return _UNKNOWN_LIFETIME if date is None else max(0.0, expires_at - date)
    if status not in HEURISTIC_STATUSES and "public" not in cc:
        return 0.0  # §4.2.2: heuristics only for these codes, or with `public`
    last_modified = _last_modified(headers)
    if last_modified is not None:  # §4.2.2
        if date is None:
            return _UNKNOWN_LIFETIME
        return min(max(0.0, date - last_modified) * HEURISTIC_FRACTION, HEURISTIC_CAP)
    if default_ttl > 0 and get_header(headers, b"set-cookie") is None:
        return float(default_ttl)  # configured fallback, never for cookies
    return 0.0


def freshness_lifetime(
    headers: Headers,
    *,
    status: int,
    response_time: float,
    default_ttl: float = 0.0,
    shared: bool = True,
) -> float:
    """§4.2.1: s-maxage (shared) > max-age > Expires - Date > heuristic > ``default_ttl``;
    a Surrogate-Control ``max-age`` meant for PIBL comes first (:func:`response_cache_control`).
    """
    cc = response_cache_control(headers, shared=shared)
    return _lifetime(
        cc,
        headers,
        status=status,
        response_time=response_time,
        default_ttl=default_ttl,
        shared=shared,
    )


def current_age(
    headers: Headers, *, request_time: float, response_time: float, now: float
) -> float:
    """§4.2.3: corrected initial age plus the time the response has been resident."""
    initial_age = _corrected_initial_age(
        headers, request_time=request_time, response_time=response_time
    )
    return _aged(initial_age, response_time, now)


def _corrected_initial_age(headers: Headers, *, request_time: float, response_time: float) -> float:
    """§4.2.3 ``corrected_initial_age``: the response's age when it arrived. An invalid Age
    makes it unknown, taken as very old (``DELTA_SECONDS_MAX``, which :func:`_aged` keeps)."""
    age_value = _age_value(headers)
    if age_value is None:
        return float(DELTA_SECONDS_MAX)
    apparent_age = max(0.0, response_time - _date_value(headers, response_time))
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value + response_delay
    return max(apparent_age, corrected_age_value)


def _aged(initial_age: float, response_time: float, now: float) -> float:
    """§4.2.3 ``current_age``: ``initial_age`` plus the time resident since ``response_time``."""
    resident_time = max(0.0, now - response_time)
    return min(initial_age + resident_time, float(DELTA_SECONDS_MAX))


# --------------------------------------------------------------------------------------------
# Secondary keys (§4.1)


def vary_fields(headers: Headers) -> tuple[str, ...]:
    """The lower-case, de-duplicated, sorted field names in ``Vary`` (may include ``*``)."""
    names = {
        member.strip(" \t").lower()
        for value in get_all(headers, b"vary")
        for member in value.decode("latin-1").split(",")
    }
    names.discard("")
    return tuple(sorted(names))


def secondary_key(fields: Iterable[str], request_headers: Headers) -> SecondaryKey:
    """The request's normalised values for ``fields`` (None where a field is absent)."""
    return tuple(
        (name, _normalised_field(request_headers, name.encode("latin-1"))) for name in fields
    )


def vary_matches(stored: SecondaryKey, request: RequestHead) -> bool:
    """§4.1: every nominated field matches after normalisation (absent in both matches);
    ``Vary: *`` never matches."""
    for name, value in stored:
        if name == "*" or _normalised_field(request.headers, name.encode("latin-1")) != value:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Stored entries

# Fields a stored response is never served with as stored: ``Age`` is recomputed (§5.1),
# ``Surrogate-Control`` is reduced to the members for other devices, and the message framing is
# PIBL's own (RFC 9112 §6).
_FRAMING_FIELDS: Final = frozenset({b"content-length", b"transfer-encoding"})
_REPLACED_WHEN_SERVED: Final = frozenset({b"age", b"surrogate-control"})


@dataclass(frozen=True, slots=True)
class ResponseFacts:
    """What a stored response's own fields say, worked out once per stored response.

    Every fact depends only on the entry (fields, status, times, ``default_ttl``), never on a
    request or on ``now``, so a fresh hit costs a few comparisons instead of re-parsing Date,
    Age, Cache-Control and Surrogate-Control each time. Each fact equals what the pure
    functions above give for the same entry (``tests/unit/test_cache_facts.py`` checks it).
    """

    cache_control: CacheControl  # response_cache_control(headers), shared; do not mutate
    lifetime: float  # freshness_lifetime(shared=True)
    initial_age: float  # §4.2.3 corrected_initial_age; DELTA_SECONDS_MAX for an invalid Age
    has_validators: bool
    served_fields: Headers  # the stored fields without Age and Surrogate-Control
    downstream_surrogate: Headers  # the Surrogate-Control that goes downstream, if any
    # The status line and ``served_fields`` without framing, serialised, without the final
    # CRLF: a whole response is this, Age, ``downstream_surrogate``, framing and PIBL's fields.
    serving_head: bytes

    @classmethod
    def of(cls, entry: StoredResponse) -> ResponseFacts:
        headers = entry.headers
        cc = response_cache_control(headers)
        served = [(n, v) for n, v in headers if lower_name(n) not in _REPLACED_WHEN_SERVED]
        rest = downstream_surrogate_control(headers)
        unframed = [(n, v) for n, v in served if lower_name(n) not in _FRAMING_FIELDS]
        return cls(
            cache_control=cc,
            lifetime=_lifetime(
                cc,
                headers,
                status=entry.status,
                response_time=entry.response_time,
                default_ttl=entry.default_ttl,
                shared=True,
            ),
            initial_age=_corrected_initial_age(
                headers, request_time=entry.request_time, response_time=entry.response_time
            ),
            has_validators=_has_validators(headers),
            served_fields=served,
            downstream_surrogate=[] if rest is None else [(b"Surrogate-Control", rest)],
            serving_head=response_head_bytes(entry.status, unframed, entry.reason)[:-2],
        )


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """What a cache entry keeps besides its body.

    ``headers`` are already stripped for storage; ``vary`` is the secondary key of the request
    that produced the response; ``default_ttl`` is the configured fallback lifetime in force
    when it was stored, so a later lookup computes the same freshness. An entry is never
    modified (``freshened`` makes a new one), which lets :attr:`facts` be computed once.
    """

    key: CacheKey
    status: int
    reason: bytes
    headers: Headers
    request_time: float
    response_time: float
    vary: SecondaryKey = ()
    default_ttl: float = 0.0
    _facts: ResponseFacts | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )
    # The last whole head served from this entry and what it was built from: (Age in whole
    # seconds, Cache-Status value, Connection value, Content-Length, head). Hits within the
    # same second share it (see ``proxy.caching``).
    served_head: tuple[int, bytes, bytes, int, bytes] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    @classmethod
    def from_exchange(
        cls,
        key: CacheKey,
        request: RequestHead,
        response: ResponseHead,
        *,
        request_time: float,
        response_time: float,
        default_ttl: float = 0.0,
        shared: bool = True,
    ) -> StoredResponse:
        """The entry for a response ``storable`` accepted."""
        return cls(
            key=key,
            status=response.status,
            reason=response.reason,
            headers=strip_for_storage(response.headers, shared=shared),
            request_time=request_time,
            response_time=response_time,
            vary=secondary_key(vary_fields(response.headers), request.headers),
            default_ttl=default_ttl,
        )

    @property
    def facts(self) -> ResponseFacts:
        """The request-independent facts about this entry, computed on first use."""
        facts = self._facts
        if facts is None:
            facts = ResponseFacts.of(self)
            object.__setattr__(self, "_facts", facts)  # a cache of a pure function of self
        return facts

    @property
    def cache_control(self) -> CacheControl:
        """The directives PIBL obeys for this entry (as a shared cache); do not mutate."""
        return self.facts.cache_control

    @property
    def has_validators(self) -> bool:
        return self.facts.has_validators

    def freshness_lifetime(self, *, shared: bool = True) -> float:
        if shared:
            return self.facts.lifetime
        return freshness_lifetime(
            self.headers,
            status=self.status,
            response_time=self.response_time,
            default_ttl=self.default_ttl,
            shared=False,
        )

    def current_age(self, now: float) -> float:
        return _aged(self.facts.initial_age, self.response_time, now)

    def freshened(
        self, headers_304: Headers, *, request_time: float, response_time: float
    ) -> StoredResponse:
        """This entry updated by a matching 304 (§4.3.4) received at ``response_time``."""
        return replace(
            self,
            headers=freshen_headers(self.headers, headers_304),
            request_time=request_time,
            response_time=response_time,
        )

    def headers_for_serving(self, now: float) -> Headers:
        """The stored fields with ``Age`` replaced by the current age (§5.1, RFC 9110 §6.6.1:
        the stored ``Date`` is kept), and ``Surrogate-Control`` as it goes downstream."""
        facts = self.facts
        age = (b"Age", age_header(self.current_age(now)))
        return [*facts.served_fields, age, *facts.downstream_surrogate]

    def to_bytes(self) -> bytes:
        """A self-describing encoding (JSON; bytes as latin-1 strings) for storage backends."""
        return json.dumps(
            {
                "v": 1,
                "key": self.key.to_bytes().decode("latin-1"),
                "status": self.status,
                "reason": self.reason.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
                "request_time": self.request_time,
                "response_time": self.response_time,
                "vary": [list(pair) for pair in self.vary],
                "default_ttl": self.default_ttl,
            },
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredResponse:
        """The inverse of :meth:`to_bytes`; raises ``ValueError`` on anything malformed."""
        try:
            obj: Any = json.loads(data)
            if obj["v"] != 1:
                raise ValueError("unknown entry version")
            return cls(
                key=CacheKey.from_bytes(_str(obj["key"]).encode("latin-1")),
                status=_int(obj["status"]),
                reason=_str(obj["reason"]).encode("latin-1"),
                headers=[
                    (_str(n).encode("latin-1"), _str(v).encode("latin-1"))
                    for n, v in obj["headers"]
                ],
                request_time=_float(obj["request_time"]),
                response_time=_float(obj["response_time"]),
                vary=tuple((_str(n), None if v is None else _str(v)) for n, v in obj["vary"]),
                default_ttl=_float(obj["default_ttl"]),
            )
        except (KeyError, TypeError, AttributeError, UnicodeError) as exc:
            raise caused_by(ValueError(f"malformed cache entry: {exc}"), exc)  # noqa: B904 (caused_by)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("expected an integer")
    return value


def _float(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError("expected a number")
    return float(value)


# --------------------------------------------------------------------------------------------
# Lookup (§4)


class Action(enum.Enum):
    """What to do with a selected stored response."""

    FRESH = "fresh"  # serve it (fresh, or stale within the client's max-stale)
    STALE_REVALIDATE = "stale-revalidate"  # send a conditional request (§4.3.1)
    STALE_WHILE_REVALIDATE = "stale-while-revalidate"  # serve, revalidate in background (RFC 5861)
    MUST_FORWARD = "must-forward"  # forward the request as is: no usable validator or no match


class Decision:
    """The outcome of :func:`decide`.

    ``age`` is the entry's current age and ``ttl`` its remaining freshness (negative when
    stale), both for ``Age`` and Cache-Status ``ttl=``. ``fwd`` is the RFC 9211 ``fwd=``
    reason when the origin must be contacted (``stale``, ``request``, ``vary-miss``,
    ``method``). ``only_if_cached`` reports the request directive (§5.2.1.7).

    A plain class, not a frozen dataclass: one is made per cache lookup, and compiled (mypyc)
    a frozen dataclass costs about 15 times as much to construct (its ``__init__`` goes
    through ``object.__setattr__``). Treat it as immutable all the same.
    """

    __slots__ = ("action", "age", "fwd", "only_if_cached", "ttl")

    def __init__(
        self,
        action: Action,
        age: float,
        ttl: float,
        fwd: str | None = None,
        only_if_cached: bool = False,
    ) -> None:
        self.action = action
        self.age = age
        self.ttl = ttl
        self.fwd = fwd
        self.only_if_cached = only_if_cached

    def _fields(self) -> tuple[Action, float, float, str | None, bool]:
        return (self.action, self.age, self.ttl, self.fwd, self.only_if_cached)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"Decision(action={self.action!r}, age={self.age!r}, ttl={self.ttl!r}, "
            f"fwd={self.fwd!r}, only_if_cached={self.only_if_cached!r})"
        )

    @property
    def gateway_timeout(self) -> bool:
        """The client sent only-if-cached but the entry needs the origin: answer 504."""
        return self.only_if_cached and self.action in (
            Action.STALE_REVALIDATE,
            Action.MUST_FORWARD,
        )


def _forbids_stale(cc: CacheControl, shared: bool, *, implied: bool) -> bool:
    """§4.2.4: must-revalidate / proxy-revalidate (and, when ``implied``, s-maxage §5.2.2.10)
    or no-cache prohibit serving a stale response."""
    if "must-revalidate" in cc or _is_unqualified(cc, "no-cache"):
        return True
    return shared and ("proxy-revalidate" in cc or (implied and "s-maxage" in cc))


def decide(
    entry: StoredResponse,
    request: RequestHead,
    now: float,
    *,
    shared: bool = True,
    honor_request: bool = True,
) -> Decision:
    """May ``entry`` (already selected by key) answer ``request`` at ``now`` (§4)?"""
    age = entry.current_age(now)
    ttl = entry.freshness_lifetime(shared=shared) - age
    directives = request_cache_control(request)
    oic = bool(directives) and "only-if-cached" in directives
    # Nearly every request has no directives: the checks of the request's own are skipped.
    req = directives if honor_request else _NO_DIRECTIVES

    if request.method not in ("GET", "HEAD"):
        return Decision(_MUST_FORWARD, age, ttl, "method", oic)
    if not vary_matches(entry.vary, request):
        return Decision(_MUST_FORWARD, age, ttl, "vary-miss", oic)
    if req and "no-cache" in req:  # §5.2.1.4
        return Decision(_revalidation(entry), age, ttl, "request", oic)
    resp = entry.cache_control
    if _is_unqualified(resp, "no-cache"):  # §5.2.2.4: validate on every reuse
        return Decision(_revalidation(entry), age, ttl, "stale", oic)
    if req:
        max_age = _delta(req.get("max-age"))
        if max_age is not None and age > max_age:  # §5.2.1.1
            return Decision(_revalidation(entry), age, ttl, "request", oic)
        min_fresh = _delta(req.get("min-fresh"))
        if min_fresh is not None and ttl < min_fresh:  # §5.2.1.3
            return Decision(_revalidation(entry), age, ttl, "request", oic)
    if ttl > 0:  # §4.2: fresh iff freshness_lifetime > current_age
        return Decision(_FRESH, age, ttl, None, oic)

    staleness = -ttl
    if "max-stale" in req and not _forbids_stale(resp, shared, implied=True):  # §5.2.1.2
        limit = req["max-stale"]
        allowed = _delta(limit)
        if limit is None or (allowed is not None and staleness <= allowed):
            return Decision(_FRESH, age, ttl, None, oic)
    swr = _delta(resp.get("stale-while-revalidate"))
    if swr is not None and staleness <= swr and not _forbids_stale(resp, shared, implied=False):
        return Decision(Action.STALE_WHILE_REVALIDATE, age, ttl, "stale", oic)  # RFC 5861 §3
    return Decision(_revalidation(entry), age, ttl, "stale", oic)


# Read per decision: as final names they are compiled to plain loads, not class lookups.
_FRESH: Final = Action.FRESH
_MUST_FORWARD: Final = Action.MUST_FORWARD
_NO_DIRECTIVES: Final[CacheControl] = {}


def _revalidation(entry: StoredResponse) -> Action:
    """How to go to the origin for ``entry``: conditionally when it has a validator (§4.3.1)."""
    return Action.STALE_REVALIDATE if entry.has_validators else _MUST_FORWARD


def stale_if_error_allowed(
    entry: StoredResponse,
    request: RequestHead,
    now: float,
    *,
    shared: bool = True,
    honor_request: bool = True,
    disconnected: bool = False,
) -> bool:
    """May ``entry`` be served because the origin failed (an ``ERROR_STATUSES`` code, or
    unreachable)? RFC 5861 §4: within the response's or the request's ``stale-if-error``
    window; §4.2.4: any stale age when ``disconnected`` and not forbidden.
    """
    resp = entry.cache_control
    if _forbids_stale(resp, shared, implied=False):
        return False
    staleness = entry.current_age(now) - entry.freshness_lifetime(shared=shared)
    if staleness < 0:
        return True  # still fresh: no stale response is generated
    windows = [_delta(resp.get("stale-if-error"))]
    if honor_request:
        windows.append(_delta(request_cache_control(request).get("stale-if-error")))
    if any(w is not None and staleness <= w for w in windows):
        return True
    return disconnected and not _forbids_stale(resp, shared, implied=True)


# --------------------------------------------------------------------------------------------
# Validation (§4.3)


def _entity_tags(value: bytes) -> list[tuple[bool, bytes]] | None:
    """RFC 9110 §8.8.3 entity-tag list → [(weak, opaque-tag)]; None for ``*``.

    Lenient: an unquoted tag ``abc`` is read as ``"abc"``; other junk is kept verbatim, so it
    only ever matches itself.
    """
    tags: list[tuple[bool, bytes]] = []
    i, n = 0, len(value)
    while i < n:
        if value[i : i + 1] in (b" ", b"\t", b","):
            i += 1
            continue
        weak = value.startswith(b"W/", i)
        start = i + 2 if weak else i
        if value.startswith(b'"', start):
            end = value.find(b'"', start + 1)
            if end >= 0:
                tags.append((weak, value[start : end + 1]))
                i = end + 1
                continue
        end = value.find(b",", i)
        end = n if end < 0 else end
        raw = value[i:end].strip(b" \t")
        if raw == b"*":
            return None
        tags.append((False, raw if b'"' in raw else b'"' + raw + b'"'))
        i = end
    return tags


def _entity_tag(headers: Headers) -> tuple[bool, bytes] | None:
    raw = get_header(headers, b"etag")
    tags = _entity_tags(raw) if raw is not None else []
    return tags[0] if tags else None


def conditional_headers(entry: StoredResponse) -> Headers:
    """§4.3.1: ``If-None-Match`` from the ETag, ``If-Modified-Since`` from Last-Modified."""
    out: Headers = []
    etag = _entity_tag(entry.headers)
    if etag is not None:
        out.append((b"If-None-Match", b"W/" + etag[1] if etag[0] else etag[1]))
    last_modified = get_header(entry.headers, b"last-modified")
    if last_modified is not None and parse_http_date(last_modified) is not None:
        out.append((b"If-Modified-Since", last_modified.strip(b" \t")))
    return out


def revalidation_headers(request_headers: Headers, entry: StoredResponse) -> Headers:
    """The client's fields with its own If-None-Match/If-Modified-Since replaced by the
    entry's validators (§4.3.1); the client's conditional is then evaluated against the
    (freshened) entry with :func:`client_conditional_matches`."""
    kept = [
        (name, value)
        for name, value in request_headers
        if lower_name(name) not in (b"if-none-match", b"if-modified-since")
    ]
    return kept + conditional_headers(entry)


def matches_304_entry(entry: StoredResponse, headers_304: Headers, *, single: bool = True) -> bool:
    """§4.3.4: does a 304 identify ``entry`` for freshening?

    A strong ETag must equal the entry's strong ETag; a weak one must match weakly; otherwise
    Last-Modified must be equal. A 304 without validators matches when ``entry`` was the only
    candidate (``single``), i.e. the conditional request was built from it alone (§4.3.4 also
    asks that the entry lack validators; PIBL relaxes that, since it sent exactly this entry's).
    """
    new = _entity_tag(headers_304)
    if new is not None:
        stored = _entity_tag(entry.headers)
        if stored is None:
            return False
        if not new[0]:
            return not stored[0] and stored[1] == new[1]
        return stored[1] == new[1]
    new_lm = _last_modified(headers_304)
    if new_lm is not None:
        return _last_modified(entry.headers) == new_lm
    return single


def head_response_matches(entry: StoredResponse, body_size: int, head_headers: Headers) -> bool:
    """§4.3.5: may a 200 response to HEAD update ``entry`` (else it makes the entry stale)?

    Every validator the HEAD response carries (ETag, Last-Modified) must match the entry's, and
    its Content-Length, when present, the stored body's length.
    """
    etag = _entity_tag(head_headers)
    if etag is not None and etag != _entity_tag(entry.headers):
        return False
    raw_lm = get_header(head_headers, b"last-modified")
    if raw_lm is not None:
        new_lm = _last_modified(head_headers)
        if new_lm is None or new_lm != _last_modified(entry.headers):
            return False
    length = get_header(head_headers, b"content-length")
    return length is None or length.strip(b" \t") == b"%d" % body_size


def freshen_headers(stored: Headers, headers_304: Headers) -> Headers:
    """§3.2/§4.3.4: every field in the 304 replaces the stored field of that name, except
    ``_NOT_UPDATED`` (never stored, Content-Length, fields describing the stored bytes); others
    are kept. Position is preserved.

    The stored ``Age`` is dropped even when the 304 has none: the entry's age restarts from
    the 304, which is what the new request and response times describe (§4.2.3); keeping the
    old value would count the time before the validation twice.
    """
    excluded = _NOT_UPDATED | header_tokens(headers_304, b"connection")
    stored = [(name, value) for name, value in stored if lower_name(name) != b"age"]
    updates: dict[bytes, Headers] = {}
    for name, value in headers_304:
        lname = lower_name(name)
        if lname not in excluded:
            updates.setdefault(lname, []).append((name, value))
    out: Headers = []
    emitted: set[bytes] = set()
    for name, value in stored:
        lname = lower_name(name)
        if lname not in updates:
            out.append((name, value))
        elif lname not in emitted:
            out.extend(updates[lname])
            emitted.add(lname)
    for lname, fields in updates.items():
        if lname not in emitted:
            out.extend(fields)
    return strip_for_storage(out)


def client_conditional_matches(
    request: RequestHead,
    stored_headers: Headers,
    *,
    status: int = 200,
    response_time: float | None = None,
) -> bool:
    """§4.3.2: should the cache answer ``request`` with 304 from this stored response?

    Only for GET/HEAD and a 2xx stored status. If-None-Match (``*`` or a weak match, RFC 9110
    §13.1.2) takes precedence over If-Modified-Since, which compares with Last-Modified, else
    Date, else ``response_time`` (§4.3.2), and is ignored unless it is a single valid date.
    """
    if request.method not in ("GET", "HEAD") or not 200 <= status < 300:
        return False
    if_none_match = get_all(request.headers, b"if-none-match")
    if if_none_match:
        wanted = _entity_tags(b",".join(if_none_match))
        if wanted is None:
            return True
        stored = _entity_tag(stored_headers)
        return stored is not None and any(tag == stored[1] for _, tag in wanted)
    if_modified_since = get_all(request.headers, b"if-modified-since")
    if len(if_modified_since) != 1:
        return False  # RFC 9110 §13.1.3
    since = parse_http_date(if_modified_since[0])
    if since is None:
        return False
    modified = _last_modified(stored_headers)
    if modified is None:
        raw_date = get_header(stored_headers, b"date")
        modified = parse_http_date(raw_date) if raw_date is not None else response_time
    return modified is not None and modified <= since


def not_modified_headers(stored_headers: Headers) -> Headers:
    """The fields of a 304 generated from a stored response (RFC 9110 §15.4.5)."""
    wanted = set(_NOT_MODIFIED_FIELDS)
    if get_header(stored_headers, b"etag") is None:
        wanted.add(b"last-modified")
    return [(name, value) for name, value in stored_headers if lower_name(name) in wanted]


# --------------------------------------------------------------------------------------------
# Invalidation (§4.4)


def invalidation_targets(
    request: RequestHead, response: ResponseHead, request_key: CacheKey
) -> list[CacheKey]:
    """Keys to invalidate after ``response`` to an unsafe ``request`` (§4.4).

    A non-error (2xx/3xx) response to a method other than GET/HEAD/OPTIONS/TRACE invalidates the
    target URI and the Location / Content-Location URIs of the same origin (others could be used
    for denial of service).
    """
    if request.method in SAFE_METHODS or not 200 <= response.status < 400:
        return []
    targets = [request_key]
    for field in (b"location", b"content-location"):
        raw = get_header(response.headers, field)
        if raw is None or not raw.strip():
            continue
        try:
            key = key_from_url(urljoin(request_key.url, raw.decode("latin-1").strip()))
        except ValueError:
            continue
        if key.origin == request_key.origin and key not in targets:
            targets.append(key)
    return targets


# --------------------------------------------------------------------------------------------
# Serving


def age_header(age: float) -> bytes:
    """§5.1: whole seconds; capped at 2^31 (§1.2.2)."""
    return str(age_seconds(age)).encode("ascii")


def age_seconds(age: float) -> int:
    """The whole seconds ``age_header`` sends for ``age``."""
    return min(max(int(age), 0), DELTA_SECONDS_MAX)


_SF_TOKEN: Final = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*", re.ASCII)


def _sf_item(value: str) -> str:
    """An RFC 8941 token if ``value`` is one, else a quoted sf-string (non-ASCII → ``?``)."""
    if _SF_TOKEN.fullmatch(value):
        return value
    chars = (c if " " <= c <= "~" else "?" for c in value)
    return '"' + "".join("\\" + c if c in '\\"' else c for c in chars) + '"'


# Every fresh hit sends ``pibl; hit; ttl=N``: built once per N (a hot URL's ttl counts down
# through the same values for every hit within a second), bounded like any memo.
_FRESH_HIT_STATUS: Final[dict[int, bytes]] = {}
_FRESH_HIT_STATUS_ENTRIES: Final = 4096


def fresh_hit_status(ttl: float) -> bytes:
    """``cache_status(True, ttl=ttl)``, remembered per whole ttl."""
    seconds = int(ttl)
    status = _FRESH_HIT_STATUS.get(seconds)
    if status is None:
        if len(_FRESH_HIT_STATUS) >= _FRESH_HIT_STATUS_ENTRIES:
            _FRESH_HIT_STATUS.clear()
        status = _FRESH_HIT_STATUS[seconds] = cache_status(True, ttl=seconds)
    return status


def cache_status(
    hit: bool,
    *,
    fwd: str | None = None,
    stored: bool = False,
    detail: str | None = None,
    ttl: float | None = None,
    fwd_status: int | None = None,
    name: str = "pibl",
) -> bytes:
    """An RFC 9211 Cache-Status member, e.g. ``pibl; hit; ttl=42`` or
    ``pibl; fwd=stale; fwd-status=304``."""
    limit = 999_999_999_999_999  # sf-integer range (RFC 8941 §3.3.1)
    if name == "pibl" and fwd is None and fwd_status is None and not stored and not detail:
        member = b"pibl; hit" if hit else b"pibl"  # what every fresh hit sends: the short way
        if ttl is None:
            return member
        return b"%s; ttl=%d" % (member, max(-limit, min(int(ttl), limit)))
    params = [_sf_item(name)]
    if hit:
        params.append("hit")
    if fwd is not None:
        if not _SF_TOKEN.fullmatch(fwd):
            raise ValueError(f"fwd must be a token: {fwd!r}")
        params.append(f"fwd={fwd}")
    if fwd_status is not None:
        params.append(f"fwd-status={int(fwd_status)}")
    if stored:
        params.append("stored")
    if ttl is not None:
        params.append(f"ttl={max(-limit, min(int(ttl), limit))}")
    if detail:
        params.append(f"detail={_sf_item(detail)}")
    return "; ".join(params).encode("ascii")
