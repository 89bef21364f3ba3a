from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop

import pibl
from tests.redis_support import RedisServer


def pytest_sessionstart(session: pytest.Session) -> None:
    # The hot-path modules are compiled in place (setup.py). A module compiled before its source
    # last changed would test old code: say so instead.
    package = Path(pibl.__file__).parent
    modules = list(package.rglob("*.so"))
    if not modules:
        return  # pure Python (PIBL_COMPILE=0)
    # A build rewrites the library shared by all compiled modules (next to the package) but may
    # leave a module whose C did not change untouched: the newest file dates the last build.
    libraries = list(package.parent.glob("*__mypyc*.so"))
    built = max(path.stat().st_mtime for path in modules + libraries)
    sources = [so.with_name(so.name.split(".", 1)[0] + ".py") for so in modules]
    newer = sorted(str(p.relative_to(package)) for p in sources if p.stat().st_mtime > built)
    if newer:
        pytest.exit(
            f"the compiled modules are older than {', '.join(newer[:3])}: run `make install` "
            "(or delete src/pibl/**/*.so to test as pure Python)",
            returncode=2,
        )


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    # Tests run on the event loop PIBL uses in production.
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart by key prefix."""
    with RedisServer() as server:
        yield server
