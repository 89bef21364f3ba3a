"""The access log: one line per request, failed requests included.

Three parts: ``AccessRecord`` (what the pipeline fills in while a request runs), the formatters
(``FORMATS``: nginx "combined" with extras, and JSON lines) and the writers (``AccessLog``,
``NullAccessLog``) behind the ``AccessLogger`` protocol.

Every value that came from the network is escaped before it reaches the file, so that a request
cannot forge a line break, a fake field or a terminal escape sequence in the log (log injection,
CWE-117). The output of both formats is pure printable ASCII, one line per record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from typing import ClassVar, Final, Protocol

from pibl.errors import caused_by

__all__ = [
    "FORMATS",
    "AccessLog",
    "AccessLogger",
    "AccessRecord",
    "Formatter",
    "NullAccessLog",
    "format_combined",
    "format_json",
]

logger: Final = logging.getLogger("pibl.accesslog")


class AccessRecord:
    """What is known about one request when it ends; the pipeline assigns fields as it learns them.

    A plain slotted class rather than a dataclass: one is created per request, and ``__init__``
    is nothing but attribute stores. Every field has a default, so a request that fails early
    (bad request line, client gone) still yields a loggable record.
    """

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "cache_status",
        "client_addr",
        "error",
        "host",
        "method",
        "referer",
        "retries",
        "route",
        "start_time",
        "status",
        "target",
        "total_time",
        "upstream_addr",
        "upstream_status",
        "upstream_time",
        "user_agent",
        "version",
    )

    def __init__(self) -> None:
        self.client_addr: str = ""
        # time.time() when the request head arrived (wall clock, for the timestamp).
        self.start_time: float = 0.0
        self.method: str = ""
        # The raw request-target decoded as latin-1, so each character is one wire byte.
        self.target: str = ""
        self.version: str = "1.1"
        # 499 when the client went away before the response was sent (nginx's convention).
        self.status: int = 0
        # Response body bytes sent to the client ($body_bytes_sent).
        self.bytes_sent: int = 0
        # Request body bytes received from the client.
        self.bytes_received: int = 0
        self.referer: str = ""
        self.user_agent: str = ""
        self.host: str = ""
        self.upstream_addr: str = "-"
        self.upstream_status: int | None = None
        # Seconds, like nginx's $upstream_response_time and $request_time.
        self.upstream_time: float | None = None
        self.total_time: float = 0.0
        self.cache_status: str = "-"
        self.route: str = ""
        # A short reason when the request failed; "" when it did not.
        self.error: str = ""
        # Attempts after the first (another server, or a fresh connection); for metrics.
        self.retries: int = 0

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELD_ORDER)
        return f"AccessRecord({fields})"


# Field order of the JSON format (and of repr): the order a reader expects, not __slots__'s.
_FIELD_ORDER: Final = (
    "client_addr",
    "start_time",
    "method",
    "target",
    "version",
    "status",
    "bytes_sent",
    "bytes_received",
    "referer",
    "user_agent",
    "host",
    "upstream_addr",
    "upstream_status",
    "upstream_time",
    "total_time",
    "cache_status",
    "route",
    "error",
)


# --- escaping ------------------------------------------------------------------------------


class _EscapeTable(dict[int, str]):
    """A ``str.translate`` table: every code point <= 0xFF is precomputed; beyond it, UTF-8.

    Code points up to 0xFF are escaped as that one byte (``\\xHH``): header values and the target
    are decoded as latin-1, so this reproduces the exact byte the client sent, as nginx's
    access log escaping (``ngx_http_log_escape``) does. Code points above 0xFF cannot come from the
    wire that way (they come from configuration, e.g. a route name) and are escaped byte by byte
    in UTF-8. They are computed on demand and not cached, so a hostile request cannot grow the
    table.
    """

    def __missing__(self, code_point: int) -> str:
        # surrogatepass: a lone surrogate (from surrogateescape decoding) must not raise here.
        raw = chr(code_point).encode("utf-8", "surrogatepass")
        return "".join([f"\\x{byte:02X}" for byte in raw])


def _escape_table(extra: str) -> _EscapeTable:
    # nginx (ngx_http_log_escape) escapes '"', '\' and bytes < 0x20 and >= 0x7F as \xHH,
    # uppercase hex; a literal backslash is escaped too so that \xHH stays unambiguous.
    table = _EscapeTable()
    for code_point in range(0x100):
        printable = 0x20 <= code_point < 0x7F
        # Printable ASCII must be in the table too, or translate() would ask __missing__.
        table[code_point] = chr(code_point) if printable else f"\\x{code_point:02X}"
    for char in '"\\' + extra:
        table[ord(char)] = f"\\x{ord(char):02X}"
    return table


# Inside "...": the nginx set.
_QUOTED: Final = _escape_table("")
# Unquoted key=value extras: a space would let a value fake the next field ("HIT route=x").
_BARE: Final = _escape_table(" ")

# --- time ----------------------------------------------------------------------------------

# Fixed English names: strftime("%b") follows LC_TIME, and log parsers expect nginx's "Nov".
_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)


class _SecondCache:
    """The formatted form of the last whole second; nginx caches its time strings the same way
    (ngx_time_update), since consecutive requests almost always share the second."""

    __slots__ = ("clf", "iso", "second")

    def __init__(self) -> None:
        self.second = -1
        self.clf = ""
        self.iso = ""


_time_cache: Final = _SecondCache()


def _second_strings(timestamp: float) -> tuple[int, str, str] | None:
    """(whole second, CLF string, ISO 8601 prefix) for ``timestamp``; None when unrepresentable."""
    try:
        second = math.floor(timestamp)
    except (OverflowError, ValueError):  # inf, nan
        return None
    cache = _time_cache
    if second == cache.second:
        return second, cache.clf, cache.iso
    try:
        tm = time.gmtime(second)
    except (OverflowError, OSError, ValueError):
        return None
    # UTC, like the JSON format: the two formats then agree, and log shippers need no zone
    # database. nginx's $time_local uses the local zone; on a UTC host it is the same string.
    clf = (
        f"{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year:04d}:"
        f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} +0000"
    )
    iso = (
        f"{tm.tm_year:04d}-{tm.tm_mon:02d}-{tm.tm_mday:02d}T"
        f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}"
    )
    cache.second, cache.clf, cache.iso = second, clf, iso
    return second, clf, iso


def _time_local(timestamp: float) -> str:
    cache = _time_cache
    if 0.0 <= timestamp < 1e12 and int(timestamp) == cache.second:
        return cache.clf  # the same second as the line before: nearly every line
    strings = _second_strings(timestamp)
    return "-" if strings is None else strings[1]


def _time_iso(timestamp: float) -> str | None:
    strings = _second_strings(timestamp)
    if strings is None:
        return None
    second, _, iso = strings
    millis = min(int((timestamp - second) * 1000), 999)
    return f"{iso}.{millis:03d}Z"


# "000" to "999": the fraction of a duration in milliseconds, without formatting a float.
_MILLIS: Final = tuple([format(i, "03d") for i in range(1000)])
# "0.000" to "0.999": a duration under a second (nearly all) as a string already made.
_UNDER_A_SECOND: Final = tuple(["0." + millis for millis in _MILLIS])
# A status code's text (0 for "none yet", then 100 to 599) without formatting an int per line.
_STATUS_TEXT: Final = tuple([str(status) for status in range(600)])


def _seconds_text(value: float | None) -> str:
    # Millisecond resolution, as nginx prints $request_time and $upstream_response_time.
    if value is None:
        return "-"
    if 0.0 <= value < 1e9:
        # Rounded half up, in integers: a tenth of the cost of format(value, ".3f").
        millis = int(value * 1000.0 + 0.5)
        if millis < 1000:
            return _UNDER_A_SECOND[millis]
        return str(millis // 1000) + "." + _MILLIS[millis % 1000]
    if not math.isfinite(value):
        return "-"
    return format(value, ".3f")  # negative (a clock step) or absurdly large


def _seconds_json(value: float | None) -> float | None:
    # JSON has no NaN/Infinity (json.dumps would emit invalid JSON); microseconds are plenty.
    if value is None or not math.isfinite(value):
        return None
    return round(value, 6)


# --- formatters ----------------------------------------------------------------------------


class Formatter(Protocol):
    def __call__(self, rec: AccessRecord, /) -> str: ...


def format_combined(rec: AccessRecord) -> str:
    """nginx's ``combined`` format followed by proxy extras; one line, no trailing newline.

    ``$remote_addr - - [$time_local] "$request" $status $body_bytes_sent "$http_referer"
    "$http_user_agent" upstream=... upstream_status=... upstream_time=... request_time=...
    cache="..." route="..." error="..."``. The combined prefix is unchanged so that existing
    parsers (goaccess, fail2ban, awstats) keep working; the extras only append.
    """
    # Nearly every line needs no escaping at all: check the text fields once, joined (a few C
    # passes over one short string), instead of each field on its own, and build the line as
    # it is.
    # (An f-string of str values compiles to one build of one string, not nine concatenations.)
    texts = (
        f"{rec.client_addr}{rec.method}{rec.target}{rec.version}{rec.referer}{rec.user_agent}"
        f"{rec.upstream_addr}{rec.cache_status}{rec.route}{rec.error}"
    )
    plain = (
        texts.isascii()
        and texts.isprintable()
        and '"' not in texts
        and "\\" not in texts
        and " " not in rec.client_addr
        and " " not in rec.upstream_addr
    )
    return _combined(rec, not plain)


def _combined(rec: AccessRecord, escape: bool) -> str:
    if rec.method and rec.target and rec.version and not escape:
        request = f"{rec.method} {rec.target} HTTP/{rec.version}"  # one build: nearly every line
    elif rec.method or rec.target:
        # nginx logs the raw request line; we rebuild it from its (escaped) parts.
        request = _field(rec.method, escape, _QUOTED) + " " + _field(rec.target, escape, _QUOTED)
        if rec.version:
            request += " HTTP/" + _field(rec.version, escape, _QUOTED)
    else:
        request = "-"  # the request line was never read (timeout, garbage)
    upstream_status = "-" if rec.upstream_status is None else _status_text(rec.upstream_status)
    return (
        f"{_field(rec.client_addr, escape, _BARE)} - - [{_time_local(rec.start_time)}] "
        f'"{request}" {_status_text(rec.status)} {rec.bytes_sent} '
        f'"{_field(rec.referer, escape, _QUOTED)}" "{_field(rec.user_agent, escape, _QUOTED)}" '
        f"upstream={_field(rec.upstream_addr, escape, _BARE)} upstream_status={upstream_status} "
        f"upstream_time={_seconds_text(rec.upstream_time)} "
        f"request_time={_seconds_text(rec.total_time)} "
        f'cache="{_field(rec.cache_status, escape, _QUOTED)}" '
        f'route="{_field(rec.route, escape, _QUOTED)}" error="{_field(rec.error, escape, _QUOTED)}"'
    )


def _status_text(status: int) -> str:
    return _STATUS_TEXT[status] if 0 <= status < 600 else str(status)


def _field(value: str, escape: bool, table: _EscapeTable) -> str:
    """A field's text: ``-`` when empty, as nginx logs; escaped through ``table`` if asked."""
    if not value:
        return "-"
    return value.translate(table) if escape else value


# ensure_ascii escapes control characters, quotes, U+2028/U+2029 and all non-ASCII, so a JSON
# line can never contain a raw line break or terminal escape; compact separators keep it short.
_JSON: Final = json.JSONEncoder(ensure_ascii=True, check_circular=False, separators=(",", ":"))


def format_json(rec: AccessRecord) -> str:
    """One JSON object, keys in a fixed order; ``time`` is ISO 8601 UTC, durations in seconds.

    The keys are the ``AccessRecord`` attribute names (plus ``time``), and strings are logged
    as they are: ``json.loads`` of the line gives back exactly what the pipeline recorded.
    """
    return _JSON.encode(
        {
            "time": _time_iso(rec.start_time),
            "client_addr": rec.client_addr,
            "start_time": _seconds_json(rec.start_time),
            "method": rec.method,
            "target": rec.target,
            "version": rec.version,
            "status": rec.status,
            "bytes_sent": rec.bytes_sent,
            "bytes_received": rec.bytes_received,
            "referer": rec.referer,
            "user_agent": rec.user_agent,
            "host": rec.host,
            "upstream_addr": rec.upstream_addr,
            "upstream_status": rec.upstream_status,
            "upstream_time": _seconds_json(rec.upstream_time),
            "total_time": _seconds_json(rec.total_time),
            "cache_status": rec.cache_status,
            "route": rec.route,
            "error": rec.error,
        }
    )


FORMATS: Final[dict[str, Formatter]] = {"combined": format_combined, "json": format_json}


# --- writers -------------------------------------------------------------------------------


class AccessLogger(Protocol):
    """What the pipeline and the server need from an access log."""

    def log(self, rec: AccessRecord) -> None: ...

    def flush(self) -> None: ...

    def reopen(self) -> None: ...

    def close(self) -> None: ...


_STDOUT_FD: Final = 1
_OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT


class AccessLog:
    """Buffered access log written to ``path`` (``"-"`` for standard output).

    ``log()`` formats a line and appends it to a buffer. The buffer is written when it grows
    past ``BUFFER_LIMIT`` or ``FLUSH_INTERVAL`` seconds after its first line (one timer per
    batch), like nginx's ``access_log ... buffer=64k flush=...``; without a running event loop
    every line is written at once. A batch is written with one ``os.write`` of whole lines to an
    ``O_APPEND`` descriptor, so lines from several processes sharing the file do not interleave
    mid-line (on local file systems); the call loops only when the kernel accepts part of it.

    Writing never raises into the caller: on an error (ENOSPC, EIO, EAGAIN on a non-blocking
    stdout ...) the rest of the batch is dropped and counted in ``dropped_lines``, and one error
    is logged per failure streak (nginx similarly rate-limits this message). A write that failed
    after a partial write leaves a torn last line in the file: it cannot be completed, and
    writing a lone newline at that moment would likely fail the same way. The next batch
    therefore starts with a newline, so the torn fragment stays on a line of its own instead of
    corrupting the next good line.

    The writes are blocking, as nginx's are: appending to a local file completes in the page
    cache. Use it from the event-loop thread only (it is not thread-safe).
    """

    BUFFER_LIMIT: ClassVar[int] = 64 * 1024
    FLUSH_INTERVAL: ClassVar[float] = 0.05

    def __init__(self, path: str, format: str = "combined") -> None:
        try:
            self._formatter: Formatter = FORMATS[format]
        except KeyError:
            known = ", ".join(sorted(FORMATS))
            raise caused_by(  # noqa: B904 (caused_by)
                ValueError(f"unknown access log format {format!r} (known: {known})"), None
            )
        self.path = path
        self.format = format
        self.dropped_lines = 0
        self._buffer: list[str] = []
        self._buffered = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._error_reported = False
        # The last write stopped in the middle of a line (see the class docstring).
        self._torn = False
        self._closed = False
        # Opening fails loudly at startup, as nginx refuses to start when it cannot open a log.
        self._fd = self._open()

    @staticmethod
    def disabled() -> NullAccessLog:
        """A logger that logs nothing (``access_log off``), so the hot path needs no ``if``."""
        return NullAccessLog()

    def _open(self) -> int:
        if self.path == "-":
            return _STDOUT_FD
        return os.open(self.path, _OPEN_FLAGS, 0o644)

    def log(self, rec: AccessRecord) -> None:
        if self._closed:
            self.dropped_lines += 1
            return
        line = self._formatter(rec)
        buffer = self._buffer
        buffer.append(line)
        buffer.append("\n")  # joined at the flush: no copy of the line to end it
        self._buffered += len(line) + 1  # the formatters emit ASCII only: characters == bytes
        if self._buffered > self.BUFFER_LIMIT:
            self.flush()
        elif self._timer is None or (self._timer_loop is not None and self._timer_loop.is_closed()):
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        # A timer left on a closed loop never fires; it is forgotten, not cancelled.
        self._timer = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop to come back to: write now (startup, shutdown, tools)
            return
        self._timer = loop.call_later(self.FLUSH_INTERVAL, self._on_timer)
        self._timer_loop = loop

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write the buffered lines now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        data = "".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        if self._torn:
            data = "\n" + data
        self._write(data.encode("ascii", "backslashreplace"))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        written_total = 0
        try:
            while written_total < len(data):
                # EINTR is retried by os.write itself (PEP 475).
                written_total += os.write(self._fd, view[written_total:])
        except OSError as exc:
            lost = data[written_total:]
            self.dropped_lines += lost.count(b"\n")
            # Torn if a partial write ended inside a line; an untouched batch tears nothing.
            if written_total:
                self._torn = data[written_total - 1] != 0x0A
            if not self._error_reported:
                self._error_reported = True
                logger.error(
                    "access log %s: write failed: %s; dropping log lines until writes succeed",
                    self.path,
                    exc,
                )
            return
        finally:
            view.release()
        self._torn = False
        self._error_reported = False

    def reopen(self) -> None:
        """Flush, then open ``path`` again (SIGUSR1 after logrotate renamed the file).

        If the new open fails, the old descriptor is kept and the failure logged, as nginx's
        ngx_reopen_files does: logging into the renamed file beats losing the lines.
        """
        self.flush()
        if self._closed or self.path == "-":
            return
        try:
            fd = self._open()
        except OSError as exc:
            logger.error("access log %s: reopen failed, keeping the old file: %s", self.path, exc)
            return
        old, self._fd = self._fd, fd
        self._torn = False  # a torn line belongs to the old file
        self._close_fd(old)

    def close(self) -> None:
        """Flush and close; later ``log()`` calls are counted as dropped. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self.path != "-":
            self._close_fd(self._fd)

    def _close_fd(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError as exc:  # EIO from a delayed write-back (NFS): the lines may be lost
            logger.error("access log %s: close failed: %s", self.path, exc)


class NullAccessLog:
    """An access log that is off: every method does nothing."""

    dropped_lines = 0

    def log(self, rec: AccessRecord) -> None:
        pass

    def flush(self) -> None:
        pass

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass
