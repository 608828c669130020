"""`tenantfleet move`, `drain`, `rebalance` and `gc`: thin adapters over `shard_migrations.moves`."""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import click

from host.cli import throttle
from host.cli.base import CliState, cli, emit, pass_state, router_runtime, run
from router.errors import MoveFailed, ValidationFailed
from router.placement import BY_CHOICES, MODES

# The mover (asyncpg, prometheus-client, rich) is imported by the commands when they run,
# so that loading the CLI stays fast.
if TYPE_CHECKING:
    from shard_migrations.moves.batch import BatchReport, MoveBatch, MoveMetrics

MOVE_COLUMNS = ["runId", "code", "from", "to", "mode", "phase", "pauseMs", "bytesCopied", "lastError"]
SHARD_COLUMNS = ["shardId", "state", "capacity", "tenantsBefore", "tenantsAfter", "bytesBefore", "bytesAfter"]
PLAN_COLUMNS = ["tenantId", "from", "to", "bytes", "mode", "state", "runId", "pauseMs", "error"]
GC_COLUMNS = ["shardId", "schemaName", "tenantId", "runId", "retiredAt", "dropped"]


def _progress(state: CliState) -> Any:
    def show(phase: str, figures: dict[str, Any]) -> None:
        if state.json:
            return
        extra = "".join(f" {k}={v}" for k, v in figures.items() if k in ("table", "bytesCopied", "pauseMs"))
        click.echo(f"  {phase}{extra}", err=True)
    return show


@cli.command("move", context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1, metavar="TENANT | status [RUN]")
@click.option("--to", "to", default=None, metavar="SHARD", help="The shard to move the tenant to.")
@click.option("--online/--offline", default=True, show_default=True,
              help="Online: the tenant stays writable while a logical-replication subscription catches up, writes "
                   "pause only for the cutover. Offline: the tenant's requests wait (then 503 TENANT_MOVING) for the "
                   "whole copy; needs no replication rights.")
@click.option("--dry-run", is_flag=True, help="Run the pre-flight checks only; change nothing.")
@click.option("--resume", "resume_run", type=int, default=None, metavar="RUN",
              help="Finish move RUN from where it stopped (after a failure or a kill).")
@click.option("--abort", "abort_run", type=int, default=None, metavar="RUN",
              help="Undo move RUN (before its switch): the tenant stays where it is, the target's copy is dropped.")
@pass_state
def move_cmd(state: CliState, args: tuple[str, ...], to: str | None, online: bool, dry_run: bool,
             resume_run: int | None, abort_run: int | None) -> None:
    """Move a tenant to another shard, watch moves, resume or abort one.

    \b
      tenantfleet move TENANT --to SHARD [--offline] [--dry-run]
      tenantfleet move status [RUN]
      tenantfleet move --resume RUN
      tenantfleet move --abort RUN

    TENANT is a tenant id, code or domain. A move copies the tenant's schema and rows,
    verifies them (row counts and checksums), cuts over under the tenant's fence (the
    epoch is bumped; requests re-resolve and go on on the new shard) and renames the old
    schema out of the way (`tenantfleet gc` drops it after the grace period).
    """
    mode = "online" if online else "offline"
    chosen = sum(x is not None for x in (resume_run, abort_run)) + (1 if args else 0)
    if chosen != 1:
        raise click.UsageError("give a TENANT (with --to), `status [RUN]`, --resume RUN or --abort RUN")
    if args and args[0] == "status":
        if len(args) > 2:
            raise click.UsageError("move status takes at most one RUN")
        run_id = _run_id(args[1]) if len(args) == 2 else None
        _status(state, run_id)
        return
    if args and len(args) != 1:
        raise click.UsageError("move takes one TENANT")
    if args and to is None:
        raise click.UsageError("missing --to SHARD")

    from shard_migrations.moves.mover import Mover, lookup_tenant

    async def go() -> Any:
        async with router_runtime(state.settings) as rt:
            mover = Mover(rt.directory, rt.settings, progress=_progress(state))
            if resume_run is not None:
                return (await mover.resume(resume_run)).to_api()
            if abort_run is not None:
                return (await mover.abort(abort_run)).to_api()
            assert to is not None
            tenant = await lookup_tenant(rt.directory, args[0])
            if dry_run:
                return {"dryRun": True, **await mover.plan(tenant, to, mode)}
            return (await mover.start(tenant, to, mode)).to_api()
    emit(state, run(go()))


def _run_id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 18:
        raise ValidationFailed(f"RUN must be a run id (digits), not {text!r}", field="run")
    return int(text)


def _status(state: CliState, run_id: int | None) -> None:
    from shard_migrations.moves.mover import Mover

    async def go() -> Any:
        async with router_runtime(state.settings) as rt:
            mover = Mover(rt.directory, rt.settings)
            if run_id is None:
                return [m.to_api() for m in await mover.list()]
            return (await mover.load(run_id)).to_api()
    data = run(go())
    emit(state, data, columns=None if state.json or run_id is not None else MOVE_COLUMNS)


@cli.command("gc")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=None,
              help="Drop old schemas retired longer ago than this many seconds "
                   "(default: TENANTFLEET_RETIRED_GRACE_S, 86400).")
@click.option("--dry-run", is_flag=True, help="Only list what would be dropped.")
@pass_state
def gc_cmd(state: CliState, grace_s: float | None, dry_run: bool) -> None:
    """Drop the schemas moves left behind on their source shards once their grace period is over."""
    from shard_migrations.moves.retire import collect_retired

    async def go() -> Any:
        async with router_runtime(state.settings) as rt:
            grace = rt.settings.retired_grace_s if grace_s is None else grace_s
            return await collect_retired(rt.directory, rt.settings, grace_s=grace, dry_run=dry_run)
    emit(state, run(go()), columns=None if state.json else GC_COLUMNS)


_MODE_HELP = ("auto (default): tenants up to TENANTFLEET_MOVE_OFFLINE_MAX_BYTES (2 MiB) move offline (their "
              "copy under the fence takes tens of ms), larger ones online. online: every tenant stays writable "
              "while it copies, writes pause only for its cutover. offline: each tenant's requests wait for its "
              "whole copy.")
_BY_HELP = "What evens out: tenant count or bytes on disk (schemas' relation sizes)."


def _batch_cli(state: CliState, metrics_file: str | None, work: Any) -> BatchReport:
    """Run ``work(metrics, view)`` where ``view(batch)`` is the per-shard progress display
    (and metrics file) for the batch once it is planned."""
    from prometheus_client import CollectorRegistry
    from rich.console import Console

    from shard_migrations.moves.batch import MoveMetrics
    from shard_migrations.progress import ProgressView

    registry = CollectorRegistry()
    live = state.console.is_terminal and not state.json

    def view(batch: MoveBatch) -> Any:
        if state.json and not metrics_file:
            return nullcontext()
        console = state.console if not state.json else Console(stderr=True, quiet=True)
        return ProgressView(console, batch.snapshot, live=live, metrics=registry, metrics_file=metrics_file,
                            title="moves off ")

    report: BatchReport = run(work(MoveMetrics(registry), view))
    return report


def _show(state: CliState, report: BatchReport, *, planned_only: bool) -> None:
    data = report.to_api()
    if state.json:
        emit(state, data)
    else:
        if planned_only:
            state.console.print(f"{report.kind} plan: {len(report.planned)} moves (nothing changed; "
                                f"{'--apply' if report.kind == 'rebalance' else 'drop --plan'} runs them)",
                                highlight=False)
        else:
            state.console.print(f"{report.kind} run {report.run_id}: {data['done']} of {data['planned'] + (len(report.outcomes) - len(report.planned))} "
                                f"moves done, {data['failed']} failed in {data['seconds']} s", highlight=False)
        emit(state, data["shards"], columns=SHARD_COLUMNS, title="shards")
        if data["moves"]:
            emit(state, data["moves"], columns=PLAN_COLUMNS, title="moves")
    failed = [o for o in report.outcomes if o.state == "failed"]
    if not planned_only and (failed or report.remaining):
        raise MoveFailed(f"{report.kind} run {report.run_id}: {len(failed)} moves failed"
                         + (f", {report.remaining} tenants still on the shard" if report.remaining else "")
                         + "; run the same command again to resume", runId=report.run_id,
                         failed=[o.to_api() for o in failed][:20])


@cli.command("drain")
@click.argument("shard", metavar="SHARD")
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True, help=_MODE_HELP)
@click.option("--by", type=click.Choice(BY_CHOICES), default="bytes", show_default=True,
              help="Fill the other shards evenly by tenant count or by bytes.")
@click.option("--plan", "plan_only", is_flag=True, help="Show the moves only; change nothing (not even the state).")
@click.option("--metrics-file", default=None, help="Write Prometheus text metrics to this file while running.")
@throttle.option
@pass_state
def drain_cmd(state: CliState, shard: str, mode: str, by: str, plan_only: bool, metrics_file: str | None,
              no_slo_throttle: bool = False) -> None:
    """Empty SHARD: mark it `draining` (no new tenants) and move every tenant off it.

    Each tenant goes to the active shard with room and the lowest load at that point,
    largest first. Moves run at most TENANTFLEET_MOVES_CONCURRENCY at once, and
    TENANTFLEET_MOVES_PER_SHARD per shard (source or target); a failing shard backs off.
    Run the same command again to resume after a failure or a crash: the shard's open
    moves are finished first. Exit 0 only when the shard is empty.
    """
    throttle.apply(state, no_slo_throttle, moves=not plan_only)
    from shard_migrations.moves.batch import drain

    async def work(metrics: MoveMetrics, view: Any) -> BatchReport:
        async with router_runtime(state.settings) as rt:
            return await drain(rt.directory, rt.settings, shard, mode=mode, by=by,  # type: ignore[arg-type]
                               plan_only=plan_only, metrics=metrics, batch_view=view)
    _show(state, _batch_cli(state, metrics_file, work), planned_only=plan_only)


@cli.command("rebalance")
@click.option("--by", type=click.Choice(BY_CHOICES), default="count", show_default=True, help=_BY_HELP)
@click.option("--plan/--apply", "plan_only", default=True, show_default=True,
              help="--plan shows the moves (the default: nothing changes); --apply runs them.")
@click.option("--tolerance", type=click.FloatRange(min=0, max=1, max_open=True), default=0.1, show_default=True,
              help="How far from the mean load a shard may stay, as a fraction (0.1 = 10%).")
@click.option("--mode", type=click.Choice(MODES), default="auto", show_default=True, help=_MODE_HELP)
@click.option("--metrics-file", default=None, help="Write Prometheus text metrics to this file while running.")
@throttle.option
@pass_state
def rebalance_cmd(state: CliState, by: str, plan_only: bool, tolerance: float, mode: str,
                  metrics_file: str | None, no_slo_throttle: bool = False) -> None:
    """Even out the active shards: the fewest moves that bring every shard within
    --tolerance of the mean (tenant count or bytes, relative to each shard's capacity).

    Shows the plan and the shards' figures before and after; --apply runs it with the
    same limits and backoff as `drain`. Exit 0 only if every move finished.
    """
    throttle.apply(state, no_slo_throttle, moves=not plan_only)
    from shard_migrations.moves.batch import rebalance

    async def work(metrics: MoveMetrics, view: Any) -> BatchReport:
        async with router_runtime(state.settings) as rt:
            return await rebalance(rt.directory, rt.settings, by=by, tolerance=tolerance,  # type: ignore[arg-type]
                                   apply=not plan_only, mode=mode, metrics=metrics, batch_view=view)
    _show(state, _batch_cli(state, metrics_file, work), planned_only=plan_only)
