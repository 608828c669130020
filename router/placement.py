"""Placement decisions for moves, drains and rebalances: pure functions, no I/O.

The directory (`router.directory`) and the mover (`shard_migrations.moves`) feed them
the fleet's figures and carry out what they return. A shard's *load* is its tenants (or
bytes) relative to its capacity weight, so shards of different sizes fill evenly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

from router.errors import NoShardAvailable, ShardNotFound, ValidationFailed

By = Literal["count", "bytes"]
BY_CHOICES: tuple[By, ...] = ("count", "bytes")
# How a batch (drain, rebalance) moves each tenant: `auto` picks offline for small tenants.
MODES = ("auto", "online", "offline")


@dataclass(frozen=True)
class ShardLoad:
    shard_id: str
    state: str
    capacity: int          # tenants the shard may hold
    tenants: int
    bytes: int = 0

    def has_room(self, extra: int = 1) -> bool:
        return self.state == "active" and self.tenants + extra <= self.capacity


@dataclass(frozen=True)
class TenantSize:
    tenant_id: str
    shard_id: str
    bytes: int = 0


@dataclass(frozen=True)
class PlannedMove:
    tenant_id: str
    source: str
    target: str
    bytes: int = 0

    def to_api(self) -> dict[str, object]:
        return {"tenantId": self.tenant_id, "from": self.source, "to": self.target, "bytes": self.bytes}


@dataclass
class _Shard:
    load: ShardLoad
    tenants: int
    bytes: int
    members: list[TenantSize] = field(default_factory=list)

    def value(self, by: By) -> float:
        return (self.tenants if by == "count" else self.bytes) / self.load.capacity


def check_target(source: ShardLoad, target: ShardLoad | None, target_id: str) -> None:
    """Why ``target`` can't take a tenant from ``source``: VALIDATION_FAILED (same shard),
    SHARD_NOT_FOUND (``target`` None: not registered), NO_SHARD_AVAILABLE
    (not active, or full)."""
    if target is None:
        raise ShardNotFound(f"shard {target_id} is not registered", shardId=target_id)
    if target.shard_id == source.shard_id:
        raise ValidationFailed(f"the tenant is already on shard {target.shard_id}", field="to")
    if target.state != "active":
        raise NoShardAvailable(f"shard {target.shard_id} is {target.state}: moves go to active shards only",
                               shardId=target.shard_id)
    if not target.has_room():
        raise NoShardAvailable(f"shard {target.shard_id} is full ({target.tenants} of {target.capacity} tenants)",
                               shardId=target.shard_id)


def choose_target(loads: Iterable[ShardLoad], *, exclude: str, size: int = 0, by: By = "count") -> ShardLoad:
    """The active shard with room and the lowest load (ties: by id) for one tenant leaving
    ``exclude``. NO_SHARD_AVAILABLE if there is none."""
    best: ShardLoad | None = None
    best_key: tuple[float, str] | None = None
    for s in loads:
        if s.shard_id == exclude or not s.has_room():
            continue
        key = (((s.tenants + 1) if by == "count" else (s.bytes + size)) / s.capacity, s.shard_id)
        if best_key is None or key < best_key:
            best, best_key = s, key
    if best is None:
        raise NoShardAvailable(f"no active shard with room to take a tenant from {exclude}", shardId=exclude)
    return best


def plan_drain(source: str, tenants: Sequence[TenantSize], loads: Sequence[ShardLoad], *,
               by: By = "bytes") -> list[PlannedMove]:
    """Every tenant of ``source`` to the active shard with room and the lowest load at
    that point, largest tenants first (they are the hardest to fit). NO_SHARD_AVAILABLE
    if the other shards can't hold them all; nothing is planned then."""
    shards = {s.shard_id: _Shard(s, s.tenants, s.bytes) for s in loads if s.shard_id != source}
    moves: list[PlannedMove] = []
    for t in sorted((t for t in tenants if t.shard_id == source), key=lambda t: (-t.bytes, t.tenant_id)):
        candidates = [sh for sh in shards.values() if sh.load.state == "active" and sh.tenants < sh.load.capacity]
        if not candidates:
            raise NoShardAvailable(f"the other active shards have no room for the {len(tenants)} tenants of {source}",
                                   shardId=source, planned=len(moves))
        pick = min(candidates, key=lambda sh: (_after(sh, t, by), sh.load.shard_id))
        pick.tenants += 1
        pick.bytes += t.bytes
        moves.append(PlannedMove(t.tenant_id, source, pick.load.shard_id, t.bytes))
    return moves


def _after(sh: _Shard, t: TenantSize, by: By) -> float:
    return ((sh.tenants + 1) if by == "count" else (sh.bytes + t.bytes)) / sh.load.capacity


def plan_rebalance(loads: Sequence[ShardLoad], tenants: Sequence[TenantSize], *, by: By = "count",
                   tolerance: float = 0.1, max_moves: int = 10_000) -> list[PlannedMove]:
    """Moves that bring every active shard's load within ``tolerance`` (a fraction) of the
    mean, greedily from the most to the least loaded shard, each move the tenant that
    closes the gap most without overshooting it. Fewest moves in practice: a move is
    planned only while it reduces the spread; a tenant moves at most once.

    Only ``active`` shards take or give tenants here (drain empties the others).
    """
    if by not in BY_CHOICES:
        raise ValidationFailed(f"by must be one of {', '.join(BY_CHOICES)}", field="by")
    if not 0 <= tolerance < 1:
        raise ValidationFailed("tolerance must be a fraction in [0, 1), e.g. 0.1 for 10%", field="tolerance")
    active = {s.shard_id: _Shard(s, s.tenants, s.bytes) for s in loads if s.state == "active"}
    if len(active) < 2:
        return []
    for t in tenants:
        if t.shard_id in active:
            active[t.shard_id].members.append(t)
    total_cap = sum(sh.load.capacity for sh in active.values())
    mean = sum((sh.tenants if by == "count" else sh.bytes) for sh in active.values()) / total_cap
    moved: set[str] = set()
    moves: list[PlannedMove] = []
    while len(moves) < max_moves:
        hi = max(active.values(), key=lambda sh: (sh.value(by), sh.load.shard_id))
        lo = min(active.values(), key=lambda sh: (sh.value(by), sh.load.shard_id))
        spread_before = hi.value(by) - lo.value(by)
        if hi.value(by) <= mean * (1 + tolerance) + 1e-12 and lo.value(by) >= mean * (1 - tolerance) - 1e-12:
            break
        if lo.tenants >= lo.load.capacity:
            break
        best: TenantSize | None = None
        best_spread = spread_before
        for t in hi.members:
            if t.tenant_id in moved:
                continue
            w = 1 if by == "count" else t.bytes
            new_hi = (_weight(hi, by) - w) / hi.load.capacity
            new_lo = (_weight(lo, by) + w) / lo.load.capacity
            spread = abs(new_hi - new_lo)
            if spread < best_spread - 1e-12:
                best, best_spread = t, spread
        if best is None:
            break
        hi.members.remove(best)
        lo.members.append(best)
        hi.tenants -= 1
        lo.tenants += 1
        hi.bytes -= best.bytes
        lo.bytes += best.bytes
        moved.add(best.tenant_id)
        moves.append(PlannedMove(best.tenant_id, hi.load.shard_id, lo.load.shard_id, best.bytes))
    return moves


def _weight(sh: _Shard, by: By) -> int:
    return sh.tenants if by == "count" else sh.bytes


def loads_after(loads: Sequence[ShardLoad], moves: Sequence[PlannedMove]) -> Mapping[str, ShardLoad]:
    """The shards' figures once ``moves`` are done (what `rebalance --plan` shows)."""
    out = {s.shard_id: s for s in loads}
    for m in moves:
        src, dst = out[m.source], out[m.target]
        out[m.source] = ShardLoad(src.shard_id, src.state, src.capacity, src.tenants - 1, src.bytes - m.bytes)
        out[m.target] = ShardLoad(dst.shard_id, dst.state, dst.capacity, dst.tenants + 1, dst.bytes + m.bytes)
    return out
