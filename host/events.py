"""Events across hosts, the registry invalidation listener, and the tasks the host owns.

`emit` publishes on Redis; every host's `Subscriber` receives it and runs the handlers
registered there, each in its own task: a failing handler is logged with its pluginId
and neither stops the other handlers nor the emitter (which returned at publish).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine, Mapping

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from host.keys import events_channel, registry_channel
from host.metrics import HostMetrics
from plugins.api import Event
from router.errors import ValidationFailed

log = logging.getLogger("tenantfleet.host.events")

EventHandler = Callable[[Event], Awaitable[None]]
RETRY_S = 0.2
RETRY_MAX_S = 5.0


class TaskOwner:
    """The one owner of the host's background tasks; `close` cancels and awaits them all."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise RuntimeError("the host is shutting down")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # an owned loop died of a bug: say so now rather than at garbage collection
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class EventBus:
    redis: aioredis.Redis
    namespace: str
    tasks: TaskOwner
    metrics: HostMetrics
    handlers: dict[str, list[tuple[str, EventHandler]]] = field(default_factory=dict)

    def on(self, plugin_id: str, name: str, handler: EventHandler) -> None:
        self.handlers.setdefault(name, []).append((plugin_id, handler))

    async def emit(self, source: str, name: str, payload: Mapping[str, Any], tenant_id: str | None) -> None:
        """Publish; VALIDATION_FAILED if the payload isn't JSON-serialisable."""
        try:
            body = orjson.dumps({"name": name, "source": source, "tenantId": tenant_id, "payload": payload})
        except TypeError as exc:
            raise ValidationFailed(f"event payload is not JSON: {exc}", field="payload") from exc
        await self.redis.publish(events_channel(self.namespace), body)

    def deliver(self, raw: bytes) -> None:
        data = orjson.loads(raw)
        event = Event(name=data["name"], source=data["source"], tenant_id=data.get("tenantId"),
                      payload=data.get("payload") or {})
        for plugin_id, handler in self.handlers.get(event.name, ()):
            self.tasks.spawn(self._run(plugin_id, handler, event), name=f"event:{plugin_id}:{event.name}")

    async def _run(self, plugin_id: str, handler: EventHandler, event: Event) -> None:
        try:
            await handler(event)
        except Exception:  # a plugin's bug: logged with its id, never propagated
            self.metrics.event_handler_errors.labels(plugin_id, event.name).inc()
            log.exception("event handler failed", extra={"pluginId": plugin_id, "event": event.name,
                                                          "tenantId": event.tenant_id})


class Subscriber:
    """One pub/sub connection per host for registry invalidations and events.

    Reconnects with backoff; after a gap it calls ``on_registry`` anyway, since
    invalidations published meanwhile were missed.
    """

    def __init__(self, redis: aioredis.Redis, namespace: str, bus: EventBus,
                 on_registry: Callable[[], Awaitable[None]]) -> None:
        self._redis = redis
        self._registry_ch = registry_channel(namespace).encode()
        self._events_ch = events_channel(namespace).encode()
        self._bus = bus
        self._on_registry = on_registry
        self.ready = asyncio.Event()

    async def run(self) -> None:
        delay = RETRY_S
        first = True
        while True:
            try:
                async with self._redis.pubsub() as ps:
                    await ps.subscribe(self._registry_ch, self._events_ch)
                    if not first:
                        await self._on_registry()
                    first = False
                    delay = RETRY_S
                    self.ready.set()
                    while True:
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None:
                            await self._dispatch(msg["channel"], msg["data"])
            except (RedisError, OSError) as exc:
                self.ready.clear()
                log.warning("pub/sub connection lost (%s); retrying in %.1fs", exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel == self._registry_ch:
            try:
                await self._on_registry()
            except Exception:  # the control plane hiccuped: the registry TTL re-reads later
                log.exception("registry reload after an invalidation failed")
        elif channel == self._events_ch:
            try:
                self._bus.deliver(data)
            except (ValueError, KeyError, TypeError):
                log.warning("malformed event on %s dropped", channel.decode())
