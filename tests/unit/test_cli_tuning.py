"""Process tuning done once a server has started (cli._tune_gc)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pibl import cli


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_startup_objects_are_frozen_and_young_collections_wait_for_real_garbage() -> None:
    gc.unfreeze()
    _, middle, oldest = gc.get_threshold()
    cli._tune_gc()
    assert gc.get_freeze_count() > 0  # what startup built is out of the collector's reach
    assert gc.get_threshold() == (cli.YOUNG_GC_THRESHOLD, middle, oldest)
    # Room for the tracked objects of a few hundred requests in flight (about 30 each).
    assert cli.YOUNG_GC_THRESHOLD >= 256 * 30


@pytest.mark.usefixtures("restored_gc")
def test_cycles_are_still_collected_under_the_raised_threshold() -> None:
    cli._tune_gc()
    gc.collect()

    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    collected: list[int] = []

    def observe(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collected.append(info["collected"])

    gc.callbacks.append(observe)
    try:
        # Garbage cycles beyond the threshold trigger a young collection on their own.
        for _ in range(cli.YOUNG_GC_THRESHOLD):
            a, b = Node(), Node()
            a.other, b.other = b, a
    finally:
        gc.callbacks.remove(observe)
    assert sum(collected) > 0
