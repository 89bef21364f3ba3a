"""The admin API with ``[server] workers = 2``: one listener, figures and actions of both workers.

PIBL runs as a subprocess (supervisor + 2 workers). Which worker served what is read from
``/api/status`` (``processes``: requests per worker) and from the backends, never guessed. Every
wait is bounded and waits on a condition (a log line, a counter), never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pibl.balancer.upstream import Address
from tests.integration.test_cli import PiblProcess, bounded, pibl_process, write_config
from tests.support import Backend, Received, Reply, request, running_backends

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="workers need SO_REUSEPORT balancing"
)

WAIT = 10.0
# Fresh connections made before giving up on the kernel spreading them over both workers (with
# two workers, all of N land on one with probability 2**-(N-1)).
MAX_REQUESTS = 400
ADMIN_LINE = r"admin API and dashboard on http://([\d.]+):(\d+)/"
READY = re.compile(r"worker (\d+) ready \(pid (\d+)\)")


def config(tmp_path: Path, backends: list[Backend], cache: bool = False) -> Path:
    path = write_config(
        tmp_path / "pibl.toml",
        [b.address for b in backends],
        server='workers = 2\nshutdown_timeout = "5s"',
    )
    text = path.read_text() + '\n[admin]\nlisten = "127.0.0.1:0"\n'
    if cache:
        text += '\n[cache]\nenabled = true\nstorage = "memory"\n'
    path.write_text(text)
    return path


async def start(pibl: PiblProcess, tmp: Path) -> tuple[Address, Address]:
    proxy = await pibl.wait_listening()
    match = await pibl.wait_for(ADMIN_LINE)
    assert [name[:13] for name in os.listdir(tmp)] == ["pibl-workers-"]
    return proxy, Address(match.group(1), int(match.group(2)))


async def admin(address: Address, method: str, path: str, body: Any = None) -> Any:
    headers = [("Host", f"127.0.0.1:{address.port}")]
    raw = b"" if body is None else json.dumps(body).encode()
    if method in ("POST", "PUT"):
        headers.append(("Content-Length", str(len(raw))))
    response = await request(address, method, path, headers=headers, body=raw)
    assert response.status == 200, response.body
    if path == "/metrics":
        return response.body.decode()
    return json.loads(response.body)


def per_worker(status: dict[str, Any]) -> dict[int, int]:
    """Worker number → requests it counted, from /api/status."""
    return {int(p["number"]): int(p["requests"]) for p in status["processes"]}


async def until(check: Callable[[], Awaitable[bool]], what: str, pibl: PiblProcess) -> None:
    """Call ``check`` until it is true, for at most ``MAX_REQUESTS`` rounds (each does I/O)."""
    for _ in range(MAX_REQUESTS):
        if await check():
            return
    raise AssertionError(f"{what}: not reached\n{pibl.describe()}")


async def stop(pibl: PiblProcess, tmp: Path) -> None:
    pids = [int(m.group(2)) for line in pibl.lines["stderr"] if (m := READY.search(line))]
    pibl.send_signal(signal.SIGTERM)
    assert await pibl.wait_exit(timeout=WAIT) == 0, pibl.describe()
    assert "Traceback" not in pibl.stderr, pibl.describe()
    assert not [pid for pid in pids if exists(pid)], "a worker outlived the supervisor"
    assert os.listdir(tmp) == []  # the state folder the workers shared is removed


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


@pytest.fixture
def tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The TMPDIR of PIBL's processes: where the supervisor creates its state folder."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def requests_total(metrics: str) -> float:
    for family in text_string_to_metric_families(metrics):
        if family.name == "pibl_requests":
            return sum(s.value for s in family.samples if s.name == "pibl_requests_total")
    return 0.0


@bounded
async def test_status_and_metrics_count_the_requests_of_both_workers(
    tmp_path: Path, tmp: Path
) -> None:
    async with running_backends(count=2) as backends:
        async with pibl_process("run", "-c", str(config(tmp_path, backends))) as pibl:
            proxy, address = await start(pibl, tmp)
            status = await admin(address, "GET", "/api/status")
            assert status["workers"] == 2
            assert sorted(per_worker(status)) == [1, 2]
            assert all(p["pid"] > 0 and p["uptime"] >= 0 for p in status["processes"])
            made = 0

            async def both_served() -> bool:
                nonlocal made
                assert (await request(proxy, "GET", f"/n{made}")).status == 200
                made += 1
                counts = per_worker(await admin(address, "GET", "/api/status"))
                return all(counts.get(n, 0) > 0 for n in (1, 2))

            await until(both_served, "both workers served requests", pibl)
            status = await admin(address, "GET", "/api/status")
            assert status["requests"] == made, status
            assert sum(per_worker(status).values()) == made
            servers = status["pools"][0]["servers"]
            assert sum(s["requests"] for s in servers) == made  # attempts, summed too
            assert sum(sum(s["responses"].values()) for s in servers) == made
            assert sum(len(b.requests) for b in backends) == made
            metrics = await admin(address, "GET", "/metrics")
            assert requests_total(metrics) == made
            assert "pibl_workers 2.0" in metrics
            await stop(pibl, tmp)


@bounded
async def test_a_drain_reaches_every_worker(tmp_path: Path, tmp: Path) -> None:
    async with running_backends(count=2) as backends:
        drained, other = backends
        async with pibl_process("run", "-c", str(config(tmp_path, backends))) as pibl:
            proxy, address = await start(pibl, tmp)
            path = f"/api/upstreams/app/servers/{drained.address}"
            answer = await admin(address, "POST", f"{path}/drain")
            assert answer["state"] == "drained"
            assert answer["acknowledged_by"] == {"acknowledged": [1, 2], "missing": []}
            assert answer["workers"] == {"1": "drained", "2": "drained"}
            before = per_worker(await admin(address, "GET", "/api/status"))
            sent = 0

            async def both_served_after_drain() -> bool:
                nonlocal sent
                response = await request(proxy, "GET", "/after-drain")
                assert response.status == 200
                assert response.header("X-Backend") == other.name
                sent += 1
                counts = per_worker(await admin(address, "GET", "/api/status"))
                return all(counts[n] > before[n] for n in (1, 2))

            await until(both_served_after_drain, "both workers served after the drain", pibl)
            assert not [r for r in drained.requests if r.target == b"/after-drain"]
            assert len([r for r in other.requests if r.target == b"/after-drain"]) == sent
            answer = await admin(address, "POST", f"{path}/enable")
            assert answer["workers"] == {"1": "up", "2": "up"}
            await stop(pibl, tmp)


@bounded
async def test_a_purge_reaches_the_memory_cache_of_every_worker(tmp_path: Path, tmp: Path) -> None:
    def cacheable(req: Received) -> Reply:
        return Reply(headers=[(b"Cache-Control", b"max-age=600")], body=req.target)

    async with running_backends(cacheable) as backends:
        origin = backends[0]
        async with pibl_process("run", "-c", str(config(tmp_path, backends, cache=True))) as pibl:
            proxy, address = await start(pibl, tmp)

            def fetched() -> int:
                return len([r for r in origin.requests if r.target == b"/item"])

            async def cached_in(count: int) -> bool:
                # A fresh connection each time: the kernel picks the worker. Each worker's
                # memory cache misses once, then hits: the origin sees one request per worker.
                response = await request(proxy, "GET", "/item")
                assert response.status == 200
                assert response.body == b"/item"
                return fetched() == count

            await until(lambda: cached_in(2), "both workers cached /item", pibl)
            status = await admin(address, "GET", "/api/cache/stats")
            assert status["entries"] == 2  # one per worker's memory storage
            answer = await admin(
                address, "POST", "/api/cache/purge", {"url": "http://test.local/item"}
            )
            assert answer == {
                "purged": 2,
                "acknowledged_by": {"acknowledged": [1, 2], "missing": []},
            }
            assert (await admin(address, "GET", "/api/cache/stats"))["entries"] == 0
            # Every worker misses again (a worker left out of the purge would keep hitting and
            # the origin would never see a fourth request).
            await until(lambda: cached_in(4), "both workers missed after the purge", pibl)
            await stop(pibl, tmp)
