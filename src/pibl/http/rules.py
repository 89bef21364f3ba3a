"""Header rules for a proxy: what to strip, what to add (RFC 9110 §7.6, RFC 7239, Go's
``httputil.ReverseProxy``). Sanitising happens first and configured edits after it, so that a
user's edit is never silently removed by the sanitiser.
"""

from __future__ import annotations

from typing import Final

from pibl.http.head import Headers, RequestHead, ResponseHead, length_mask, lower_name

# RFC 9110 §7.6.1 plus the de-facto ones Go's ReverseProxy also removes (Proxy-Connection,
# Keep-Alive, Proxy-Authenticate/-Authorization are single-hop by nature).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# PIBL re-frames every message, so the peer's Content-Length is replaced, never copied.
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})
_FORWARDED: Final = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"}
)
VIA_VALUE: Final = b"1.1 pibl"
# RFC 9110 §7.6.3: Via names the protocol version of the message as PIBL received it.
_VIA_FOR_VERSION: Final = {"1.1": VIA_VALUE, "1.0": b"1.0 pibl"}


_NOT_FORWARDED: Final = HOP_BY_HOP | _FRAMING
# Connection values that list no field beyond the hop-by-hop ones (nearly every response).
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
# The lengths of every name the loops below act on (see ``length_mask``).
_REQUEST_LENGTHS: Final = length_mask(_NOT_FORWARDED | _FORWARDED | {b"via", b"host"})
_RESPONSE_LENGTHS: Final = length_mask(_NOT_FORWARDED | {b"via"})
_SCHEMES: Final = {"http": b"http", "https": b"https"}


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] | None = None
    for name, value in headers:
        if len(name) == 10 and lower_name(name) == b"connection":
            if tokens is None:
                tokens = set()
            tokens.update([t.strip().lower() for t in value.split(b",")])
    return _NO_TOKENS if tokens is None else frozenset(tokens)


def upstream_request_headers(request: RequestHead, *, trusted_peer: bool) -> Headers:
    """The header fields to send upstream for ``request`` (without framing fields).

    Drops hop-by-hop fields and those listed in ``Connection``; drops client-sent
    ``X-Forwarded-*``/``Forwarded`` unless the peer is a trusted proxy (spoofing); then appends
    ``X-Forwarded-For/-Proto/-Host`` and ``Via``. ``Host`` is kept as the client sent it.
    """
    listed = _connection_tokens(request.headers)
    out: Headers = []
    prior_xff: list[bytes] = []
    prior_via: list[bytes] = []
    forwarded_host: bytes | None = None
    forwarded_proto: bytes | None = None
    host_value: bytes | None = None
    for field in request.headers:
        name, value = field
        if not listed and not (_REQUEST_LENGTHS >> len(name)) & 1:
            out.append(field)  # none of the names acted on below
            continue
        lname = lower_name(name)
        if lname in _NOT_FORWARDED or lname in listed:
            continue
        if lname in _FORWARDED:
            if not trusted_peer:
                continue
            if lname == b"x-forwarded-for":
                prior_xff.append(value)
                continue
            if lname == b"x-forwarded-host":
                forwarded_host = value
                continue
            if lname == b"x-forwarded-proto":
                forwarded_proto = value
                continue
        elif lname == b"via":
            prior_via.append(value)
            continue
        elif lname == b"host" and host_value is None:
            host_value = value
        out.append(field)  # the parsed tuple itself: nothing new to allocate
    if host_value is None and request.host:
        # HTTP/1.0 clients may omit Host; an absolute-form target still names it (RFC 9112 §3.2.2).
        out.append((b"Host", request.host))
    client = request.client_ip.encode("ascii")
    out.append((b"X-Forwarded-For", b", ".join([*prior_xff, client]) if prior_xff else client))
    scheme = _SCHEMES.get(request.scheme) or request.scheme.encode("ascii")
    out.append((b"X-Forwarded-Proto", forwarded_proto or scheme))
    host = forwarded_host or host_value or request.host
    if host:
        out.append((b"X-Forwarded-Host", host))
    via = _VIA_FOR_VERSION.get(request.version, VIA_VALUE)
    out.append((b"Via", b", ".join([*prior_via, via]) if prior_via else via))
    if request.upgrade is not None:
        # RFC 9110 §7.8: Upgrade is hop-by-hop, so the proxy re-sends it for this hop explicitly.
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", request.upgrade))
    return out


def downstream_response_headers(response: ResponseHead) -> Headers:
    """The upstream response's fields minus hop-by-hop and framing ones, plus ``Via``."""
    # One pass over the fields (this runs for every proxied response); the fields that
    # Connection lists, wherever it stands, are taken out afterwards, rarely.
    out: Headers = []
    prior_via: list[bytes] = []
    has_connection = False
    for field in response.headers:
        name = field[0]
        if not (_RESPONSE_LENGTHS >> len(name)) & 1:
            out.append(field)  # none of the names acted on below
            continue
        lname = lower_name(name)
        if lname in _NOT_FORWARDED:
            if lname == b"connection" and field[1] not in _PLAIN_CONNECTION:
                has_connection = True  # it may list other fields
            continue
        if lname == b"via":
            prior_via.append(field[1])
            continue
        out.append(field)  # the parsed tuple itself: nothing new to allocate
    if has_connection:
        listed = _connection_tokens(response.headers)
        if listed - _NOT_FORWARDED:
            out = [(n, v) for n, v in out if lower_name(n) not in listed]
            if b"via" in listed:
                prior_via = []
    out.append((b"Via", b", ".join([*prior_via, VIA_VALUE]) if prior_via else VIA_VALUE))
    return out
