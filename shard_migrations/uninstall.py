"""Uninstalling a plugin from tenants: ``keep``, ``export`` or ``purge``, and re-importing an export.

A plugin declares its tenant-scope cleanup in its ``meta``::

    meta = {..., "uninstall": {"policy": "keep", "tables": ["items"]}}

``tables`` are the tenant-schema tables its migrations create (exported in this order,
dropped with CASCADE, so their indexes and owned sequences go too); ``policy`` is the
default when the caller names none. Per tenant:

- ``keep``: the tenant's ``sys_tenant_plugins`` row is disabled; data, ledger and version
  stay, so enabling again finds everything.
- ``export``: disabled, then every declared table is written with COPY (CSV, in one
  REPEATABLE READ snapshot, session settings pinned so the text is the same on every
  shard) to ``<export dir>/<plugin>/<tenant id>/<table>.csv`` with a ``manifest.json``
  (plugin, version, tenant, tables with columns, row counts and sha256). The directory is
  written as ``<tenant id>.partial`` and renamed once every file is re-read and its
  checksum matches the manifest.
- ``purge``: disabled at once; after the grace period the declared tables are dropped and
  the tenant's ledger rows removed (``fleet.sys_plugin_migrations``, tenant scope) in ONE
  transaction, and the ``sys_tenant_plugins`` row deleted, so a later install starts from
  the first migration. With an export directory the tenant is exported (and verified)
  first. A tenant enabled again during the grace period is skipped. The public scope is
  shared by the shard's tenants and is never dropped.

Every uninstall is a recorded run (``fleet_runs`` kind ``uninstall``, one item per
tenant) whose tenants go through the same per-shard limiter as a migration; each item is
idempotent, so a resumed run (after kill -9) simply does its open items again. A tenant's
shard work holds the plugin's tenant advisory lock and the tenant's hold key shared (a
move holds it exclusive) and checks the shard's fence, as the migrator does: a held
tenant is retried later, a moved one is re-read from the directory and done where it
lives now.

SQL identifiers are only the directory's schema names and the plugin's declared table
and column names (internal names), quoted by the server (``quote_ident``); values are
always parameters.
"""
from __future__ import annotations

import asyncio
import csv
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence

import asyncpg
import semver

from router.errors import NotFound, RunBusy, RunNotFound, TenantFleetError, ValidationFailed
from router.models import TenantRecord
from router.pools import ShardPools
from router.settings import Settings
from shard_migrations import runs
from shard_migrations.engine import LockBusy, TenantHeld, TenantMovedAway, Unit, apply_tenant, classify, \
    current_placement, tenant_key
from shard_migrations.keys import HEARTBEAT_S, TENANT_STATES_TARGETED, UNIT_BACKOFF_MAX_S, advisory_key
from shard_migrations.ledger import Conn
from shard_migrations.limiter import ShardLimiters
from shard_migrations.packages import Discovery, PluginPackage, parse_version

log = logging.getLogger("tenantfleet.uninstall")

POLICIES = ("keep", "export", "purge")
RUN_KIND = "uninstall"
MANIFEST = "manifest.json"
EXPORT_FORMAT = "tenantfleet-export/1"
TABLE_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DEFAULT_PURGE_GRACE_S = 86400.0   # purge drops data a day after it was asked for, unless told otherwise
MAX_GRACE_S = 366 * 86400.0
_GRACE_RE = re.compile(r"^([0-9]{1,9})(s|m|h|d)?$")
_GRACE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# COPY's text of dates, times and floats depends on these: pinned so an export reads the
# same on every shard and a re-import can be checked byte for byte
_PIN_SESSION = ("SELECT set_config('timezone', 'UTC', true), set_config('datestyle', 'ISO, YMD', true), "
                "set_config('intervalstyle', 'postgres', true), set_config('extra_float_digits', '1', true), "
                "set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)")
_LOCKS = ("SELECT pg_try_advisory_lock($1), pg_try_advisory_lock_shared(fleet.tenant_hold_key($2::uuid))")
_UNHOLD = "SELECT pg_advisory_unlock_shared(fleet.tenant_hold_key($1::uuid))"

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Cleanup:
    """What a plugin declares for uninstall (``meta["uninstall"]``)."""
    policy: str
    tables: tuple[str, ...]


def cleanup_of(package: PluginPackage) -> Cleanup:
    """The plugin's declared cleanup; a plugin that declares none can only be uninstalled
    with ``keep``. Raises VALIDATION_FAILED for a malformed declaration."""
    meta = getattr(package.module, "meta", {})
    decl = meta.get("uninstall") if isinstance(meta, dict) else None
    if decl is None:
        return Cleanup("keep", ())
    if not isinstance(decl, dict):
        raise ValidationFailed(f"plugin {package.id}: meta.uninstall must be an object", pluginId=package.id)
    policy, tables = decl.get("policy", "keep"), decl.get("tables", [])
    if policy not in POLICIES:
        raise ValidationFailed(f"plugin {package.id}: meta.uninstall.policy must be one of {', '.join(POLICIES)}",
                               pluginId=package.id)
    if not isinstance(tables, list) or not all(isinstance(t, str) and TABLE_RE.match(t) for t in tables):
        raise ValidationFailed(f"plugin {package.id}: meta.uninstall.tables must be a list of table names",
                               pluginId=package.id)
    return Cleanup(policy, tuple(tables))


@dataclass(frozen=True)
class UninstallOptions:
    """``policy`` None: the plugin's default. ``tenant_ids`` None: every tenant the plugin is
    installed for (active or suspended). ``grace_s``: purge only, how long after the run is
    recorded the data may be dropped."""
    policy: str | None = None
    tenant_ids: tuple[str, ...] | None = None
    export_dir: Path | None = None
    grace_s: float | None = None     # None: DEFAULT_PURGE_GRACE_S
    concurrency: int | None = None


@dataclass
class UninstallReport:
    run_id: int
    plugin: str
    policy: str
    state: str                          # done | failed | waiting (purge in its grace period)
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    purge_after: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"runId": self.run_id, "plugin": self.plugin, "policy": self.policy, "state": self.state,
                "tenants": self.total, "done": self.done, "skipped": self.skipped,
                "failedItems": [{"itemKey": k, "error": e} for k, e in self.failed[:50]],
                "exports": self.exports, "purgeAfter": self.purge_after}


def parse_grace(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h`` or ``7d`` as seconds (at most 366 days); VALIDATION_FAILED otherwise."""
    m = _GRACE_RE.match(text.strip())
    if m is None:
        raise ValidationFailed(f"grace must be a number of seconds or like 15m, 2h, 7d, not {text!r}", field="grace")
    seconds = float(int(m.group(1)) * _GRACE_UNITS[m.group(2) or "s"])
    if seconds > MAX_GRACE_S:
        raise ValidationFailed("grace must be at most 366 days", field="grace")
    return seconds


def check_export_dir(path: Path) -> Path:
    """The directory, created if missing; VALIDATION_FAILED if it can't be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tenantfleet-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValidationFailed(f"export dir {path} is not writable: {exc.strerror or exc}",
                               field="exportDir") from None
    return path


def _validate(package: PluginPackage, opts: UninstallOptions) -> tuple[str, Cleanup]:
    cleanup = cleanup_of(package)
    policy = opts.policy or cleanup.policy
    if policy not in POLICIES:
        raise ValidationFailed(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}", field="policy")
    if policy != "keep" and not cleanup.tables:
        raise ValidationFailed(f"plugin {package.id} declares no tenant tables (meta.uninstall.tables): only "
                               "--policy keep", field="policy", pluginId=package.id)
    if policy == "export" and opts.export_dir is None:
        raise ValidationFailed("policy export needs an export dir (--export-dir, or TENANTFLEET_EXPORT_DIR)",
                               field="exportDir")
    if opts.grace_s is not None and not (0 <= opts.grace_s <= MAX_GRACE_S):
        raise ValidationFailed("grace must be between 0 and 366 days", field="grace")
    if opts.export_dir is not None and policy != "keep":
        check_export_dir(opts.export_dir)
    return policy, cleanup


_TARGETS = """
SELECT t.tenant_id::text AS tenant_id, t.code, t.schema_name, t.shard_id, t.state, t.epoch
FROM sys_tenant_plugins tp JOIN tenants t USING (tenant_id)
WHERE tp.plugin_id = $1 AND t.state = ANY($2::text[]) AND ($3::uuid[] IS NULL OR t.tenant_id = ANY($3::uuid[]))
ORDER BY t.shard_id, t.tenant_id
"""


def _record(r: asyncpg.Record) -> TenantRecord:
    return TenantRecord(tenant_id=r["tenant_id"], code=r["code"], schema=r["schema_name"], shard_id=r["shard_id"],
                        state=r["state"], epoch=r["epoch"])


async def _targets(control: asyncpg.Pool, plugin_id: str, tenant_ids: Sequence[str] | None) -> list[TenantRecord]:
    rows = await control.fetch(_TARGETS, plugin_id, list(TENANT_STATES_TARGETED),
                               None if tenant_ids is None else list(tenant_ids))
    found = [_record(r) for r in rows]
    if tenant_ids is not None:
        missing = set(tenant_ids) - {t.tenant_id for t in found}
        if missing:
            raise ValidationFailed(f"plugin {plugin_id} is not installed for tenant {sorted(missing)[0]}",
                                   pluginId=plugin_id, tenantId=sorted(missing)[0])
    return found


async def load_uninstall_run(control: asyncpg.Pool, run_id: int) -> runs.RunInfo:
    """An uninstall run, or RUN_NOT_FOUND."""
    row = await control.fetchrow(
        "SELECT run_id, plugin_id, target_version, params, state, owner, heartbeat_at, summary, created_at, "
        "finished_at FROM fleet_runs WHERE run_id = $1 AND kind = $2", run_id, RUN_KIND)
    if row is None:
        raise RunNotFound(f"no uninstall run {run_id}", runId=run_id)
    return runs.RunInfo(row["run_id"], row["plugin_id"], row["target_version"], row["params"], row["state"],
                        row["owner"], row["heartbeat_at"], runs.stored_summary(row["summary"]), row["created_at"],
                        row["finished_at"])


async def uninstall(control: asyncpg.Pool, pools: ShardPools, settings: Settings, package: PluginPackage,
                    opts: UninstallOptions, *, resume: int | None = None, limiters: ShardLimiters | None = None,
                    on_run: Callable[[int], None] | None = None, on_progress: Progress | None = None) -> UninstallReport:
    """Uninstall ``package`` from the targeted tenants as a recorded run (or finish run
    ``resume``); returns its report (state ``done``, ``failed`` with its failed items, or
    ``waiting``: a purge recorded and its tenants disabled, to be finished with ``resume``
    once ``purgeAfter`` has passed).

    ``pools`` connect as the shards' owner role. ``on_progress`` is called with
    ``{"runId", "total", "done", "skipped", "failed", "shards": {id: done}}`` after each tenant.

    Raises before anything is changed: VALIDATION_FAILED (unknown policy, a policy the
    plugin can't do, export dir missing or not writable, the plugin not installed for a
    named tenant, resume of another plugin's run), RUN_NOT_FOUND, RUN_BUSY (a resumed
    purge still in its grace period, or a run that is done).
    """
    if resume is not None:
        info = await load_uninstall_run(control, resume)
        if info.plugin_id != package.id:
            raise ValidationFailed(f"run {resume} uninstalls {info.plugin_id}, not {package.id}", runId=resume)
        if info.state == "done":
            raise RunBusy(f"run {resume} is done", runId=resume)
        age = await control.fetchval("SELECT extract(epoch FROM now() - heartbeat_at)::float8 FROM fleet_runs "
                                     "WHERE run_id = $1", resume)
        if info.state == "running" and age is not None and age < 3 * HEARTBEAT_S:
            raise RunBusy(f"run {resume} is running in another process (heartbeat {age:.0f} s ago)", runId=resume)
        p = info.params
        opts = UninstallOptions(policy=p["policy"], tenant_ids=None if p.get("tenants") is None else tuple(p["tenants"]),
                                export_dir=None if p.get("exportDir") is None else Path(p["exportDir"]),
                                grace_s=float(p.get("graceS") or 0), concurrency=opts.concurrency)
        policy, cleanup = _validate(package, opts)
        purge_after = dt.datetime.fromisoformat(p["purgeAfter"]) if p.get("purgeAfter") else None
        if purge_after is not None:
            now = await control.fetchval("SELECT now()")
            if now < purge_after:
                raise RunBusy(f"run {resume} purges {package.id} after its grace period, at {purge_after.isoformat()}",
                              runId=resume, purgeAfter=purge_after.isoformat(),
                              retryAfter=int((purge_after - now).total_seconds()) + 1)
        open_keys = {i.key for i in await runs.open_items(control, resume)}
        tenants = [t for t in await _targets(control, package.id, None) if tenant_key(t.tenant_id) in open_keys]
        gone = open_keys - {tenant_key(t.tenant_id) for t in tenants}
        run_id = resume
        await runs.claim(control, run_id)
    else:
        policy, cleanup = _validate(package, opts)
        tenants = await _targets(control, package.id, opts.tenant_ids)
        now = await control.fetchval("SELECT now()")
        grace = DEFAULT_PURGE_GRACE_S if opts.grace_s is None else opts.grace_s
        purge_after = now + dt.timedelta(seconds=grace) if policy == "purge" and grace > 0 else None
        params = {"policy": policy, "tenants": None if opts.tenant_ids is None else list(opts.tenant_ids),
                  "exportDir": None if opts.export_dir is None or policy == "keep" else str(opts.export_dir.resolve()),
                  "graceS": grace if policy == "purge" else None, "purgeAfter": None if purge_after is None else purge_after.isoformat()}
        gone = set()
        run_id = await _create_run(control, package.id, params, tenants, waiting=purge_after is not None)
    if on_run is not None:
        on_run(run_id)
    report = UninstallReport(run_id, package.id, policy, "running", total=len(tenants) + len(gone),
                             purge_after=None if purge_after is None else purge_after.isoformat())
    if resume is None:  # disabled first, everywhere at once: no request writes to what is exported or dropped
        await control.execute("UPDATE sys_tenant_plugins SET enabled = false, updated_at = now() "
                              "WHERE plugin_id = $1 AND tenant_id = ANY($2::uuid[]) AND enabled",
                              package.id, [t.tenant_id for t in tenants])
    if resume is None and purge_after is not None:
        report.state = "waiting"
        await control.execute("UPDATE fleet_runs SET summary = $2, updated_at = now() WHERE run_id = $1",
                               run_id, report.to_dict())
        return report
    export_root = None if opts.export_dir is None or policy == "keep" else opts.export_dir / package.id
    limiters = limiters or ShardLimiters(settings, opts.concurrency)
    per_shard: dict[str, int] = {}

    def progress() -> dict[str, Any]:
        return {"runId": run_id, "total": report.total, "done": report.done, "skipped": report.skipped,
                "failed": len(report.failed), "shards": dict(per_shard)}

    async with runs.RunRecorder(control, run_id, package.id, "", settings.batch_size,
                                summary=lambda: report.to_dict() | {"progress": progress()}) as rec:
        for key in gone:
            rec.skipped(key, "nothing left to uninstall (purged before the run stopped, or the tenant is gone)")
            report.skipped += 1
        try:
            async def one(tenant: TenantRecord) -> None:
                key = tenant_key(tenant.tenant_id)
                rec.running([(key, 1)])
                try:
                    outcome = await _tenant_with_retries(control, pools, settings, package, cleanup, policy,
                                                         tenant, export_root, run_id, limiters)
                except TenantFleetError as exc:
                    rec.failed(key, 1, exc.message)
                    report.failed.append((key, exc.message))
                except Exception as exc:
                    if classify(exc) == "fatal" and not isinstance(exc, asyncpg.PostgresError):
                        raise
                    why = f"{exc.__class__.__name__}: {exc}"
                    rec.failed(key, 1, why)
                    report.failed.append((key, why))
                else:
                    if outcome == "skipped":
                        rec.skipped(key, "enabled again during the grace period")
                        report.skipped += 1
                    else:
                        rec.done(key, 1, None)
                        report.done += 1
                        if outcome:
                            report.exports.append(outcome)
                    per_shard[tenant.shard_id] = per_shard.get(tenant.shard_id, 0) + 1
                if on_progress is not None:
                    on_progress(progress())

            async with asyncio.TaskGroup() as tg:
                for t in tenants:
                    tg.create_task(one(t), name=f"uninstall-{t.tenant_id}")
        except BaseException as exc:
            report.state = "failed"
            try:
                await asyncio.shield(runs.finish(control, run_id, "failed",
                                                 report.to_dict() | {"error": getattr(exc, "message", repr(exc))}))
            except runs.DB_ERRORS:
                log.warning("run %s: could not record the failure", run_id, exc_info=True)
            raise
    report.state = "failed" if report.failed else "done"
    await runs.finish(control, run_id, report.state, report.to_dict() | {"progress": progress()})
    return report


async def _create_run(control: asyncpg.Pool, plugin_id: str, params: dict[str, Any], tenants: Sequence[TenantRecord],
                      *, waiting: bool) -> int:
    async with control.acquire() as conn, conn.transaction():
        run_id: int = await conn.fetchval(
            "INSERT INTO fleet_runs (kind, plugin_id, target_version, params, state, owner, heartbeat_at) "
            "VALUES ($1, $2, NULL, $3, $4, $5, now()) RETURNING run_id",
            RUN_KIND, plugin_id, params, "planned" if waiting else "running", runs.owner_tag())
        if tenants:
            await conn.copy_records_to_table(
                "fleet_run_items", columns=["run_id", "item_key", "shard_id", "tenant_id", "scope"],
                records=[(run_id, tenant_key(t.tenant_id), t.shard_id, t.tenant_id, "tenant") for t in tenants])
    return run_id


async def _tenant_with_retries(control: asyncpg.Pool, pools: ShardPools, settings: Settings, package: PluginPackage,
                               cleanup: Cleanup, policy: str, tenant: TenantRecord, export_root: Path | None,
                               run_id: int, limiters: ShardLimiters) -> str | None:
    """One tenant's shard work through its shard's limiter; a busy lock or a move holding
    the tenant is retried (up to ``migrate_move_wait_s``), a moved tenant followed.
    Returns the export directory written, ``"skipped"``, or None."""
    row = await control.fetchrow("SELECT enabled, version_installed FROM sys_tenant_plugins "
                                 "WHERE tenant_id = $1::uuid AND plugin_id = $2", tenant.tenant_id, package.id)
    if row is None:
        return "skipped"  # purged by an earlier attempt of this item (killed before it was recorded)
    if policy == "purge" and row["enabled"]:
        return "skipped"
    version = row["version_installed"] or str(package.version)
    started = time.monotonic()
    delay = 0.05
    while True:
        lim = limiters.get(tenant.shard_id)
        try:
            pool = await pools.get(tenant.shard_id)
            async with lim.slot():
                async with pool.acquire(timeout=settings.connect_timeout_s) as conn:
                    out = await _tenant_on_shard(conn, settings, package, cleanup, policy, tenant, export_root,
                                                 run_id, version)
            lim.success()
            break
        except TenantMovedAway:
            now = await current_placement(control, tenant.tenant_id)
            if now is None:
                return "skipped"
            if (now.shard_id, now.epoch) != (tenant.shard_id, tenant.epoch):
                log.info("run %s: tenant %s is now on shard %s at epoch %s; its uninstall follows it", run_id,
                         tenant.code, now.shard_id, now.epoch)
            # else the directory has not caught up with the fence: wait as for a held tenant
            tenant = now
        except LockBusy:
            pass
        except Exception as exc:
            if classify(exc) != "shard":
                raise
            lim.failure(exc)
            if lim.down:
                raise
        if time.monotonic() - started > settings.migrate_move_wait_s:
            raise TenantHeldTooLong(tenant)
        await asyncio.sleep(delay)
        delay = min(UNIT_BACKOFF_MAX_S, delay * 2)
    if policy == "purge":
        await control.execute("DELETE FROM sys_tenant_plugins WHERE tenant_id = $1::uuid AND plugin_id = $2 "
                              "AND NOT enabled", tenant.tenant_id, package.id)
    return out


class TenantHeldTooLong(TenantHeld):
    def __init__(self, tenant: TenantRecord) -> None:
        super().__init__(f"tenant {tenant.code} stayed locked (held by a move or a migrator)")


@asynccontextmanager
async def _held(conn: Conn, plugin_id: str, tenant: TenantRecord) -> AsyncIterator[None]:
    """Session-level: the plugin's tenant unit lock (the migrator's) and the tenant's hold
    key shared (a move holds it exclusive): LockBusy / TenantHeld at once if taken; then the
    fence check in its own statement (TenantMovedAway). Released in ``finally``; a
    connection that can't release them is terminated, so they end with the session."""
    key = advisory_key(plugin_id, "tenant", tenant.tenant_id)
    row = await conn.fetchrow(_LOCKS, key, tenant.tenant_id)
    try:
        unit = Unit(tenant.shard_id, "tenant", tenant, ())
        if row is None or not row[0]:
            raise LockBusy(unit.key)
        if not row[1]:
            raise TenantHeld(unit.key)
        epoch = await conn.fetchval("SELECT epoch FROM fleet.tenant_fence WHERE tenant_id = $1::uuid",
                                    tenant.tenant_id)
        if epoch is None or epoch > tenant.epoch:
            raise TenantMovedAway(unit, epoch)
        yield
    finally:
        if not conn.is_closed():
            try:
                if row is not None and row[0]:
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)
                if row is not None and row[1]:
                    await conn.execute(_UNHOLD, tenant.tenant_id)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                conn.terminate()


async def _pin(conn: Conn, settings: Settings) -> None:
    await conn.execute(_PIN_SESSION, f"{settings.lock_timeout_ms}ms", f"{settings.statement_timeout_ms}ms")


async def _qualified(conn: Conn, schema: str, table: str) -> str | None:
    """``"schema"."table"`` quoted by the server, or None if the table does not exist."""
    q: str | None = await conn.fetchval(
        "SELECT quote_ident($1) || '.' || quote_ident($2) WHERE to_regclass(quote_ident($1) || '.' || "
        "quote_ident($2)) IS NOT NULL", schema, table)
    return q


async def _columns(conn: Conn, qualified: str) -> list[str]:
    rows = await conn.fetch("SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 "
                            "AND NOT attisdropped ORDER BY attnum", qualified)
    return [r["attname"] for r in rows]


async def _copy_out(conn: Conn, qualified: str, columns: Sequence[str], path: Path) -> None:
    """The table's rows as CSV with a header, in a stable order (by the whole row's text)."""
    cols = await conn.fetchval("SELECT string_agg(quote_ident(c), ', ' ORDER BY o) FROM "
                               "unnest($1::text[]) WITH ORDINALITY AS u(c, o)", list(columns))
    # identifiers quoted by the server from internal names (schema, declared table, catalog columns)
    await conn.copy_from_query(f"SELECT {cols} FROM {qualified} AS r ORDER BY r::text", output=path,
                               format="csv", header=True)


def _csv_records(path: Path) -> int:
    """Rows in a CSV file with a header (quoted newlines inside values count once)."""
    with path.open(newline="", encoding="utf-8") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


async def _tenant_on_shard(conn: Conn, settings: Settings, package: PluginPackage, cleanup: Cleanup, policy: str,
                           tenant: TenantRecord, export_root: Path | None, run_id: int, version: str) -> str | None:
    if policy == "keep":
        return None
    written: str | None = None
    # the locks and the fence check before the snapshot: the export reads what the hold protects
    async with _held(conn, package.id, tenant), conn.transaction(isolation="repeatable_read"):
        await _pin(conn, settings)
        if export_root is not None:
            written = str(await _export(conn, package, cleanup, tenant, export_root, version, run_id))
        if policy == "purge":
            for table in reversed(cleanup.tables):
                q = await _qualified(conn, tenant.schema, table)
                if q is not None:
                    await conn.execute(f"DROP TABLE {q} CASCADE")  # server-quoted internal names
            await conn.execute("DELETE FROM fleet.sys_plugin_migrations WHERE plugin_id = $1 AND scope = 'tenant' "
                               "AND tenant_id = $2::uuid", package.id, tenant.tenant_id)
    return written


async def _export(conn: Conn, package: PluginPackage, cleanup: Cleanup, tenant: TenantRecord, root: Path,
                  version: str, run_id: int) -> Path:
    final = root / tenant.tenant_id
    tmp = root / f"{tenant.tenant_id}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tables: list[dict[str, Any]] = []
    for table in cleanup.tables:
        q = await _qualified(conn, tenant.schema, table)
        if q is None:
            continue
        columns = await _columns(conn, q)
        path = tmp / f"{table}.csv"
        await _copy_out(conn, q, columns, path)
        rows = _csv_records(path)
        tables.append({"name": table, "file": path.name, "columns": columns, "rows": rows,
                       "sha256": _sha256(path)})
    manifest = {"format": EXPORT_FORMAT, "plugin": package.id, "version": version,
                "tenantId": tenant.tenant_id, "tenantCode": tenant.code, "runId": run_id,
                "exportedAt": dt.datetime.now(dt.timezone.utc).isoformat(), "tables": tables}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    read_manifest(tmp)  # verified: re-read and every checksum compared before anything is dropped
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def read_manifest(src: Path) -> dict[str, Any]:
    """An export's manifest with every file re-read and checked against it.

    Raises NOT_FOUND (no manifest there) or VALIDATION_FAILED (field ``export``) naming what
    is wrong: bad JSON, a missing file, a checksum that differs."""
    def bad(why: str) -> ValidationFailed:
        return ValidationFailed(f"export {src} is not usable: {why}", field="export")
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"no export at {src} (no {MANIFEST})", field="export") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"{MANIFEST} can't be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT \
            or not isinstance(manifest.get("plugin"), str) or not isinstance(manifest.get("tables"), list) \
            or not isinstance(manifest.get("version"), str):
        raise bad(f"{MANIFEST} is not a {EXPORT_FORMAT} manifest")
    for t in manifest["tables"]:
        if not (isinstance(t, dict) and isinstance(t.get("name"), str) and TABLE_RE.match(t["name"])
                and t.get("file") == f"{t['name']}.csv" and isinstance(t.get("columns"), list)
                and all(isinstance(c, str) for c in t["columns"]) and isinstance(t.get("sha256"), str)
                and isinstance(t.get("rows"), int)):
            raise bad(f"{MANIFEST} has a malformed table entry")
        path = src / t["file"]
        try:
            actual = _sha256(path)
        except OSError:
            raise bad(f"{t['file']} is missing") from None
        if actual != t["sha256"]:
            raise bad(f"{t['file']} has sha256 {actual[:12]}…, the manifest says {t['sha256'][:12]}…")
    return manifest


async def import_export(control: asyncpg.Pool, pools: ShardPools, settings: Settings, discovery: Discovery,
                        tenant: TenantRecord, src: Path) -> dict[str, Any]:
    """Re-import an export (a ``<export dir>/<plugin>/<tenant id>`` directory) into ``tenant``
    (the same or another one): the files are verified against the manifest, the plugin is
    installed for the tenant at the exported version (its migrations applied) if needed, the
    rows copied in ONE transaction under the tenant's hold (sequences moved past the ids),
    then read back and checksummed: any difference rolls everything back. The tenant's
    plugin is enabled at the end.

    Raises NOT_FOUND (no export there), VALIDATION_FAILED (a corrupt or unreadable export, a version this plugin doesn't
    ship, a table that already has rows), PLUGIN_NOT_FOUND, TENANT_BUSY, MIGRATION_FAILED,
    SHARD_UNREACHABLE; nothing is imported then.
    """
    manifest = read_manifest(src)
    package = discovery.get(manifest["plugin"])
    version = parse_version(manifest["version"], field_name="manifest version")
    if version > package.version:
        raise ValidationFailed(f"the export is of {package.id} {version}; this host ships {package.version}",
                               field="export")
    cleanup = cleanup_of(package)
    unknown = [t["name"] for t in manifest["tables"] if t["name"] not in cleanup.tables]
    if unknown:
        raise ValidationFailed(f"the export has table {unknown[0]}, which {package.id} does not declare",
                               field="export")
    pool = await pools.get(tenant.shard_id)
    async with pool.acquire(timeout=settings.connect_timeout_s) as conn:
        await _refuse_rows(conn, tenant, manifest)
    await control.execute(
        "INSERT INTO sys_plugins (plugin_id, api_version, version_installed) VALUES ($1, $2, $3) "
        "ON CONFLICT (plugin_id) DO NOTHING", package.id, package.api, str(version))
    installed = await control.fetchval("SELECT version_installed FROM sys_tenant_plugins WHERE tenant_id = $1::uuid "
                                       "AND plugin_id = $2", tenant.tenant_id, package.id)
    to = version if installed is None or semver.Version.parse(installed) < version else None
    if to is not None:
        await apply_tenant(pools, settings, package, tenant, to=to, control=control)
    tenant = await current_placement(control, tenant.tenant_id) or tenant
    pool = await pools.get(tenant.shard_id)
    counts: dict[str, int] = {}
    async with pool.acquire(timeout=settings.connect_timeout_s) as conn:
        async with _held(conn, package.id, tenant), conn.transaction():
            await _pin(conn, settings)
            await _refuse_rows(conn, tenant, manifest)
            for t in manifest["tables"]:
                await conn.copy_to_table(t["name"], schema_name=tenant.schema, source=src / t["file"],
                                         columns=t["columns"], format="csv", header=True)
                q = await _qualified(conn, tenant.schema, t["name"])
                assert q is not None
                await _advance_sequences(conn, q, t["columns"])
                check = src / f".{t['name']}.verify.csv"
                try:
                    await _copy_out(conn, q, t["columns"], check)
                    got = _sha256(check)
                finally:
                    check.unlink(missing_ok=True)
                if got != t["sha256"]:
                    raise ValidationFailed(f"table {t['name']} read back with sha256 {got[:12]}…, the export has "
                                           f"{t['sha256'][:12]}… (column types differ?): nothing imported",
                                           field="export")
                counts[t["name"]] = t["rows"]
    await control.execute(
        "INSERT INTO sys_tenant_plugins (tenant_id, plugin_id, enabled, version_installed) "
        "VALUES ($1::uuid, $2, true, $3) ON CONFLICT (tenant_id, plugin_id) DO UPDATE SET enabled = true, "
        "version_installed = coalesce(sys_tenant_plugins.version_installed, EXCLUDED.version_installed), "
        "updated_at = now()", tenant.tenant_id, package.id, str(to or installed or version))
    return {"pluginId": package.id, "tenantId": tenant.tenant_id, "version": str(version), "rows": counts,
            "verified": True}


async def _refuse_rows(conn: Conn, tenant: TenantRecord, manifest: dict[str, Any]) -> None:
    for t in manifest["tables"]:
        q = await _qualified(conn, tenant.schema, t["name"])
        if q is not None and await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {q})"):
            raise ValidationFailed(f"tenant {tenant.code} already has rows in {t['name']}: import into an empty "
                                   "table (purge the plugin for the tenant first)", field="tenant",
                                   tenantId=tenant.tenant_id)


async def _advance_sequences(conn: Conn, qualified: str, columns: Sequence[str]) -> None:
    """Serial and identity columns' sequences past the imported values."""
    for col in columns:
        seq = await conn.fetchval("SELECT pg_get_serial_sequence($1, $2)", qualified, col)
        if seq is None:
            continue
        qcol = await conn.fetchval("SELECT quote_ident($1)", col)
        await conn.execute(f"SELECT setval($1::regclass, coalesce(max({qcol}), 0) + 1, false) FROM {qualified}",
                           seq)
