"""The scenarios, the routes users call and the phases a run is split into.

A run's timeline (seconds from the start of the load):

    warmup [0, W)  steady [W, E)  event [E, max(E + event_min_s, operation end))  after [.., D)

``steady`` has no event: its phases are warmup and steady only. The event is what the
scenario does to the fleet under load: ``upgrade`` runs ``tenantfleet migrate apply
PLUGIN`` (the plugin's next version across the fleet); ``shard-slow`` runs ``tenantfleet
loadtest slow-shard SHARD`` (a bounded lock holder on one shard's tenants); ``move``
runs ``tenantfleet drain SHARD`` (every tenant of one shard moved to the others, online or
offline per the mover's ``auto`` mode) while `PinnedWriter` users keep writing to the
first tenants of that shard, whose client-side write pause (the longest gap between
acknowledged writes around their cutover) is judged.
"""
from __future__ import annotations

from dataclasses import dataclass

PHASES = ("warmup", "steady", "event", "after")
JUDGED_PHASES = ("steady", "event", "after")

# The routes a tenant's staff call, as "METHOD path" (the gate's and the SLO file's names).
ROUTES = ("GET /items", "GET /items/{id}", "POST /items", "PATCH /items/{id}", "GET /manifest")
ALL_ROUTES = "all routes"
# In `shard-slow`, requests of the slow shard's tenants are recorded under this prefix:
# reported, not judged (the SLO holds for the other shards' tenants).
SLOW_PREFIX = "[slow shard] "
# In `move`, the pinned writers' client-side write pause is judged as this route.
PINNED_ROUTE = "pinned writes"


@dataclass(frozen=True)
class Scenario:
    name: str
    has_event: bool
    summary: str
    available: bool = True
    unavailable_reason: str = ""


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("steady", False, "steady load: warm-up, then the steady phase judged"),
    Scenario("upgrade", True, "after warm-up and steady, `tenantfleet migrate apply PLUGIN` rolls the "
                              "plugin's next version across the fleet under load"),
    Scenario("shard-slow", True, "after warm-up and steady, one shard's tenants are held by a bounded lock "
                                 "holder (`tenantfleet loadtest slow-shard`); the other shards' tenants are judged"),
    Scenario("move", True, "after warm-up and steady, `tenantfleet drain SHARD` moves every tenant off one shard "
                           "under load; users pinned to its tenants measure their write pause"),
)}


@dataclass(frozen=True)
class Timeline:
    """When each phase starts, in seconds from the start of the load."""
    duration_s: float
    warmup_s: float
    steady_s: float
    event_min_s: float

    @property
    def event_at_s(self) -> float:
        return self.warmup_s + self.steady_s


def phase_at(t: float, timeline: Timeline, has_event: bool, event_end_s: float | None) -> str:
    """The phase of a request sent ``t`` seconds after the start.

    The event phase lasts from the event's start until the later of its end and
    ``event_min_s`` after its start; while the event runs (``event_end_s`` is None) it
    lasts until the end of the run."""
    if t < timeline.warmup_s:
        return "warmup"
    if not has_event or t < timeline.event_at_s:
        return "steady"
    end = None if event_end_s is None else max(event_end_s, timeline.event_at_s + timeline.event_min_s)
    if end is None or t < end:
        return "event"
    return "after"
