"""The access log end to end: real requests through a real proxy into a real file.

One line per request whatever its fate (200, 502, 404, 400, 499), with the fields an operator
needs; both formats parse; request data cannot forge a line or a field; SIGUSR1 reopens the file
after a rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pibl.balancer.upstream import Address
from pibl.server.app import ProxyApp
from tests.integration.test_cli import (
    assert_clean_output,
    bounded,
    pibl_process,
    write_config,
)
from tests.support import (
    Client,
    Received,
    Reply,
    Response,
    dead_address,
    make_settings,
    request,
    running_backends,
    running_proxy,
)

WAIT = 5.0

# nginx's combined format, then PIBL's extras (see accesslog.format_combined).
COMBINED = re.compile(
    r"(?P<client>\S+) - - "
    r"\[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] "
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes_sent>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)" '
    r"upstream=(?P<upstream>\S+) upstream_status=(?P<upstream_status>\d{3}|-) "
    r"upstream_time=(?P<upstream_time>\d+\.\d{3}|-) "
    r"request_time=(?P<request_time>\d+\.\d{3}) "
    r'cache="(?P<cache>[^"]*)" '
    r'route="(?P<route>[^"]*)" error="(?P<error>[^"]*)"'
)

JSON_KEYS = [
    "time",
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
]


@dataclass
class Entry:
    """The fields both formats carry, read back from one line."""

    client: str
    request: str  # "" when the request line was never read
    status: int
    bytes_sent: int
    referer: str
    user_agent: str
    upstream: str  # "" when no upstream was involved
    upstream_status: int | None
    upstream_time: float | None
    total_time: float
    route: str
    error: str


def _dash(text: str) -> str:
    return "" if text == "-" else text


def parse_line(fmt: str, line: str) -> Entry:
    """Parse one log line of ``fmt``, failing the test if it is not well-formed."""
    assert line.isascii(), f"not ASCII: {line!r}"
    assert line.isprintable(), f"not printable: {line!r}"
    if fmt == "json":
        data = json.loads(line)
        assert list(data) == JSON_KEYS, list(data)
        request = ""
        if data["method"] or data["target"]:
            request = f"{data['method']} {data['target']} HTTP/{data['version']}"
        return Entry(
            client=data["client_addr"],
            request=request,
            status=data["status"],
            bytes_sent=data["bytes_sent"],
            referer=data["referer"],
            user_agent=data["user_agent"],
            upstream=_dash(data["upstream_addr"]),
            upstream_status=data["upstream_status"],
            upstream_time=data["upstream_time"],
            total_time=data["total_time"],
            route=data["route"],
            error=data["error"],
        )
    match = COMBINED.fullmatch(line)
    assert match is not None, f"not combined format: {line!r}"
    fields = match.groupdict()
    return Entry(
        client=fields["client"],
        request=_dash(fields["request"]),
        status=int(fields["status"]),
        bytes_sent=int(fields["bytes_sent"]),
        referer=_dash(fields["referer"]),
        user_agent=_dash(fields["user_agent"]),
        upstream=_dash(fields["upstream"]),
        upstream_status=None
        if fields["upstream_status"] == "-"
        else int(fields["upstream_status"]),
        upstream_time=None if fields["upstream_time"] == "-" else float(fields["upstream_time"]),
        total_time=float(fields["request_time"]),
        route=_dash(fields["route"]),
        error=_dash(fields["error"]),
    )


def unescape(text: str) -> str:
    """Undo the log's ``\\xHH`` escaping: each escape stands for one byte (latin-1)."""
    return re.sub(r"\\x([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a torn last line"
    return data.decode("ascii").splitlines()


async def wait_for_lines(app: ProxyApp, path: Path, count: int) -> list[str]:
    """Flush the access log until ``path`` holds at least ``count`` lines."""
    async with asyncio.timeout(WAIT):
        while True:
            app.access_log.flush()
            lines = read_lines(path)
            if len(lines) >= count:
                return lines
            await asyncio.sleep(0.01)  # polling, bounded by WAIT


def log_settings(backends: Any, path: Path, fmt: str, **sections: Any) -> Any:
    return make_settings(
        backends,
        access_log={"enabled": True, "path": str(path), "format": fmt},
        **sections,
    )


async def raw_request(address: Address, data: bytes) -> Response:
    client = await Client.connect(address)
    try:
        await client.send(data)
        return await client.read_response()
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- one line each

BACKEND_LATENCY = 0.05  # seconds the origin takes before answering /api/slow


async def _origin(req: Received) -> Reply:
    if req.target.startswith(b"/api/slow"):
        await asyncio.sleep(BACKEND_LATENCY)  # a slow origin, so that the times are measurable
    if req.target.startswith(b"/api/chunked"):
        return Reply(body=b"c" * 1000, chunked=True)
    return Reply(headers=[(b"X-Backend", b"origin")], body=b"hello")


@pytest.mark.parametrize("fmt", ["json", "combined"])
@bounded
async def test_one_line_per_request_with_all_fields_failed_ones_included(
    tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / "access.log"
    dead = await dead_address()
    async with running_backends(_origin) as backends:
        origin = backends[0].address
        settings = log_settings(
            backends,
            path,
            fmt,
            upstreams={
                "app": {"servers": [str(origin)]},
                "gone": {"servers": [str(dead)], "retries": 0},
            },
            routes=[
                {"path_prefix": "/api", "upstream": "app"},
                {"path_prefix": "/dead", "upstream": "gone"},
            ],
        )
        async with running_proxy(settings) as app:
            address = app.addresses[0]
            ua = [("Host", "test.local"), ("User-Agent", "probe/1.0"), ("Referer", "http://r/")]
            responses = {
                "slow": await request(address, "GET", "/api/slow?x=1", headers=ua),
                "chunked": await request(address, "GET", "/api/chunked"),
                "post": await request(address, "POST", "/api/form", body=b"k=v"),
                "dead": await request(address, "GET", "/dead/x"),
                "noroute": await request(address, "GET", "/elsewhere"),
                "malformed": await raw_request(address, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n"),
            }
            assert [r.status for r in responses.values()] == [200, 200, 200, 502, 404, 400]
            await wait_for_lines(app, path, len(responses))
        # The proxy is closed (its log flushed and closed): nothing else was written.
        lines = read_lines(path)
    assert len(lines) == len(responses), lines

    entries = [parse_line(fmt, line) for line in lines]
    by_request = {e.request: e for e in entries}
    assert len(by_request) == len(entries), "one line per request, none twice"
    for entry in entries:
        assert entry.client == "127.0.0.1"
        assert 0 <= entry.total_time < WAIT

    slow = by_request["GET /api/slow?x=1 HTTP/1.1"]
    assert (slow.status, slow.upstream, slow.upstream_status) == (200, str(origin), 200)
    assert slow.bytes_sent == len(responses["slow"].body) == 5  # body bytes, not the head
    assert (slow.user_agent, slow.referer, slow.route, slow.error) == (
        "probe/1.0",
        "http://r/",
        "app",
        "",
    )
    assert slow.upstream_time is not None
    # Seconds (not ms), and the upstream's share is part of the whole.
    assert BACKEND_LATENCY * 0.8 <= slow.upstream_time < WAIT
    assert BACKEND_LATENCY * 0.8 <= slow.total_time < WAIT
    assert slow.upstream_time <= slow.total_time + 0.0015  # combined rounds to ms

    chunked = by_request["GET /api/chunked HTTP/1.1"]
    assert chunked.status == 200
    assert responses["chunked"].header("Transfer-Encoding") == "chunked"
    assert chunked.bytes_sent == len(responses["chunked"].body) == 1000  # no chunk framing

    post = by_request["POST /api/form HTTP/1.1"]
    assert (post.status, post.upstream, post.bytes_sent) == (200, str(origin), 5)

    dead_entry = by_request["GET /dead/x HTTP/1.1"]
    assert (dead_entry.status, dead_entry.upstream) == (502, str(dead))
    assert dead_entry.upstream_status is None
    assert dead_entry.upstream_time is not None  # the failed connect took time too
    assert dead_entry.bytes_sent == len(responses["dead"].body) > 0
    assert dead_entry.route == "gone"
    assert dead_entry.error

    noroute = by_request["GET /elsewhere HTTP/1.1"]
    assert (noroute.status, noroute.upstream, noroute.upstream_time) == (404, "", None)
    assert noroute.bytes_sent == len(responses["noroute"].body) > 0
    assert noroute.error == "no route matches this request"

    malformed = by_request[""]
    assert (malformed.status, malformed.upstream, malformed.upstream_time) == (400, "", None)
    assert malformed.bytes_sent == len(responses["malformed"].body) > 0
    assert malformed.error


@bounded
async def test_keep_alive_requests_each_get_a_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    async with running_backends(count=1) as backends:
        async with running_proxy(log_settings(backends, path, "json")) as app:
            client = await Client.connect(app.addresses[0])
            try:
                for i in range(5):
                    assert (await client.request("GET", f"/k/{i}")).status == 200
            finally:
                await client.aclose()
            await wait_for_lines(app, path, 5)
        lines = read_lines(path)
    targets = [json.loads(line)["target"] for line in lines]
    assert sorted(targets) == [f"/k/{i}" for i in range(5)]


# --------------------------------------------------------------------------- 499


class TricklingOrigin:
    """Sends a response head and a first block, then (once ``resume`` is set) trickles the rest
    slowly until its connection breaks; the response never completes on its own."""

    FIRST = 4096
    BLOCK = 1024
    MAX_BLOCKS = 1000
    TOTAL = FIRST + BLOCK * MAX_BLOCKS + 1

    def __init__(self) -> None:
        self.resume = asyncio.Event()
        self.finished = asyncio.Event()
        self.blocks_sent = 0
        self.server: asyncio.Server | None = None
        self.address = Address("127.0.0.1", 0)
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> TricklingOrigin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = Address(host, port)
        return self

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.TOTAL
            writer.write(head + b"a" * self.FIRST)
            await writer.drain()
            await self.resume.wait()
            for _ in range(self.MAX_BLOCKS):
                if writer.is_closing():
                    break  # the proxy dropped the connection
                writer.write(b"b" * self.BLOCK)
                await writer.drain()
                self.blocks_sent += 1
                await asyncio.sleep(0.005)  # a slow origin: the response trickles
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self.finished.set()


@contextlib.asynccontextmanager
async def trickling_origin() -> AsyncIterator[TricklingOrigin]:
    origin = await TricklingOrigin().start()
    try:
        yield origin
    finally:
        await origin.aclose()


@pytest.mark.parametrize("fmt", ["json", "combined"])
@pytest.mark.parametrize("close", ["fin", "rst"])
@bounded
async def test_client_leaving_mid_response_is_logged_499(
    tmp_path: Path, fmt: str, close: str
) -> None:
    path = tmp_path / "access.log"
    async with trickling_origin() as origin:
        settings = log_settings([origin.address], path, fmt, upstream={"retries": 0})
        async with running_proxy(settings) as app:
            reader, writer = await asyncio.open_connection(
                app.addresses[0].host, app.addresses[0].port
            )
            try:
                writer.write(b"GET /stream HTTP/1.1\r\nHost: t\r\nUser-Agent: leaver\r\n\r\n")
                async with asyncio.timeout(WAIT):
                    head = await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(TricklingOrigin.FIRST)
                assert head.startswith(b"HTTP/1.1 200")
                if close == "rst":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            origin.resume.set()
            await wait_for_lines(app, path, 1)
            # PIBL gives up the upstream connection too, long before the response would end.
            async with asyncio.timeout(WAIT):
                await origin.finished.wait()
            assert origin.blocks_sent < TricklingOrigin.MAX_BLOCKS
        lines = read_lines(path)
    assert len(lines) == 1, lines
    entry = parse_line(fmt, lines[0])
    assert entry.status == 499
    assert entry.request == "GET /stream HTTP/1.1"
    assert entry.user_agent == "leaver"
    assert entry.client == "127.0.0.1"
    assert (entry.upstream, entry.upstream_status) == (str(origin.address), 200)
    # What was relayed before the client left: at least the first block, never the whole body.
    assert TricklingOrigin.FIRST <= entry.bytes_sent < TricklingOrigin.TOTAL
    assert 0 <= entry.total_time < WAIT
    assert entry.upstream_time is not None  # the upstream did answer
    assert entry.upstream_time <= entry.total_time + 0.0015  # combined rounds to ms
    assert entry.error == "client closed the connection"


# --------------------------------------------------------------------------- log injection

# Accepted by llhttp, hostile to a naive log writer.
HOSTILE_ACCEPTED = [
    (b"/p", b'x" 200 0 "-" "-" upstream=evil route="x'),
    (b'/q?a="b"&c=\\d', b"a\\x22b\tc"),
    (b"/r?%0d%0afake", b"\xff\x80 obs-text \xc3\xa9"),
    (b"/s", b'","status":200,"upstream_addr":"evil'),
]
# Refused by llhttp (400); the rejected bytes never reach the log.
HOSTILE_REFUSED = [
    b"GET /a\x1b[2J HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /a\x7fb HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nUser-Agent: a\x1b[31mred\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nUser-Agent: a\rb\r\n\r\n",
    b'GET / HTTP/1.1\r\nHost: t\r\nUser-Agent: a\n127.0.0.1 - - [x] "GET /forged HTTP/1.1"\r\n\r\n',
    b"GET / HTTP/1.1\r\nHost: t\r\nUser-Agent: a\x00b\r\n\r\n",
]


@pytest.mark.parametrize("fmt", ["json", "combined"])
@bounded
async def test_request_data_cannot_forge_a_line_or_a_field(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "access.log"
    async with running_backends(count=1) as backends:
        origin = str(backends[0].address)
        async with running_proxy(log_settings(backends, path, fmt)) as app:
            address = app.addresses[0]
            for target, agent in HOSTILE_ACCEPTED:
                head = b"GET %s HTTP/1.1\r\nHost: t\r\nUser-Agent: %s\r\nReferer: %s\r\n\r\n"
                response = await raw_request(address, head % (target, agent, agent))
                assert response.status == 200, target
            for data in HOSTILE_REFUSED:
                assert (await raw_request(address, data)).status == 400, data
            total = len(HOSTILE_ACCEPTED) + len(HOSTILE_REFUSED)
            await wait_for_lines(app, path, total)
        raw = path.read_bytes()
    lines = raw.decode("ascii").splitlines()
    assert len(lines) == total, lines
    assert b"\x1b" not in raw
    assert b"\r" not in raw
    assert b"forged" not in raw

    entries = [parse_line(fmt, line) for line in lines]  # each fully matches its format
    accepted = [e for e in entries if e.status == 200]
    refused = [e for e in entries if e.status == 400]
    assert len(accepted) == len(HOSTILE_ACCEPTED)
    assert len(refused) == len(HOSTILE_REFUSED)
    decode = (lambda s: s) if fmt == "json" else unescape
    sent = {target.decode("latin-1"): agent.decode("latin-1") for target, agent in HOSTILE_ACCEPTED}
    for entry in accepted:
        # The fields hold exactly what was sent, and only in their own place.
        method, logged_target, version = decode(entry.request).split(" ")
        assert (method, version) == ("GET", "HTTP/1.1")
        assert decode(entry.user_agent) == sent[logged_target]
        assert decode(entry.referer) == sent[logged_target]
        assert entry.upstream == origin
        assert entry.upstream_status == 200
        assert entry.route == "app"
        assert entry.error == ""
    for entry in refused:
        assert (entry.request, entry.user_agent, entry.upstream) == ("", "", "")
    if fmt == "combined":
        for line in lines:
            # Only the format's own quotes: request, referer, agent, cache, route, error. The
            # fake "upstream=evil" stays inside the escaped user-agent (parse_line's fullmatch).
            assert line.count('"') == 12, line
    else:
        assert all("evil" not in json.loads(line)["upstream_addr"] for line in lines)


# --------------------------------------------------------------------------- SIGUSR1 reopen


async def _poll(predicate: Any, what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            # A file appearing or growing in another process signals no event: poll it.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@bounded
async def test_sigusr1_reopens_the_access_log_after_rotation(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    async with running_backends(count=1) as backends:
        config = write_config(
            tmp_path / "pibl.toml",
            [backends[0].address],
            access_log=f'path = "{log_path}"\nformat = "json"',
        )
        async with pibl_process("run", "-c", str(config)) as pibl:
            address = await pibl.wait_listening()
            assert (await request(address, "GET", "/before")).status == 200
            await _poll(lambda: len(read_lines(log_path)) == 1, "the first line")

            log_path.rename(rotated)  # what logrotate does
            pibl.send_signal(signal.SIGUSR1)
            await _poll(log_path.exists, "the reopened log file")

            assert (await request(address, "GET", "/after")).status == 200
            await _poll(lambda: len(read_lines(log_path)) == 1, "a line in the new file")

            pibl.send_signal(signal.SIGTERM)
            assert await pibl.wait_exit() == 0, pibl.describe()
            assert_clean_output(pibl.stdout, pibl.stderr)

    old = [json.loads(line) for line in read_lines(rotated)]
    new = [json.loads(line) for line in read_lines(log_path)]
    assert [r["target"] for r in old] == ["/before"]
    assert [r["target"] for r in new] == ["/after"]
    assert new[0]["status"] == 200
    assert new[0]["upstream_addr"] == str(backends[0].address)
