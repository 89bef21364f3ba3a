"""The benchmark's helper programs keep working: bench/bare.py and bench/cpu_cost.py."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.support import Address, Reply, running_backends
from tests.support import request as http_request

BENCH = Path(__file__).resolve().parents[2] / "bench"


@asynccontextmanager
async def running_bare(*backends: Address, cache: bool) -> AsyncIterator[Address]:
    argv = [sys.executable, str(BENCH / "bare.py"), "--listen", "127.0.0.1:0"]
    argv += [arg for b in backends for arg in ("--backend", str(b))]
    proc = await asyncio.create_subprocess_exec(
        *argv, *(["--cache"] if cache else []), stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=20)
        match = re.search(rb"listening on ([\d.]+):(\d+)", line)
        assert match, line
        yield Address(match.group(1).decode(), int(match.group(2)))
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=10)


async def test_bare_proxy_forwards_round_robin_over_kept_connections() -> None:
    async with (
        running_backends(count=2) as backends,
        running_bare(*(b.address for b in backends), cache=False) as address,
    ):
        answers = [await http_request(address, "GET", f"/n{i}") for i in range(4)]
    assert [r.status for r in answers] == [200] * 4
    assert [len(b.requests) for b in backends] == [2, 2]


async def test_bare_proxy_answers_repeated_gets_from_memory_and_marks_them() -> None:
    seen: list[str] = []

    def handle(req: object) -> Reply:
        seen.append("x")
        return Reply(body=b"stored body")

    async with (
        running_backends(handle) as backends,
        running_bare(backends[0].address, cache=True) as address,
    ):
        first = await http_request(address, "GET", "/c")
        second = await http_request(address, "GET", "/c")
    assert first.header("X-Cache-Status") is None
    assert second.header("X-Cache-Status") == "HIT"
    assert second.body == first.body == b"stored body"
    assert len(seen) == 1


@pytest.mark.parametrize("scenario", ["hit", "proxied"])
def test_cpu_cost_prints_cpu_per_request(scenario: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "cpu_cost.py"), scenario, "--requests", "300"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        rf"{scenario}: \d+\.\d\d us of CPU per request \(minimum of 5 x 300; \d+ bytes each\)\n",
        result.stdout,
    ), result.stdout
