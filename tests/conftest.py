from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import uvloop

from tests.redis_support import RedisServer


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    # Tests run on the event loop PIBL uses in production.
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart by key prefix."""
    with RedisServer() as server:
        yield server
