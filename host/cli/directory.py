"""`tenantfleet tenants ...`, `tenantfleet shards ...`, `tenantfleet router serve`."""
from __future__ import annotations

from typing import Any

import click

from host.cli.base import CliState, cli, emit, pass_state, router_runtime, run, stop_on_signals
from router.keys import SHARD_STATES

TENANT_COLUMNS = ["tenantId", "code", "shardId", "schemaName", "state", "epoch", "domains"]
SHARD_COLUMNS = ["shardId", "state", "tenants", "capacity", "weight", "dsn"]


@cli.group()
def tenants() -> None:
    """Create, list, show, suspend and resume tenants."""


@tenants.command("create")
@click.argument("code")
@click.option("--domain", "domains", multiple=True, help="A domain that resolves to this tenant (repeatable).")
@click.option("--shard", default=None, help="Place on this shard instead of the least-loaded active one.")
@pass_state
def tenants_create(state: CliState, code: str, domains: tuple[str, ...], shard: str | None) -> None:
    """Create tenant CODE: placed on the least-loaded active shard, schema created, state active."""
    async def go() -> dict[str, Any]:
        async with router_runtime(state.settings) as rt:
            return (await rt.directory.create_tenant(code, list(domains), shard_id=shard)).to_api()
    emit(state, run(go()), columns=TENANT_COLUMNS)


@tenants.command("list")
@click.option("--shard", default=None, help="Only tenants on this shard.")
@click.option("--state", "tstate", default=None, help="Only tenants in this state.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="At most this many rows (one page).")
@click.option("--after", default=None, metavar="CODE",
              help="The page after this code: the last code of the previous page.")
@click.option("--offset", type=click.IntRange(min=0), default=0, hidden=True,
              help="Deprecated: skip this many rows (slow on a large fleet); use --after.")
@pass_state
def tenants_list(state: CliState, shard: str | None, tstate: str | None, limit: int, after: str | None,
                 offset: int) -> None:
    """List tenants ordered by code, one page of --limit at a time.

    Pages by keyset: `--after CODE` starts after that code, as cheap at the 100,000th
    tenant as at the first. A full page ends with the command for the next one."""
    async def go() -> list[dict[str, Any]]:
        async with router_runtime(state.settings) as rt:
            recs = await rt.directory.list_tenants(shard_id=shard, state=tstate, limit=limit, after=after,
                                                   offset=offset)
            return [r.to_api() for r in recs]
    rows = run(go())
    emit(state, rows, columns=TENANT_COLUMNS)
    if len(rows) == limit and not state.json:
        click.echo(f"next page: --after {rows[-1]['code']}", err=True)


def _query(ref: str) -> dict[str, str]:
    """A tenant reference on the command line: a UUID, a domain (has a dot) or a code."""
    if len(ref) == 36 and ref.count("-") == 4:
        return {"id": ref}
    return {"domain": ref} if "." in ref else {"code": ref}


@tenants.command("show")
@click.argument("ref")
@pass_state
def tenants_show(state: CliState, ref: str) -> None:
    """Show where tenant REF (id, code or domain) lives."""
    async def go() -> dict[str, Any]:
        async with router_runtime(state.settings) as rt:
            return (await rt.directory.get(**_query(ref))).to_api()
    emit(state, run(go()), columns=TENANT_COLUMNS)


def _transition(state: CliState, ref: str, action: str) -> None:
    async def go() -> dict[str, Any]:
        async with router_runtime(state.settings) as rt:
            rec = await rt.directory.get(**_query(ref))
            fn = rt.directory.suspend if action == "suspend" else rt.directory.resume
            return (await fn(rec.tenant_id)).to_api()
    emit(state, run(go()), columns=TENANT_COLUMNS)


@tenants.command("suspend")
@click.argument("ref")
@pass_state
def tenants_suspend(state: CliState, ref: str) -> None:
    """Suspend tenant REF: its requests get TENANT_SUSPENDED; the epoch is bumped."""
    _transition(state, ref, "suspend")


@tenants.command("resume")
@click.argument("ref")
@pass_state
def tenants_resume(state: CliState, ref: str) -> None:
    """Resume a suspended tenant REF; the epoch is bumped."""
    _transition(state, ref, "resume")


@cli.group()
def shards() -> None:
    """Register shards, list them with their tenant counts, set their state."""


@shards.command("add")
@click.argument("shard_id")
@click.argument("dsn")
@click.option("--capacity", default=1000, show_default=True, help="Tenants this shard is sized for (placement weight).")
@click.option("--weight", default=100, show_default=True)
@pass_state
def shards_add(state: CliState, shard_id: str, dsn: str, capacity: int, weight: int) -> None:
    """Register SHARD_ID at DSN. The DSN is checked first; an unreachable shard is refused."""
    async def go() -> dict[str, Any]:
        async with router_runtime(state.settings) as rt:
            return (await rt.directory.add_shard(shard_id, dsn, capacity=capacity, weight=weight)).to_api()
    emit(state, run(go()), columns=SHARD_COLUMNS)


@shards.command("list")
@pass_state
def shards_list(state: CliState) -> None:
    """List shards with state, tenant count and capacity."""
    async def go() -> list[dict[str, Any]]:
        async with router_runtime(state.settings) as rt:
            return [s.to_api() for s in await rt.directory.list_shards()]
    emit(state, run(go()), columns=SHARD_COLUMNS)


@shards.command("set-state")
@click.argument("shard_id")
@click.argument("new_state", type=click.Choice(SHARD_STATES))
@pass_state
def shards_set_state(state: CliState, shard_id: str, new_state: str) -> None:
    """Set SHARD_ID's state; only active shards receive new tenants."""
    async def go() -> dict[str, Any]:
        async with router_runtime(state.settings) as rt:
            return (await rt.directory.set_shard_state(shard_id, new_state)).to_api()
    emit(state, run(go()), columns=SHARD_COLUMNS)


@cli.group("router")
def router_group() -> None:
    """The router service (resolve, tenants, shards over HTTP)."""


@router_group.command("serve")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port to listen on (default TENANTFLEET_ROUTER_PORT, 8300).")
@pass_state
def router_serve(state: CliState, port: int | None) -> None:
    """Serve the router on TENANTFLEET_BIND_HOST until SIGINT/SIGTERM, then drain and close."""
    from router import service
    from router.runtime import effective_settings

    settings = effective_settings(state.settings)

    async def go() -> None:
        stop = stop_on_signals()

        async def ready(bound: int) -> None:
            click.echo(f"router serving on http://{settings.bind_host}:{bound}")

        await service.serve(settings, port=port, ready=ready, stop=stop)

    from host.app import run as run_on_fast_loop
    from host.logs import json_logging

    with json_logging(settings.log_level):
        run_on_fast_loop(go())


IMPORT_REFUSED_COLUMNS = ["line", "code", "reason"]


@tenants.command("import")
@click.argument("file")
@click.option("--resume", "resume", type=int, default=None, metavar="RUN",
              help="Finish import run RUN (after a crash or kill) from the same FILE.")
@click.option("--batch-size", type=click.IntRange(1, 5000), default=200, show_default=True,
              help="Tenants per shard transaction.")
@pass_state
def tenants_import(state: CliState, file: str, resume: int | None, batch_size: int) -> None:
    """Create the tenants listed in FILE (CSV with a header, or JSON lines).

    Fields: code, domains, plugins (to enable; their migrations are applied), and an
    optional shard (else placed on the least-loaded active shards). In CSV, domains and
    plugins are separated by ';' or spaces within their cell. Bad rows (bad code or
    domain, duplicate in the file or the directory, unknown plugin or shard) are refused
    with their line numbers and the good ones land; nothing is left half-created. The run
    is recorded: after a crash, `--resume RUN` finishes it. Exit 2 if any row was refused.
    """
    import time
    from pathlib import Path

    from router.errors import ValidationFailed
    from shard_migrations.packages import discover
    from shard_migrations.tenant_import import ImportReport, TenantImporter

    live = state.console.is_terminal and not state.json
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= (0.2 if live else 2.0):
            last[0] = now
            click.echo(f"\r{done:,}/{total:,} tenants" + ("" if live else "\n"), nl=False, err=True)

    async def go() -> ImportReport:
        async with router_runtime(state.settings) as rt:
            importer = TenantImporter(rt.control, rt.shard_pools, rt.settings, discover(), batch_size=batch_size,
                                      progress=None if state.json else progress)
            if resume is not None:
                return await importer.resume(Path(file), resume)
            return await importer.start(Path(file))

    report = run(go())
    data = report.to_dict()
    if state.json:
        emit(state, data)
    else:
        click.echo("", err=True)
        state.console.print(f"import run {report.run_id}: {report.created:,} tenants created in {report.seconds:.1f} s "
                            f"({data['tenantsPerS'] or 0:,} tenants/s), {len(report.refused):,} of {report.rows:,} rows "
                            "refused", highlight=False)
        if report.refused:
            emit(state, data["refused"], columns=IMPORT_REFUSED_COLUMNS, title="refused")
    if report.refused:
        raise ValidationFailed(f"{len(report.refused)} of {report.rows} rows refused (the others were imported; "
                               f"run {report.run_id})", field="file", runId=report.run_id)
