"""``[server] workers = N``: a supervisor process and N workers sharing the port (SO_REUSEPORT).

Which process serves a connection is read from /proc, not from anything PIBL adds to responses:
the server side of each test connection is found in ``/proc/net/tcp`` (local port = PIBL's,
remote port = the client's) and its socket inode in ``/proc/PID/fd`` of one worker. Worker pids
come from the supervisor's ``worker N ready (pid P)`` log lines and are checked to be its
children. Every wait is bounded and waits on a log line, an exit or /proc state, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest

from pibl.balancer.upstream import Address
from tests.integration.test_cli import PiblProcess, bounded, pibl_process, write_config
from tests.support import Client, Received, Reply, request, running_backends, wait_until

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="workers need SO_REUSEPORT balancing and /proc"
)

WAIT = 10.0
# Connections opened to see which workers accept: with two workers, the kernel's hash sends all
# of them to the same one with probability 2**-(CONNECTIONS - 1).
CONNECTIONS = 40
READY = re.compile(r"worker (\d+) ready \(pid (\d+)\)")


def workers_config(tmp_path: Path, backend: Address, workers: int = 2, **kw: str) -> Path:
    server = f'workers = {workers}\nshutdown_timeout = "{kw.pop("shutdown_timeout", "5s")}"'
    return write_config(tmp_path / "pibl.toml", [backend], server=server, **kw)


def worker_pids(pibl: PiblProcess) -> dict[int, int]:
    """Worker number → pid of its latest process that reported ready."""
    pids: dict[int, int] = {}
    for line in pibl.lines["stderr"]:
        match = READY.search(line)
        if match:
            pids[int(match.group(1))] = int(match.group(2))
    return pids


def exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie too: it was not reaped)."""
    return os.path.exists(f"/proc/{pid}")


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        return int(stat.read().rpartition(")")[2].split()[1])


def open_files(pid: int) -> set[str]:
    """What the descriptors of ``pid`` point to: paths, ``socket:[INODE]``, ``pipe:[...]``."""
    targets: set[str] = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        with contextlib.suppress(OSError):  # an fd closed while we look
            targets.add(os.readlink(f"{fd_dir}/{name}"))
    return targets


def socket_inodes(pid: int) -> set[int]:
    return {int(t[8:-1]) for t in open_files(pid) if t.startswith("socket:[")}


def server_side_inodes(port: int, client_ports: Iterable[int]) -> dict[int, int]:
    """Client port → inode of the accepted socket for connections to 127.0.0.1:``port``."""
    wanted = set(client_ports)
    found: dict[int, int] = {}
    with open("/proc/net/tcp") as table:
        next(table)  # the header
        for row in table:
            fields = row.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            remote_port = int(fields[2].rpartition(":")[2], 16)
            if local_port == port and remote_port in wanted:
                found[remote_port] = int(fields[9])
    return found


async def connections_per_process(address: Address, pids: Iterable[int]) -> Counter[int]:
    """Open ``CONNECTIONS`` connections, make a request on each, count them per serving pid."""
    clients = [await Client.connect(address) for _ in range(CONNECTIONS)]
    try:
        for client in clients:
            assert (await client.request("GET", "/")).status == 200
        ports = [client.writer.get_extra_info("sockname")[1] for client in clients]
        inodes = server_side_inodes(address.port, ports)
        assert len(inodes) == CONNECTIONS, inodes
        held = {pid: socket_inodes(pid) for pid in pids}
        served: Counter[int] = Counter()
        for inode in inodes.values():
            owners = [pid for pid, mine in held.items() if inode in mine]
            assert len(owners) == 1, f"socket {inode} held by {owners}"
            served[owners[0]] += 1
        return served
    finally:
        for client in clients:
            await client.aclose()


async def start_workers(pibl: PiblProcess, count: int = 2) -> tuple[Address, dict[int, int]]:
    address = await pibl.wait_listening()
    pids = worker_pids(pibl)
    # "listening on" is logged once every worker is ready.
    assert sorted(pids) == list(range(1, count + 1)), pibl.describe()
    for pid in pids.values():
        assert parent_pid(pid) == pibl.pid
    return address, pids


async def stop(pibl: PiblProcess) -> None:
    pibl.send_signal(signal.SIGTERM)
    assert await pibl.wait_exit(timeout=WAIT) == 0, pibl.describe()
    assert "Traceback" not in pibl.stderr, pibl.describe()
    assert len(re.findall(r"listening on http://", pibl.stderr)) == 1, pibl.describe()


@bounded
async def test_two_workers_share_the_port_and_both_accept(tmp_path: Path) -> None:
    async with running_backends(count=1) as backends:
        config = workers_config(tmp_path, backends[0].address)
        async with pibl_process("run", "-c", str(config)) as pibl:
            address, pids = await start_workers(pibl)
            served = await connections_per_process(address, [pibl.pid, *pids.values()])
            assert served[pibl.pid] == 0, "the supervisor accepted a connection"
            for pid in pids.values():
                assert served[pid] > 0, f"worker {pid} served nothing: {served}"
            await stop(pibl)
        for pid in pids.values():
            assert not exists(pid), f"worker {pid} outlived the supervisor"
    assert len(backends[0].requests) == CONNECTIONS


@bounded
async def test_a_killed_worker_is_restarted_and_requests_keep_succeeding(tmp_path: Path) -> None:
    async with running_backends(count=1) as backends:
        config = workers_config(tmp_path, backends[0].address)
        async with pibl_process("run", "-c", str(config)) as pibl:
            address, pids = await start_workers(pibl)
            old = pids[1]
            os.kill(old, signal.SIGKILL)
            await pibl.wait_for(rf"worker 1 \(pid {old}\) was killed by SIGKILL; restarting")
            # Meanwhile worker 2 has the port to itself.
            for _ in range(5):
                assert (await request(address, "GET", "/")).status == 200
            match = await pibl.wait_for(rf"worker 1 ready \(pid (?!{old}\))(\d+)\)")
            new = int(match.group(1))
            assert parent_pid(new) == pibl.pid
            served = await connections_per_process(address, [new, pids[2]])
            assert served[new] > 0, served
            assert served[pids[2]] > 0, served
            await stop(pibl)


@bounded
async def test_sigterm_lets_a_worker_finish_its_request_then_exits_0(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def handler(req: Received) -> Reply:
        if req.target == b"/slow":
            await release.wait()
            return Reply(body=b"finished after SIGTERM")
        return Reply(body=b"quick")

    async with running_backends(handler) as backends:
        origin = backends[0]
        config = workers_config(tmp_path, origin.address, shutdown_timeout="10s")
        async with pibl_process("run", "-c", str(config)) as pibl:
            address, _pids = await start_workers(pibl)
            busy = await Client.connect(address)
            try:
                await busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
                await wait_until(lambda: any(r.target == b"/slow" for r in origin.requests), WAIT)
                pibl.send_signal(signal.SIGTERM)
                await pibl.wait_for("SIGTERM: stopping the workers")
                await pibl.wait_for("shutting down")  # a worker got it
                release.set()
                response = await busy.read_response(timeout=WAIT)
                assert response.body == b"finished after SIGTERM"
            finally:
                await busy.aclose()
            assert await pibl.wait_exit(timeout=WAIT) == 0, pibl.describe()
            assert "all workers stopped" in pibl.stderr


@bounded
async def test_a_worker_that_does_not_stop_is_killed_after_the_shutdown_timeout(
    tmp_path: Path,
) -> None:
    async with running_backends(count=1) as backends:
        config = workers_config(tmp_path, backends[0].address, shutdown_timeout="200ms")
        async with pibl_process("run", "-c", str(config)) as pibl:
            _address, pids = await start_workers(pibl)
            os.kill(pids[2], signal.SIGSTOP)  # cannot handle SIGTERM any more
            pibl.send_signal(signal.SIGTERM)
            assert await pibl.wait_exit(timeout=WAIT) == 1, pibl.describe()
            assert f"worker 2 (pid {pids[2]}) still running after the shutdown timeout" in (
                pibl.stderr
            )
            assert f"worker 2 (pid {pids[2]}) was killed by SIGKILL" in pibl.stderr
            assert not exists(pids[2])


@bounded
async def test_sigusr1_reopens_the_access_log_in_every_worker_and_sighup_kills_none(
    tmp_path: Path,
) -> None:
    log_path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    async with running_backends(count=1) as backends:
        config = workers_config(
            tmp_path, backends[0].address, access_log=f'path = "{log_path}"\nformat = "json"'
        )
        async with pibl_process("run", "-c", str(config)) as pibl:
            address, pids = await start_workers(pibl)
            log_path.rename(rotated)
            pibl.send_signal(signal.SIGUSR1)

            def every_worker_has_the_new_file() -> bool:
                for pid in pids.values():
                    files = open_files(pid)
                    if str(log_path) not in files or str(rotated) in files:
                        return False
                return True

            await wait_until(every_worker_has_the_new_file, WAIT)
            served = await connections_per_process(address, pids.values())
            assert all(served[pid] > 0 for pid in pids.values()), served
            await wait_until(lambda: log_path.read_text().count("\n") == CONNECTIONS, WAIT)
            assert rotated.read_text() == ""

            pibl.send_signal(signal.SIGHUP)
            await pibl.wait_for("SIGHUP: forwarding to the workers")
            assert (await request(address, "GET", "/")).status == 200
            await stop(pibl)
            assert worker_pids(pibl) == pids, "a worker was replaced"
            assert "killed by" not in pibl.stderr


@bounded
async def test_a_worker_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "access.log"
    async with running_backends(count=1) as backends:
        config = workers_config(tmp_path, backends[0].address, access_log=f'path = "{missing}"')
        async with pibl_process("run", "-c", str(config)) as pibl:
            assert await pibl.wait_exit(timeout=WAIT) == 1, pibl.describe()
    assert f"pibl: {missing}: No such file or directory" in pibl.stderr
    assert "before it was ready; stopping" in pibl.stderr
    assert "listening on" not in pibl.stderr
    assert "Traceback" not in pibl.stderr


@bounded
async def test_one_worker_serves_in_the_pibl_process_itself(tmp_path: Path) -> None:
    async with running_backends(count=1) as backends:
        config = workers_config(tmp_path, backends[0].address, workers=1)
        async with pibl_process("run", "-c", str(config)) as pibl:
            address = await pibl.wait_listening()
            served = await connections_per_process(address, [pibl.pid])
            assert served[pibl.pid] == CONNECTIONS
            await stop(pibl)
            assert "supervisor" not in pibl.stderr
