"""`tenantfleet plugins uninstall` and `tenantfleet plugins import-export`: adapters over
`shard_migrations.uninstall` (the admin API and the console call the same functions)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from host.cli.base import CliState, emit, pass_state
from host.cli.plugins import _resolve_tenant, _with_runtime, plugins
from router.errors import MigrationFailed, ValidationFailed

if TYPE_CHECKING:
    from host.runtime import HostRuntime

REPORT_COLUMNS = ["runId", "plugin", "policy", "state", "tenants", "done", "skipped", "purgeAfter", "exports",
                  "failedItems"]


@plugins.command("uninstall")
@click.argument("plugin_id")
@click.option("--tenant", help="Only this tenant (id or code); default: every tenant the plugin is installed for, "
                               "as a recorded run (kind uninstall).")
@click.option("--policy", type=str, default=None,
              help="keep (disable, data stays), export (disable, write each tenant's tables to --export-dir, "
                   "verified) or purge (after --grace, drop the tenant tables and ledger rows; with --export-dir "
                   "exported first). Default: the plugin's own (meta.uninstall.policy).")
@click.option("--export-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where exports go: DIR/PLUGIN/TENANT_ID/{manifest.json,TABLE.csv} (default "
                   "TENANTFLEET_EXPORT_DIR; with purge, set or given, the tenant is exported first).")
@click.option("--grace", default=None, help="Purge only: wait this long before dropping (90, 90s, 15m, 2h, 7d; "
                                            "default 1d; 0 drops now). Finish with --resume RUN after it.")
@click.option("--resume", "resume", type=click.IntRange(min=1), default=None,
              help="Finish this uninstall run (after a kill, failures, or a purge's grace period).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=None,
              help="Tenants at once per shard (default TENANTFLEET_SHARD_CONCURRENCY).")
@pass_state
def plugins_uninstall(state: CliState, plugin_id: str, tenant: str | None, policy: str | None,
                      export_dir: Path | None, grace: str | None, resume: int | None,
                      concurrency: int | None) -> None:
    """Uninstall a plugin from one tenant or from every tenant (a recorded, resumable run
    through the per-shard limiter, like a migration). Exits 1 if some tenants failed
    (run again with --resume RUN); nothing is changed for bad input (unknown plugin,
    policy or tenant, an export dir that can't be written)."""
    from shard_migrations.uninstall import UninstallOptions, parse_grace, uninstall

    if resume is not None and (tenant or policy or export_dir or grace):
        raise ValidationFailed("--resume finishes a run with the run's own options: give no --tenant, --policy, "
                               "--export-dir or --grace with it", field="resume")
    grace_s = None if grace is None else parse_grace(grace)
    last = [0.0]

    def progress(p: dict[str, Any]) -> None:
        now = time.monotonic()
        if state.json or (now - last[0] < 1.0 and p["done"] + p["skipped"] + p["failed"] < p["total"]):
            return
        last[0] = now
        click.echo(f"run {p['runId']}: {p['done']}/{p['total']} done, {p['skipped']} skipped, "
                   f"{p['failed']} failed", err=True)

    def started(run_id: int) -> None:
        if not state.json:
            click.echo(f"uninstall run {run_id} recorded", err=True)

    async def go(rt: HostRuntime) -> dict[str, Any]:
        package = rt.discovery.get(plugin_id)
        tenant_ids = None if tenant is None else ((await _resolve_tenant(rt, tenant)).tenant_id,)
        opts = UninstallOptions(policy=policy, tenant_ids=tenant_ids, export_dir=export_dir or rt.settings.export_dir,
                                grace_s=grace_s,
                                concurrency=concurrency)
        report = await uninstall(rt.control, rt.owner_pools, rt.settings, package, opts, resume=resume,
                                 on_run=started, on_progress=progress)
        await rt.registry.announce("global", plugin_id)
        return report.to_dict()

    out = _with_runtime(state, go)
    emit(state, out, columns=REPORT_COLUMNS)
    if out["state"] == "failed":
        first = out["failedItems"][0] if out["failedItems"] else {"itemKey": "?", "error": "?"}
        raise MigrationFailed(f"run {out['runId']}: {len(out['failedItems'])} tenants failed, first {first['itemKey']}: "
                              f"{first['error']}; finish with `plugins uninstall {plugin_id} --resume {out['runId']}`",
                              runId=out["runId"])
    if out["state"] == "waiting" and not state.json:
        click.echo(f"tenants disabled; the purge runs with `plugins uninstall {plugin_id} --resume {out['runId']}` "
                   f"after {out['purgeAfter']}", err=True)


@plugins.command("import-export")
@click.argument("export", type=click.Path(path_type=Path, file_okay=False))
@click.option("--tenant", required=True, help="Tenant id or code to import into (the same or another tenant).")
@pass_state
def plugins_import_export(state: CliState, export: Path, tenant: str) -> None:
    """Re-import one tenant's export (DIR/PLUGIN/TENANT_ID, as `plugins uninstall --policy
    export` wrote it): checksums verified, the plugin installed at the exported version if
    needed, the rows copied in one transaction and read back with equal checksums, then the
    plugin enabled. A corrupt export or a table that already has rows changes nothing."""
    from shard_migrations.uninstall import import_export

    async def go(rt: HostRuntime) -> dict[str, Any]:
        rec = await _resolve_tenant(rt, tenant)
        out = await import_export(rt.control, rt.owner_pools, rt.settings, rt.discovery, rec, export)
        await rt.registry.announce("tenant", out["pluginId"], rec.tenant_id)
        return out

    emit(state, _with_runtime(state, go))

