"""`tenantfleet migrate plan|apply|status|verify`: thin adapters over the fleet migrator.

Every command prints a table (or JSON with ``--json``) and exits non-zero on failure
with one line ``error: CODE: message`` naming what failed and where.
"""
from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import click

from host.cli import throttle
from host.cli.base import CliState, cli, emit, pass_state, router_runtime, run
from router.errors import MigrationFailed, ShardUnreachable

# The migrator (SQLAlchemy, asyncpg, prometheus-client) is imported by the commands when
# they run, so that loading the CLI stays fast.
if TYPE_CHECKING:
    from shard_migrations.fleet import FleetMigrator, RunOptions, RunReport
    from shard_migrations.metrics import MigrateMetrics

# JSON keys are camelCase like every --json output; `header()` turns them into table headers
SHARD_PLAN_COLUMNS = ["shardId", "reachable", "publicPending", "tenantsPending", "tenantsUpToDate", "filesPending",
                      "drift", "error"]
REPORT_COLUMNS = ["shardId", "units", "done", "failed", "files", "rate", "error"]
CANARY_COLUMNS = ["shardId", "canary", "ok", "tried", "error"]
RUN_COLUMNS = ["runId", "plugin", "version", "state", "owner", "createdAt", "finishedAt"]
RUN_SHARD_COLUMNS = ["shardId", "pending", "running", "done", "failed", "skipped", "attempts", "state", "rate", "etaS"]
FAILED_ITEM_COLUMNS = ["itemKey", "shardId", "attempts", "lastError"]
DRIFT_COLUMNS = ["shardId", "tenantId", "file", "recorded", "expected"]
MISSING_COLUMNS = ["shardId", "tenantId", "file"]


@asynccontextmanager
async def _migrator(state: CliState, plugin: str, *, concurrency: int | None = None, batch_size: int | None = None,
                    metrics: MigrateMetrics | None = None) -> AsyncIterator[FleetMigrator]:
    from shard_migrations.fleet import FleetMigrator, migration_pools
    from shard_migrations.packages import discover

    package = discover().get(plugin)
    settings = state.settings
    if batch_size is not None:
        settings = settings.model_copy(update={"batch_size": batch_size})
    async with AsyncExitStack() as stack:
        rt = await stack.enter_async_context(router_runtime(settings))
        pools = await stack.enter_async_context(migration_pools(rt.settings, rt.directory.dsn_of, concurrency))
        yield FleetMigrator(rt.control, pools, rt.settings, package, metrics=metrics)


def _options(to: str | None, from_file: str | None, tenants: tuple[str, ...], allow_drift: bool = False,
             batch_size: int | None = None, concurrency: int | None = None) -> RunOptions:
    from shard_migrations.fleet import RunOptions

    return RunOptions(to=to, from_file=from_file, tenant_ids=tenants or None, allow_drift=allow_drift,
                      batch_size=batch_size, concurrency=concurrency)


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--tenant", "tenants", multiple=True, help="Only this tenant id (repeatable).")(fn)
    fn = click.option("--from", "from_file", default=None,
                      help="Start at this file (NNN_name.sql or scope/NNN_name.sql); earlier ones are not considered.")(fn)
    fn = click.option("--to", default=None, help="Target version (default: the plugin package's version).")(fn)
    return click.argument("plugin")(fn)


@cli.group()
def migrate() -> None:
    """Plan, apply, watch and verify plugin schema upgrades across every shard and tenant.

    Order: the plugin's public-scope files on every shard, then its tenant-scope files in
    every active or suspended tenant, then version_installed per tenant and globally.
    """


@migrate.command("plan")
@_common
@pass_state
def plan_cmd(state: CliState, plugin: str, to: str | None, from_file: str | None, tenants: tuple[str, ...]) -> None:
    """Show what `apply PLUGIN` would do: pending files per shard and tenant, drift, unreachable shards."""
    async def go() -> dict[str, Any]:
        async with _migrator(state, plugin) as m:
            return (await m.plan(_options(to, from_file, tenants))).to_dict()
    data = run(go())
    if state.json:
        emit(state, data)
        return
    state.console.print(f"{data['plugin']} → {data['version']}: {data['filesPending']} file applications pending "
                        f"(public: {', '.join(data['publicFiles']) or '-'}; tenant: {', '.join(data['tenantFiles']) or '-'})",
                        highlight=False)
    emit(state, data["shards"], columns=SHARD_PLAN_COLUMNS)
    _raise_unreachable(data)


def _raise_unreachable(plan: dict[str, Any]) -> None:
    down = [s for s in plan["shards"] if not s["reachable"]]
    if down:
        more = f" (and {len(down) - 1} more shards)" if len(down) > 1 else ""
        raise ShardUnreachable(f"{down[0]['error']}{more}", shardId=down[0]["shardId"])


@migrate.command("apply")
@_common
@click.option("--dry-run", is_flag=True, help="Print the plan and try each new file on one canary tenant per shard "
                                              "inside a transaction that is rolled back.")
@click.option("--resume", "resume", type=int, default=None, metavar="RUN", help="Finish run RUN (after a crash or kill).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Tenants per batch (default: settings).")
@click.option("--concurrency", type=click.IntRange(min=1), default=None, help="Tenants at once per shard (default: settings).")
@click.option("--allow-drift", is_flag=True, help="Go on although recorded files changed since they were applied.")
@click.option("--metrics-file", default=None, help="Write Prometheus text metrics to this file while running.")
@throttle.option
@pass_state
def apply_cmd(state: CliState, plugin: str, to: str | None, from_file: str | None, tenants: tuple[str, ...],
              dry_run: bool, resume: int | None, batch_size: int | None, concurrency: int | None, allow_drift: bool,
              metrics_file: str | None, no_slo_throttle: bool = False) -> None:
    """Apply PLUGIN's pending files across the fleet (or --resume RUN). Exit 0 only if everything is done."""
    throttle.apply(state, no_slo_throttle, background=True)
    opts = _options(to, from_file, tenants, allow_drift, batch_size, concurrency)
    if dry_run:
        _dry_run(state, plugin, opts)
        return
    from prometheus_client import CollectorRegistry

    from shard_migrations.metrics import MigrateMetrics
    from shard_migrations.progress import ProgressView

    registry = CollectorRegistry()

    async def go() -> RunReport:
        async with _migrator(state, plugin, concurrency=concurrency, batch_size=batch_size,
                             metrics=MigrateMetrics(registry)) as m:
            def started(run_id: int) -> None:
                if not state.json:
                    state.console.print(f"run {run_id}: {plugin} (resume with --resume {run_id})", highlight=False)
            live = state.console.is_terminal and not state.json
            async with ProgressView(state.console, m.snapshot, live=live, metrics=registry,
                                    metrics_file=metrics_file) if not state.json else AsyncExitStack():
                return await m.apply(opts, resume=resume, on_run=started)
    report = run(go())
    data = report.to_dict()
    if state.json:
        emit(state, data)
    else:
        state.console.print(f"run {report.run_id}: {report.state}, {report.applied_files} files applied "
                            f"({report.plugin} → {report.version})", highlight=False)
        emit(state, data["shards"], columns=REPORT_COLUMNS)
    report.raise_for_failure()


def _dry_run(state: CliState, plugin: str, opts: RunOptions) -> None:
    async def go() -> dict[str, Any]:
        async with _migrator(state, plugin) as m:
            plan = await m.plan(opts)
            return {"plan": plan.to_dict(), "canaries": await m.dry_run(plan)}
    data = run(go())
    if state.json:
        emit(state, data)
    else:
        p = data["plan"]
        state.console.print(f"dry run: {p['plugin']} → {p['version']}, {p['filesPending']} file applications pending",
                            highlight=False)
        emit(state, p["shards"], columns=SHARD_PLAN_COLUMNS, title="plan")
        emit(state, data["canaries"], columns=CANARY_COLUMNS, title="canary (rolled back)")
    _raise_unreachable(data["plan"])
    bad = [c for c in data["canaries"] if not c["ok"]]
    if bad:
        raise MigrationFailed(f"dry run: {bad[0]['error']}" + (f" ({len(bad)} shards failed)" if len(bad) > 1 else ""),
                              shardId=bad[0]["shardId"])


@migrate.command("status")
@click.argument("run_id", type=int, required=False, metavar="[RUN]")
@click.option("--plugin", default=None, help="List only this plugin's runs.")
@pass_state
def status_cmd(state: CliState, run_id: int | None, plugin: str | None) -> None:
    """Show run RUN (items per shard and status, failures, heartbeat) or list recent runs.
    Reads the control plane only: works while another process runs it."""
    from shard_migrations import runs

    async def go() -> Any:
        async with router_runtime(state.settings) as rt:
            if run_id is None:
                return await runs.list_runs(rt.control, plugin)
            return await runs.run_status(rt.control, run_id)
    data = run(go())
    if state.json or run_id is None:
        emit(state, data, columns=None if state.json else RUN_COLUMNS)
        return
    state.console.print(f"run {data['runId']}: {data['plugin']} → {data['version']} {data['state']}"
                        f"{' (alive)' if data['alive'] else ''}, owner {data['owner']}, "
                        f"heartbeat {data['heartbeatAgeS']} s ago", highlight=False)
    emit(state, data["shards"], columns=RUN_SHARD_COLUMNS)
    if data["failedItems"]:
        emit(state, data["failedItems"], columns=FAILED_ITEM_COLUMNS, title="failed")


@migrate.command("verify")
@click.argument("plugin")
@click.option("--to", default=None, help="Version to check against (default: the plugin package's version).")
@pass_state
def verify_cmd(state: CliState, plugin: str, to: str | None) -> None:
    """Compare every shard's ledger with PLUGIN's files: drift (exit 3), unreachable shards,
    missing applications (exit 4)."""
    from shard_migrations.fleet import migration_pools
    from shard_migrations.packages import discover
    from shard_migrations.verify import verify as verify_fleet

    async def go() -> Any:
        package = discover().get(plugin)
        async with router_runtime(state.settings) as rt, \
                migration_pools(rt.settings, rt.directory.dsn_of) as pools:
            return await verify_fleet(rt.control, pools, package, to)
    report = run(go())
    data = report.to_dict()
    if state.json:
        emit(state, data)
    else:
        state.console.print(f"{report.plugin} {report.version}: {report.shards} shards, {report.tenants} tenants, "
                            f"{len(report.drift)} drifted, {len(report.missing)} missing, "
                            f"{len(report.unreachable)} unreachable", highlight=False)
        if report.drift:
            emit(state, data["drift"], columns=DRIFT_COLUMNS, title="drift")
        if report.missing:
            emit(state, data["missing"][:50], columns=MISSING_COLUMNS, title="missing")
    report.raise_for_problems()
