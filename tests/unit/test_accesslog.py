"""Access log: formatting, escaping against log injection, batching, rotation, write errors."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl import accesslog
from pibl.accesslog import (
    FORMATS,
    AccessLog,
    AccessLogger,
    AccessRecord,
    NullAccessLog,
    format_combined,
    format_json,
)

# 2026-11-28T12:00:00Z
NOON = 1795867200.0

TEXT_FIELDS = (
    "client_addr",
    "method",
    "target",
    "version",
    "referer",
    "user_agent",
    "host",
    "upstream_addr",
    "cache_status",
    "route",
    "error",
)

PRINTABLE_ASCII_LINE = re.compile(r"[\x20-\x7e]*")


def full_record() -> AccessRecord:
    rec = AccessRecord()
    rec.client_addr = "192.0.2.7"
    rec.start_time = NOON + 0.25
    rec.method = "GET"
    rec.target = "/api/items?id=3"
    rec.version = "1.1"
    rec.status = 200
    rec.bytes_sent = 5120
    rec.bytes_received = 17
    rec.referer = "https://example.com/page"
    rec.user_agent = "curl/8.5.0"
    rec.host = "example.com"
    rec.upstream_addr = "10.0.0.2:8080"
    rec.upstream_status = 200
    rec.upstream_time = 0.0123
    rec.total_time = 0.0151
    rec.cache_status = "HIT"
    rec.route = "api"
    rec.error = ""
    return rec


def strict_json(line: str) -> dict[str, Any]:
    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    value = json.loads(line, parse_constant=reject)
    assert isinstance(value, dict)
    return value


def assert_one_printable_line(line: str) -> None:
    assert PRINTABLE_ASCII_LINE.fullmatch(line), line


def unescape_combined(text: str) -> str:
    """Undo the combined format's \\xHH escaping for latin-1 text."""
    return re.sub(r"\\x([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


# --- records and formatters ----------------------------------------------------------------


def test_record_defaults() -> None:
    rec = AccessRecord()
    assert rec.version == "1.1"
    assert rec.upstream_addr == "-"
    assert rec.upstream_status is None
    assert rec.upstream_time is None
    assert rec.cache_status == "-"
    assert rec.error == ""
    assert not hasattr(rec, "__dict__")
    with pytest.raises(AttributeError):
        rec.unknown = 1  # type: ignore[attr-defined]
    assert "client_addr=''" in repr(rec)


def test_combined_full_record() -> None:
    assert format_combined(full_record()) == (
        '192.0.2.7 - - [28/Nov/2026:12:00:00 +0000] "GET /api/items?id=3 HTTP/1.1" 200 5120 '
        '"https://example.com/page" "curl/8.5.0" upstream=10.0.0.2:8080 upstream_status=200 '
        'upstream_time=0.012 request_time=0.015 cache="HIT" route="api" error="-"'
    )


def test_combined_minimal_record() -> None:
    assert format_combined(AccessRecord()) == (
        '- - - [01/Jan/1970:00:00:00 +0000] "-" 0 0 "-" "-" upstream=- upstream_status=- '
        'upstream_time=- request_time=0.000 cache="-" route="-" error="-"'
    )


def test_combined_failed_request() -> None:
    rec = AccessRecord()
    rec.client_addr = "192.0.2.7"
    rec.start_time = NOON
    rec.method = "POST"
    rec.target = "/upload"
    rec.status = 499
    rec.upstream_addr = "10.0.0.2:8080, 10.0.0.3:8080"
    rec.total_time = 2.5
    rec.error = "client closed connection"
    line = format_combined(rec)
    assert '"POST /upload HTTP/1.1" 499 0 ' in line
    # Unquoted values cannot contain a space, or they could fake the next field.
    assert " upstream=10.0.0.2:8080,\\x2010.0.0.3:8080 upstream_status=-" in line
    assert line.endswith('request_time=2.500 cache="-" route="-" error="client closed connection"')


def test_json_full_record() -> None:
    line = format_json(full_record())
    assert "\n" not in line
    assert strict_json(line) == {
        "time": "2026-11-28T12:00:00.250Z",
        "client_addr": "192.0.2.7",
        "start_time": NOON + 0.25,
        "method": "GET",
        "target": "/api/items?id=3",
        "version": "1.1",
        "status": 200,
        "bytes_sent": 5120,
        "bytes_received": 17,
        "referer": "https://example.com/page",
        "user_agent": "curl/8.5.0",
        "host": "example.com",
        "upstream_addr": "10.0.0.2:8080",
        "upstream_status": 200,
        "upstream_time": 0.0123,
        "total_time": 0.0151,
        "cache_status": "HIT",
        "route": "api",
        "error": "",
    }
    # Stable key order, for humans reading the file and for diffing.
    assert list(strict_json(line))[:3] == ["time", "client_addr", "start_time"]


def test_json_minimal_record() -> None:
    assert strict_json(format_json(AccessRecord())) == {
        "time": "1970-01-01T00:00:00.000Z",
        "client_addr": "",
        "start_time": 0.0,
        "method": "",
        "target": "",
        "version": "1.1",
        "status": 0,
        "bytes_sent": 0,
        "bytes_received": 0,
        "referer": "",
        "user_agent": "",
        "host": "",
        "upstream_addr": "-",
        "upstream_status": None,
        "upstream_time": None,
        "total_time": 0.0,
        "cache_status": "-",
        "route": "",
        "error": "",
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_unrepresentable_times_do_not_break_lines(bad: float) -> None:
    rec = full_record()
    rec.start_time = bad
    rec.upstream_time = bad if bad != 1e300 else None
    rec.total_time = bad if bad != 1e300 else 0.0
    combined = format_combined(rec)
    assert_one_printable_line(combined)
    assert "[-]" in combined
    data = strict_json(format_json(rec))
    assert data["time"] is None


def test_formats_registry() -> None:
    assert {"combined": format_combined, "json": format_json} == FORMATS


# --- log injection -------------------------------------------------------------------------

INJECTIONS = [
    "/a\nfake 127.0.0.1 - - [x]",
    "/a\r\nb",
    'x" 200 0 "-" "forged',
    "a\x00b",
    "\x1b[31mred\x1b[0m",
    "caf\xe9 \u2603 \U0001f600",
    "back\\slash \\x0A",
    "\x7f\u2028\u2029\x85",
]


@pytest.mark.parametrize("payload", INJECTIONS)
@pytest.mark.parametrize("field", ["target", "user_agent", "referer", "error", "cache_status"])
def test_injection_is_escaped(field: str, payload: str) -> None:
    rec = full_record()
    setattr(rec, field, payload)

    combined = format_combined(rec)
    assert_one_printable_line(combined)
    # The quoted fields are still exactly where a combined parser looks for them.
    fields = re.fullmatch(
        r'(\S+) - - \[([^]]+)\] "([^"]*)" (\d+) (\d+) "([^"]*)" "([^"]*)" (.*)', combined
    )
    assert fields is not None, combined
    assert fields.group(4) == "200"

    line = format_json(rec)
    assert_one_printable_line(line)
    assert strict_json(line)[field] == payload


def test_combined_escapes_like_nginx() -> None:
    rec = full_record()
    rec.target = '/a"b\n\x1b[1m\xe9\\'
    rec.user_agent = "\u2603"
    line = format_combined(rec)
    assert '"GET /a\\x22b\\x0A\\x1B[1m\\xE9\\x5C HTTP/1.1"' in line
    assert '"\\xE2\\x98\\x83"' in line  # beyond latin-1: its UTF-8 bytes


texts = st.text()
latin1 = st.text(st.characters(max_codepoint=0xFF))


@given(st.fixed_dictionaries(dict.fromkeys(TEXT_FIELDS, texts)))
def test_any_text_gives_one_safe_line(values: dict[str, str]) -> None:
    rec = full_record()
    for name, value in values.items():
        setattr(rec, name, value)

    assert_one_printable_line(format_combined(rec))

    line = format_json(rec)
    assert_one_printable_line(line)
    data = strict_json(line)
    assert {name: data[name] for name in TEXT_FIELDS} == values


@given(st.fixed_dictionaries(dict.fromkeys(TEXT_FIELDS, texts)))
def test_a_line_built_unescaped_is_used_only_when_escaping_changes_nothing(
    values: dict[str, str],
) -> None:
    # format_combined skips the escaping when the whole line shows nothing to escape; it must
    # always agree with escaping every field.
    rec = full_record()
    for name, value in values.items():
        setattr(rec, name, value)
    assert format_combined(rec) == accesslog._combined(rec, True)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0.000"),
        (0.0123, "0.012"),
        (0.0151, "0.015"),
        (0.0004, "0.000"),
        (0.0006, "0.001"),
        (2.5, "2.500"),
        (59.9996, "60.000"),
        (86400.25, "86400.250"),
        (-0.25, "-0.250"),  # the wall clock stepped back: printed, not hidden
        (1e12, "1000000000000.000"),
        (float("nan"), "-"),
        (float("inf"), "-"),
        (None, "-"),
    ],
)
def test_durations_are_printed_in_milliseconds(seconds: float | None, text: str) -> None:
    assert accesslog._seconds_text(seconds) == text


@given(st.floats(min_value=0.0, max_value=5.0))
def test_durations_under_and_over_a_second_round_half_up(seconds: float) -> None:
    millis = int(seconds * 1000.0 + 0.5)
    assert accesslog._seconds_text(seconds) == f"{millis // 1000}.{millis % 1000:03d}"


@given(st.integers(min_value=-10, max_value=10_000))
def test_status_text_is_the_number(status: int) -> None:
    assert accesslog._status_text(status) == str(status)


@given(st.lists(st.floats(min_value=-5.0, max_value=4e9) | st.sampled_from([NOON, NOON + 0.5])))
def test_time_local_in_any_order_matches_gmtime(timestamps: list[float]) -> None:
    # The last second's string is reused: whatever came before, each line gets its own second.
    for timestamp in timestamps:
        if timestamp < 0:
            continue  # before 1970: whatever gmtime says, tested by test_unrepresentable_times
        tm = time.gmtime(int(timestamp))
        expected = time.strftime("%d/%b/%Y:%H:%M:%S +0000", tm)
        assert accesslog._time_local(timestamp) == expected


@given(
    st.sampled_from(["GET", "HEAD", "POST", ""]),
    st.sampled_from(["/a?b=c", "*", ""]),
    st.sampled_from(["1.1", "1.0", ""]),
)
def test_the_one_build_request_line_is_the_escaped_one(
    method: str, target: str, version: str
) -> None:
    # Nothing to escape: the line built without escaping equals the one built escaping.
    rec = full_record()
    rec.method, rec.target, rec.version = method, target, version
    assert accesslog._combined(rec, False) == accesslog._combined(rec, True)


@given(latin1, latin1)
def test_combined_escaping_is_reversible_for_wire_bytes(target: str, user_agent: str) -> None:
    rec = full_record()
    rec.target = target
    rec.user_agent = user_agent
    match = re.search(r'"GET (.*) HTTP/1\.1" 200 5120 "[^"]*" "([^"]*)"', format_combined(rec))
    assert match is not None
    assert unescape_combined(match.group(1)) == (target or "-")
    assert unescape_combined(match.group(2)) == (user_agent or "-")


# --- writer --------------------------------------------------------------------------------


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "access.log"


@pytest.fixture
def make_log() -> Iterator[Callable[..., AccessLog]]:
    opened: list[AccessLog] = []

    def make(path: str | Path, fmt: str = "combined") -> AccessLog:
        log = AccessLog(str(path), fmt)
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


@pytest.fixture
def write_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the os.write calls the access log makes (other fds pass through untouched)."""
    real_write = os.write
    calls: list[int] = []

    def counting_write(fd: int, data: Any) -> int:
        written = real_write(fd, data)
        calls.append(written)
        return written

    monkeypatch.setattr(accesslog.os, "write", counting_write)
    return calls


def numbered(i: int) -> AccessRecord:
    rec = full_record()
    rec.target = f"/item/{i}"
    return rec


# Plain helpers so that async tests do blocking file checks without ruff's ASYNC240 noise:
# they are instant local file operations, and blocking the loop here is the point (no flush).
def lines_of(path: Path) -> list[str]:
    return path.read_text("ascii").splitlines()


def is_empty(path: Path) -> bool:
    return path.read_bytes() == b""


def rotate(path: Path, to: Path) -> None:
    path.rename(to)


def test_unknown_format_is_rejected(log_path: Path) -> None:
    with pytest.raises(ValueError, match="xml"):
        AccessLog(str(log_path), "xml")
    assert not log_path.exists()


def test_open_failure_raises_at_startup(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        AccessLog(str(tmp_path / "missing-dir" / "access.log"))


def test_without_running_loop_writes_immediately(
    log_path: Path, make_log: Callable[..., AccessLog]
) -> None:
    log = make_log(log_path, "json")
    log.log(full_record())
    assert strict_json(lines_of(log_path)[0])["target"] == "/api/items?id=3"
    assert os.stat(log_path).st_mode & 0o777 == 0o644 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_appends_to_existing_file(log_path: Path, make_log: Callable[..., AccessLog]) -> None:
    log_path.write_text("earlier line\n")
    make_log(log_path).log(full_record())
    assert lines_of(log_path)[0] == "earlier line"
    assert len(lines_of(log_path)) == 2


async def test_batches_until_flush_timer(
    log_path: Path, make_log: Callable[..., AccessLog], write_calls: list[int]
) -> None:
    log = make_log(log_path)
    loop = asyncio.get_running_loop()
    for i in range(200):
        log.log(numbered(i))
    assert is_empty(log_path)
    assert write_calls == []

    # Scheduled after the log's own call_later with the same delay: it fires after the flush.
    flushed = loop.create_future()
    loop.call_later(AccessLog.FLUSH_INTERVAL, flushed.set_result, None)
    await flushed

    assert lines_of(log_path) == [format_combined(numbered(i)) for i in range(200)]
    assert len(write_calls) == 1  # the whole batch in one write


async def test_next_batch_gets_a_new_timer(
    log_path: Path, make_log: Callable[..., AccessLog]
) -> None:
    log = make_log(log_path)
    loop = asyncio.get_running_loop()
    for batch in range(2):
        log.log(numbered(batch))
        flushed = loop.create_future()
        loop.call_later(AccessLog.FLUSH_INTERVAL, flushed.set_result, None)
        await flushed
        assert len(lines_of(log_path)) == batch + 1


async def test_buffer_limit_flushes_whole_lines(
    log_path: Path, make_log: Callable[..., AccessLog], write_calls: list[int]
) -> None:
    log = make_log(log_path)
    line_size = len(format_combined(numbered(0))) + 1
    count = 0
    buffered = 0
    while buffered + line_size <= AccessLog.BUFFER_LIMIT:
        log.log(numbered(0))
        count += 1
        buffered += line_size
    assert is_empty(log_path)  # exactly at the limit is not past it

    log.log(numbered(0))  # crosses the limit: written now, without waiting for the timer
    assert write_calls == [buffered + line_size]
    assert lines_of(log_path) == [format_combined(numbered(0))] * (count + 1)

    log.log(numbered(1))  # starts a new batch
    assert len(lines_of(log_path)) == count + 1
    log.flush()
    assert lines_of(log_path)[-1] == format_combined(numbered(1))
    assert len(write_calls) == 2


async def test_explicit_flush_and_close(log_path: Path, make_log: Callable[..., AccessLog]) -> None:
    log = make_log(log_path)
    log.log(numbered(1))
    log.flush()
    assert lines_of(log_path) == [format_combined(numbered(1))]
    log.flush()  # nothing buffered: no empty write
    log.log(numbered(2))
    log.close()  # flushes and cancels the timer
    assert len(lines_of(log_path)) == 2
    log.log(numbered(3))
    assert log.dropped_lines == 1
    log.close()  # idempotent
    log.reopen()  # harmless after close
    assert len(lines_of(log_path)) == 2


def test_timer_on_a_closed_loop_is_replaced(
    log_path: Path, make_log: Callable[..., AccessLog]
) -> None:
    log = make_log(log_path)

    async def log_one(i: int) -> None:
        log.log(numbered(i))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(log_one(0))
    finally:
        loop.close()
    assert is_empty(log_path)  # its timer died with the loop

    log.log(numbered(1))  # no loop now: written at once, the stale batch included
    assert len(lines_of(log_path)) == 2


def test_reopen_after_logrotate_rename(
    tmp_path: Path, log_path: Path, make_log: Callable[..., AccessLog]
) -> None:
    log = make_log(log_path)
    log.log(numbered(1))
    rotated = tmp_path / "access.log.1"
    log_path.rename(rotated)

    log.log(numbered(2))  # still the old descriptor until told to reopen
    log.reopen()
    log.log(numbered(3))

    assert lines_of(rotated) == [format_combined(numbered(1)), format_combined(numbered(2))]
    assert lines_of(log_path) == [format_combined(numbered(3))]


async def test_reopen_flushes_the_batch_into_the_old_file(
    tmp_path: Path, log_path: Path, make_log: Callable[..., AccessLog]
) -> None:
    log = make_log(log_path)
    log.log(numbered(1))  # buffered: a loop is running
    rotated = tmp_path / "access.log.1"
    rotate(log_path, rotated)
    log.reopen()
    assert lines_of(rotated) == [format_combined(numbered(1))]
    assert is_empty(log_path)


def test_reopen_failure_keeps_the_old_file(
    tmp_path: Path, make_log: Callable[..., AccessLog], caplog: pytest.LogCaptureFixture
) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    log = make_log(log_dir / "access.log")
    rotated = tmp_path / "rotated.log"
    (log_dir / "access.log").rename(rotated)
    log_dir.rmdir()

    log.reopen()  # must not raise
    log.log(numbered(1))

    assert lines_of(rotated) == [format_combined(numbered(1))]
    assert [r.levelno for r in caplog.records if r.name == "pibl.accesslog"] == [logging.ERROR]
    assert "reopen failed" in caplog.text


def test_write_error_is_counted_not_raised(
    make_log: Callable[..., AccessLog], caplog: pytest.LogCaptureFixture
) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    log = make_log("/dev/full")
    log.log(numbered(1))  # ENOSPC
    log.log(numbered(2))
    log.flush()
    log.reopen()
    log.close()
    assert log.dropped_lines == 2
    errors = [r for r in caplog.records if r.name == "pibl.accesslog"]
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR
    assert "No space left on device" in errors[0].getMessage()


class FlakyWrite:
    """os.write for one fd that fails, or accepts only part of the data, on demand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, log: AccessLog) -> None:
        self.real_write = os.write
        self.fd = log._fd
        self.fail: int | None = None  # errno to fail with
        self.max_chunk: int | None = None  # accept at most this much per call
        self.fail_after_first = False
        monkeypatch.setattr(accesslog.os, "write", self)

    def __call__(self, fd: int, data: Any) -> int:
        if fd != self.fd:
            return self.real_write(fd, data)
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        if self.fail_after_first:
            self.fail = errno.EIO
        if self.max_chunk is not None:
            data = bytes(data[: self.max_chunk])
        return self.real_write(fd, data)


def test_error_is_reported_again_after_a_success(
    monkeypatch: pytest.MonkeyPatch,
    log_path: Path,
    make_log: Callable[..., AccessLog],
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = make_log(log_path)
    flaky = FlakyWrite(monkeypatch, log)

    flaky.fail = errno.EIO
    log.log(numbered(1))
    log.log(numbered(2))
    flaky.fail = None
    log.log(numbered(3))
    flaky.fail = errno.ENOSPC
    log.log(numbered(4))

    assert log.dropped_lines == 3
    assert lines_of(log_path) == [format_combined(numbered(3))]
    messages = [r.getMessage() for r in caplog.records if r.name == "pibl.accesslog"]
    assert len(messages) == 2
    assert os.strerror(errno.EIO) in messages[0]
    assert os.strerror(errno.ENOSPC) in messages[1]


async def test_short_writes_are_continued(
    monkeypatch: pytest.MonkeyPatch, log_path: Path, make_log: Callable[..., AccessLog]
) -> None:
    log = make_log(log_path)
    flaky = FlakyWrite(monkeypatch, log)
    flaky.max_chunk = 7
    for i in range(20):
        log.log(numbered(i))
    log.flush()
    assert lines_of(log_path) == [format_combined(numbered(i)) for i in range(20)]
    assert log.dropped_lines == 0


async def test_error_after_short_write_drops_the_rest(
    monkeypatch: pytest.MonkeyPatch,
    log_path: Path,
    make_log: Callable[..., AccessLog],
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = make_log(log_path)
    flaky = FlakyWrite(monkeypatch, log)
    first = format_combined(numbered(1))
    flaky.max_chunk = len(first) + 1 + 10  # line 1 and the start of line 2
    flaky.fail_after_first = True
    for i in (1, 2, 3):
        log.log(numbered(i))
    log.flush()  # must not raise
    assert log.dropped_lines == 2  # the torn line 2 and line 3
    assert len([r for r in caplog.records if r.name == "pibl.accesslog"]) == 1

    flaky.fail = None
    flaky.fail_after_first = False
    flaky.max_chunk = None
    log.log(numbered(4))
    log.flush()
    # The torn fragment is closed by the next batch, so line 4 starts a line of its own.
    lines = lines_of(log_path)
    assert lines[0] == first
    assert lines[1] == format_combined(numbered(2))[:10]
    assert lines[2] == format_combined(numbered(4))
    assert len(lines) == 3


def test_stdout_mode(capfd: pytest.CaptureFixture[str]) -> None:
    log = AccessLog("-", "json")
    log.log(full_record())
    log.reopen()  # nothing to reopen
    log.close()
    out = capfd.readouterr().out
    assert out.count("\n") == 1
    assert strict_json(out)["route"] == "api"
    os.fstat(1)  # close() left standard output open


def test_disabled_logs_nothing(tmp_path: Path) -> None:
    for log in (AccessLog.disabled(), NullAccessLog()):
        assert_is_access_logger(log)
        log.log(full_record())
        log.flush()
        log.reopen()
        log.close()
    assert list(tmp_path.iterdir()) == []


def test_access_log_satisfies_protocol(log_path: Path, make_log: Callable[..., AccessLog]) -> None:
    logger: AccessLogger = make_log(log_path)
    assert_is_access_logger(logger)


def assert_is_access_logger(logger: object) -> None:
    # What @runtime_checkable would check; the protocol is compiled (mypyc), which that
    # decorator does not accept.
    for name in ("log", "flush", "reopen", "close"):
        assert callable(getattr(logger, name, None)), name
