"""Comparing every ledger with the plugin's files: drift and missing applications.

It reads what `plan.build_plan` reads: the targeted tenants' ids from the control plane
and one ledger query per shard, which returns rows only for the tenants that are not up
to date. An up-to-date tenant costs its id, not a record nor its ledger rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg

from router.errors import MigrationIncomplete, ShardUnreachable
from router.pools import ShardPools
from shard_migrations.ledger import Drift, drift_error
from shard_migrations.packages import PluginPackage
from shard_migrations.plan import build_plan, resolve_target
from shard_migrations.runs import unreachable_list


@dataclass
class VerifyReport:
    plugin: str
    version: str
    shards: int = 0
    tenants: int = 0
    drift: list[Drift] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)   # {shardId, tenantId, file}
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.drift or self.missing or self.unreachable)

    def to_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "version": self.version, "ok": self.ok, "shards": self.shards,
                "tenants": self.tenants, "drift": [d.to_dict() for d in self.drift], "missing": self.missing,
                "unreachable": unreachable_list(self.unreachable)}

    def raise_for_problems(self) -> None:
        """MIGRATION_DRIFT (first drifted file, shard, tenant), else SHARD_UNREACHABLE, else
        MIGRATION_INCOMPLETE (first missing application)."""
        if self.drift:
            raise drift_error(self.drift)
        if self.unreachable:
            sid, why = next(iter(self.unreachable.items()))
            raise ShardUnreachable(why, shardId=sid)
        if self.missing:
            m = self.missing[0]
            where = f"tenant {m['tenantId']}" if m["tenantId"] else "public scope"
            raise MigrationIncomplete(
                f"{self.plugin} {self.version}: {len(self.missing)} file applications missing, first "
                f"{m['file']} on shard {m['shardId']}, {where}", count=len(self.missing))


async def verify(control: asyncpg.Pool, pools: ShardPools, package: PluginPackage, to: str | None = None) -> VerifyReport:
    """Check every targeted tenant and every shard's public scope against ``package`` at
    version ``to`` (default: the package's). Never raises for what it finds; see
    `VerifyReport.raise_for_problems`. Raises VALIDATION_FAILED for an unknown version."""
    target = resolve_target(package, to)
    plan = await build_plan(control, pools, target)
    rep = VerifyReport(package.id, str(target.version), shards=len(plan.shards))
    for sp in plan.shards.values():
        rep.tenants += len(sp.tenants) + len(sp.up_to_date)
        if not sp.reachable:
            rep.unreachable[sp.shard_id] = sp.error or "unreachable"
            continue
        rep.drift.extend(sp.drift)
        rep.missing.extend({"shardId": sp.shard_id, "tenantId": None, "file": f"public/{f.name}"}
                           for f in sp.public_pending)
        for t in sp.tenants:
            rep.missing.extend({"shardId": sp.shard_id, "tenantId": t.tenant.tenant_id, "file": f"tenant/{f.name}"}
                               for f in t.pending)
    return rep
