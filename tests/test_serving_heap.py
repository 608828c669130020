"""A serving router and host freeze their startup heap: Python's full collections stop
walking it (in a serving process one took ~80 ms, every request in flight waiting)."""
from __future__ import annotations

import asyncio
import gc
from typing import Any, Awaitable, Callable, Iterator

import pytest

from host import app as host_app
from router import service
from router.http import freeze_startup_heap
from tests.fleetkit import Fleet
from tests.hostkit import host_settings


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()  # what an earlier test froze goes back to the collector
    yield
    gc.unfreeze()


def test_freezing_takes_the_heap_out_of_full_collections(unfrozen: None) -> None:
    gc.collect()  # what earlier tests left as garbage is not counted
    before = len(gc.get_objects(generation=2))
    kept = [[i] for i in range(20_000)]  # tracked objects that outlive a collection
    frozen = freeze_startup_heap()
    assert frozen == gc.get_freeze_count() >= before + len(kept)
    assert len(gc.get_objects(generation=2)) < 1_000  # what a full collection still walks
    gc.collect()
    assert all(gc.is_tracked(k) for k in kept[:10]) and len(kept) == 20_000  # frozen objects stay alive
    gc.unfreeze()
    assert len(gc.get_objects(generation=2)) >= len(kept)  # unfrozen: walked again


async def _frozen_when_ready(serve: Callable[..., Awaitable[None]], settings: Any) -> int:
    stop = asyncio.Event()
    seen: list[int] = []

    async def ready(_: Any) -> None:
        seen.append(gc.get_freeze_count())
        stop.set()

    await asyncio.wait_for(serve(settings, port=0, ready=ready, stop=stop), 60)
    assert len(seen) == 1
    return seen[0]


async def test_the_host_freezes_its_heap_once_listening(fleet: Fleet, unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    assert await _frozen_when_ready(host_app.serve, host_settings(fleet)) > 10_000


async def test_the_router_freezes_its_heap_once_listening(fleet: Fleet, unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    assert await _frozen_when_ready(service.serve, fleet.settings) > 10_000
