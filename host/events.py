"""Events after commit, the registry invalidation listener, and the tasks the host owns.

Plugins write events into their shard's outbox inside their own transaction
(`host.outbox`, which states the delivery semantics: each plugin subscribing to an event
anywhere in the fleet handles it at least once). `EventBus` is how they travel after
commit: the writing host hands them to Redis (one list per subscription, popped by the
hosts that have its handler), or, when Redis doesn't take them, runs its own handlers
itself and leaves the rest to the hosts that have them. Nothing here can fail a request whose
transaction committed: delivery runs in owned background tasks, and whatever is not
delivered stays in the outbox for the relay. Each handler runs in its own coroutine: a
failing handler is logged with its pluginId, stops none of the others, and gets the event
again later.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Awaitable, Callable, Collection, Coroutine, Mapping, Sequence

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from host.keys import (
    EVENTS_AFTER_COMMIT_MAX, EVENTS_IN_FLIGHT, EVENTS_POP_S, EVENTS_QUEUE_TTL_S, OUTBOX_HANDOFF_S, OUTBOX_LEASE_S,
    events_queue_key, registry_channel, subscription_queue_key,
)
from host.metrics import HostMetrics
from host.outbox import SHARD_ERRORS, OutboxEvent, OutboxStore, retry_delay
from host.subscriptions import Subscriptions
from plugins.api import Event
from router.client import cancel_and_wait

log = logging.getLogger("tenantfleet.host.events")

EventHandler = Callable[[Event], Awaitable[None]]
ShardOf = Callable[[str], Awaitable[str]]
# Whether a plugin's handlers run for a tenant's event: True yes; False no, the plugin has
# nothing to do there (disabled: the event counts as handled by it); None not now (switched
# off: it gets the event again later). May raise what the control plane raises (not now).
EventGate = Callable[[str, str], Awaitable[bool | None]]
RETRY_S = 0.2
RETRY_MAX_S = 5.0
TASKS_STOP_S = 5.0     # how long `TaskOwner.close` waits for cancelled tasks to end
BACKLOG_HOLD_LEASES = 10  # a relay leaves rows still queued in a backlog alone for at most this many leases
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
    ``shard_of`` names a tenant's shard (the resolve cache); ``control`` holds the fleet's
    event subscriptions (`host.subscriptions`; without it this host is the whole fleet);
    ``lease_s`` is the outbox lease the relays claim with (what a backlog is measured against);
    ``gate`` decides per plugin and tenant whether a handler runs (without one, every handler runs).
    """

    def __init__(self, redis: aioredis.Redis, queue_redis: aioredis.Redis, namespace: str, tasks: TaskOwner,
                 metrics: HostMetrics, store: OutboxStore, shard_of: ShardOf, *,
                 control: asyncpg.Pool | None = None, lease_s: float = OUTBOX_LEASE_S,
                 gate: EventGate | None = None) -> None:
        self.redis = redis
        self._queue_redis = queue_redis
        self._ns = namespace
        self._queue = events_queue_key(namespace)
        self.tasks = tasks
        self.metrics = metrics
        self.store = store
        self._shard_of = shard_of
        self.lease_s = lease_s
        self.handlers: dict[str, list[tuple[str, EventHandler]]] = {}
        self.gate = gate
        self.subscriptions = Subscriptions(control, self.own)
        self._slots = asyncio.Semaphore(EVENTS_IN_FLIGHT)
        self._redis_down_until = 0.0
        self._after_commit = 0  # events held by `committed` tasks not yet handed on or handled
        self._pops = 0
        self.ready = asyncio.Event()  # set while the queue is being popped

    def on(self, plugin_id: str, name: str, handler: EventHandler) -> None:
        self.handlers.setdefault(name, []).append((plugin_id, handler))
        self.subscriptions.changed()

    def own(self) -> list[tuple[str, str]]:
        """This host's subscriptions: (plugin id, event name) with at least one handler here."""
        return sorted({(pid, name) for name, hs in self.handlers.items() for pid, _ in hs})

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
        """First delivery (the writer's, right after commit); see `_deliver`."""
        await self._deliver(batch, relayed=False)

    async def redeliver(self, batch: list[OutboxEvent]) -> None:
        """A relay's delivery of rows whose lease ran out: as `deliver`, except that a
        subscription whose queue holds work older than half a lease is not pushed to again
        (the row's earlier message is likely still queued; the claim gave it a new lease)."""
        await self._deliver(batch, relayed=True)

    async def _deliver(self, batch: list[OutboxEvent], *, relayed: bool) -> None:
        """Hand each event to every live subscription that has not handled it yet: one
        message per subscription on its Redis list, popped by one host that has it. With
        Redis down run this host's share here (and settle each row); the rest is left to
        the hosts that have those handlers. An event nobody subscribes to is settled as
        delivered. Raises nothing a delivery can cause."""
        if not batch:
            return
        unsubscribed: dict[str, list[str]] = {}
        messages: list[OutboxEvent] = []
        for ev in batch:
            live = self.subscriptions.live(ev.name)
            remaining = (self.subscriptions.mine(ev.name) if live is None else set(live)) - set(ev.handled_by)
            if remaining:
                messages.extend(dataclasses.replace(ev, plugin=p) for p in sorted(remaining))
            elif live is not None:
                unsubscribed.setdefault(ev.shard_id, []).append(ev.event_id)
            # else: the fleet's subscriptions unknown and none here: left to its lease
        for shard_id, ids in unsubscribed.items():
            try:
                await self.store.delivered(shard_id, ids)
            except SHARD_ERRORS as exc:
                log.warning("%d event(s) nobody subscribes to not settled (%s); they will come again", len(ids),
                            exc.__class__.__name__, extra={"shardId": shard_id})
        if not messages or await self._push(messages, relayed=relayed):
            return
        # Redis down: this host's handlers here; a share that only other hosts have is handed
        # to their relays (the row due again soon; their claims take it, ours skip it).
        by_event: dict[str, tuple[OutboxEvent, set[str]]] = {}
        for m in messages:
            by_event.setdefault(m.event_id, (dataclasses.replace(m, plugin=None), set()))[1].add(str(m.plugin))
        runs = []
        for ev, plugins in by_event.values():
            mine = plugins & self.subscriptions.mine(ev.name)
            runs.append(self._handle_in_slot(ev, mine, handoff=bool(plugins - mine)))
        await asyncio.gather(*runs)

    def _key(self, ev: OutboxEvent) -> str:
        return subscription_queue_key(self._ns, str(ev.plugin), ev.name)

    async def _push(self, messages: list[OutboxEvent], *, relayed: bool) -> bool:
        """LPUSH each message on its subscription's list (one round trip); False if Redis
        did not take them (then the breaker skips Redis for `REDIS_BREAKER_S`)."""
        if time.monotonic() < self._redis_down_until:
            return False
        by_key: dict[str, list[OutboxEvent]] = {}
        for m in messages:
            by_key.setdefault(self._key(m), []).append(m)
        held: dict[str, tuple[list[str], float]] = {}  # shard -> (rows left queued, for how long)
        try:
            if relayed:
                for key, waited in (await self._backlogged(list(by_key))).items():
                    skipped = by_key.pop(key)
                    self.metrics.events_not_repushed.inc(len(skipped))
                    log.info("%d event(s) not pushed again: %s holds work that waited %.0f s", len(skipped), key,
                             waited)
                    hold = min(waited, self.lease_s * BACKLOG_HOLD_LEASES)
                    for m in skipped:
                        ids, longest = held.get(m.shard_id, ([], 0.0))
                        ids.append(m.event_id)
                        held[m.shard_id] = (ids, max(longest, hold))
            if by_key:
                now = time.time()
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, group in by_key.items():
                        pipe.lpush(key, *[dataclasses.replace(m, queued_at=now).to_json() for m in group])
                        pipe.expire(key, EVENTS_QUEUE_TTL_S)
                    await pipe.execute()
                self.metrics.events_pushed.inc(sum(len(g) for g in by_key.values()))
        except REDIS_ERRORS as exc:
            self._redis_down_until = time.monotonic() + REDIS_BREAKER_S
            log.warning("Redis did not take %d event message(s) (%s); running this host's handlers here",
                        len(messages), exc.__class__.__name__)
            return False
        # Rows whose messages are most likely still queued: left alone about as long as the
        # queue's oldest message waited (the claim gave them one lease), so a long backlog
        # is not claimed again every lease. Capped, so a message lost meanwhile is not
        # waited for long once the backlog is gone.
        for shard_id, (ids, hold) in held.items():
            if hold > self.lease_s:
                try:
                    await self.store.extend(shard_id, ids, hold)
                except SHARD_ERRORS as exc:
                    log.warning("leases of %d queued event(s) not extended (%s)", len(ids), exc.__class__.__name__,
                                extra={"shardId": shard_id})
        return True

    async def _backlogged(self, keys: list[str]) -> dict[str, float]:
        """The queues whose oldest message (the tail: LPUSH, BRPOP) has waited half a lease
        or more, with how long it has."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.lindex(key, -1)
            oldest = await pipe.execute()
        now = time.time()
        busy: dict[str, float] = {}
        for key, raw in zip(keys, oldest):
            if raw is None:
                continue
            try:
                queued_at = OutboxEvent.from_json(raw if isinstance(raw, bytes) else raw.encode()).queued_at
            except (ValueError, KeyError, TypeError):
                continue  # not ours; the consumer drops it
            if queued_at and now - queued_at >= self.lease_s / 2:
                busy[key] = now - queued_at
        return busy

    async def _handle_in_slot(self, ev: OutboxEvent, plugins: Collection[str], *, handoff: bool) -> None:
        async with self._slots:
            await self.handle(ev, plugins, handoff=handoff)

    async def handle(self, ev: OutboxEvent, plugins: Collection[str] | None = None, *, handoff: bool = False) -> None:
        """Run the handlers of ``ev.name`` that ``plugins`` have on this host (default: the
        message's plugin, or every plugin here for a message without one) and that `gate`
        lets handle the tenant's events, then settle the outbox row: those plugins are
        recorded as done when all their handlers returned (or the gate said the plugin has
        nothing to do for the tenant: disabled there, or globally); the
        row is delivered once every live subscriber is done, else it waits for the others'
        (their messages, or their relays: at once with ``handoff``). A failing plugin gets
        the event again after a backoff. A row that can't be settled (shard down) is left to
        its lease: the event comes again."""
        if plugins is None:
            plugins = {ev.plugin} if ev.plugin is not None else self.subscriptions.mine(ev.name) - set(ev.handled_by)
        event = Event(id=ev.event_id, name=ev.name, source=ev.source, tenant_id=ev.tenant_id, payload=ev.payload)
        runs = [(pid, h) for pid, h in self.handlers.get(ev.name, ()) if pid in plugins]
        verdicts = {pid: await self._may_handle(pid, ev.tenant_id) for pid in sorted({pid for pid, _ in runs})}
        runs = [(pid, h) for pid, h in runs if verdicts[pid]]
        results = await asyncio.gather(*(self._run(pid, h, event) for pid, h in runs))
        failed = {pid for (pid, _), error in zip(runs, results) if error is not None}
        errors = [error for error in results if error is not None]
        errors += [f"{pid}: not now (switched off, or the registry did not answer)"
                   for pid, verdict in verdicts.items() if verdict is None]
        done = sorted(({pid for pid, _ in runs} - failed) | {pid for pid, verdict in verdicts.items() if verdict is False})
        live = self.subscriptions.live(ev.name)
        again = retry_delay(ev.attempt) if errors else OUTBOX_HANDOFF_S if handoff else None
        try:
            await self.store.settle(ev.shard_id, ev.event_id, done, None if live is None else sorted(live), again,
                                    "; ".join(errors) if errors else None)
        except SHARD_ERRORS as exc:
            log.warning("event %s handled but not settled (%s); it will come again", ev.event_id,
                        exc.__class__.__name__, extra={"tenantId": ev.tenant_id, "shardId": ev.shard_id})

    async def _may_handle(self, plugin_id: str, tenant_id: str) -> bool | None:
        if self.gate is None:
            return True
        try:
            return await self.gate(plugin_id, tenant_id)
        except SHARD_ERRORS as exc:
            log.warning("could not tell whether %s handles events of tenant %s (%s); it gets them again later",
                        plugin_id, tenant_id, exc.__class__.__name__, extra={"pluginId": plugin_id,
                                                                              "tenantId": tenant_id})
            return None

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
    def _pop_keys(self) -> list[str]:
        """The lists this host pops: one per subscription it has, plus the one earlier hosts
        pushed to; rotated each pop, so no subscription's backlog starves another's."""
        keys = [self._queue, *(subscription_queue_key(self._ns, pid, name) for pid, name in self.own())]
        self._pops += 1
        n = self._pops % len(keys)
        return keys[n:] + keys[:n]

    async def consume(self) -> None:
        """Pop events from the Redis queues of this host's subscriptions (each message goes
        to one host) and handle them, at most `EVENTS_IN_FLIGHT` at once; reconnects with
        backoff while Redis is away."""
        delay = RETRY_S
        while True:
            await self._slots.acquire()  # a free slot first: what we pop, we run at once
            handed_off = False
            lost: BaseException | None = None
            try:
                popped = await self._queue_redis.brpop(self._pop_keys(), timeout=EVENTS_POP_S)
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
            if ev.queued_at and time.time() - ev.queued_at >= self.lease_s / 2:
                # it waited in a backlog: hold the row for another lease while it runs, so
                # no relay pushes it again meanwhile
                try:
                    await self.store.extend(ev.shard_id, [ev.event_id], self.lease_s)
                except SHARD_ERRORS as exc:
                    log.warning("lease of event %s not extended (%s)", ev.event_id, exc.__class__.__name__)
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
