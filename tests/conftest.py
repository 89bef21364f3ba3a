from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    # Tests run on the event loop PIBL uses in production.
    return {"uvloop": uvloop.new_event_loop}
