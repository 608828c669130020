"""The event outbox: events written inside tenant transactions, then claimed, settled and relayed.

Delivery semantics: **each plugin that subscribes to an event somewhere in the fleet
handles it at least once, on one host that has that plugin's handler.**

- `write` adds the event to its shard's ``fleet.event_outbox`` inside the plugin's own
  transaction (through ``fleet.emit_event``), so it commits or rolls back with the change
  it reports. The row starts with a lease of `OUTBOX_LEASE_S`: the writing host delivers
  it right after commit (`host.events.EventBus.committed`), nobody else touches it until then.
- Who subscribes is the fleet's map (`host.subscriptions`: plugin id and event name per
  live host). Delivering pushes one message per subscribing plugin that has not handled
  the event yet, on that subscription's Redis list; only hosts with the handler pop it,
  so handler work spreads over them. With Redis down (or failing) the delivering host
  runs its own share straight from the outbox row, and hands the rest to the relays of
  the hosts that have those handlers (the row due again in `OUTBOX_HANDOFF_S`).
- A host that ran a plugin's handlers adds the plugin to the row's ``handled_by``; the
  row is delivered once ``handled_by`` covers every live subscriber. An event nobody
  subscribes to (a handler removed fleet-wide) is delivered as it is. If a handler
  raised, the row is retried after a backoff (exponential with full jitter, capped at
  `OUTBOX_RETRY_MAX_S`, never given up: a handler that always fails is a bug to fix,
  and its events wait for the fix); only the plugins not in ``handled_by`` get it again.
- `Relay` (one per host, owned by its `TaskOwner`) sweeps every shard for rows whose
  lease ran out (the writer died after commit, Redis lost the message, a host died mid-
  handler), claims them with ``FOR UPDATE SKIP LOCKED`` and a new lease, and delivers
  them the same way; it claims only events this host handles or nobody handles. A
  subscription whose list holds work older than half a lease is not pushed to again
  (the earlier message is most likely still queued; the claim renewed the lease), and a
  host that pops an event which waited that long renews its lease before running it:
  a backlog longer than the lease doesn't feed itself. An unreachable shard backs off alone.
- Delivered rows are deleted after `OUTBOX_RETENTION_S`: the table is bounded by traffic.

A handler may therefore see an event more than once (a host died between running the
handlers and marking the row; a lease ran out under a slow handler): `plugins.api.Event.id`
is the same every time, so handlers ignore repeats by it. Events of one tenant are not
ordered across retries.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence

import asyncpg
import orjson
from tenacity import RetryCallState, wait_exponential_jitter, wait_random_exponential

from host.keys import (
    MAX_EVENT_BYTES, OUTBOX_BATCH, OUTBOX_CLEANUP_EVERY_S, OUTBOX_LEASE_S, OUTBOX_RETENTION_S,
    OUTBOX_RETRY_INITIAL_S, OUTBOX_RETRY_MAX_S, OUTBOX_SHARD_BACKOFF_MAX_S, OUTBOX_SHARDS_EVERY_S, OUTBOX_SWEEP_S,
)
from plugins.api import Db
from router.errors import TenantFleetError, ValidationFailed
from router.pools import ShardPools
from shard_migrations.limiter import backoff_delay

log = logging.getLogger("tenantfleet.host.outbox")

EVENT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*$")
MAX_EVENT_NAME = 200
# What a shard that is down, restarting or refusing us raises (sorted by class, never text).
SHARD_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, TenantFleetError)

# the payload goes as JSON text, cast on the server (encoded once, by encode_event)
_WRITE_SQL = "SELECT fleet.emit_event($1::uuid, $2, $3, $4::text::jsonb, $5)"
# One statement claims a batch: rows locked by another relay are skipped, the claimed
# ones get a new lease and an attempt more, and come back to us. Only rows this host can
# move on: events it has a handler for ($3), or that no live host subscribes to ($4, to
# settle them; NULL while the fleet's subscriptions are unknown). Rows for handlers other
# hosts have are theirs to claim.
_CLAIM_SQL = """
UPDATE fleet.event_outbox o SET attempts = o.attempts + 1,
       next_attempt_at = now() + make_interval(secs => $2)
FROM (SELECT event_id FROM fleet.event_outbox
      WHERE delivered_at IS NULL AND next_attempt_at <= now()
        AND (name = ANY ($3::text[]) OR NOT (name = ANY ($4::text[])))
      ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
WHERE o.event_id = due.event_id
RETURNING o.event_id::text, o.tenant_id::text, o.source, o.name, o.payload::text, o.attempts, o.handled_by
"""
# What a host settles after running some plugins' handlers of one event: those plugins
# join handled_by ($2, the ones whose handlers all returned); the row is delivered once
# handled_by covers every live subscriber ($3; NULL: unknown, never delivered here); a
# failure ($4 seconds, $5 why) or a hand-off to another host ($4 alone) makes it due again.
# One statement whose SET reads the row it updates (re-read after a concurrent update
# committed), so two hosts settling different plugins of one event never lose either.
_SETTLE_SQL = """
UPDATE fleet.event_outbox SET
  handled_by = ARRAY(SELECT DISTINCT p FROM unnest(handled_by || $2::text[]) p ORDER BY p),
  delivered_at = CASE WHEN $3::text[] <@ (handled_by || $2::text[]) THEN now() END,
  next_attempt_at = CASE WHEN $4::float8 IS NULL THEN next_attempt_at ELSE now() + make_interval(secs => $4) END,
  last_error = CASE WHEN $3::text[] <@ (handled_by || $2::text[]) THEN NULL ELSE coalesce($5, last_error) END
WHERE event_id = $1::uuid AND delivered_at IS NULL
RETURNING delivered_at IS NOT NULL
"""
# A consumer that pops an event which waited in the queue long: the relays leave it alone
# for another lease while its handlers run. A relay that finds a row's queue backlogged:
# the row is left alone about as long as the queue's oldest message has waited.
_EXTEND_SQL = ("UPDATE fleet.event_outbox SET next_attempt_at = greatest(next_attempt_at, "
               "now() + make_interval(secs => $2)) WHERE event_id = ANY ($1::uuid[]) AND delivered_at IS NULL")
_DELIVERED_SQL = ("UPDATE fleet.event_outbox SET delivered_at = now(), last_error = NULL "
                  "WHERE event_id = ANY ($1::uuid[]) AND delivered_at IS NULL")
_RETRY_SQL = ("UPDATE fleet.event_outbox SET next_attempt_at = now() + make_interval(secs => $2), last_error = $3 "
              "WHERE event_id = $1::uuid AND delivered_at IS NULL")
_CLEANUP_SQL = """
DELETE FROM fleet.event_outbox WHERE event_id IN (
  SELECT event_id FROM fleet.event_outbox
  WHERE delivered_at IS NOT NULL AND delivered_at < now() - make_interval(secs => $1) LIMIT $2)
"""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One outbox row on its way to the handlers (also the Redis message, as JSON)."""
    event_id: str
    shard_id: str
    tenant_id: str
    source: str
    name: str
    payload: Mapping[str, Any]
    attempt: int
    handled_by: tuple[str, ...] = ()  # plugins whose handlers already ran (from the row)
    plugin: str | None = None         # in a queue message: the plugin whose handlers it is for
    queued_at: float = 0.0            # in a queue message: when it was pushed (the pusher's clock)

    def to_json(self) -> bytes:
        return orjson.dumps({"id": self.event_id, "shard": self.shard_id, "tenant": self.tenant_id,
                             "source": self.source, "name": self.name, "payload": self.payload,
                             "attempt": self.attempt, "plugin": self.plugin, "queuedAt": self.queued_at})

    @classmethod
    def from_json(cls, raw: bytes) -> "OutboxEvent":
        """Raises ValueError, KeyError or TypeError for a message that isn't one of ours.
        (A message of an earlier host has no plugin: it is for whoever pops it.)"""
        d = orjson.loads(raw)
        plugin = d.get("plugin")
        return cls(str(d["id"]), str(d["shard"]), str(d["tenant"]), str(d["source"]), str(d["name"]),
                   dict(d["payload"]), int(d["attempt"]), (), None if plugin is None else str(plugin),
                   float(d.get("queuedAt") or 0.0))


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_nul(v) for v in value)
    return False


def encode_event(name: str, payload: Mapping[str, Any]) -> str:
    """The payload as JSON text for the outbox; VALIDATION_FAILED for a bad name or payload.

    Names are dotted lower-case words (``inventory.item_created``); a payload is a JSON
    object of at most `MAX_EVENT_BYTES`, with no NUL character (PostgreSQL's jsonb refuses it).
    """
    if not isinstance(name, str) or len(name) > MAX_EVENT_NAME or not EVENT_NAME_RE.match(name):
        raise ValidationFailed("event names are dotted lower-case words like inventory.item_created",
                               field="name")
    if not isinstance(payload, Mapping):
        raise ValidationFailed("an event payload is a JSON object", field="payload")
    try:
        body = orjson.dumps(payload)
    except TypeError as exc:
        raise ValidationFailed(f"event payload is not JSON: {exc}", field="payload") from exc
    if len(body) > MAX_EVENT_BYTES:
        raise ValidationFailed(f"an event payload is at most {MAX_EVENT_BYTES} bytes of JSON", field="payload")
    if _has_nul(payload):
        raise ValidationFailed("an event payload may not contain NUL characters", field="payload")
    return body.decode()


async def write(db: Db, tenant_id: str, source: str, name: str, body: str, *,
                lease_s: float = OUTBOX_LEASE_S) -> str:
    """Add an event to the outbox inside ``db``'s transaction; its id.

    ``tenant_id`` must be the transaction's own (fenced) tenant, ``body`` from `encode_event`;
    the writer owns the first delivery for ``lease_s``, then a relay may take it.
    """
    return str(await db.fetchval(_WRITE_SQL, tenant_id, source, name, body, lease_s))


class OutboxStore:
    """The relay's and the deliverers' statements on the shards' outboxes (as the shard owner)."""

    def __init__(self, pools: ShardPools) -> None:
        self._pools = pools

    async def claim(self, shard_id: str, limit: int = OUTBOX_BATCH, lease_s: float = OUTBOX_LEASE_S, *,
                    names: Sequence[str] | None = None, subscribed: Sequence[str] | None = None) -> list[OutboxEvent]:
        """Up to ``limit`` due rows of ``shard_id``, now leased to the caller for ``lease_s``.

        With ``names`` (the event names the caller handles), only those rows and the rows
        of events no live host subscribes to (``subscribed``: every live subscription's
        event name; None when unknown, then only ``names``). Without, every due row."""
        pool = await self._pools.get(shard_id)
        if names is None:
            rows = await pool.fetch(_CLAIM_SQL, limit, lease_s, None, [])  # NOT (x = ANY('{}')): every row
        else:
            rows = await pool.fetch(_CLAIM_SQL, limit, lease_s, list(names),
                                    None if subscribed is None else list(subscribed))
        return [OutboxEvent(r["event_id"], shard_id, r["tenant_id"], r["source"], r["name"],
                            orjson.loads(r["payload"]), r["attempts"], tuple(r["handled_by"])) for r in rows]

    async def settle(self, shard_id: str, event_id: str, handled: Sequence[str], subscribers: Sequence[str] | None,
                     again_in_s: float | None = None, error: str | None = None) -> bool:
        """Record that ``handled`` plugins' handlers ran for the event; delivered (True) once
        every plugin of ``subscribers`` has (never when that is None); due again in
        ``again_in_s`` if given, with ``error`` as the reason."""
        pool = await self._pools.get(shard_id)
        delivered = await pool.fetchval(_SETTLE_SQL, event_id, list(handled),
                                        None if subscribers is None else list(subscribers), again_in_s,
                                        None if error is None else error[:500])
        return bool(delivered)

    async def extend(self, shard_id: str, event_ids: list[str], lease_s: float = OUTBOX_LEASE_S) -> None:
        """The events' leases run at least ``lease_s`` from now."""
        pool = await self._pools.get(shard_id)
        await pool.execute(_EXTEND_SQL, [uuid.UUID(e) for e in event_ids], lease_s)

    async def delivered(self, shard_id: str, event_ids: list[str]) -> None:
        pool = await self._pools.get(shard_id)
        await pool.execute(_DELIVERED_SQL, [uuid.UUID(e) for e in event_ids])

    async def retry_later(self, shard_id: str, event_id: str, delay_s: float, error: str) -> None:
        pool = await self._pools.get(shard_id)
        await pool.execute(_RETRY_SQL, event_id, delay_s, error[:500])

    async def cleanup(self, shard_id: str, retention_s: float = OUTBOX_RETENTION_S, limit: int = 10_000) -> int:
        """Delete up to ``limit`` rows delivered more than ``retention_s`` ago; how many."""
        pool = await self._pools.get(shard_id)
        status = await pool.execute(_CLEANUP_SQL, retention_s, limit)
        return int(status.split()[-1])


# initial * 2^(attempt-1), capped, plus up to a second of jitter: never sooner than the
# initial delay, so a failing handler is not hammered by every relay at once.
RETRY_WAIT = wait_exponential_jitter(initial=OUTBOX_RETRY_INITIAL_S, max=OUTBOX_RETRY_MAX_S, jitter=1.0)


def retry_delay(attempt: int) -> float:
    """Seconds before a failed delivery of attempt number ``attempt`` (1-based) is tried again."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(RETRY_WAIT(state))


Deliver = Callable[[list[OutboxEvent]], Awaitable[None]]
ShardIds = Callable[[], Awaitable[list[str]]]
# (event names this host handles, event names any live host handles or None if unknown)
Names = Callable[[], tuple[list[str], list[str] | None]]


class Relay:
    """Sweeps every shard's outbox for due rows and delivers them; one per host.

    ``deliver`` gets each claimed batch (and must settle every event in it, or leave it
    to its lease). With ``names`` (host.subscriptions.Subscriptions.names) it claims only
    the rows this host can move on (see `OutboxStore.claim`). `wake` makes the next sweep
    start now.
    """

    def __init__(self, store: OutboxStore, shard_ids: ShardIds, deliver: Deliver, *,
                 sweep_s: float = OUTBOX_SWEEP_S, lease_s: float = OUTBOX_LEASE_S,
                 names: Names | None = None) -> None:
        self._store = store
        self._shard_ids = shard_ids
        self._deliver = deliver
        self._sweep_s = sweep_s
        self._lease_s = lease_s
        self._names = names
        self._wake = asyncio.Event()
        self._shards: list[str] = []
        self._shards_read = -math.inf
        self._backoff: dict[str, tuple[int, float]] = {}   # shard -> (failures, not before)
        self._cleaned: dict[str, float] = {}
        self._busy: dict[str, asyncio.Task[None]] = {}  # shard -> its pass in progress (or last)
        self._shard_wait = wait_random_exponential(multiplier=OUTBOX_SWEEP_S, max=OUTBOX_SHARD_BACKOFF_MAX_S)
        self.sweeps = 0

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Sweep until cancelled; cancelling it cancels the shard sweeps it started."""
        try:
            while True:
                self._wake.clear()
                await self.sweep()
                try:
                    await asyncio.wait_for(self._wake.wait(), self._sweep_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            busy = [t for t in self._busy.values() if not t.done()]
            for t in busy:
                t.cancel()
            await asyncio.gather(*busy, return_exceptions=True)

    async def sweep(self) -> None:
        """One pass over every shard (concurrently): claim and deliver until nothing is due.

        Waits for the shards' passes at most one sweep interval: a shard whose pass hangs
        (a lock on its outbox, a server that stopped answering) goes on in the background
        and is skipped until it ends, so it never holds up the others. Re-raises a pass's
        unexpected error (a bug) here."""
        now = time.monotonic()
        if now - self._shards_read > OUTBOX_SHARDS_EVERY_S:
            try:
                self._shards = await self._shard_ids()
                self._shards_read = now
            except SHARD_ERRORS as exc:  # the control plane hiccuped: sweep the shards we know
                log.warning("outbox relay could not list shards (%s)", exc.__class__.__name__)
        for gone in [s for s, t in self._busy.items() if s not in self._shards and t.done()]:
            self._busy.pop(gone).result()
        passes: list[asyncio.Task[None]] = []
        for shard_id in self._shards:
            task = self._busy.get(shard_id)
            if task is not None and task.done():
                task.result()  # a pass that ended in the background: its bug surfaces here
            if task is None or task.done():
                task = asyncio.create_task(self._sweep_shard(shard_id), name=f"outbox:sweep:{shard_id}")
                self._busy[shard_id] = task
            passes.append(task)
        if passes:
            done, _ = await asyncio.wait(passes, timeout=self._sweep_s)
            for task in done:
                task.result()
        self.sweeps += 1

    async def _sweep_shard(self, shard_id: str) -> None:
        failures, not_before = self._backoff.get(shard_id, (0, 0.0))
        if time.monotonic() < not_before:
            return
        try:
            while True:
                if self._names is None:
                    batch = await self._store.claim(shard_id, lease_s=self._lease_s)
                else:
                    names, subscribed = self._names()
                    batch = await self._store.claim(shard_id, lease_s=self._lease_s, names=names,
                                                    subscribed=subscribed)
                if batch:
                    await self._deliver(batch)
                if len(batch) < OUTBOX_BATCH:
                    break
            if time.monotonic() - self._cleaned.get(shard_id, -math.inf) > OUTBOX_CLEANUP_EVERY_S:
                self._cleaned[shard_id] = time.monotonic()
                await self._store.cleanup(shard_id)
            self._backoff.pop(shard_id, None)
        except SHARD_ERRORS as exc:
            failures += 1
            delay = backoff_delay(self._shard_wait, failures)
            self._backoff[shard_id] = (failures, time.monotonic() + delay)
            log.warning("outbox relay: shard %s failed (%s); next sweep there in %.1fs", shard_id,
                        exc.__class__.__name__, delay, extra={"shardId": shard_id})
