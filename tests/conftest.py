"""Session fixtures: servers started once; each test that needs isolation gets its own fleet."""
from __future__ import annotations

from contextlib import AsyncExitStack
from typing import AsyncIterator, Awaitable, Callable, Iterator

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
