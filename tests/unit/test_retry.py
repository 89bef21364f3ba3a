"""The retry decision table: should_retry and is_keepalive_race."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.errors import (
    ClientDisconnected,
    NoUpstreamAvailable,
    ProtocolError,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from pibl.proxy.retry import IDEMPOTENT_METHODS, is_keepalive_race, should_retry

METHODS = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE", "POST", "PATCH", "LOCK", "CONNECT"]
SENT_ERRORS: list[UpstreamError] = [
    UpstreamClosed("closed"),
    UpstreamTimeout("timeout"),
    UpstreamProtocolError("garbage"),
    UpstreamError("other"),
]


def retry(
    error: BaseException,
    method: str = "GET",
    *,
    attempt: int = 0,
    retries: int = 2,
    response_started: bool = False,
    body_sent: bool = False,
) -> bool:
    return should_retry(
        error,
        method,
        attempt=attempt,
        retries=retries,
        response_started=response_started,
        body_sent=body_sent,
    )


def test_idempotent_methods_are_rfc9110s() -> None:
    assert frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}) == IDEMPOTENT_METHODS


# --------------------------------------------------------------------------- connect errors


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("body_sent", [False, True])
def test_connect_error_is_always_retried_while_attempts_remain(
    method: str, body_sent: bool
) -> None:
    error = UpstreamConnectError("refused")
    assert retry(error, method, attempt=0, retries=1, body_sent=body_sent)
    assert retry(error, method, attempt=1, retries=2, body_sent=body_sent)


@pytest.mark.parametrize(("attempt", "retries"), [(0, 0), (1, 1), (2, 2), (3, 2)])
def test_connect_error_not_retried_when_attempts_are_exhausted(attempt: int, retries: int) -> None:
    assert not retry(UpstreamConnectError("refused"), attempt=attempt, retries=retries)


def test_connect_timeout_is_a_connect_error() -> None:
    error = UpstreamConnectError("timed out")
    error.__cause__ = TimeoutError()
    assert retry(error, "POST")


# --------------------------------------------------------------------------- after sending


@pytest.mark.parametrize("error", SENT_ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("method", METHODS)
def test_after_sending_only_idempotent_methods_are_retried(
    error: UpstreamError, method: str
) -> None:
    assert retry(error, method) is (method in IDEMPOTENT_METHODS)


@pytest.mark.parametrize("error", SENT_ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET"])
def test_streamed_body_is_never_replayed(error: UpstreamError, method: str) -> None:
    assert not retry(error, method, body_sent=True)


def test_post_is_never_retried_after_sending() -> None:
    for error, body_sent in itertools.product(SENT_ERRORS, [False, True]):
        assert not retry(error, "POST", body_sent=body_sent)


@pytest.mark.parametrize("error", SENT_ERRORS, ids=lambda e: type(e).__name__)
def test_idempotent_not_retried_when_attempts_are_exhausted(error: UpstreamError) -> None:
    assert not retry(error, "GET", attempt=2, retries=2)
    assert retry(error, "GET", attempt=1, retries=2)


# --------------------------------------------------------------------------- never


@pytest.mark.parametrize(
    "error", [UpstreamConnectError("refused"), *SENT_ERRORS], ids=lambda e: type(e).__name__
)
def test_never_after_the_response_started(error: UpstreamError) -> None:
    assert not retry(error, "GET", response_started=True)


def test_never_when_the_client_went_away() -> None:
    assert not retry(ClientDisconnected("gone"), "GET")


@pytest.mark.parametrize(
    "error",
    [
        ProtocolError("bad"),
        NoUpstreamAvailable("none"),
        ValueError("bug"),
        ConnectionResetError("raw"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_never_for_errors_that_are_not_upstream_failures(error: BaseException) -> None:
    assert not retry(error, "GET")


@given(
    error=st.sampled_from(
        [UpstreamConnectError("c"), *SENT_ERRORS, ClientDisconnected("d"), ProtocolError("p")]
    ),
    method=st.sampled_from(METHODS),
    attempt=st.integers(min_value=0, max_value=5),
    retries=st.integers(min_value=0, max_value=5),
    response_started=st.booleans(),
    body_sent=st.booleans(),
)
def test_decision_table(
    error: BaseException,
    method: str,
    attempt: int,
    retries: int,
    response_started: bool,
    body_sent: bool,
) -> None:
    expected = (
        attempt < retries
        and not response_started
        and isinstance(error, UpstreamError)
        and (
            isinstance(error, UpstreamConnectError)
            or (method in IDEMPOTENT_METHODS and not body_sent)
        )
    )
    got = retry(
        error,
        method,
        attempt=attempt,
        retries=retries,
        response_started=response_started,
        body_sent=body_sent,
    )
    assert got is expected


# --------------------------------------------------------------------------- keep-alive race


def race(
    error: BaseException,
    method: str = "GET",
    *,
    response_started: bool = False,
    body_sent: bool = False,
) -> bool:
    return is_keepalive_race(error, method, response_started=response_started, body_sent=body_sent)


@pytest.mark.parametrize("method", ["POST", "PATCH", "LOCK"])
def test_non_idempotent_request_is_never_repeated_after_a_keepalive_close(method: str) -> None:
    # The server may have read the head before closing; a POST is never sent twice.
    assert not race(UpstreamClosed("closed before responding", reused=True), method)


def test_reused_connection_closed_before_answering_is_a_race() -> None:
    assert race(UpstreamClosed("closed before responding", reused=True))


def test_fresh_connection_closing_is_not_a_race() -> None:
    assert not race(UpstreamClosed("closed before responding", reused=False))


def test_no_race_once_the_response_started_or_the_body_was_streamed() -> None:
    error = UpstreamClosed("closed", reused=True)
    assert not race(error, response_started=True)
    assert not race(error, body_sent=True)


def test_connect_error_is_not_a_race() -> None:
    assert not race(UpstreamConnectError("refused", reused=True))


def test_read_timeout_on_a_reused_connection_is_not_a_race() -> None:
    # The server has the request and is slow: sending it again on a fresh connection would
    # repeat it (a POST without a body included), and double the wait.
    assert not race(UpstreamTimeout("no data", reused=True))


def test_invalid_response_on_a_reused_connection_is_not_a_race() -> None:
    # The server answered (badly): it saw the request.
    assert not race(UpstreamProtocolError("garbage", reused=True))


def test_client_disconnect_and_other_errors_are_not_races() -> None:
    assert not race(ClientDisconnected("gone"))
    assert not race(ConnectionResetError())
    assert not race(ProtocolError("bad"))
