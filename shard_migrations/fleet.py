"""A fleet run: one plugin to one version on every shard and tenant.

Order: the public scope on every shard, then every tenant's scope (on each shard whose
public scope succeeded), then ``version_installed``: per tenant as each finishes, and in
``sys_plugins`` once every targeted tenant has it. Per shard, units are taken in batches
of ``batch_size`` (the shard is probed before each batch) by ``concurrency`` workers
that go through the shard's `ShardLimiter`. A unit whose advisory lock is busy or whose
DDL hit ``lock_timeout`` is set aside with its own backoff while the shard goes on; a
shard that errors backs off alone, and one that stays down for ``shard_give_up_s`` is
reported with its items failed while the other shards finish (one whose ledger can't be
read when the run starts is reported at once). A resumed run re-plans
its open items from the ledgers, so nothing is applied twice and nothing is skipped.

Moves: a tenant a move holds (`engine.TenantHeld`) is set aside with the same backoff
and come back to, for up to ``migrate_move_wait_s`` (a move may outlast
``shard_give_up_s``), never failed for it. A tenant that was moved off the shard its
unit was planned on (`engine.TenantMovedAway`) is re-read from the directory and its
unit applied on the shard that serves it now (after that shard's public-scope files of
this run, through that shard's limiter), whichever shard's workers pick it up again.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import asyncpg
from tenacity import wait_random_exponential

from router.errors import MigrationFailed, ShardUnreachable, TenantFleetError, ValidationFailed
from router.pools import ShardPools
from router.settings import Settings
from shard_migrations import ledger, runs
from shard_migrations.engine import (
    TenantHeld, TenantMovedAway, Unit, apply_unit, classify, current_placement, public_key, tenant_key,
    try_in_rollback,
)
from shard_migrations.keys import UNIT_BACKOFF_INITIAL_S, UNIT_BACKOFF_MAX_S
from shard_migrations.limiter import ShardLimiters, backoff_delay
from shard_migrations.slo_throttle import SloThrottle, throttle_api
from shard_migrations.metrics import MigrateMetrics
from shard_migrations.packages import MigrationFile, PluginPackage
from shard_migrations.plan import Plan, ShardPlan, Target, build_plan, check_not_downgrade, resolve_target

log = logging.getLogger("tenantfleet.migrate")


@dataclass(frozen=True)
class RunOptions:
    to: str | None = None
    from_file: str | None = None
    tenant_ids: tuple[str, ...] | None = None
    allow_drift: bool = False
    batch_size: int | None = None
    concurrency: int | None = None

    def params(self) -> dict[str, Any]:
        return {"to": self.to, "from": self.from_file,
                "tenants": None if self.tenant_ids is None else list(self.tenant_ids)}


@dataclass
class ShardProgress:
    shard_id: str
    total: int = 0
    done: int = 0
    failed: int = 0
    files: int = 0
    deferred: int = 0
    started: float | None = None
    finished: float | None = None
    error: str | None = None

    def rate(self) -> float:
        if self.started is None:
            return 0.0
        took = (self.finished or time.monotonic()) - self.started
        return self.done / took if took > 0 else 0.0

    def eta_s(self) -> float | None:
        r = self.rate()
        left = self.total - self.done - self.failed
        return None if r <= 0 or left <= 0 else left / r


@dataclass
class RunReport:
    run_id: int
    plugin: str
    version: str
    state: str
    shards: dict[str, ShardProgress]
    applied_files: int
    failed_items: list[tuple[str, str]] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    drift_allowed: int = 0
    throttle: dict[str, Any] | None = None   # what the SLO throttle did (None: it was off)

    def to_dict(self) -> dict[str, Any]:
        """The report as `migrate apply --json` prints it (camelCase keys)."""
        return {"runId": self.run_id, "plugin": self.plugin, "version": self.version, "state": self.state,
                "appliedFiles": self.applied_files, "driftAllowed": self.drift_allowed,
                "shards": [{"shardId": s.shard_id, "units": s.total, "done": s.done, "failed": s.failed,
                            "files": s.files, "rate": round(s.rate(), 1), "error": s.error}
                           for s in self.shards.values()],
                "unreachable": runs.unreachable_list(self.unreachable),
                "failedItems": [{"itemKey": k, "error": e} for k, e in self.failed_items[:50]],
                "sloThrottle": self.throttle}

    def raise_for_failure(self) -> None:
        """SHARD_UNREACHABLE naming the shards that stayed down, or MIGRATION_FAILED for failed items."""
        hint = f"; the rest is done; finish with `migrate apply {self.plugin} --resume {self.run_id}`"
        if self.unreachable:
            sid, why = next(iter(self.unreachable.items()))
            more = f" (and {len(self.unreachable) - 1} more shards)" if len(self.unreachable) > 1 else ""
            raise ShardUnreachable(f"run {self.run_id}: shard {sid} stayed unreachable{more}: {why}{hint}",
                                   runId=self.run_id, shards=sorted(self.unreachable))
        if self.failed_items:
            key, why = self.failed_items[0]
            raise MigrationFailed(f"run {self.run_id}: {len(self.failed_items)} items failed, first {key}: {why}{hint}",
                                  runId=self.run_id)


@dataclass(order=True)
class _Pending:
    not_before: float
    seq: int
    unit: Unit = field(compare=False)
    attempts: int = field(default=0, compare=False)
    failing_since: float | None = field(default=None, compare=False)
    held_since: float | None = field(default=None, compare=False)   # a move holds the tenant


def _first_error(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in eg.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return eg.exceptions[0]


class FleetMigrator:
    """Plans, dry-runs and applies one plugin across the fleet. Open ``pools`` with
    `migration_pools` (sized for the workers)."""

    def __init__(self, control: asyncpg.Pool, pools: ShardPools, settings: Settings, package: PluginPackage, *,
                 metrics: MigrateMetrics | None = None, limiters: ShardLimiters | None = None) -> None:
        self.control = control
        self.pools = pools
        self.settings = settings
        self.package = package
        self.metrics = metrics
        self.limiters = limiters
        self.throttle: SloThrottle | None = None   # the SLO throttle of the current run
        self.progress: dict[str, ShardProgress] = {}
        self.run_id: int | None = None
        self._seq = itertools.count()
        self._unit_wait = wait_random_exponential(multiplier=UNIT_BACKOFF_INITIAL_S, max=UNIT_BACKOFF_MAX_S)
        self._public_files: tuple[MigrationFile, ...] = ()   # the run's public-scope files (for re-routed units)
        self.rerouted = 0   # tenant units applied on another shard than planned (the tenant moved)

    # --- plan and dry-run ------------------------------------------------------------------
    async def plan(self, opts: RunOptions) -> Plan:
        """The plan for ``opts``. Raises VALIDATION_FAILED (unknown/downgrade version, bad --from),
        TENANT_NOT_FOUND."""
        target = resolve_target(self.package, opts.to, opts.from_file)
        await check_not_downgrade(self.control, target)
        plan = await build_plan(self.control, self.pools, target, tenant_ids=opts.tenant_ids)
        plan.raise_if_downgrade()
        return plan

    async def dry_run(self, plan: Plan) -> list[dict[str, Any]]:
        """Try the pending files on one canary tenant per shard (and the shard's pending public
        files) in a transaction that is rolled back. One result per shard: ``ok`` with the
        files tried, or the error. Nothing is recorded."""
        async def one(sp: ShardPlan) -> dict[str, Any]:
            res: dict[str, Any] = {"shardId": sp.shard_id, "canary": None, "tried": [], "ok": True, "error": None}
            units: list[Unit] = []
            if sp.public_pending:
                units.append(Unit(sp.shard_id, "public", None, tuple(sp.public_pending)))
            if sp.tenants:
                canary = sp.tenants[0]
                res["canary"] = canary.tenant.code
                units.append(Unit(sp.shard_id, "tenant", canary.tenant, tuple(canary.pending)))
            if not sp.reachable:
                return res | {"ok": False, "error": sp.error}
            if not units:
                return res
            try:
                pool = await self.pools.get(sp.shard_id)
                async with pool.acquire(timeout=self.settings.connect_timeout_s) as conn:
                    res["tried"] = await try_in_rollback(conn, units, self.settings)
            except TenantFleetError as exc:
                return res | {"ok": False, "error": exc.message}
            except Exception as exc:
                if classify(exc) == "fatal":
                    raise
                return res | {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}
            return res

        return list(await asyncio.gather(*(one(sp) for sp in plan.shards.values())))

    # --- apply -------------------------------------------------------------------------------
    async def apply(self, opts: RunOptions, *, resume: int | None = None,
                    on_run: Callable[[int], None] | None = None) -> RunReport:
        """Run (or resume run ``resume``) to completion and return its report; the run's state
        is ``done`` or ``failed`` (some shard stayed down or items failed; see the report).

        Raises before anything is applied: VALIDATION_FAILED, PLUGIN_NOT_FOUND (resume of
        another plugin's run), RUN_NOT_FOUND, TENANT_NOT_FOUND, MIGRATION_DRIFT (unless
        ``allow_drift``). Raises during the run, after recording it as failed:
        MIGRATION_FAILED (a file's SQL fails; names file, shard, tenant) and MIGRATION_DRIFT.
        """
        open_items: list[runs.OpenItem] = []
        if resume is not None:
            info = await runs.load_run(self.control, resume)
            if info.plugin_id != self.package.id:
                raise ValidationFailed(f"run {resume} migrates {info.plugin_id}, not {self.package.id}", runId=resume)
            p = info.params
            opts = RunOptions(to=info.target_version, from_file=p.get("from"),
                              tenant_ids=None if p.get("tenants") is None else tuple(p["tenants"]),
                              allow_drift=opts.allow_drift, batch_size=opts.batch_size, concurrency=opts.concurrency)
            open_items = await runs.open_items(self.control, resume)
        target = resolve_target(self.package, opts.to, opts.from_file)
        await check_not_downgrade(self.control, target)
        if resume is not None:
            plan = await build_plan(self.control, self.pools, target,
                                    tenant_ids=[i.tenant_id for i in open_items if i.tenant_id is not None],
                                    shard_ids=[i.shard_id for i in open_items if i.tenant_id is None], strict=False)
        else:
            plan = await build_plan(self.control, self.pools, target, tenant_ids=opts.tenant_ids)
        plan.raise_if_downgrade()
        if plan.drift and not opts.allow_drift:
            raise ledger.drift_error(plan.drift)
        await runs.ensure_registry(self.control, self.package)
        version = str(target.version)
        if resume is None:
            run_id = await runs.create_run(self.control, self.package.id, version, opts.params(), plan.item_keys())
        else:
            run_id = resume
            await runs.claim(self.control, run_id)
        self.run_id = run_id
        if on_run is not None:
            on_run(run_id)
        attempts = {i.key: i.attempts for i in open_items}
        limiters = self.limiters or ShardLimiters(self.settings, opts.concurrency)
        self.limiters = limiters
        batch = opts.batch_size or self.settings.batch_size
        report = RunReport(run_id, self.package.id, version, "running", self.progress, 0,
                           drift_allowed=len(plan.drift))
        async with runs.RunRecorder(self.control, run_id, self.package.id, version, batch,
                                    summary=lambda: self._summary(report)) as rec:
            try:
                if resume is not None:
                    planned = {k for k, *_ in plan.item_keys()}
                    live = {t for s in plan.shards.values() for t in (*s.up_to_date, *(x.tenant.tenant_id for x in s.tenants))}
                    for item in open_items:
                        if item.key in planned:
                            continue
                        if item.tenant_id is not None and item.tenant_id not in live:
                            rec.skipped(item.key, "tenant is no longer active or suspended")
                        else:  # the ledger says it's there (applied before the kill, or by another migrator)
                            rec.done(item.key, item.attempts, item.tenant_id)
                # the up-to-date tenants whose registry row says otherwise (usually none; the flip's
                # own check would skip the others, but only after the whole list went to the server)
                current = [s.up_to_date for s in plan.shards.values() if s.reachable and s.up_to_date]
                stale = await runs.not_at_version(self.control, self.package.id, version) if current else set()
                if stale:
                    rec.flip(t for ids in current for t in ids if t in stale)
                async with SloThrottle(self.settings, limiters.all,
                                       registry=self.metrics.registry if self.metrics else None,
                                       shards=[sid for sid, sp in plan.shards.items() if sp.tenants],
                                       limiter_for=limiters.get) as throttle:
                    self.throttle = throttle
                    try:
                        await self._run_phases(plan, target, opts, batch, limiters, rec, attempts, report)
                    finally:
                        report.throttle = throttle_api(throttle)
            except BaseException as exc:
                report.state = "failed"
                summary = self._summary(report) | {"error": getattr(exc, "message", None) or repr(exc)}
                try:
                    await rec.flush()
                    await asyncio.shield(runs.finish(self.control, run_id, "failed", summary))
                except runs.DB_ERRORS:  # the control plane is gone too: keep the run's own error
                    log.warning("run %s: could not record the failure", run_id, exc_info=True)
                raise
        report.state = "failed" if report.unreachable or report.failed_items else "done"
        if report.state == "done" and opts.tenant_ids is None:
            await runs.flip_plugin(self.control, self.package, version)
        await runs.finish(self.control, run_id, report.state, self._summary(report))
        return report

    def _summary(self, report: RunReport) -> dict[str, Any]:
        """What the heartbeat stores for `status`: totals and each shard's live state."""
        shards = [{k: row[k] for k in ("shardId", "state", "backoffS", "deferred", "done", "failed", "files")}
                  | {"rate": round(row["rate"], 1), "etaS": None if row["etaS"] is None else round(row["etaS"], 1),
                     "error": row["error"]} for row in self.snapshot()]
        # stored in fleet_runs.summary; `runs.stored_summary` also reads the snake_case form older code wrote
        return {"appliedFiles": report.applied_files, "shards": shards,
                "unreachable": runs.unreachable_list(report.unreachable), "failed": len(report.failed_items)}

    async def _run_phases(self, plan: Plan, target: Target, opts: RunOptions, batch: int, limiters: ShardLimiters,
                          rec: runs.RunRecorder, attempts: dict[str, int], report: RunReport) -> None:
        self._public_files = target.public_files
        for sp in plan.shards.values():
            self.progress[sp.shard_id] = ShardProgress(sp.shard_id, total=len(sp.tenants) + bool(sp.public_pending))

        def give_up(sp: ShardPlan, why: str) -> None:
            report.unreachable[sp.shard_id] = why
            self.progress[sp.shard_id].error = why
            keys = ([public_key(sp.shard_id)] if sp.public_pending else []) + \
                [tenant_key(t.tenant.tenant_id) for t in sp.tenants]
            for k in keys:
                if k not in done_keys:
                    rec.failed(k, attempts.get(k, 0), why)
                    report.failed_items.append((k, why))
                    self.progress[sp.shard_id].failed += 1

        done_keys: set[str] = set()
        for sp in plan.unreachable:
            give_up(sp, sp.error or "unreachable")
        live = [sp for sp in plan.shards.values() if sp.reachable]

        async def phase(scope: str, sp: ShardPlan) -> None:
            if scope == "public":
                units = [Unit(sp.shard_id, "public", None, tuple(sp.public_pending))] if sp.public_pending else []
            else:
                units = [Unit(sp.shard_id, "tenant", t.tenant, tuple(t.pending)) for t in sp.tenants]
            if not units:
                return
            ok = await self._drive_shard(sp.shard_id, units, opts, batch, limiters, rec, attempts, report, done_keys)
            if not ok:
                lim = limiters.get(sp.shard_id)
                give_up(sp, f"shard {sp.shard_id} down for {self.settings.shard_give_up_s:g} s: {lim.last_error}")

        for scope in ("public", "tenant"):
            try:
                async with asyncio.TaskGroup() as tg:
                    for sp in live:
                        if sp.shard_id not in report.unreachable:
                            tg.create_task(phase(scope, sp), name=f"migrate-{scope}-{sp.shard_id}")
            except BaseExceptionGroup as eg:
                raise _first_error(eg) from None

    async def _drive_shard(self, shard_id: str, units: Sequence[Unit], opts: RunOptions, batch: int,
                           limiters: ShardLimiters, rec: runs.RunRecorder, attempts: dict[str, int],
                           report: RunReport, done_keys: set[str]) -> bool:
        """Apply ``units`` on one shard; False if the shard went down (its open units are left
        to the caller to report)."""
        limiter = limiters.get(shard_id)
        prog = self.progress[shard_id]
        prog.started = prog.started or time.monotonic()
        try:
            pool = await self.pools.get(shard_id)
        except Exception as exc:
            if classify(exc) != "shard":
                raise
            limiter.failure(exc)
            limiter.down = True
            return False
        batches = [list(units[i:i + batch]) for i in range(0, len(units), batch)]
        batches.reverse()
        ready: list[_Pending] = []     # heap by (not_before, seq)
        load = asyncio.Lock()
        pid = self.package.id

        async def next_pending() -> _Pending | None:
            while not limiter.down:
                now = time.monotonic()
                if ready and ready[0].not_before <= now:
                    return heapq.heappop(ready)
                if batches and not any(p.not_before <= now for p in ready):
                    async with load:
                        if batches:
                            chunk = batches.pop()
                            await limiter.probe(pool)
                            rec.running((u.key, attempts.get(u.key, 0) + 1) for u in chunk)
                            for u in chunk:
                                heapq.heappush(ready, _Pending(0.0, next(self._seq), u, attempts.get(u.key, 0)))
                    continue
                if not ready:
                    return None
                await asyncio.sleep(min(0.25, max(0.0, ready[0].not_before - now)))
            return None

        async def worker() -> None:
            while (p := await next_pending()) is not None:
                key = p.unit.key
                start = time.monotonic()
                here = p.unit.shard_id == shard_id
                try:
                    if here:
                        async with limiter.slot():
                            if limiter.down:
                                heapq.heappush(ready, p)
                                return
                            async with pool.acquire(timeout=self.settings.connect_timeout_s) as conn:
                                applied = await apply_unit(conn, pid, p.unit, self.settings,
                                                           allow_drift=opts.allow_drift)
                    else:
                        applied = await self._apply_rerouted(p.unit, opts, limiters)
                except Exception as exc:
                    kind = classify(exc)
                    p.attempts += 1
                    now = time.monotonic()
                    why = f"{exc.__class__.__name__}: {exc}"
                    if kind == "fatal":
                        rec.failed(key, p.attempts, getattr(exc, "message", why))
                        if isinstance(exc, TenantFleetError):
                            raise
                        raise MigrationFailed(f"{pid} on {p.unit.where()}: {why}", shardId=shard_id,
                                              tenantId=p.unit.tenant_id) from exc
                    if self.metrics:
                        self.metrics.retries.labels(pid, shard_id, "held" if isinstance(exc, TenantHeld)
                                                    else kind).inc()
                    if isinstance(exc, TenantMovedAway):
                        moved = await self._replace_moved(exc)
                        if moved is None:
                            rec.skipped(key, "tenant is no longer active or suspended")
                            prog.deferred = sum(1 for x in ready if x.attempts)
                            continue
                        before, after = p.unit.tenant, moved.tenant
                        assert before is not None and after is not None
                        if (after.shard_id, after.epoch) != (before.shard_id, before.epoch):
                            log.info("run %s: %s is now on shard %s at epoch %s; its unit follows it",
                                     self.run_id, p.unit.where(), after.shard_id, after.epoch)
                            if moved.shard_id != p.unit.shard_id:
                                self.rerouted += 1
                            p.unit = moved
                            p.not_before = 0.0
                            rec.attempt(key, p.attempts, why)
                            heapq.heappush(ready, p)
                            continue
                        # the directory has not caught up with the shard (a cutover mid-way, or a
                        # move killed after its commit point): come back later, as for a held tenant
                        exc = TenantHeld(f"{p.unit.key}: {exc}")
                    if kind == "shard" and here:
                        limiter.failure(exc)
                        p.not_before = 0.0
                    else:
                        give_up_s = self.settings.shard_give_up_s
                        if isinstance(exc, TenantHeld):
                            p.held_since = p.held_since or now
                            since, give_up_s = p.held_since, self.settings.migrate_move_wait_s
                        else:
                            p.failing_since = p.failing_since or now
                            since = p.failing_since
                        if now - since >= give_up_s:
                            rec.failed(key, p.attempts, why)
                            report.failed_items.append((key, why))
                            prog.failed += 1
                            prog.deferred = sum(1 for x in ready if x.attempts)
                            continue
                        p.not_before = now + backoff_delay(self._unit_wait, p.attempts)
                    rec.attempt(key, p.attempts, why)
                    heapq.heappush(ready, p)
                    prog.deferred = sum(1 for x in ready if x.attempts)
                    continue
                if here:
                    limiter.success()
                done_keys.add(key)
                rec.done(key, p.attempts + 1, p.unit.tenant_id)
                prog.done += 1
                prog.files += len(applied)
                report.applied_files += len(applied)
                prog.deferred = sum(1 for x in ready if x.attempts)
                if self.metrics:
                    self.metrics.units.labels(pid, shard_id, p.unit.scope, "applied" if applied else "noop").inc()
                    self.metrics.files.labels(pid, shard_id, p.unit.scope).inc(len(applied))
                    self.metrics.unit_seconds.labels(pid, shard_id).observe(time.monotonic() - start)

        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(limiter.concurrency):
                    tg.create_task(worker(), name=f"migrate-{shard_id}-{i}")
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None
        if not limiter.down:
            prog.finished = time.monotonic()
        return not limiter.down

    async def _replace_moved(self, exc: TenantMovedAway) -> Unit | None:
        """The unit of a tenant that is not where it was planned, as the directory places it
        now (the same unit if the directory still says what the plan said); None if the
        tenant is no longer targeted."""
        unit = exc.unit
        assert unit.tenant is not None
        now = await current_placement(self.control, unit.tenant.tenant_id)
        if now is None:
            return None
        return Unit(now.shard_id, unit.scope, now, unit.files)

    async def _apply_rerouted(self, unit: Unit, opts: RunOptions, limiters: ShardLimiters) -> list[MigrationFile]:
        """Apply a tenant's unit on the shard it moved to, through that shard's limiter: that
        shard's public-scope files of this run first (a no-op if they are there; a tenant's
        files may use them), then the tenant's."""
        lim = limiters.get(unit.shard_id)
        pool = await self.pools.get(unit.shard_id)
        async with lim.slot():
            async with pool.acquire(timeout=self.settings.connect_timeout_s) as conn:
                if self._public_files:
                    await apply_unit(conn, self.package.id, Unit(unit.shard_id, "public", None, self._public_files),
                                     self.settings, allow_drift=opts.allow_drift)
                return await apply_unit(conn, self.package.id, unit, self.settings, allow_drift=opts.allow_drift)

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-shard progress and limiter state (for the progress display and the metrics)."""
        lims = self.limiters.snapshot() if self.limiters else {}
        out: list[dict[str, Any]] = []
        for sid, p in sorted(self.progress.items()):
            lim = lims.get(sid)
            state = "down" if p.error else (lim.throttled or lim.state) if lim else "waiting"
            backoff = lim.backoff_s if lim else 0.0
            out.append({"shardId": sid, "total": p.total, "done": p.done, "failed": p.failed, "files": p.files,
                        "deferred": p.deferred, "state": state, "backoffS": round(backoff, 2),
                        "rate": p.rate(), "etaS": p.eta_s(), "error": p.error})
            if self.metrics:
                self.metrics.pending.labels(self.package.id, sid).set(p.total - p.done - p.failed)
                self.metrics.backoff.labels(sid).set(backoff)
                self.metrics.down.labels(sid).set(1 if state == "down" else 0)
        return out


def migration_pools(settings: Settings, dsn_lookup: Callable[[str], Any], concurrency: int | None = None) -> ShardPools:
    """Shard pools for migrating, with room for ``concurrency`` workers plus the probe on each shard.

    The statement cache stays on: migration connections prepare statements only on the
    ``fleet`` tables and catalog functions, which plugin files never change; the files
    themselves run unprepared (simple protocol), so DDL can't invalidate a cached plan.
    Without the cache every parameterised statement costs two round trips.
    """
    room = (concurrency or settings.shard_concurrency) + 1
    sized = settings.model_copy(update={"shard_pool_max": max(settings.shard_pool_max, room)})
    return ShardPools(sized, dsn_lookup, reset=_no_session_state, background=True)


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset for migration connections. asyncpg has already rolled back an open
    transaction; the full reset (unlock all, RESET ALL, ...) would cost a round trip per
    unit for nothing: the engine leaves no session state (its locks are transaction-level
    or released in ``finally``, its settings local or RESET, and a connection whose
    release step failed is terminated)."""
