"""PIBL's own CPU time per request, without the network: a steadier figure than requests/s.

Wall-clock rates on a shared machine move by ±10 % from one run to the next; this moves by
about ±1.5 %, so a change to the request path can be measured by alternating two builds. It
runs a PIBL app in this process (combined access log to a temporary file, as ``bench/run.py``
configures it), feeds one client connection the same request N times through transports that
only count what they are given, and prints the process CPU time per request (the minimum over
the repetitions). Socket calls and the loop's polling are not in it; what is left is PIBL's part
of a request plus uvloop's dispatch.

``hit``: a memory-cache hit of a 1 KiB response, stored first by a real request to a one-response
backend started here. A hit is answered inside ``data_received``, with nothing awaited. The
requests come one to each of ``--per-turn`` connections (32) per loop turn, from callbacks, as a
worker under ``wrk -c50`` reads about 33 requests per ``epoll_wait``; the answers, held for the
end of the turn, are written when the turn ends, and what is done once per turn is shared.

``proxied``: a 1 KiB response (nginx's fields) proxied over pooled upstream connections whose
transport answers every request on the next loop turn. Each request then takes three loop
turns, driven by ``asyncio.sleep(0)``; the driver's own cost (about 2.6 µs here) is included.

    .venv/bin/python bench/cpu_cost.py hit|proxied [--requests N] [--repeat R] [--per-turn K]

To compare with another build: ``PYTHONPATH=<its src> .venv/bin/python bench/cpu_cost.py ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from typing import Any

import uvloop

from pibl.cli import _tune_gc
from pibl.config import parse_config
from pibl.pool.connection import UpstreamConnection
from pibl.server.app import ProxyApp

BODY = os.urandom(1024)
# What the benchmark's nginx backends send for /cached/1k.bin and /1k.bin.
CACHEABLE = (
    b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: application/octet-stream\r\n"
    b'Content-Length: 1024\r\nETag: "bench"\r\nCache-Control: max-age=3600\r\n\r\n' + BODY
)
PROXIED = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 21:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Sat, 28 Nov 2026 15:32:10 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6b0af3fa-400"\r\nAccept-Ranges: bytes\r\n\r\n' + BODY
)
UPSTREAM_CONNECTIONS = 4  # per server, placed in each pool


class Backend(asyncio.Protocol):
    """Answers every request on a connection with CACHEABLE (requests end with a blank line)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while b"\r\n\r\n" in self.pending:
            _, _, self.pending = self.pending.partition(b"\r\n\r\n")
            self.transport.write(CACHEABLE)


class CountingTransport:
    """What a connection needs from its transport; writes are counted, not sent."""

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.writes += 1
        self.bytes += sum(len(part) for part in parts)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


class AnsweringTransport(CountingTransport):
    """An upstream connection's transport: each request is answered on the next loop turn."""

    def __init__(self, conn: UpstreamConnection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.conn = conn
        self.loop = loop

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.conn.data_received, PROXIED)

    def writelines(self, parts: list[bytes]) -> None:
        self.loop.call_soon(self.conn.data_received, PROXIED)


async def fetch(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(len(BODY))
    writer.close()
    return head


async def start_app(config: dict[str, Any]) -> tuple[ProxyApp, int]:
    app = ProxyApp(parse_config(config))
    port = (await app.start(log_listening=False))[0].port
    return app, port


async def measure(scenario: str, requests: int, repeat: int, per_turn: int, log_dir: str) -> None:
    loop = asyncio.get_running_loop()
    access_log = {"path": f"{log_dir}/access.log", "format": "combined"}
    backend: asyncio.Server | None = None
    if scenario == "hit":
        backend = await loop.create_server(Backend, "127.0.0.1", 0)
        backend_port = backend.sockets[0].getsockname()[1]
        app, port = await start_app(
            {
                "server": {"listen": "127.0.0.1:0"},
                "upstreams": {"app": {"servers": [f"127.0.0.1:{backend_port}"]}},
                "access_log": access_log,
                "cache": {"enabled": True, "storage": "memory"},
            }
        )
        request = f"GET /cached/1k.bin HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        await fetch(port, request)  # stores the response
        head = await fetch(port, request)
        if b"pibl; hit" not in head:
            raise SystemExit(f"the second request was not a hit:\n{head.decode()}")
        turns = 0  # answered inside data_received
        response_size = len(head) + len(BODY)
    else:
        # Three servers nobody connects to: the pools are filled with answering connections.
        servers = [f"127.0.0.1:{port}" for port in (9, 10, 11)]
        app, port = await start_app(
            {
                "server": {"listen": "127.0.0.1:0"},
                "upstreams": {"app": {"servers": servers}},
                "access_log": access_log,
            }
        )
        for group in app.groups.values():
            for pool in group.pools.values():
                for _ in range(UPSTREAM_CONNECTIONS):
                    conn = UpstreamConnection()
                    conn.connection_made(AnsweringTransport(conn, loop))  # type: ignore[arg-type]
                    pool._idle.append(conn)  # as if released after an earlier request
        request = f"GET /1k.bin HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        turns = 3  # the upstream answers; the response is written; the request finishes
        response_size = 0  # counted by writes: one per response
    _tune_gc()  # as `pibl run` does
    transport = CountingTransport()
    # Hits: one request on each of `per_turn` connections per loop turn, as the loop's reads
    # deliver them under load. Proxied: one connection, three turns per request.
    clients = [app._plain_connection() for _ in range(per_turn if not turns else 1)]
    for client in clients:
        client.connection_made(transport)  # type: ignore[arg-type]
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        if turns:
            client = clients[0]
            for _ in range(requests):
                client.data_received(request)
                for _ in range(turns):
                    await asyncio.sleep(0)
        else:
            await _hits_in_turns(loop, clients, request, requests)
        best = min(best, (time.process_time() - start) / requests)
        await asyncio.sleep(0)  # let the access log's flush timer run
    # A hit's head grows by a byte when Age reaches 10: the byte count is checked to 1 %.
    answered = round(transport.bytes / response_size) if response_size else transport.writes
    if abs(answered - requests * repeat) > requests * repeat // 100:
        raise SystemExit(f"{answered} responses for {requests * repeat} requests")
    print(
        f"{scenario}: {best * 1e6:.2f} us of CPU per request "
        f"(minimum of {repeat} x {requests}; {transport.bytes // answered} bytes each)"
    )
    for client in clients:
        client.connection_lost(None)
    await app.aclose()
    if backend is not None:
        backend.close()


async def _hits_in_turns(
    loop: asyncio.AbstractEventLoop, clients: list[Any], request: bytes, requests: int
) -> None:
    """Feed ``requests`` requests, one per client per loop turn, from callbacks (no task
    switch per turn); held answers are written when each turn ends, as in a running server."""
    done = loop.create_future()
    left = requests

    def turn() -> None:
        nonlocal left
        for client in clients[: min(len(clients), left)]:
            client.data_received(request)
        left -= min(len(clients), left)
        if left:
            loop.call_soon(turn)
        else:
            loop.call_soon(done.set_result, None)  # after this turn's writes

    loop.call_soon(turn)
    await done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["hit", "proxied"])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--per-turn",
        type=int,
        default=32,
        help="hits: connections given a request per loop turn (a live worker under wrk -c50 "
        "reads about 33 requests per epoll_wait)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pibl-cpu-cost-") as log_dir:
        uvloop.run(measure(args.scenario, args.requests, args.repeat, args.per_turn, log_dir))


if __name__ == "__main__":
    main()
