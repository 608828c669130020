"""`tenantfleet move` and `tenantfleet gc`: thin adapters over `shard_migrations.moves`."""
from __future__ import annotations

from typing import Any

import click

from host.cli.base import CliState, cli, emit, pass_state, run
from router.errors import ValidationFailed
from router.runtime import open_runtime
from shard_migrations.moves.mover import Mover, lookup_tenant
from shard_migrations.moves.retire import collect_retired

MOVE_COLUMNS = ["runId", "code", "from", "to", "mode", "phase", "pauseMs", "bytesCopied", "lastError"]
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

    async def go() -> Any:
        async with open_runtime(state.settings) as rt:
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
    async def go() -> Any:
        async with open_runtime(state.settings) as rt:
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
    async def go() -> Any:
        async with open_runtime(state.settings) as rt:
            grace = rt.settings.retired_grace_s if grace_s is None else grace_s
            return await collect_retired(rt.directory, rt.settings, grace_s=grace, dry_run=dry_run)
    emit(state, run(go()), columns=None if state.json else GC_COLUMNS)
