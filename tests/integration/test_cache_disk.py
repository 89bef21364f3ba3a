"""The disk cache end to end: hostile URLs, a restart, and ``kill -9`` in the middle of writes.

The disk storage names files by digests and renames complete files into place; these tests check
what that promises from the outside: every URL gets its own entry and its own body back, nothing
is written outside the cache folder, entries outlive the process, and a process killed while it
writes leaves entries that are either whole and correct or absent, never torn or mixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from pibl.balancer.upstream import Address
from tests.support import (
    Received,
    Reply,
    Response,
    dead_address,
    make_settings,
    request,
    running_backends,
    running_proxy,
)

CACHEABLE = [(b"Cache-Control", b"max-age=600")]
HOSTILE_PATHS = [
    "/a/b",
    "/ab",
    "/a:b",
    "//ab",
    "/x/../y",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/nul%00x",
    "/" + "s" * 8192,
]
HEX_NAME = re.compile(r"[0-9a-f]+")
LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")


def is_hit(response: Response) -> bool:
    """Whether PIBL's ``Cache-Status`` member (RFC 9211) has the ``hit`` parameter."""
    value = response.header("Cache-Status") or ""
    return "hit" in [param.strip() for param in value.split(";")]


def echo(request: Received) -> Reply:
    """A cacheable answer naming the host and the target exactly as the backend received them."""
    body = b"host=%s target=%s" % ((request.header("Host") or "").encode(), request.target)
    return Reply(headers=CACHEABLE, body=body)


def disk_cache(path: Path) -> dict[str, object]:
    return {"enabled": True, "storage": "disk", "path": str(path)}


def names_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def assert_only_digest_files(root: Path) -> list[Path]:
    """Every file under ``root`` is an entry ``entries/<hex>/<hex>/<hex>`` inside ``root``."""
    resolved = root.resolve()
    files = [path for path in root.rglob("*") if path.is_file()]
    for path in files:
        assert path.resolve().is_relative_to(resolved / "entries"), path
        parts = path.relative_to(root / "entries").parts
        assert len(parts) == 3, path
        assert all(HEX_NAME.fullmatch(part) for part in parts), path
    return files


async def test_hostile_paths_each_get_their_own_entry_inside_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    async with running_backends(echo) as backends:
        settings = make_settings(
            backends,
            cache=disk_cache(root),
            server={"max_request_line": 32 * 1024, "max_header_size": 64 * 1024},
        )
        async with running_proxy(settings) as app:
            address = app.addresses[0]
            for path in HOSTILE_PATHS:
                first = await request(address, "GET", path)
                assert first.status == 200, (path[:40], first.status)
                assert first.body == b"host=test.local target=" + path.encode()
                assert not is_hit(first), first.header("Cache-Status")
                second = await request(address, "GET", path)
                assert second.status == 200, (path[:40], second.status)
                assert is_hit(second), (path[:40], second.header("Cache-Status"))
                assert second.body == first.body, path[:40]
            assert len(backends[0].requests) == len(HOSTILE_PATHS)
            assert [r.target.decode() for r in backends[0].requests] == HOSTILE_PATHS
            assert app.cache is not None
            assert app.cache.storage.stats()["entries"] == len(HOSTILE_PATHS)

            # One path under two Host values: two entries, each with its own body.
            for host in ("one.test", "two.test"):
                response = await request(address, "GET", "/ab", headers=[("Host", host)])
                assert not is_hit(response)
            for host in ("one.test", "two.test"):
                response = await request(address, "GET", "/ab", headers=[("Host", host)])
                assert is_hit(response), host
                assert response.body == b"host=%s target=/ab" % host.encode()
            assert app.cache.storage.stats()["entries"] == len(HOSTILE_PATHS) + 2
    files = assert_only_digest_files(root)
    assert len(files) == len(HOSTILE_PATHS) + 2  # distinct keys never share a file
    assert names_in(tmp_path) == ["cache"]


async def test_entries_survive_a_restart_without_contacting_the_backend(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    async with running_backends(echo) as backends:
        async with running_proxy(make_settings(backends, cache=disk_cache(root))) as app:
            first = await request(app.addresses[0], "GET", "/kept?v=1")
            assert first.status == 200
            assert not is_hit(first)
        assert len(backends[0].requests) == 1
    # The backend is gone: only the cache can answer.
    gone = await dead_address()
    async with running_proxy(make_settings([gone], cache=disk_cache(root))) as app:
        again = await request(app.addresses[0], "GET", "/kept?v=1")
        assert again.status == 200
        assert is_hit(again), again.header("Cache-Status")
        assert again.body == first.body == b"host=test.local target=/kept?v=1"
        head = await request(app.addresses[0], "HEAD", "/kept?v=1")
        assert head.status == 200
        assert is_hit(head)
        assert head.header("Content-Length") == str(len(first.body))
        miss = await request(app.addresses[0], "GET", "/never-stored")
        assert miss.status == 502


# --------------------------------------------------------------------------- kill -9

BODY_SIZE = 256 * 1024
PATH_COUNT = 96
CONCURRENCY = 24
# Every fourth path: the backend sends the head and half the body, then stalls, so PIBL has a
# cache file half written when it is killed (the client has seen those bytes, so PIBL had
# already handed them to the writer: it writes to the cache before the client).
PARTIAL_EVERY = 4
PARTIALS_BEFORE_KILL = 12
FULL_BEFORE_KILL = 48  # complete answers the backend has sent when PIBL is killed


def original_body(path: str) -> bytes:
    return hashlib.shake_256(b"original " + path.encode()).digest(BODY_SIZE)


def new_body(path: str) -> bytes:
    return hashlib.shake_256(b"new " + path.encode()).digest(BODY_SIZE)


class PiblProcess:
    """``python -m pibl run -c FILE`` with its stderr collected; ``address`` once listening."""

    def __init__(self, proc: asyncio.subprocess.Process, address: Address) -> None:
        self.proc = proc
        self.address = address
        self.log = ""


@contextlib.asynccontextmanager
async def pibl_process(config: Path) -> AsyncIterator[PiblProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pibl",
        "run",
        "-c",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr = proc.stderr
    drain: asyncio.Task[bytes] | None = None
    early = b""
    try:
        async with asyncio.timeout(20):
            while True:
                line = await stderr.readline()
                early += line
                assert line, f"pibl exited before listening:\n{early.decode()}"
                match = LISTENING.search(line.decode())
                if match:
                    break
        running = PiblProcess(proc, Address(match.group(1), int(match.group(2))))
        drain = asyncio.create_task(stderr.read())
        yield running
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            async with asyncio.timeout(10):
                rest = await drain
            running.log = (early + rest).decode(errors="replace")


def write_config(path: Path, backend: Address, cache: Path) -> Path:
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"

[upstreams.app]
servers = ["{backend}"]

[cache]
enabled = true
storage = "disk"
path = "{cache}"
max_size = "1GiB"
max_object_size = "1MiB"

[access_log]
enabled = false

[log]
level = "info"
"""
    )
    return path


async def fetch_all(
    address: Address, paths: list[str], check: Callable[[str, Response], None]
) -> list[BaseException | None]:
    """GET every path, ``CONCURRENCY`` at a time; the error of each request, or None."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(path: str) -> None:
        async with gate:
            response = await request(address, "GET", path)
            check(path, response)

    return list(await asyncio.gather(*(one(path) for path in paths), return_exceptions=True))


async def read_half_then_wait(
    address: Address, path: str, body: bytes, seen: Callable[[], None]
) -> int:
    """GET ``path``, read at least half of ``body`` (checking it), call ``seen``, then read
    until PIBL goes away; returns the number of body bytes received."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: test.local\r\n\r\n" % path.encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        got = bytearray()
        while len(got) < BODY_SIZE // 2:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed before half the body")
            got += data
        assert got == body[: len(got)], path
        seen()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                got += data
        assert len(got) < BODY_SIZE, "the stalled response completed"
        return len(got)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_kill_9_during_disk_writes_never_leaves_a_torn_entry(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    paths = [f"/kill/{i:03d}" for i in range(PATH_COUNT)]
    partial = {path for i, path in enumerate(paths) if i % PARTIAL_EVERY == PARTIAL_EVERY - 1}
    full = [path for path in paths if path not in partial]
    originals = {path: original_body(path) for path in paths}
    news = {path: new_body(path) for path in paths}
    answered = halves_seen = 0
    enough_full = asyncio.Event()
    enough_partial = asyncio.Event()

    def first_life(request: Received) -> Reply:
        nonlocal answered
        path = request.target.decode()
        if path in partial:
            head = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: %d\r\n\r\n"
            return Reply(raw=head % BODY_SIZE + originals[path][: BODY_SIZE // 2 + 4096])
        answered += 1
        if answered >= FULL_BEFORE_KILL:
            enough_full.set()
        return Reply(headers=CACHEABLE, body=originals[path])

    def half_seen() -> None:
        nonlocal halves_seen
        halves_seen += 1
        if halves_seen >= PARTIALS_BEFORE_KILL:
            enough_partial.set()

    def served_original(path: str, response: Response) -> None:
        assert response.status == 200
        assert response.body == originals[path]

    async with asyncio.timeout(120):
        # First life: many concurrent fetches, each streaming 256 KiB into the disk cache.
        async with running_backends(first_life) as backends:
            config = write_config(tmp_path / "first.toml", backends[0].address, cache)
            async with pibl_process(config) as pibl:
                stalled = [
                    asyncio.create_task(
                        read_half_then_wait(pibl.address, path, originals[path], half_seen)
                    )
                    for path in sorted(partial)
                ]
                fetches = asyncio.create_task(fetch_all(pibl.address, full, served_original))
                await enough_partial.wait()
                await enough_full.wait()
                pibl.proc.send_signal(signal.SIGKILL)
                assert await pibl.proc.wait() == -signal.SIGKILL
                outcomes = await fetches
                stalled_outcomes = await asyncio.gather(*stalled, return_exceptions=True)
            completed = sum(outcome is None for outcome in outcomes)
            assert completed < len(full), "PIBL was killed after every request had finished"
            for failure in [o for o in outcomes if o is not None]:
                # Killed mid-response, or refused once PIBL was gone.
                assert isinstance(failure, ConnectionError | OSError | TimeoutError), failure
            half_written = [o for o in stalled_outcomes if isinstance(o, int)]
            assert len(half_written) >= PARTIALS_BEFORE_KILL, stalled_outcomes
            for outcome in stalled_outcomes:
                if not isinstance(outcome, int):  # killed before it even got its head
                    assert isinstance(outcome, ConnectionError | OSError), outcome

        # Second life: the origin now answers differently, so every body tells where it came from.
        def second_life(request: Received) -> Reply:
            return Reply(headers=CACHEABLE, body=news[request.target.decode()])

        async with running_backends(second_life) as backends:
            config = write_config(tmp_path / "second.toml", backends[0].address, cache)
            async with pibl_process(config) as pibl:
                assert names_in(cache / "tmp") == []  # leftovers removed at start
                hits: list[str] = []
                misses: list[str] = []

                def whole_body(path: str, response: Response) -> None:
                    assert response.status == 200, (path, response.status)
                    if is_hit(response):
                        assert response.body == originals[path], f"{path}: torn cached body"
                        hits.append(path)
                    else:
                        assert response.body == news[path], f"{path}: wrong body on a miss"
                        misses.append(path)

                outcomes = await fetch_all(pibl.address, paths, whole_body)
                assert [o for o in outcomes if o is not None] == []
                assert len(hits) + len(misses) == PATH_COUNT
                assert hits, "no entry survived kill -9"
                assert partial <= set(misses), "a half-written entry was served"
                assert len(backends[0].requests) == len(misses)

                # Everything is stored now: a third round is all hits, with the right bodies.
                def stored(path: str, response: Response) -> None:
                    assert is_hit(response), path
                    assert response.body == (originals if path in hits else news)[path], path

                outcomes = await fetch_all(pibl.address, paths, stored)
                assert [o for o in outcomes if o is not None] == []
                assert len(backends[0].requests) == len(misses)
            assert "removing unusable cache file" not in pibl.log, pibl.log
            assert "Traceback" not in pibl.log, pibl.log
    assert len(assert_only_digest_files(cache)) == PATH_COUNT
    print(
        f"kill -9: {completed}/{len(full)} complete and {len(half_written)} half-written "
        f"before the kill; {len(hits)} hits, {len(misses)} misses after the restart"
    )
