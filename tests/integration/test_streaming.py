"""Bodies stream with back-pressure: a 1 GiB upload and download keep PIBL's peak RSS small.

PIBL runs as its own process (``python -m pibl run``) so that its peak RSS (VmHWM) can be read
from /proc without the test's own allocations.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator

import pytest

from pibl.balancer.upstream import Address
from tests.support import Received, Reply, running_backends

GIB = 1 << 30
RSS_LIMIT_KIB = 100 * 1024


@contextlib.asynccontextmanager
async def pibl_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, Address]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pibl",
        "run",
        *args,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "pibl exited before listening"
                match = re.search(r"listening on http://([\d.]+):(\d+)", line)
                if match:
                    break
        address = Address(match.group(1), int(match.group(2)))
        drain = asyncio.create_task(proc.stderr.read())
        yield proc, address
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        with contextlib.suppress(Exception):
            drain.cancel()


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def _download(address: Address, size: int) -> int:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: %d" % size in head
    got = 0
    while got < size:
        data = await reader.read(1 << 18)
        assert data
        got += len(data)
    writer.close()
    return got


async def _upload(address: Address, size: int) -> bytes:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
    block = b"u" * (1 << 16)
    sent = 0
    while sent < size:
        writer.write(block)
        sent += len(block)
        await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head


@pytest.mark.slow
async def test_1gib_download_and_upload_keep_peak_rss_under_100mib() -> None:
    def handler(req: Received) -> Reply:
        if req.method == "GET":
            return Reply(stream_size=GIB)
        return Reply(body=b"%d" % req.body_size)

    async with running_backends(handler) as backends:
        backend = backends[0].address
        async with pibl_process("--listen", "127.0.0.1:0", "--backend", str(backend)) as (
            proc,
            addr,
        ):
            async with asyncio.timeout(240):
                assert await _download(addr, GIB) == GIB
                head = await _upload(addr, GIB)
            assert head.startswith(b"HTTP/1.1 200")
            assert backends[0].requests[-1].body_size == GIB
            peak = peak_rss_kib(proc.pid)
            print(f"pibl peak RSS after 1 GiB down + 1 GiB up: {peak / 1024:.1f} MiB")
            assert peak < RSS_LIMIT_KIB, f"peak RSS {peak} KiB"


def test_peak_rss_is_readable() -> None:
    assert peak_rss_kib(os.getpid()) > 0
