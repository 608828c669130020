"""Many moves at once: drains and rebalances, planned in `router.placement`, run here.

A batch runs `PlannedMove`s through one `Mover` with three limits: ``moves_concurrency``
overall, and ``moves_per_shard`` on every shard a move touches, as its source or its
target (each shard's `ShardLimiter`, the same per-shard limiter and backoff the fleet
migrator uses). PostgreSQL's replication limits are small (``max_replication_slots``,
``max_wal_senders``, ``max_logical_replication_workers``): a move over a limit waits in
the queue for a slot, it never starts and stalls. A move that fails on a shard error
backs both its shards off and is resumed (its recorded run, `Mover.resume`) up to
``MOVE_ATTEMPTS`` times; a move refused for what it is (pre-flight) is reported and not
retried.

Drains and rebalances are runs of their own (``fleet_runs`` kind ``drain`` /
``rebalance``, each move also a ``move`` run): running the same drain again finishes what
a crash left, first resuming the shard's open moves, then planning what is still there.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, AsyncContextManager, Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from router.directory import Directory
from router.errors import MoveFailed, MoveRefused, NoShardAvailable, TenantFleetError, ValidationFailed
from router.placement import (
    BY_CHOICES, MODES, By, PlannedMove, ShardLoad, TenantSize, loads_after, plan_drain, plan_rebalance,
)
from router.pools import ShardPools, connect
from router.settings import Settings
from shard_migrations.limiter import ShardLimiter
from shard_migrations.moves.mover import OPEN, MoveInfo, Mover, mover_pools
from shard_migrations.runs import owner_tag
from shard_migrations.slo_throttle import SloThrottle, throttle_api

log = logging.getLogger("tenantfleet.moves")

MOVE_ATTEMPTS = 3
# Refusals of the move itself: retrying can't help (the operator must act).
_FINAL = (MoveRefused, NoShardAvailable, ValidationFailed)
# What a move's phases are shown as in the progress display.
SHOWN_PHASES = ("queued", "preparing", "copying", "catching up", "verifying", "cutover", "cleaning up", "done",
                "failed")


class MoveMetrics:
    """Moves by outcome, bytes copied and the cutover pause, on the registry given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.moves = Counter("tenantfleet_moves_total", "Tenant moves finished, by outcome (done|failed|refused).",
                             ["source", "target", "outcome"], registry=registry)
        self.bytes = Counter("tenantfleet_move_bytes_copied_total", "Bytes copied by tenant moves (binary COPY).",
                             ["source", "target"], registry=registry)
        self.pause = Histogram("tenantfleet_move_cutover_pause_seconds",
                               "Writes held by a move's cutover (exclusive fence to commit point).",
                               ["target"], registry=registry,
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


@dataclass
class MoveOutcome:
    move: PlannedMove
    state: str = "queued"             # a SHOWN_PHASES entry
    run_id: int | None = None
    attempts: int = 0
    error: str | None = None
    code: str | None = None           # the error envelope's code
    info: dict[str, Any] = field(default_factory=dict)

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.move.to_api(), "state": self.state, "runId": self.run_id,
                               "attempts": self.attempts}
        for k in ("mode", "pauseMs", "bytesCopied", "copyMBps", "epochAfter", "stepsMs", "committedAt"):
            if k in self.info:
                out[k] = self.info[k]
        if self.error:
            out["error"] = self.error
            out["errorCode"] = self.code
        return out


_PHASE_SHOWN = {"preparing": "preparing", "prepared": "copying", "copying": "copying", "copied": "catching up",
                "catching up": "catching up", "caught_up": "verifying", "verifying": "verifying",
                "verified": "cutover", "cutover": "cutover", "switched": "cleaning up", "cleaning up": "cleaning up",
                "cleaned": "cleaning up", "done": "done"}


class MoveBatch:
    """Run planned moves under the overall and per-shard limits; `snapshot` feeds the
    progress display (one row per shard the batch moves tenants off)."""

    def __init__(self, directory: Directory, settings: Settings, mode: str, *,
                 metrics: MoveMetrics | None = None, on_change: Callable[[MoveOutcome], None] | None = None) -> None:
        if mode not in MODES:
            raise ValidationFailed(f"mode must be one of {', '.join(MODES)}", field="mode")
        self.directory = directory
        self.settings = settings
        self.mode = mode
        self.metrics = metrics
        self.on_change = on_change
        self.outcomes: list[MoveOutcome] = []
        self.limiters: dict[str, ShardLimiter] = {}
        self._overall = asyncio.Semaphore(settings.moves_concurrency)
        self._pools: ShardPools | None = None
        self.peak_in_flight = 0          # the most moves seen at once on one shard
        self.throttle: SloThrottle | None = None
        self.cpu: dict[str, Any] | None = None   # whether the moves yielded the CPU, and why (mover_pools)
        self._started = time.monotonic()

    def mode_for(self, move: PlannedMove) -> str:
        """``auto``: offline for a tenant up to ``move_offline_max_bytes``, else online."""
        if self.mode != "auto":
            return self.mode
        return "offline" if move.bytes <= self.settings.move_offline_max_bytes else "online"

    def limiter(self, shard_id: str) -> ShardLimiter:
        lim = self.limiters.get(shard_id)
        if lim is None:
            lim = self.limiters[shard_id] = ShardLimiter(shard_id, self.settings,
                                                         concurrency=self.settings.moves_per_shard)
        return lim

    async def run(self, moves: Sequence[PlannedMove], resume: Sequence[MoveInfo] = ()) -> list[MoveOutcome]:
        """Finish the open moves in ``resume`` and run ``moves``; returns every outcome."""
        todo: list[tuple[MoveOutcome, MoveInfo | None]] = []
        for info in resume:
            o = MoveOutcome(PlannedMove(info.tenant_id, info.source, info.target), run_id=info.run_id)
            todo.append((o, info))
        for m in moves:
            todo.append((MoveOutcome(m), None))
        self.outcomes.extend(o for o, _ in todo)
        async with mover_pools(self.directory, self.settings) as pools, \
                SloThrottle(self.settings.model_copy(
                                update={"slo_throttle_start_rate": self.settings.slo_throttle_move_start_rate}),
                            lambda: list(self.limiters.values()),
                            registry=self.metrics.registry if self.metrics else None,
                            shards={sid for o, _ in todo for sid in (o.move.source, o.move.target)},
                            limiter_for=self.limiter) as throttle:
            self._pools = pools
            self.cpu = dict(pools.note)
            self.throttle = throttle
            try:
                await asyncio.gather(*(self._one(o, info) for o, info in todo), return_exceptions=True)
            finally:
                self._pools = None
        return self.outcomes

    async def _one(self, o: MoveOutcome, info: MoveInfo | None) -> None:
        shards = sorted({o.move.source, o.move.target})  # a fixed order: two moves never wait on each other
        while True:
            # the shards' slots first (a shard backing off holds its waiters here), then one
            # of the overall permits: moves between healthy shards are never held up by it
            async with AsyncExitStack() as stack:
                for sid in shards:
                    await stack.enter_async_context(self.limiter(sid).slot())
                async with self._overall:
                    self.peak_in_flight = max(self.peak_in_flight, max(self.limiter(s).in_flight for s in shards))
                    o.attempts += 1
                    try:
                        await self._attempt(o, info)
                        for sid in shards:
                            self.limiter(sid).success()
                        self._count(o, "done")
                        return
                    except _FINAL as exc:
                        self._fail(o, exc, "refused")
                        return
                    except Exception as exc:  # a shard's error, or one no move should end a whole batch with
                        err = exc if isinstance(exc, TenantFleetError) else MoveFailed(
                            f"{exc.__class__.__name__}: {exc}", tenantId=o.move.tenant_id)
                        log.warning("move of tenant %s (%s -> %s), attempt %s: %s", o.move.tenant_id,
                                    o.move.source, o.move.target, o.attempts, err.message,
                                    exc_info=not isinstance(exc, TenantFleetError))
                        if o.run_id is not None:
                            try:
                                o.info.update((await Mover(self.directory, self.settings).load(o.run_id)).detail)
                            except Exception:
                                pass
                        if o.attempts >= MOVE_ATTEMPTS:
                            self._fail(o, err, "failed")
                            return
                        for sid in _blamed(err, shards):
                            self.limiter(sid).failure(err)
                        o.state = "queued"
                        self._changed(o)

    async def _attempt(self, o: MoveOutcome, info: MoveInfo | None) -> None:
        t0 = time.monotonic()
        marks: list[tuple[str, int]] = []
        o.info["phasesMs"] = marks

        def progress(phase: str, figures: dict[str, Any]) -> None:
            marks.append((phase, round((time.monotonic() - t0) * 1000)))
            if phase == "committed":   # wall clock: load tests find the tenant's cutover in their own timeline
                o.info["committedAt"] = round(time.time(), 3)
            shown = _PHASE_SHOWN.get(phase)
            if shown is not None and shown != o.state:
                o.state = shown
                self._changed(o)

        mover = Mover(self.directory, self.settings, progress=progress, pools=self._pools)
        if o.run_id is not None:
            done = await mover.resume(o.run_id)
        else:
            tenant = await self.directory.get(id=o.move.tenant_id)
            if tenant.shard_id != o.move.source:  # moved since the plan was made: nothing to do
                o.state = "done"
                o.info["skipped"] = f"already on {tenant.shard_id}"
                return
            done = await mover.start(tenant, o.move.target, self.mode_for(o.move),
                                     on_run=lambda run_id: setattr(o, "run_id", run_id))
        o.run_id = done.run_id
        o.info.update(done.detail)
        o.info["mode"] = done.mode
        o.state = "done"
        self._changed(o)

    def _fail(self, o: MoveOutcome, exc: TenantFleetError, outcome: str) -> None:
        o.state = "failed"
        o.error = exc.message
        o.code = exc.code
        self._count(o, outcome)
        self._changed(o)

    def _count(self, o: MoveOutcome, outcome: str) -> None:
        if self.metrics is None:
            return
        self.metrics.moves.labels(o.move.source, o.move.target, outcome).inc()
        if outcome == "done" and "skipped" not in o.info:
            self.metrics.bytes.labels(o.move.source, o.move.target).inc(o.info.get("bytesCopied", 0) or 0)
            if o.info.get("pauseMs") is not None:
                self.metrics.pause.labels(o.move.target).observe(o.info["pauseMs"] / 1000)

    def _changed(self, o: MoveOutcome) -> None:
        if self.on_change is not None:
            self.on_change(o)

    def snapshot(self) -> list[dict[str, Any]]:
        """Rows for `shard_migrations.progress.ProgressView`: per source shard, moves done,
        failed and waiting, the moves in each phase, the limiter's state, rate and ETA."""
        rows = []
        elapsed = max(time.monotonic() - self._started, 1e-6)
        for source in sorted({o.move.source for o in self.outcomes}):
            mine = [o for o in self.outcomes if o.move.source == source]
            done = sum(o.state == "done" for o in mine)
            failed = sum(o.state == "failed" for o in mine)
            active = {p: sum(o.state == p for o in mine) for p in SHOWN_PHASES[1:-2]}
            lim = self.limiter(source).snapshot()
            phases = ", ".join(f"{p} {n}" for p, n in active.items() if n)
            rate = done / elapsed
            left = len(mine) - done - failed
            rows.append({"shardId": source, "done": done, "total": len(mine), "failed": failed,
                         "deferred": sum(o.state == "queued" for o in mine),
                         "state": ", ".join(x for x in (lim.throttled, phases) if x) or lim.state,
                         "backoffS": lim.backoff_s, "rate": rate,
                         "etaS": (left / rate) if rate > 0 and left else None})
        return rows


def _blamed(err: TenantFleetError, shards: Sequence[str]) -> list[str]:
    """The shards a failure backs off: the one it names, else both of the move's."""
    named = err.details.get("shardId")
    return [str(named)] if named in shards else list(shards)


# --- drains and rebalances ------------------------------------------------------------------

@dataclass
class BatchReport:
    kind: str                      # drain | rebalance
    run_id: int | None
    planned: list[PlannedMove]
    outcomes: list[MoveOutcome]
    before: dict[str, ShardLoad]
    after: dict[str, ShardLoad]
    remaining: int = 0             # drain: tenants still on the shard afterwards
    seconds: float = 0.0
    throttle: dict[str, Any] | None = None   # what the SLO throttle did (None: it was off)
    cpu: dict[str, Any] | None = None        # whether the moves' backends yielded the CPU, at which load

    def to_api(self) -> dict[str, Any]:
        done = sum(o.state == "done" for o in self.outcomes)
        failed = [o for o in self.outcomes if o.state == "failed"]
        return {"kind": self.kind, "runId": self.run_id, "planned": len(self.planned), "done": done,
                "failed": len(failed), "remaining": self.remaining, "seconds": round(self.seconds, 2),
                "movesPerSecond": round(done / self.seconds, 2) if self.seconds > 0 else None,
                "shards": [_load_api(self.before[s], self.after.get(s)) for s in sorted(self.before)],
                "moves": [o.to_api() for o in self.outcomes], "sloThrottle": self.throttle,
                "cpuPriority": self.cpu}



def _load_api(before: ShardLoad, after: ShardLoad | None) -> dict[str, Any]:
    return {"shardId": before.shard_id, "state": before.state, "capacity": before.capacity,
            "tenantsBefore": before.tenants, "tenantsAfter": after.tenants if after else None,
            "bytesBefore": before.bytes, "bytesAfter": after.bytes if after else None}


async def fleet_loads(directory: Directory, settings: Settings) -> tuple[dict[str, ShardLoad], list[TenantSize]]:
    """Every shard's figures and every movable tenant's size (its schema's relations, from
    its shard's catalog). A shard that can't be reached is left out of the sizes (its
    tenants count, with 0 bytes)."""
    shards = await directory.list_shards()
    rows = await directory.control.fetch(
        "SELECT tenant_id::text AS tenant_id, shard_id, schema_name FROM tenants "
        "WHERE state IN ('active', 'suspended') ORDER BY tenant_id")
    sizes: dict[str, int] = {}
    for s in shards:
        names = [r["schema_name"] for r in rows if r["shard_id"] == s.shard_id]
        if not names:
            continue
        try:
            conn = await connect(s.dsn, settings)
        except TenantFleetError:
            continue
        try:
            for r in await conn.fetch(
                    "SELECT n.nspname, sum(pg_catalog.pg_total_relation_size(c.oid))::bigint AS bytes "
                    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'm') GROUP BY n.nspname", names):
                sizes[r["nspname"]] = int(r["bytes"])
        finally:
            await conn.close()
    tenants = [TenantSize(r["tenant_id"], r["shard_id"], sizes.get(r["schema_name"], 0)) for r in rows]
    loads = {s.shard_id: ShardLoad(s.shard_id, s.state, s.capacity, s.tenants,
                                   sum(t.bytes for t in tenants if t.shard_id == s.shard_id)) for s in shards}
    return loads, tenants


async def open_moves(directory: Directory, *, source: str | None = None) -> list[MoveInfo]:
    """Moves recorded and not finished (a crash, a kill, a failure), optionally off one shard."""
    mover = Mover(directory, directory.settings)
    ids = await directory.control.fetch(
        "SELECT run_id FROM tenant_moves WHERE phase = ANY($1::text[]) AND ($2::text IS NULL OR source_shard = $2) "
        "ORDER BY run_id", list(OPEN), source)
    return [await mover.load(r["run_id"]) for r in ids]


async def _record(directory: Directory, kind: str, params: dict[str, Any]) -> int:
    run_id: int = await directory.control.fetchval(
        "INSERT INTO fleet_runs (kind, params, state, owner, heartbeat_at) VALUES ($1, $2::jsonb, 'running', $3, now()) "
        "RETURNING run_id", kind, params, owner_tag())
    return run_id


async def _finish(directory: Directory, report: BatchReport) -> None:
    state = "done" if not any(o.state == "failed" for o in report.outcomes) and report.remaining == 0 else "failed"
    summary = report.to_api()
    summary.pop("moves")
    await directory.control.execute(
        "UPDATE fleet_runs SET state = $2, summary = $3::jsonb, finished_at = now(), updated_at = now() "
        "WHERE run_id = $1", report.run_id, state, summary)


async def drain(directory: Directory, settings: Settings, shard_id: str, *, mode: str = "auto",
                by: By = "bytes", plan_only: bool = False, metrics: MoveMetrics | None = None,
                batch_view: Callable[[MoveBatch], AsyncContextManager[Any]] | None = None) -> BatchReport:
    """Set ``shard_id`` draining (no new placements) and move every tenant off it.

    Running it again resumes: the shard's open moves are finished first, then whatever
    is still on it is planned and moved. With ``plan_only`` nothing changes (not even the
    shard's state). Raises SHARD_NOT_FOUND, NO_SHARD_AVAILABLE (the other shards can't
    hold its tenants: nothing is moved), VALIDATION_FAILED."""
    if by not in BY_CHOICES:
        raise ValidationFailed(f"by must be one of {', '.join(BY_CHOICES)}", field="by")
    shard = await directory.get_shard(shard_id)  # SHARD_NOT_FOUND
    loads, tenants = await fleet_loads(directory, settings)
    if shard.state == "active" and not plan_only:
        await directory.set_shard_state(shard_id, "draining")
        loads[shard_id] = ShardLoad(shard_id, "draining", shard.capacity, loads[shard_id].tenants,
                                    loads[shard_id].bytes)
    resume = await open_moves(directory, source=shard_id)
    busy = {m.tenant_id for m in resume}
    plan = plan_drain(shard_id, [t for t in tenants if t.tenant_id not in busy], list(loads.values()), by=by)
    before = dict(loads)
    if plan_only:
        return BatchReport("drain", None, plan, [MoveOutcome(m) for m in plan], before,
                           dict(loads_after(list(loads.values()), plan)))
    report = await _run_batch(directory, settings, "drain", {"shardId": shard_id, "mode": mode, "by": by}, plan,
                              resume, before, mode, metrics, batch_view)
    report.remaining = await directory.control.fetchval("SELECT count(*) FROM tenants WHERE shard_id = $1", shard_id)
    await _finish(directory, report)
    return report


async def rebalance(directory: Directory, settings: Settings, *, by: By = "count", tolerance: float = 0.1,
                    apply: bool = False, mode: str = "auto", metrics: MoveMetrics | None = None,
                    batch_view: Callable[[MoveBatch], AsyncContextManager[Any]] | None = None) -> BatchReport:
    """The fewest moves that bring every active shard within ``tolerance`` of the mean load
    (``by`` tenant count or bytes); shown, and run with ``apply``."""
    if mode not in MODES:
        raise ValidationFailed(f"mode must be one of {', '.join(MODES)}", field="mode")
    loads, tenants = await fleet_loads(directory, settings)
    busy = {m.tenant_id for m in await open_moves(directory)}
    plan = plan_rebalance(list(loads.values()), [t for t in tenants if t.tenant_id not in busy], by=by,
                          tolerance=tolerance)
    before = dict(loads)
    if not apply:
        return BatchReport("rebalance", None, plan, [MoveOutcome(m) for m in plan], before,
                           dict(loads_after(list(loads.values()), plan)))
    report = await _run_batch(directory, settings, "rebalance", {"by": by, "tolerance": tolerance, "mode": mode},
                              plan, [], before, mode, metrics, batch_view)
    await _finish(directory, report)
    return report


async def _run_batch(directory: Directory, settings: Settings, kind: str, params: dict[str, Any],
                     plan: list[PlannedMove], resume: Sequence[MoveInfo], before: dict[str, ShardLoad], mode: str,
                     metrics: MoveMetrics | None,
                     batch_view: Callable[[MoveBatch], AsyncContextManager[Any]] | None) -> BatchReport:
    """Record a ``kind`` run, run its moves (``resume`` first) and report the shards after."""
    run_id = await _record(directory, kind, params)
    started = time.monotonic()
    batch = MoveBatch(directory, settings, mode, metrics=metrics)
    async with batch_view(batch) if batch_view is not None else nullcontext():
        outcomes = await batch.run(plan, resume)
    after_loads, _ = await fleet_loads(directory, settings)
    return BatchReport(kind, run_id, plan, outcomes, before, after_loads, seconds=time.monotonic() - started,
                       throttle=throttle_api(batch.throttle), cpu=batch.cpu)
