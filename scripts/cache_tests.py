"""Run the public HTTP caching test suite (npm ``http-cache-tests``) against PIBL.

The suite's origin server runs on a free loopback port; PIBL runs in front of it once with the
memory storage and once with the disk storage; the suite's client sends its requests to PIBL.
Results go to ``cache-tests/results/<storage>.json`` and the counts are printed.

Usage: python scripts/cache_tests.py [--storage memory|disk ...] [--id TEST_ID] [--list]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "cache-tests"
SUITE_VERSION = "0.4.5"
SUITE = WORK / "node_modules" / "http-cache-tests"
RESULTS = WORK / "results"
SUMMARY = ROOT / "scripts" / "cache_tests_summary.mjs"


def install_suite() -> None:
    if (SUITE / "package.json").exists() and f'"version": "{SUITE_VERSION}"' in (
        SUITE / "package.json"
    ).read_text():
        return
    if shutil.which("npm") is None:
        sys.exit("cache-tests: npm is needed (Debian: apt-get install nodejs npm)")
    WORK.mkdir(exist_ok=True)
    subprocess.run(
        [
            "npm",
            "install",
            "--no-audit",
            "--no-fund",
            "--silent",
            f"http-cache-tests@{SUITE_VERSION}",
        ],
        cwd=WORK,
        check=True,
    )


def _wait_for(stream: object, pattern: str, what: str) -> re.Match[str]:
    assert hasattr(stream, "readline")
    for _ in range(200):
        line = stream.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            return match
    sys.exit(f"cache-tests: {what} did not start")


@contextlib.contextmanager
def origin() -> Iterator[int]:
    env = dict(os.environ, npm_config_port="0", npm_config_protocol="http")
    with tempfile.TemporaryDirectory() as tmp:
        env["npm_config_pidfile"] = str(Path(tmp) / "server.pid")
        proc = subprocess.Popen(
            ["node", "server/server.mjs"], cwd=SUITE, env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            match = _wait_for(proc.stdout, r"Listening on \S+:(\d+)/", "the suite's origin server")
            yield int(match.group(1))
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@contextlib.contextmanager
def pibl(origin_port: int, storage: str) -> Iterator[int]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "pibl.toml"
        config.write_text(
            f"""
[server]
listen = "127.0.0.1:0"

[upstreams.origin]
servers = ["127.0.0.1:{origin_port}"]

[cache]
enabled = true
storage = "{storage}"
path = "{tmp}/cache"

[access_log]
enabled = false
"""
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "pibl", "run", "-c", str(config)],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            match = _wait_for(proc.stderr, r"listening on http://[\d.]+:(\d+)", "PIBL")
            # Keep draining PIBL's event log so it never blocks on a full pipe.
            drain = subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
            yield int(match.group(1))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            with contextlib.suppress(Exception):
                drain.wait(timeout=5)


def run_client(pibl_port: int, test_id: str) -> str:
    env = dict(
        os.environ,
        npm_config_base=f"http://127.0.0.1:{pibl_port}",
        npm_config_id=test_id,
        npm_package_config_id=test_id,
    )
    result = subprocess.run(
        ["node", "--no-warnings", "cli.mjs"],
        cwd=SUITE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"cache-tests: the suite's client failed:\n{result.stderr}")
    return result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", action="append", choices=["memory", "disk"])
    parser.add_argument("--id", default="", help="run one test and show its exchange")
    parser.add_argument("--list", action="store_true", help="list every test that did not pass")
    args = parser.parse_args()
    install_suite()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for storage in args.storage or ["memory", "disk"]:
        with origin() as origin_port, pibl(origin_port, storage) as pibl_port:
            output = run_client(pibl_port, args.id)
        if args.id:
            print(output)
            continue
        results = RESULTS / f"{storage}.json"
        results.write_text(output)
        summary = subprocess.run(
            ["node", str(SUMMARY), str(SUITE), str(results), *(["--list"] if args.list else [])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(f"== PIBL, {storage} storage")
        print(summary.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
