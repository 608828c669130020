"""Events after commit, the registry invalidation listener, and the tasks the host owns.

Plugins write events into their shard's outbox inside their own transaction
(`host.outbox`, which states the delivery semantics: one host of the fleet handles each
event, at least once). `EventBus` is how they travel after commit: the writing host
hands them to Redis (a list every host's `EventBus.consume` pops from), or, when Redis
doesn't take them, runs the handlers itself. Nothing here can fail a request whose
transaction committed: delivery runs in owned background tasks, and whatever is not
delivered stays in the outbox for the relay. Each handler runs in its own coroutine: a
failing handler is logged with its pluginId, stops none of the others, and gets the event
again later.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Coroutine, Mapping, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from host.keys import EVENTS_AFTER_COMMIT_MAX, EVENTS_IN_FLIGHT, EVENTS_POP_S, events_queue_key, registry_channel
from host.metrics import HostMetrics
from host.outbox import SHARD_ERRORS, OutboxEvent, OutboxStore, retry_delay
from plugins.api import Event
from router.client import cancel_and_wait

log = logging.getLogger("tenantfleet.host.events")

EventHandler = Callable[[Event], Awaitable[None]]
ShardOf = Callable[[str], Awaitable[str]]
RETRY_S = 0.2
RETRY_MAX_S = 5.0
TASKS_STOP_S = 5.0     # how long `TaskOwner.close` waits for cancelled tasks to end
REDIS_BREAKER_S = 1.0  # after Redis refused a batch, deliver here without asking it again for this long
# What a failing Redis call raises: the client's own errors, a socket error, or a timeout.
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class TaskOwner:
    """The one owner of the host's background tasks; `close` cancels and awaits them all."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as an owned task; RuntimeError once the host is shutting down."""
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

    async def close(self, wait_s: float = TASKS_STOP_S) -> None:
        """Cancel every task and wait for them, at most ``wait_s``. A task still running
        then is logged and left behind rather than holding up the shutdown of Redis and
        the pools."""
        self._closed = True
        tasks = list(self._tasks)
        # Cancelled again until they end, not once: redis-py loses a cancel that lands as
        # a command is sent (see router.client.cancel_and_wait), and the queue consumer
        # or the pub/sub reader would then read on, and pop events, after the shutdown.
        ended = await asyncio.gather(*(cancel_and_wait(t, wait_s) for t in tasks))
        for t, done in zip(tasks, ended):
            if not done:
                log.error("background task %s did not stop within %.0f s of its cancellation; shutting down "
                          "without it", t.get_name(), wait_s)


class EventBus:
    """Handlers by event name, and delivery of outbox events to them (see the module docstring).

    ``redis`` serves the pushes (short timeouts), ``queue_redis`` the blocking pops;
    ``shard_of`` names a tenant's shard (the resolve cache).
    """

    def __init__(self, redis: aioredis.Redis, queue_redis: aioredis.Redis, namespace: str, tasks: TaskOwner,
                 metrics: HostMetrics, store: OutboxStore, shard_of: ShardOf) -> None:
        self.redis = redis
        self._queue_redis = queue_redis
        self._queue = events_queue_key(namespace)
        self.tasks = tasks
        self.metrics = metrics
        self.store = store
        self._shard_of = shard_of
        self.handlers: dict[str, list[tuple[str, EventHandler]]] = {}
        self._slots = asyncio.Semaphore(EVENTS_IN_FLIGHT)
        self._redis_down_until = 0.0
        self._after_commit = 0  # events held by `committed` tasks not yet handed on or handled
        self.ready = asyncio.Event()  # set while the queue is being popped

    def on(self, plugin_id: str, name: str, handler: EventHandler) -> None:
        self.handlers.setdefault(name, []).append((plugin_id, handler))

    # --- after commit ----------------------------------------------------------------------
    def committed(self, tenant_id: str, events: Sequence[tuple[str, str, str, Mapping[str, Any]]]) -> None:
        """Deliver ``(event_id, source, name, payload)`` events whose transaction has just
        committed, in an owned background task. Never raises and never waits: an event not
        delivered now stays in the outbox, and the relay delivers it once its lease ends."""
        # Bounded: with Redis down these tasks wait for handler slots, and requests can
        # commit faster than handlers run. Past the bound the events wait in the outbox
        # (their rows are durable; the relay delivers them once the writer's lease ends).
        if self._after_commit + len(events) > EVENTS_AFTER_COMMIT_MAX:
            log.warning("%d event(s) left to the outbox relay: %d already wait for delivery on this host",
                        len(events), self._after_commit, extra={"tenantId": tenant_id})
            return
        self._after_commit += len(events)
        try:
            self.tasks.spawn(self._deliver_committed(tenant_id, list(events)), name="events:after-commit")
        except RuntimeError:
            self._after_commit -= len(events)
            log.info("host shutting down: %d event(s) left to the outbox relay", len(events))

    async def _deliver_committed(self, tenant_id: str, events: list[tuple[str, str, str, Mapping[str, Any]]]) -> None:
        try:
            try:
                shard_id = await self._shard_of(tenant_id)
            except SHARD_ERRORS as exc:
                log.warning("events of tenant %s left to the outbox relay (%s)", tenant_id, exc.__class__.__name__,
                            extra={"tenantId": tenant_id})
                return
            await self.deliver([OutboxEvent(eid, shard_id, tenant_id, source, name, payload, 1)
                                for eid, source, name, payload in events])
        finally:
            self._after_commit -= len(events)

    # --- delivery ----------------------------------------------------------------------------
    async def deliver(self, batch: list[OutboxEvent]) -> None:
        """Hand each event to one host: through Redis if it takes the batch, else run the
        handlers here (and settle each row). Raises nothing a delivery can cause."""
        if not batch:
            return
        if await self._push(batch):
            return
        await asyncio.gather(*(self._handle_in_slot(ev) for ev in batch))

    async def _push(self, batch: list[OutboxEvent]) -> bool:
        if time.monotonic() < self._redis_down_until:
            return False
        try:
            await self.redis.lpush(self._queue, *[ev.to_json() for ev in batch])
            return True
        except REDIS_ERRORS as exc:
            self._redis_down_until = time.monotonic() + REDIS_BREAKER_S
            log.warning("Redis did not take %d event(s) (%s); running their handlers here", len(batch),
                        exc.__class__.__name__)
            return False

    async def _handle_in_slot(self, ev: OutboxEvent) -> None:
        async with self._slots:
            await self.handle(ev)

    async def handle(self, ev: OutboxEvent) -> None:
        """Run every handler of ``ev.name`` on this host, then settle its outbox row:
        delivered when all returned, else retried after a backoff. A row that can't be
        settled (shard down) is left to its lease: the event comes again."""
        event = Event(id=ev.event_id, name=ev.name, source=ev.source, tenant_id=ev.tenant_id, payload=ev.payload)
        errors = [e for e in await asyncio.gather(*(self._run(pid, h, event) for pid, h in self.handlers.get(ev.name, ())))
                  if e is not None]
        try:
            if errors:
                delay = retry_delay(ev.attempt)
                await self.store.retry_later(ev.shard_id, ev.event_id, delay, "; ".join(errors))
            else:
                await self.store.delivered(ev.shard_id, [ev.event_id])
        except SHARD_ERRORS as exc:
            log.warning("event %s handled but not settled (%s); it will come again", ev.event_id,
                        exc.__class__.__name__, extra={"tenantId": ev.tenant_id, "shardId": ev.shard_id})

    async def _run(self, plugin_id: str, handler: EventHandler, event: Event) -> str | None:
        try:
            await handler(event)
            return None
        except Exception as exc:  # a plugin's bug or a passing fault: logged with its id, retried later
            self.metrics.event_handler_errors.labels(plugin_id, event.name).inc()
            log.exception("event handler failed", extra={"pluginId": plugin_id, "event": event.name,
                                                          "eventId": event.id, "tenantId": event.tenant_id})
            return f"{plugin_id}: {exc.__class__.__name__}"

    # --- the queue ----------------------------------------------------------------------------
    async def consume(self) -> None:
        """Pop events from the Redis queue (each event goes to one host) and handle them, at
        most `EVENTS_IN_FLIGHT` at once; reconnects with backoff while Redis is away."""
        delay = RETRY_S
        while True:
            await self._slots.acquire()  # a free slot first: what we pop, we run at once
            handed_off = False
            lost: BaseException | None = None
            try:
                popped = await self._queue_redis.brpop([self._queue], timeout=EVENTS_POP_S)
                self.ready.set()
                delay = RETRY_S
                if popped is not None:
                    raw = popped[1]
                    ev = OutboxEvent.from_json(raw if isinstance(raw, bytes) else raw.encode())
                    self.tasks.spawn(self._handle_then_release(ev), name=f"event:{ev.name}")
                    handed_off = True
            except (ValueError, KeyError, TypeError) as exc:
                # not an event of ours; a real one lost this way is still in its outbox
                log.warning("malformed event on %s dropped (%r)", self._queue, exc)
            except REDIS_ERRORS as exc:
                lost = exc
            finally:
                if not handed_off:
                    self._slots.release()
            if lost is not None:
                self.ready.clear()
                log.warning("event queue unavailable (%s); retrying in %.1fs", lost.__class__.__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _handle_then_release(self, ev: OutboxEvent) -> None:
        try:
            await self.handle(ev)
        finally:
            self._slots.release()


class Subscriber:
    """One pub/sub connection per host for registry invalidations.

    Reconnects with backoff; after a gap it calls ``on_registry`` anyway, since
    invalidations published meanwhile were missed.
    """

    def __init__(self, redis: aioredis.Redis, namespace: str, on_registry: Callable[[], Awaitable[None]]) -> None:
        self._redis = redis
        self._registry_ch = registry_channel(namespace).encode()
        self._on_registry = on_registry
        self.ready = asyncio.Event()

    async def run(self) -> None:
        delay = RETRY_S
        first = True
        while True:
            try:
                async with self._redis.pubsub() as ps:
                    await ps.subscribe(self._registry_ch)
                    if not first:
                        await self._reload()
                    first = False
                    delay = RETRY_S
                    self.ready.set()
                    while True:
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if msg is not None and msg["channel"] == self._registry_ch:
                            await self._reload()
            except REDIS_ERRORS as exc:
                self.ready.clear()
                first = False  # whatever was announced while we were away is missed: reload on return
                log.warning("pub/sub connection lost (%s); retrying in %.1fs", exc.__class__.__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _reload(self) -> None:
        try:
            await self._on_registry()
        except Exception:  # the control plane hiccuped: the registry TTL re-reads later
            log.exception("registry reload after an invalidation failed")
