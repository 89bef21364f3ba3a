"""``redirect_http``: the plain listeners answer every request with 308 to its https:// URL.

308 (RFC 9110 §15.4.9) rather than 301: the method and body are kept, so a POST is not turned
into a GET. The host comes from the request's ``Host`` (its port replaced by the TLS listener's,
left out when that is 443), path and query as sent, like nginx's
``return 308 https://$host$request_uri``. A host that is not a plain name or IP literal gets 400:
the redirect must not point wherever a client's header says.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from pibl.accesslog import AccessRecord
from pibl.http.framing import error_response, response_head_bytes

if TYPE_CHECKING:
    from pibl.server.app import ProxyApp
    from pibl.server.downstream import DownstreamConnection, RequestCycle

HTTPS_PORT = 443
# A DNS name or IPv4 address, or a bracketed IPv6 literal; an optional port follows.
_HOST_RE = re.compile(rb"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")


def https_location(host: bytes, target: bytes, https_port: int) -> bytes | None:
    """``https://host[:port]/path?query`` for a request, or None for an unusable ``host``."""
    match = _HOST_RE.fullmatch(host)
    if match is None:
        return None
    authority = match.group(1).lower()
    if https_port != HTTPS_PORT:
        authority += b":%d" % https_port
    if not target.startswith(b"/"):
        # absolute-form (RFC 9112 §3.2.2): keep what follows the authority; "*" becomes "/".
        rest = target.partition(b"://")[2]
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        target = rest[cut:] if rest[cut:].startswith(b"/") else b"/" + rest[cut:]
    return b"https://" + authority + target


class HttpsRedirect:
    """The request handler of a plain listener when ``server.tls.redirect_http`` is on."""

    def __init__(self, app: ProxyApp, https_port: int) -> None:
        self.app = app
        self.https_port = https_port

    async def handle(self, down: DownstreamConnection, cycle: RequestCycle) -> bool:
        """Answer one request; returns whether the connection may stay open."""
        head = cycle.head
        pipeline = self.app.pipeline
        if head is None or cycle.error is not None:
            # A malformed request: answered (and logged) the way every listener does.
            return await pipeline.handle(down, cycle)
        record = AccessRecord()
        record.client_addr = down.client_ip
        record.start_time = cycle.start_time
        record.method = head.method
        record.target = head.target.decode("latin-1")
        record.version = head.version
        record.host = head.host.decode("latin-1")
        location = https_location(head.host, head.target, self.https_port)
        keep_open = (
            location is not None
            and head.keep_alive
            and cycle.body_done
            and head.upgrade is None
            and self.app.keepalive_enabled
        )
        if location is None:
            record.status = 400
            out = error_response(400, "a valid Host header is needed to redirect to https")
        else:
            record.status = 308
            body = b"Redirecting to " + location + b"\n"
            headers = [
                (b"Location", location),
                (b"Content-Type", b"text/plain; charset=utf-8"),
                (b"Content-Length", b"%d" % len(body)),
            ]
            if not keep_open:
                headers.append((b"Connection", b"close"))
            elif head.version == "1.0":
                headers.append((b"Connection", b"keep-alive"))
            out = response_head_bytes(308, headers) + body
        record.bytes_sent = len(out) - out.index(b"\r\n\r\n") - 4
        cycle.response_started = True
        down.write(out)
        record.total_time = time.time() - cycle.start_time
        record.bytes_received = cycle.body_received
        pipeline.access_log.log(record)
        for observe in pipeline.record_observers:
            observe(record)
        return keep_open
