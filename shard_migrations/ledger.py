"""Reading and writing a shard's ledger, ``fleet.sys_plugin_migrations``.

The ledger is the truth about what a shard has: a file's row is written in the same
transaction as the file (or right after a no-transaction file succeeds). Run records
on the control plane only say what a run meant to do and how far it thinks it got.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from router.errors import MigrationDrift
from shard_migrations.packages import MigrationFile

# a plain connection or one borrowed from a pool
Conn = asyncpg.Connection | PoolConnectionProxy

# (scope, tenant_id or None) -> {file name: checksum}
ShardLedger = dict[tuple[str, str | None], dict[str, str]]


@dataclass(frozen=True)
class Drift:
    """A recorded file whose checksum is not the shipped file's."""
    shard_id: str
    scope: str
    tenant_id: str | None
    name: str
    recorded: str
    expected: str

    def where(self) -> str:
        return f"shard {self.shard_id}" + (f", tenant {self.tenant_id}" if self.tenant_id else ", public scope")

    def describe(self) -> str:
        return (f"{self.scope}/{self.name} changed after it was applied ({self.where()}): "
                f"recorded sha256 {self.recorded[:12]}…, file has {self.expected[:12]}…")

    def to_dict(self) -> dict[str, str | None]:
        return {"shardId": self.shard_id, "scope": self.scope, "tenantId": self.tenant_id, "file": self.name,
                "recorded": self.recorded, "expected": self.expected}


def drift_error(drift: Sequence[Drift]) -> MigrationDrift:
    """MIGRATION_DRIFT naming the first drifted file, its shard and tenant (and how many drifted)."""
    d = drift[0]
    more = f" ({len(drift)} drifted in all)" if len(drift) > 1 else ""
    return MigrationDrift(d.describe() + more, file=f"{d.scope}/{d.name}", shardId=d.shard_id, tenantId=d.tenant_id)


async def read_shard(conn: Conn, plugin_id: str) -> ShardLedger:
    """Every ledger row of ``plugin_id`` on this shard, in ONE query (work per shard, not per tenant)."""
    rows = await conn.fetch(
        "SELECT scope, tenant_id::text AS tenant_id, name, checksum FROM fleet.sys_plugin_migrations "
        "WHERE plugin_id = $1", plugin_id)
    out: ShardLedger = {}
    for r in rows:
        out.setdefault((r["scope"], r["tenant_id"]), {})[r["name"]] = r["checksum"]
    return out


async def read_unit(conn: Conn, plugin_id: str, scope: str, tenant_id: str | None) -> dict[str, str]:
    """The ledger of one (plugin, scope[, tenant]): {file name: checksum}."""
    # `=` / `IS NULL` rather than IS NOT DISTINCT FROM, which can't use the unique index
    if tenant_id is None:
        rows = await conn.fetch("SELECT name, checksum FROM fleet.sys_plugin_migrations "
                                "WHERE plugin_id = $1 AND scope = $2 AND tenant_id IS NULL", plugin_id, scope)
    else:
        rows = await conn.fetch("SELECT name, checksum FROM fleet.sys_plugin_migrations "
                                "WHERE plugin_id = $1 AND scope = $2 AND tenant_id = $3::uuid", plugin_id, scope, tenant_id)
    return {r["name"]: r["checksum"] for r in rows}


async def record(conn: Conn, plugin_id: str, scope: str, tenant_id: str | None,
                 files: Sequence[MigrationFile]) -> None:
    """Insert the ledger rows of ``files`` (one statement). The unique constraint
    (plugin, scope, tenant, name) refuses a second application."""
    await conn.execute(
        "INSERT INTO fleet.sys_plugin_migrations (plugin_id, scope, tenant_id, name, version, checksum) "
        "SELECT $1, $2, $3::uuid, f.name, f.version, f.checksum "
        "FROM unnest($4::text[], $5::text[], $6::text[]) AS f(name, version, checksum)",
        plugin_id, scope, tenant_id, [f.name for f in files], [str(f.since) for f in files],
        [f.checksum for f in files])


def split(files: Sequence[MigrationFile], recorded: dict[str, str], *, shard_id: str, tenant_id: str | None
          ) -> tuple[list[MigrationFile], list[Drift]]:
    """(files not yet recorded, recorded files whose checksum differs)."""
    pending: list[MigrationFile] = []
    drift: list[Drift] = []
    for f in files:
        have = recorded.get(f.name)
        if have is None:
            pending.append(f)
        elif have != f.checksum:
            drift.append(Drift(shard_id, f.scope, tenant_id, f.name, have, f.checksum))
    return pending, drift
