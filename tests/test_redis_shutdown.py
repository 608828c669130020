"""Closing whatever reads Redis in the background is bounded, against real Valkey.

On Python 3.11 redis-py can lose one cancellation: it sends every command through
``asyncio.wait_for`` (when ``socket_timeout`` is set), which returns instead of raising
CancelledError when the cancel lands right after the send (CPython gh-86296). A reader
cancelled then reads on for ever; closing must not wait for it for ever. These tests
close the reader exactly while it sends (resubscribing after a Valkey restart, or popping
the event queue), many times over, each close bounded by ``asyncio.wait_for``.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from host.events import EventBus, TaskOwner
from host.fleet.embedded import ValkeyProc, free_port
from host.keys import events_queue_key
from host.metrics import HostMetrics
from host.outbox import OutboxStore
from router.client import ResolveClient
from tests.fleetkit import Fleet

ROUNDS = 20
CLOSE_S = 6.0  # a close that takes longer than this is a hang (each waits at most ~5 s by contract)


def awaiting(task: asyncio.Task[Any]) -> list[str]:
    """The names of the coroutines ``task`` is suspended in, outermost first."""
    names: list[str] = []
    aw: Any = task.get_coro()
    while aw is not None and hasattr(aw, "cr_code"):
        names.append(aw.cr_code.co_name)
        aw = aw.cr_await
    return names


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` at every turn of the event loop (to catch a short window); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0)  # one turn of the loop: the poll interval, the deadline above is the wait


def named(prefix: str) -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(prefix) and not t.done()]


async def kill(tasks: list[asyncio.Task[Any]]) -> None:
    """Cleanup after a failed round: cancel until they are really gone."""
    for _ in range(100):
        if all(t.done() for t in tasks):
            return
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=0.1)


async def test_closing_the_resolve_client_while_its_listener_resubscribes_after_a_restart_never_hangs(
        fleet: Fleet, tmp_path: Path) -> None:
    valkey = ValkeyProc(root=tmp_path, port=free_port())
    await asyncio.to_thread(valkey.start)
    settings = fleet.settings.model_copy(update={"redis_url": valkey.url})
    try:
        for i in range(ROUNDS):
            client = ResolveClient(settings, fleet.directory.lookup)
            others = set(asyncio.all_tasks())
            await client.__aenter__()
            [listener] = set(named("tenantfleet-resolve-listener-")) - others
            assert client.listening
            await asyncio.to_thread(valkey.stop)
            await until(lambda: not client.listening, 5.0, "the listener noticing Valkey is gone")
            await asyncio.to_thread(valkey.start)
            # the listener reconnects and resubscribes: close it while it sends a command
            await until(lambda: "send_packed_command" in awaiting(listener) or client.listening, 10.0,
                        "the listener reconnecting")
            try:
                await asyncio.wait_for(client.__aexit__(None, None, None), CLOSE_S)
            except asyncio.TimeoutError:
                await kill([listener])
                raise AssertionError(f"round {i}: closing the client hung (listener in {awaiting(listener)})") from None
            assert listener.done()
    finally:
        await asyncio.to_thread(valkey.stop)


async def test_closing_the_host_tasks_while_the_event_queue_pops_never_hangs_nor_leaves_a_consumer(
        fleet: Fleet) -> None:
    # the queue client as host.runtime configures it (socket_timeout set: sends go through wait_for)
    queue_redis = aioredis.Redis(host=fleet.servers.redis_host, port=fleet.servers.redis_port,
                                 db=fleet.servers.redis_db, socket_timeout=1.5, socket_connect_timeout=0.5,
                                 retry=Retry(NoBackoff(), 0))
    namespace = f"shutdown{uuid.uuid4().hex[:8]}"  # a queue of its own: no host of the fleet pops it
    try:
        for i in range(ROUNDS):
            tasks = TaskOwner()
            bus = EventBus(queue_redis, queue_redis, namespace, tasks, HostMetrics(),
                           OutboxStore(fleet.shard_pools), lambda tid: asyncio.sleep(0, "s1"))
            # something to pop at once (dropped as malformed), so BRPOP is sent again and again
            await queue_redis.lpush(events_queue_key(namespace), *[b"not an event"] * 3)
            consumer = tasks.spawn(bus.consume(), name="events:queue")
            await until(bus.ready.is_set, 5.0, "the first pop")
            # close while the next BRPOP is being sent
            await until(lambda: "send_packed_command" in awaiting(consumer), 5.0, "the consumer sending BRPOP")
            try:
                await asyncio.wait_for(tasks.close(), CLOSE_S)
            except asyncio.TimeoutError:
                await kill([consumer])
                raise AssertionError(f"round {i}: closing the host's tasks hung") from None
            if not consumer.done():
                await kill([consumer])
                raise AssertionError(f"round {i}: the queue consumer outlived the close (in {awaiting(consumer)})")
    finally:
        await queue_redis.delete(events_queue_key(namespace))
        await queue_redis.aclose()
