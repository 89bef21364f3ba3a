"""PIBL's own CPU time per cache hit, without the network: a steadier figure than requests/s.

A memory-cache hit is answered inside ``data_received``, with nothing awaited. This script
starts a one-response backend and a PIBL app (memory cache, combined access log to a temporary
file, as ``bench/run.py`` configures it) in this process, stores the response with one real
request, then feeds the same request to one connection N times with a transport that only
counts what it is given, and prints the process CPU time per request (the minimum over the
repetitions). Socket calls and the event loop's I/O are not in it, so it measures PIBL's part
of a hit, which wall-clock rates on a shared machine hide under ±10 % noise.

    .venv/bin/python bench/hit_cost.py [--requests 100000] [--repeat 5]
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
from pibl.server.app import ProxyApp

BODY = os.urandom(1024)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: application/octet-stream\r\n"
    b'Content-Length: 1024\r\nETag: "bench"\r\nCache-Control: max-age=3600\r\n\r\n' + BODY
)


class Backend(asyncio.Protocol):
    """Answers every request on a connection with RESPONSE (requests end with a blank line)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while b"\r\n\r\n" in self.pending:
            _, _, self.pending = self.pending.partition(b"\r\n\r\n")
            self.transport.write(RESPONSE)


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

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


async def fetch(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(1024)
    writer.close()
    return head


async def measure(requests: int, repeat: int, log_dir: str) -> None:
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(Backend, "127.0.0.1", 0)
    backend_port = backend.sockets[0].getsockname()[1]
    settings = parse_config(
        {
            "server": {"listen": "127.0.0.1:0"},
            "upstreams": {"app": {"servers": [f"127.0.0.1:{backend_port}"]}},
            "access_log": {"path": f"{log_dir}/access.log", "format": "combined"},
            "cache": {"enabled": True, "storage": "memory"},
        }
    )
    app = ProxyApp(settings)
    port = (await app.start(log_listening=False))[0].port
    request = f"GET /cached/1k.bin HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    await fetch(port, request)  # stores the response
    head = await fetch(port, request)
    if b"pibl; hit" not in head:
        raise SystemExit(f"the second request was not a hit:\n{head.decode()}")
    _tune_gc()  # as `pibl run` does
    conn = app._plain_connection()
    transport = CountingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(requests):
            conn.data_received(request)
        best = min(best, (time.process_time() - start) / requests)
        await asyncio.sleep(0)  # let the access log's flush timer run
    if transport.writes != requests * repeat:
        raise SystemExit(f"{transport.writes} responses for {requests * repeat} requests")
    print(
        f"cache hit: {best * 1e6:.2f} us of CPU per request "
        f"(minimum of {repeat} x {requests}; {transport.bytes // transport.writes} bytes each)"
    )
    conn.connection_lost(None)
    await app.aclose()
    backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pibl-hit-cost-") as log_dir:
        uvloop.run(measure(args.requests, args.repeat, log_dir))


if __name__ == "__main__":
    main()
