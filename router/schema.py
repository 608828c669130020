"""Creating and upgrading tenantfleet's own tables on the control plane and on shards."""
from __future__ import annotations

from router.pools import AnyConnection

from router import tables

# Serialises concurrent bootstraps of the same database (two processes starting at once).
_BOOTSTRAP_LOCK = 0x7466_626F_6F74_0001


async def ensure_control(conn: AnyConnection) -> None:
    """Create the control-plane tables if missing (idempotent, safe to race)."""
    await _apply(conn, "control", tables.control_ddl())


async def ensure_shard(conn: AnyConnection) -> None:
    """Create a shard's ``fleet`` schema, ledger, fence and helper functions (idempotent).

    Also revokes CREATE on ``public`` from PUBLIC (CVE-2018-1058): only the owner may
    create objects there, so a tenant-scoped search_path can't be hijacked.
    """
    await _apply(conn, "shard", [*tables.shard_ddl(), "REVOKE CREATE ON SCHEMA public FROM PUBLIC"])


async def _apply(conn: AnyConnection, component: str, statements: list[str]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _BOOTSTRAP_LOCK)
        for stmt in statements:
            await conn.execute(stmt)
        if component == "control":
            await conn.execute(
                "INSERT INTO tenantfleet_schema (component, version) VALUES ($1, $2) "
                "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, updated_at = now()",
                component, tables.SCHEMA_VERSION,
            )
