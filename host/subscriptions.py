"""Which plugins handle which events, fleet-wide (the control plane's ``event_subscriptions``).

During a rolling deploy hosts differ: one has a plugin (or a version of it with a
handler) that another lacks. An event is delivered to every *subscription* (plugin id
and event name) some live host has, and settled once each of them handled it (see
host/events.py). Each host writes its own subscriptions with a heartbeat every
`SUBSCRIPTIONS_EVERY_S` and reads everybody's; a subscription not refreshed within
`SUBSCRIPTION_TTL_S` belongs to a host that is gone. A host that stops, even cleanly,
leaves its rows to lapse: in a rolling deploy the host that replaces it comes back
within the TTL with the same subscriptions, and the events written meanwhile wait for
it (in its subscriptions' Redis lists, or in the outbox). The map lives in PostgreSQL,
not Redis, so it holds through a Redis outage; delivery reads it from memory (no round
trip on the request path).

Until the map was read once, `live` answers None (unknown): nothing is dropped for want
of a subscriber then, events wait for their lease instead.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Callable, Collection

import asyncpg

from host.keys import SUBSCRIPTION_TTL_S, SUBSCRIPTIONS_EVERY_S, SUBSCRIPTIONS_FORGET_S
from host.outbox import SHARD_ERRORS

log = logging.getLogger("tenantfleet.host.subscriptions")

Own = Callable[[], Collection[tuple[str, str]]]

# This host's rows, all in one statement: the ones it no longer has go, the others are
# (re)written with a fresh seen_at.
_PUBLISH_SQL = """
WITH mine AS (SELECT * FROM unnest($2::text[], $3::text[]) AS m(plugin_id, event_name)),
gone AS (DELETE FROM event_subscriptions e WHERE e.host_id = $1
         AND NOT EXISTS (SELECT 1 FROM mine m WHERE m.plugin_id = e.plugin_id AND m.event_name = e.event_name))
INSERT INTO event_subscriptions (host_id, plugin_id, event_name, seen_at)
SELECT $1, plugin_id, event_name, now() FROM mine
ON CONFLICT (host_id, plugin_id, event_name) DO UPDATE SET seen_at = now()
"""
_LIVE_SQL = ("SELECT DISTINCT plugin_id, event_name FROM event_subscriptions "
             "WHERE seen_at > now() - make_interval(secs => $1)")
_FORGET_SQL = "DELETE FROM event_subscriptions WHERE seen_at < now() - make_interval(secs => $1)"


class Subscriptions:
    """This host's subscriptions (from ``own``) published, and the fleet's read, in `run`.

    Without a control pool (a bus of a test's own) the fleet is this host alone.
    """

    def __init__(self, control: asyncpg.Pool | None, own: Own, *, every_s: float = SUBSCRIPTIONS_EVERY_S,
                 ttl_s: float = SUBSCRIPTION_TTL_S, host_id: str | None = None) -> None:
        self._control = control
        self._own = own
        self.every_s = every_s
        self.ttl_s = ttl_s
        self.host_id = host_id or uuid.uuid4().hex
        self._fleet: dict[str, frozenset[str]] | None = {} if control is None else None
        self._wake = asyncio.Event()
        self.refreshed = 0  # completed publish-and-read rounds

    def mine(self, name: str) -> set[str]:
        """The plugins with a handler of ``name`` on this host."""
        return {p for p, n in self._own() if n == name}

    def live(self, name: str) -> frozenset[str] | None:
        """The plugins with a handler of ``name`` on some live host (this one included);
        None while the fleet's map has never been read."""
        if self._fleet is None:
            return None
        return self._fleet.get(name, frozenset()) | self.mine(name)

    def names(self) -> tuple[list[str], list[str] | None]:
        """(event names this host handles, event names some live host handles or None if unknown)."""
        own = sorted({n for _, n in self._own()})
        if self._fleet is None:
            return own, None
        return own, sorted(set(self._fleet) | set(own))

    def changed(self) -> None:
        """A handler was added here: publish now rather than at the next heartbeat."""
        self._wake.set()

    async def refresh(self) -> None:
        """Publish this host's rows and read the fleet's (raises what the control plane raises)."""
        if self._control is None:
            self.refreshed += 1
            return
        own = sorted(set(self._own()))
        async with self._control.acquire() as conn:
            await conn.execute(_PUBLISH_SQL, self.host_id, [p for p, _ in own], [n for _, n in own])
            rows = await conn.fetch(_LIVE_SQL, self.ttl_s)
            if self.refreshed % 100 == 0:
                await conn.execute(_FORGET_SQL, SUBSCRIPTIONS_FORGET_S)
        fleet: dict[str, set[str]] = {}
        for r in rows:
            fleet.setdefault(r["event_name"], set()).add(r["plugin_id"])
        self._fleet = {n: frozenset(ps) for n, ps in fleet.items()}
        self.refreshed += 1

    async def run(self) -> None:
        """Heartbeat until cancelled; a control plane that is down keeps the last map read."""
        while True:
            self._wake.clear()
            try:
                await self.refresh()
            except SHARD_ERRORS as exc:
                log.warning("event subscriptions not refreshed (%s); using the last ones read",
                            exc.__class__.__name__)
            try:
                await asyncio.wait_for(self._wake.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass
