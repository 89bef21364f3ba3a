"""When a failed attempt may be repeated: one pure function, so the rule is in one place.

nginx's ``proxy_next_upstream error timeout`` with ``non_idempotent`` off, and Go's Transport
rule for a reused connection that died before answering (RFC 9112 §9.3.1 keep-alive race).
"""

from __future__ import annotations

from typing import Final

from pibl.errors import ClientDisconnected, UpstreamClosed, UpstreamConnectError, UpstreamError

# RFC 9110 §9.2.2.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def should_retry(
    error: BaseException,
    method: str,
    *,
    attempt: int,
    retries: int,
    response_started: bool,
    body_sent: bool,
) -> bool:
    """Whether the request may be tried again after ``error`` on attempt number ``attempt``.

    - never once any response byte reached the client, or when the client went away;
    - a connect failure sent nothing, so another server is always safe;
    - once the request was sent, only idempotent methods whose body (if any) was not streamed
      (it cannot be replayed), and only for errors where no response arrived.
    """
    if attempt >= retries or response_started or isinstance(error, ClientDisconnected):
        return False
    if isinstance(error, UpstreamConnectError):
        return True
    if not isinstance(error, UpstreamError):
        return False
    return method in IDEMPOTENT_METHODS and not body_sent


def is_keepalive_race(
    error: BaseException, method: str, *, response_started: bool, body_sent: bool
) -> bool:
    """A pooled connection closed by the server just as it was reused: retry on a fresh one.

    Only a close/reset is that race. A read timeout or an invalid response means the server
    received the request: repeating it would send it twice (and double a timeout's wait).
    The server may have seen the request head before closing, so only idempotent methods are
    repeated (Go's Transport: ``isReplayable``); a POST is never sent twice.
    """
    return (
        method in IDEMPOTENT_METHODS
        and isinstance(error, UpstreamClosed)
        and error.reused
        and not response_started
        and not body_sent
    )
