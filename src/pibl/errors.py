"""The error hierarchy, and the one table that maps an error to the status a client sees.

Third-party exceptions (httptools, OSError, asyncio timeouts) are converted into these at the
I/O boundary, so that the pipeline decides on one closed set of cases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, TypeVar

if TYPE_CHECKING:
    from pibl.balancer.upstream import Upstream

E = TypeVar("E", bound=BaseException)


def caused_by(error: E, cause: BaseException | None) -> E:
    """``error`` with ``cause`` as its ``__cause__``: ``raise caused_by(X, err)`` instead of
    ``raise X from err``, whose ``from`` clause mypyc (which compiles the hot-path modules)
    drops. A ``None`` cause hides the context, as ``from None`` does."""
    error.__cause__ = cause
    return error


class PiblError(Exception):
    """Base of every error PIBL raises on purpose."""


class ConfigError(PiblError):
    """A configuration that cannot be used; the message names the file, line or key."""


class ProtocolError(PiblError):
    """A client sent something that is not acceptable HTTP/1.1; answer ``status_hint`` and close."""

    def __init__(self, message: str, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class UpstreamError(PiblError):
    """Talking to an upstream server failed.

    ``reused`` tells whether the connection came from the keep-alive pool: a reused connection
    that dies before any response byte is the classic keep-alive race (RFC 9112 §9.3.1), which
    makes a retry of an idempotent request safe.
    """

    def __init__(self, message: str, upstream: Upstream | None = None, reused: bool = False):
        super().__init__(message)
        self.upstream = upstream
        self.reused = reused


class UpstreamConnectError(UpstreamError):
    """The TCP connection could not be opened (refused, unreachable, connect timeout)."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer (or stopped sending) within the read timeout."""


class UpstreamClosed(UpstreamError):
    """The upstream closed or reset the connection before the response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The upstream sent a response that is not valid HTTP/1.1 (bad framing, garbage)."""


class NoUpstreamAvailable(PiblError):
    """No server of the pool can take the request."""


class ClientDisconnected(PiblError):
    """The downstream client went away before its response was complete."""


# nginx logs 499 for a client that closed the connection; it is never sent on the wire.
STATUS_CLIENT_CLOSED: Final = 499


def status_for(error: BaseException) -> int:
    """The HTTP status that stands for ``error`` in the response (or, for 499, in the log)."""
    if isinstance(error, ProtocolError):
        return error.status_hint
    if isinstance(error, UpstreamConnectError):
        # A connect *timeout* is still a gateway timeout for the client (nginx: 504).
        return 504 if isinstance(error.__cause__, TimeoutError) else 502
    if isinstance(error, UpstreamTimeout):
        return 504
    if isinstance(error, UpstreamError):
        return 502
    if isinstance(error, NoUpstreamAvailable):
        return 503
    if isinstance(error, ClientDisconnected):
        return STATUS_CLIENT_CLOSED
    return 500
