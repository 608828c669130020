"""What a run has to do: the target version, the files, and what is pending where.

Planning reads the control plane in one snapshot and each shard's ledger once
(`ledger.read_targeted`). A tenant that is up to date costs its id: the ledger query
leaves its rows on the shard, and its record is not read. So a no-op plan over 100,000
tenants moves 100,000 ids, not 100,000 records and 200,000 ledger rows.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Sequence

import asyncpg
import semver

from router.errors import TenantNotFound, ValidationFailed
from router.models import TenantRecord, parse_tenant_id
from router.pools import ShardPools, redact
from shard_migrations import ledger
from shard_migrations.engine import classify, public_key, tenant_key
from shard_migrations.keys import TENANT_STATES_TARGETED
from shard_migrations.packages import MigrationFile, PluginPackage, parse_version


@dataclass(frozen=True)
class Target:
    """One plugin going to one version, optionally starting at one file."""
    package: PluginPackage
    version: semver.Version
    public_files: tuple[MigrationFile, ...]
    tenant_files: tuple[MigrationFile, ...]
    from_file: str | None = None

    @property
    def plugin_id(self) -> str:
        return self.package.id


def known_versions(package: PluginPackage) -> set[semver.Version]:
    return {package.version, *(m.since for m in package.migrations)}


def resolve_target(package: PluginPackage, to: str | None, from_file: str | None = None) -> Target:
    """The run's target. Raises VALIDATION_FAILED for a malformed or unknown version (one the
    package does not ship: not its own and not any file's ``fleet:version``) or an unknown
    ``from_file`` (``name.sql`` or ``scope/name.sql``)."""
    version = package.check_target(to)
    if version not in known_versions(package):
        shipped = ", ".join(str(v) for v in sorted(known_versions(package)))
        raise ValidationFailed(f"plugin {package.id} has no version {version} (ships: {shipped})",
                               pluginId=package.id, version=str(version))
    public = package.files("public", version)
    tenant = package.files("tenant", version)
    if from_file is not None:
        scope, _, name = from_file.rpartition("/")
        matches = [f for f in (*public, *tenant) if f.name == name and scope in ("", f.scope)]
        if len(matches) != 1:
            what = "is ambiguous (give scope/name)" if matches else f"is not a file of {package.id} {version}"
            raise ValidationFailed(f"--from {from_file} {what}", field="from")
        start = matches[0]
        # the order is every public file, then every tenant file; --from starts in that order
        if start.scope == "tenant":
            public = []
            tenant = [f for f in tenant if f.name >= start.name]
        else:
            public = [f for f in public if f.name >= start.name]
    return Target(package, version, tuple(public), tuple(tenant), from_file)


# The distinct versions installed, one index probe per version ((plugin_id, version_installed)
# is indexed) rather than a pass over every tenant's row: a "loose index scan".
_INSTALLED_VERSIONS = """
WITH RECURSIVE v(version_installed) AS (
    (SELECT version_installed FROM sys_tenant_plugins WHERE plugin_id = $1 ORDER BY version_installed LIMIT 1)
    UNION ALL
    SELECT (SELECT p.version_installed FROM sys_tenant_plugins p
            WHERE p.plugin_id = $1 AND p.version_installed > v.version_installed
            ORDER BY p.version_installed LIMIT 1)
    FROM v WHERE v.version_installed IS NOT NULL
)
SELECT version_installed FROM v WHERE version_installed IS NOT NULL
"""


async def check_not_downgrade(control: asyncpg.Pool, target: Target) -> None:
    """VALIDATION_FAILED if the registry says a tenant is already past the target. (The
    ledgers are checked too, by `build_plan`: see `Plan.raise_if_downgrade`.)"""
    rows = await control.fetch(_INSTALLED_VERSIONS, target.plugin_id)
    for r in rows:
        try:
            installed = parse_version(r["version_installed"])
        except ValidationFailed:
            continue  # not a version we wrote; nothing to compare
        if installed > target.version:
            raise ValidationFailed(
                f"downgrade refused: {target.plugin_id} {installed} is installed, {target.version} requested "
                "(migrations only go forward)", pluginId=target.plugin_id, version=str(target.version))


# The targeted tenants' ids per shard (no order: sorting 100,000 codes costs more than the
# rest of a no-op plan); their records are read (`_RECORDS`) only for the tenants a plan
# has to name: those with a file pending or drifted, and every tenant of a shard whose ledger
# could not be read.
_TARGETED_IDS = """
SELECT shard_id, array_agg(tenant_id::text) AS ids FROM tenants
WHERE state = ANY($1::text[]) AND ($2::uuid[] IS NULL OR tenant_id = ANY($2::uuid[]))
GROUP BY shard_id
"""

_RECORDS = """
SELECT tenant_id::text AS tenant_id, code, schema_name, shard_id, state, epoch FROM tenants
WHERE state = ANY($1::text[]) AND ($2::uuid[] IS NULL OR tenant_id = ANY($2::uuid[]))
AND (tenant_id = ANY($3::uuid[]) OR shard_id = ANY($4::text[]))
ORDER BY shard_id, code
"""


@dataclass
class TenantPlan:
    tenant: TenantRecord
    pending: list[MigrationFile]


@dataclass
class ShardPlan:
    shard_id: str
    dsn: str
    error: str | None = None                      # set when the ledger could not be read
    public_pending: list[MigrationFile] = field(default_factory=list)
    tenants: list[TenantPlan] = field(default_factory=list)   # tenants with pending files, by code
    up_to_date: list[str] = field(default_factory=list)        # ids of the targeted tenants with none
    drift: list[ledger.Drift] = field(default_factory=list)
    ahead: list[str] = field(default_factory=list)   # files newer than the target that are recorded

    @property
    def reachable(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"shardId": self.shard_id, "reachable": self.reachable, "error": self.error,
                "publicPending": [f.name for f in self.public_pending],
                "tenantsPending": len(self.tenants), "tenantsUpToDate": len(self.up_to_date),
                "filesPending": len(self.public_pending) + sum(len(t.pending) for t in self.tenants),
                "drift": len(self.drift)}


@dataclass
class Plan:
    target: Target
    shards: dict[str, ShardPlan]
    tenant_filter: tuple[str, ...] | None = None

    @property
    def drift(self) -> list[ledger.Drift]:
        return [d for s in self.shards.values() for d in s.drift]

    def raise_if_downgrade(self) -> None:
        """VALIDATION_FAILED naming a shard/tenant whose ledger has a file newer than the target."""
        for s in self.shards.values():
            if s.ahead:
                t = self.target
                raise ValidationFailed(f"downgrade refused: {s.ahead[0]} is applied, {t.plugin_id} {t.version} requested "
                                       "(migrations only go forward)", pluginId=t.plugin_id, version=str(t.version))

    @property
    def unreachable(self) -> list[ShardPlan]:
        return [s for s in self.shards.values() if not s.reachable]

    def item_keys(self) -> list[tuple[str, str, str | None, str]]:
        """(item_key, shard_id, tenant_id, scope) for every unit with something to do."""
        out: list[tuple[str, str, str | None, str]] = []
        for s in self.shards.values():
            if s.public_pending:
                out.append((public_key(s.shard_id), s.shard_id, None, "public"))
            out.extend((tenant_key(t.tenant.tenant_id), s.shard_id, t.tenant.tenant_id, "tenant") for t in s.tenants)
        return out

    def files_pending(self) -> int:
        return sum(len(s.public_pending) + sum(len(t.pending) for t in s.tenants) for s in self.shards.values())

    def to_dict(self) -> dict[str, Any]:
        t = self.target
        return {"plugin": t.plugin_id, "version": str(t.version), "from": t.from_file,
                "publicFiles": [f.name for f in t.public_files], "tenantFiles": [f.name for f in t.tenant_files],
                "shards": [s.to_dict() for s in self.shards.values()], "filesPending": self.files_pending(),
                "drift": [d.to_dict() for d in self.drift]}


async def build_plan(control: asyncpg.Pool, pools: ShardPools, target: Target, *,
                     tenant_ids: Sequence[str] | None = None, shard_ids: Sequence[str] = (),
                     strict: bool = True) -> Plan:
    """What is pending on every shard and tenant, from one ledger query per shard.

    The control plane is read in one snapshot (a repeatable-read transaction): the
    targeted tenants' ids per shard, then the records of the tenants that are not up to
    date (a file pending or drifted) and of every tenant of an unreachable shard. Each
    shard's ledger query (`ledger.read_targeted`) returns rows only for its tenants that
    are not up to date, so an up-to-date tenant costs an id, not a record nor ledger rows.

    A shard whose ledger can't be read is kept in the plan with ``error`` set and all of
    its targeted tenants pending (we can't know better); the caller reports it.
    With ``tenant_ids``, only those tenants and their shards (plus ``shard_ids``) are
    planned. Raises TENANT_NOT_FOUND for an unknown ``tenant_ids`` entry (when ``strict``).
    """
    ids = None if tenant_ids is None else [parse_tenant_id(t) for t in tenant_ids]
    states = list(TENANT_STATES_TARGETED)
    async with control.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        by_shard: dict[str, list[str]] = {r["shard_id"]: r["ids"] for r in await conn.fetch(_TARGETED_IDS, states, ids)}
        if ids is not None and strict:
            found = {t for shard in by_shard.values() for t in shard}
            missing = set(ids) - found
            if missing:
                first = sorted(missing)[0]
                raise TenantNotFound(f"no active or suspended tenant {first}", id=first)
        shard_rows = await conn.fetch("SELECT shard_id, dsn FROM shards ORDER BY shard_id")
        if tenant_ids is not None:  # only the shards of the chosen tenants
            shard_rows = [r for r in shard_rows if r["shard_id"] in by_shard or r["shard_id"] in shard_ids]
        plans = {r["shard_id"]: ShardPlan(r["shard_id"], r["dsn"]) for r in shard_rows}
        read = dict(zip(plans, await asyncio.gather(
            *(_read_ledger(pools, target, p, by_shard.get(sid, [])) for sid, p in plans.items()))))
        named = [t for incomplete in read.values() if incomplete is not None for t in incomplete]
        unreachable = [sid for sid, incomplete in read.items() if incomplete is None]
        records: dict[str, list[TenantRecord]] = {}
        if named or unreachable:
            for r in await conn.fetch(_RECORDS, states, ids, named, unreachable):
                records.setdefault(r["shard_id"], []).append(
                    TenantRecord(tenant_id=r["tenant_id"], code=r["code"], schema=r["schema_name"],
                                 shard_id=r["shard_id"], state=r["state"], epoch=r["epoch"]))
    for sid, plan in plans.items():
        shard_records = records.get(sid, [])
        incomplete = read[sid]
        if incomplete is None:
            plan.tenants = [TenantPlan(t, list(target.tenant_files)) for t in shard_records]
            continue
        for t in shard_records:  # by code, as the plan's units go
            recorded = incomplete.get(t.tenant_id)
            if recorded is None:
                continue
            todo, drift = ledger.split(target.tenant_files, recorded, shard_id=sid, tenant_id=t.tenant_id)
            plan.drift.extend(drift)
            if todo:
                plan.tenants.append(TenantPlan(t, todo))
        planned = {t.tenant.tenant_id for t in plan.tenants}
        plan.up_to_date = [t for t in by_shard.get(sid, []) if t not in planned] if planned else by_shard.get(sid, [])
    return Plan(target, plans, None if tenant_ids is None else tuple(tenant_ids))


async def _read_ledger(pools: ShardPools, target: Target, plan: ShardPlan,
                       tenant_ids: Sequence[str]) -> dict[str, dict[str, str]] | None:
    """Read the shard's ledger into ``plan`` (public scope, drift there, files ahead of the
    target); returns the ledgers of its tenants that are not up to date (see
    `ledger.read_targeted`), or None (with ``plan.error`` set) if the shard can't be read."""
    later = {(f.scope, f.name): f for f in target.package.migrations if f.since > target.version}
    try:
        pool = await pools.get(plan.shard_id)
        async with pool.acquire() as conn:
            incomplete, recorded = await ledger.read_targeted(
                conn, target.plugin_id, tenant_ids, target.tenant_files,
                [name for scope, name in later if scope == "tenant"])
    except Exception as exc:
        if classify(exc) != "shard":
            raise
        plan.error = f"cannot read the ledger of shard {plan.shard_id} at {redact(plan.dsn)}: " \
                     f"{exc.__class__.__name__}: {exc}"
        plan.public_pending = list(target.public_files)
        return None
    plan.public_pending, drift = ledger.split(target.public_files, recorded.get(("public", None), {}),
                                              shard_id=plan.shard_id, tenant_id=None)
    plan.drift.extend(drift)
    if later:
        for (scope, tenant_id), names in recorded.items():
            for name in names:
                f = later.get((scope, name))
                if f is not None:
                    where = f"tenant {tenant_id}" if tenant_id else "public scope"
                    plan.ahead.append(f"{scope}/{name} ({f.since}) on shard {plan.shard_id}, {where}")
    return incomplete
