"""Checks on a parsed request head that llhttp leaves to the application (RFC 9112 §3, §6).

llhttp (strict mode) already rejects bad tokens, bare CR/LF, obs-fold, invalid chunk framing
and Content-Length together with Transfer-Encoding. What is left: the version, Host rules,
a second look at the framing fields, and the body-size limit that answers 413 before anything
is forwarded.
"""

from __future__ import annotations

from typing import Final

from pibl.errors import ProtocolError
from pibl.http.head import Headers, RequestHead, length_mask, lower_name

# Allowed bytes, checked as ``value.translate(None, ALLOWED)`` (empty when nothing else is in
# ``value``): one C pass, where a frozenset.issuperset makes an int per byte.
_DIGITS: Final = b"0123456789"
# RFC 9110 §7.2 / RFC 3986 §3.2.2: Host = uri-host [ ":" port ] -- unreserved, pct-encoded,
# sub-delims, ":" and the brackets of an IP literal. Anything else (spaces, "/", "@", obs-text)
# is "a Host header field with an invalid field value" that RFC 9112 §3.2 answers with 400.
_HOST_CHARS: Final = (
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:[]"
)

# The lengths of the names the loop below acts on (see ``length_mask``).
_CHECKED_LENGTHS: Final = length_mask(
    (b"host", b"content-length", b"transfer-encoding", b"expect", b"connection", b"upgrade")
)


def validate_request_head(
    method: str,
    target: bytes,
    version: str,
    headers: Headers,
    *,
    keep_alive: bool,
    max_body_size: int = 0,
) -> RequestHead:
    """Build a ``RequestHead`` or raise ``ProtocolError`` with the status to answer."""
    if version not in ("1.1", "1.0"):
        raise ProtocolError(f"unsupported HTTP version {version}", 505)
    content_length: int | None = None
    is_chunked = False
    hosts: list[bytes] = []
    has_transfer_encoding = False
    expects_continue = False
    connection_upgrade = False
    upgrade: bytes | None = None
    for name, value in headers:
        if not (_CHECKED_LENGTHS >> len(name)) & 1:
            continue
        lname = lower_name(name)
        if lname == b"host":
            hosts.append(value)
        elif lname == b"content-length":
            # RFC 9110 §8.6: 1*DIGIT; a list or repeated field is refused rather than merged
            # (smuggling precedent: CL.CL desync).
            if content_length is not None or not value or value.translate(None, _DIGITS):
                raise ProtocolError("invalid Content-Length")
            content_length = int(value)
        elif lname == b"transfer-encoding":
            if has_transfer_encoding:
                raise ProtocolError("repeated Transfer-Encoding")
            has_transfer_encoding = True
            codings = [c.strip().lower() for c in value.split(b",")]
            # RFC 9112 §6.3: a request whose final coding is not chunked cannot be framed (400);
            # §7: chunked is applied exactly once. A well-framed request with another coding
            # before chunked is merely one PIBL does not implement (501).
            if codings != [b"chunked"]:
                well_framed = codings[-1] == b"chunked" and b"chunked" not in codings[:-1]
                raise ProtocolError("unsupported Transfer-Encoding", 501 if well_framed else 400)
            is_chunked = True
        elif lname == b"expect":
            if value.strip().lower() == b"100-continue":
                expects_continue = True
            else:
                raise ProtocolError("unsupported expectation", 417)
        elif lname == b"connection":
            if b"upgrade" in (t.strip().lower() for t in value.split(b",")):
                connection_upgrade = True
        elif lname == b"upgrade":
            upgrade = value
    if has_transfer_encoding:
        if version == "1.0":
            # RFC 9112 §6.1: a 1.0 recipient cannot be trusted with chunked; refuse (nginx too).
            raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request")
        if content_length is not None:
            raise ProtocolError("both Content-Length and Transfer-Encoding")
    if version == "1.1" and len(hosts) != 1:
        # RFC 9112 §3.2: exactly one Host in HTTP/1.1.
        raise ProtocolError("missing Host" if not hosts else "repeated Host")
    if len(hosts) > 1:
        raise ProtocolError("repeated Host")
    if max_body_size and content_length is not None and content_length > max_body_size:
        raise ProtocolError("request body too large", 413)
    host = hosts[0] if hosts else b""
    if host.translate(None, _HOST_CHARS):
        raise ProtocolError("invalid Host")
    if method == "CONNECT":
        # Checked before the target: a CONNECT carries an authority-form target (RFC 9110 §9.3.6).
        raise ProtocolError("CONNECT is not supported by a reverse proxy", 405)
    if not target.startswith(b"/"):
        if target == b"*" and method == "OPTIONS":
            pass
        elif b"://" in target:
            # Absolute-form: its authority replaces Host (RFC 9112 §3.2.2).
            authority = target.split(b"://", 1)[1].split(b"/", 1)[0].split(b"?", 1)[0]
            host = authority.rsplit(b"@", 1)[-1]
            if host.translate(None, _HOST_CHARS):
                raise ProtocolError("invalid request target")
        else:
            raise ProtocolError("invalid request target")
    return RequestHead(
        method,
        target,
        version,
        headers,
        keep_alive=keep_alive,
        content_length=content_length,
        is_chunked=is_chunked,
        host=host,
        expects_continue=expects_continue and version == "1.1",
        upgrade=upgrade if connection_upgrade and version == "1.1" else None,
    )
