"""SIGHUP reload: routes, pools and strategies are swapped without closing client connections."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tests.support import (
    Client,
    make_settings,
    request,
    running_backends,
    running_proxy,
    wait_until,
)


async def test_reload_swaps_upstreams_and_keeps_client_connections() -> None:
    async with running_backends(count=3) as backends:
        async with running_proxy(make_settings(backends[:1])) as app:
            client = await Client.connect(app.addresses[0])
            assert (await client.request()).header("X-Backend") == "b1"
            await app.reload(make_settings(backends[1:]))
            # Same client connection, new pool: b2 and b3 in turn.
            names = [(await client.request()).header("X-Backend") for _ in range(4)]
            await client.aclose()
    assert names == ["b2", "b3", "b2", "b3"]


async def test_reload_keeps_warm_pools_for_unchanged_servers() -> None:
    async with running_backends(count=2) as backends:
        async with running_proxy(make_settings(backends[:1])) as app:
            for _ in range(3):
                await request(app.addresses[0])
            await app.reload(make_settings(backends, upstream={"balance": "round_robin"}))
            for _ in range(4):
                await request(app.addresses[0])
    # b1's keep-alive connection survived the reload.
    assert backends[0].connections == 1


async def test_ten_reloads_during_load_lose_no_request() -> None:
    async with running_backends(count=3) as backends:
        async with running_proxy(make_settings(backends[:2])) as app:
            statuses: list[int] = []
            done = asyncio.Event()

            async def client_loop() -> None:
                client = await Client.connect(app.addresses[0])
                try:
                    while not done.is_set():
                        statuses.append((await client.request()).status)
                finally:
                    await client.aclose()

            loops = [asyncio.create_task(client_loop()) for _ in range(20)]
            for i in range(10):
                # Traffic flows between reloads: wait for 20 more answers each time.
                target = len(statuses) + 20
                await wait_until(lambda target=target: len(statuses) >= target)
                chosen = backends[i % 3 :] + backends[: i % 3]
                await app.reload(make_settings(chosen[:2]))
            target = len(statuses) + 40
            await wait_until(lambda: len(statuses) >= target)
            done.set()
            await asyncio.gather(*loops)
    assert len(statuses) >= 240
    assert set(statuses) == {200}


async def test_reload_applies_new_limits_and_routes() -> None:
    async with running_backends(count=1) as backends:
        async with running_proxy(make_settings(backends)) as app:
            assert (await request(app.addresses[0], "GET", "/x")).status == 200
            await app.reload(
                make_settings(backends, routes=[{"path_prefix": "/api", "upstream": "app"}])
            )
            assert (await request(app.addresses[0], "GET", "/x")).status == 404
            assert (await request(app.addresses[0], "GET", "/api/x")).status == 200


@contextlib.asynccontextmanager
async def pibl_process(config: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pibl", "run", "-c", str(config), stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "pibl exited early"
                match = re.search(r"listening on http://([\d.]+:\d+)", line)
                if match:
                    break
        yield proc, match.group(1)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def _wait_for_log(proc: asyncio.subprocess.Process, needle: str) -> str:
    assert proc.stderr is not None
    async with asyncio.timeout(10):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "pibl exited"
            if needle in line:
                return line


async def test_sighup_rereads_the_file_and_a_bad_file_keeps_the_old_config(tmp_path: Path) -> None:
    config = tmp_path / "pibl.toml"

    def write(server: str) -> None:
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\n[upstreams.app]\nservers = ["{server}"]\n'
            "[access_log]\nenabled = false\n"
        )

    async with running_backends(count=2) as backends:
        write(str(backends[0].address))
        async with pibl_process(config) as (proc, address):
            host, port = address.rsplit(":", 1)
            from pibl.balancer.upstream import Address

            proxy = Address(host, int(port))
            assert (await request(proxy)).header("X-Backend") == "b1"
            write(str(backends[1].address))
            proc.send_signal(signal.SIGHUP)
            await _wait_for_log(proc, "reloaded")
            assert (await request(proxy)).header("X-Backend") == "b2"
            config.write_text("[server]\nlisten = 12\n")
            proc.send_signal(signal.SIGHUP)
            line = await _wait_for_log(proc, "reload refused")
            assert "server.listen" in line
            assert (await request(proxy)).header("X-Backend") == "b2"
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
