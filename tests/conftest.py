"""Session fixtures: servers started once; each test that needs isolation gets its own fleet."""
from __future__ import annotations

import asyncio
import gc
from contextlib import AsyncExitStack, contextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_asyncio

from router.settings import test_environment
from tests.fleetkit import Fleet, Servers, open_fleet, start_servers


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    env = test_environment()
    s = start_servers(env.get("external_pg"), env.get("external_redis"))
    try:
        yield s
    finally:
        if s.embedded is not None:
            s.embedded.reset()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def fleet(servers: Servers) -> AsyncIterator[Fleet]:
    """A fleet shared by the session: tests on it use fresh tenants, never global state."""
    async with AsyncExitStack() as stack:
        yield await open_fleet(servers, stack)


FleetFactory = Callable[..., Awaitable[Fleet]]


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_fleet(servers: Servers) -> AsyncIterator[FleetFactory]:
    """A factory for fleets of this test's own (new databases, new Redis namespace)."""
    async with AsyncExitStack() as stack:
        async def make(**overrides: object) -> Fleet:
            return await open_fleet(servers, stack, **overrides)  # type: ignore[arg-type]
        yield make


@contextmanager
def loop_errors(loop: asyncio.AbstractEventLoop) -> Iterator[list[dict[str, Any]]]:
    """Collects what ``loop`` reports to its exception handler while the block runs."""
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        gc.collect()  # a dropped task that failed reports itself when it is collected
        loop.set_exception_handler(previous)


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def fail_on_unhandled_loop_errors() -> AsyncIterator[None]:
    """An exception nobody handled in the event loop (a task that died unobserved, a failing
    callback) fails the test it happened in, instead of only being logged."""
    with loop_errors(asyncio.get_running_loop()) as seen:
        yield
    if seen:
        pytest.fail("unhandled error(s) in the event loop: " + "; ".join(
            f"{c.get('message')}: {c.get('exception')!r}" for c in seen), pytrace=False)
