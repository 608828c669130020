"""What a run has to do: the target version, the files, and what is pending where.

Planning reads the control plane once (the targeted tenants) and each shard's ledger
once (`ledger.read_shard`), so its cost grows with shards, not with tenants.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

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


async def check_not_downgrade(control: asyncpg.Pool, target: Target) -> None:
    """VALIDATION_FAILED if the registry says a tenant is already past the target. (The
    ledgers are checked too, by `build_plan`: see `Plan.raise_if_downgrade`.)"""
    rows = await control.fetch(
        "SELECT DISTINCT version_installed FROM sys_tenant_plugins WHERE plugin_id = $1", target.plugin_id)
    for r in rows:
        try:
            installed = parse_version(r["version_installed"])
        except ValidationFailed:
            continue  # not a version we wrote; nothing to compare
        if installed > target.version:
            raise ValidationFailed(
                f"downgrade refused: {target.plugin_id} {installed} is installed, {target.version} requested "
                "(migrations only go forward)", pluginId=target.plugin_id, version=str(target.version))


_TENANTS = """
SELECT tenant_id::text AS tenant_id, code, schema_name, shard_id, state, epoch
FROM tenants
WHERE state = ANY($1::text[]) AND ($2::uuid[] IS NULL OR tenant_id = ANY($2::uuid[]))
ORDER BY shard_id, code
"""


async def targeted_tenants(control: asyncpg.Pool, tenant_ids: Sequence[str] | None = None, *,
                           strict: bool = True) -> list[TenantRecord]:
    """Tenants the tenant scope targets (state active or suspended), optionally only ``tenant_ids``.

    Raises TENANT_NOT_FOUND for an id that is not a targeted tenant (when ``strict``)."""
    ids = None if tenant_ids is None else [parse_tenant_id(t) for t in tenant_ids]
    rows = await control.fetch(_TENANTS, list(TENANT_STATES_TARGETED), ids)
    recs = [TenantRecord(tenant_id=r["tenant_id"], code=r["code"], schema=r["schema_name"], shard_id=r["shard_id"],
                         state=r["state"], epoch=r["epoch"]) for r in rows]
    if ids is not None and strict:
        missing = set(ids) - {r.tenant_id for r in recs}
        if missing:
            first = sorted(missing)[0]
            raise TenantNotFound(f"no active or suspended tenant {first}", id=first)
    return recs


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
    tenants: list[TenantPlan] = field(default_factory=list)   # tenants with pending files
    up_to_date: list[TenantRecord] = field(default_factory=list)
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
    """What is pending on every shard and tenant, from one ledger read per shard.

    A shard whose ledger can't be read is kept in the plan with ``error`` set and all of
    its targeted tenants pending (we can't know better); the caller reports it.
    With ``tenant_ids``, only those tenants and their shards (plus ``shard_ids``) are
    planned. Raises TENANT_NOT_FOUND for an unknown ``tenant_ids`` entry (when ``strict``).
    """
    tenants = await targeted_tenants(control, tenant_ids, strict=strict)
    shard_rows = await control.fetch("SELECT shard_id, dsn FROM shards ORDER BY shard_id")
    by_shard: dict[str, list[TenantRecord]] = {}
    for t in tenants:
        by_shard.setdefault(t.shard_id, []).append(t)
    if tenant_ids is not None:  # only the shards of the chosen tenants
        shard_rows = [r for r in shard_rows if r["shard_id"] in by_shard or r["shard_id"] in shard_ids]
    plans = {r["shard_id"]: ShardPlan(r["shard_id"], r["dsn"]) for r in shard_rows}
    await asyncio.gather(*(_plan_shard(pools, target, p, by_shard.get(sid, [])) for sid, p in plans.items()))
    return Plan(target, plans, None if tenant_ids is None else tuple(tenant_ids))


async def _plan_shard(pools: ShardPools, target: Target, plan: ShardPlan, tenants: Iterable[TenantRecord]) -> None:
    try:
        pool = await pools.get(plan.shard_id)
        async with pool.acquire() as conn:
            recorded = await ledger.read_shard(conn, target.plugin_id)
    except Exception as exc:
        if classify(exc) != "shard":
            raise
        plan.error = f"cannot read the ledger of shard {plan.shard_id} at {redact(plan.dsn)}: " \
                     f"{exc.__class__.__name__}: {exc}"
        plan.public_pending = list(target.public_files)
        plan.tenants = [TenantPlan(t, list(target.tenant_files)) for t in tenants]
        return
    plan.public_pending, drift = ledger.split(target.public_files, recorded.get(("public", None), {}),
                                              shard_id=plan.shard_id, tenant_id=None)
    plan.drift.extend(drift)
    later = {(f.scope, f.name): f for f in target.package.migrations if f.since > target.version}
    if later:
        for (scope, tenant_id), names in recorded.items():
            for name in names:
                f = later.get((scope, name))
                if f is not None:
                    where = f"tenant {tenant_id}" if tenant_id else "public scope"
                    plan.ahead.append(f"{scope}/{name} ({f.since}) on shard {plan.shard_id}, {where}")
    for t in tenants:
        pending, drift = ledger.split(target.tenant_files, recorded.get(("tenant", t.tenant_id), {}),
                                      shard_id=plan.shard_id, tenant_id=t.tenant_id)
        plan.drift.extend(drift)
        if pending:
            plan.tenants.append(TenantPlan(t, pending))
        else:
            plan.up_to_date.append(t)
