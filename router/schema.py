"""Creating and upgrading tenantfleet's own tables on the control plane and on shards."""
from __future__ import annotations

from typing import Sequence

from router import tables
from router.keys import APP_ROLE
from router.pools import AnyConnection

# Serialises concurrent bootstraps of the same database (two processes starting at once).
_BOOTSTRAP_LOCK = 0x7466_626F_6F74_0001

# Tenant schemas granted to the app role per statement when catching up: each batch is
# its own transaction, so a shard with 100k schemas from before the app role never holds
# 100k schemas' catalog locks at once; once caught up, one cheap query finds nothing.
GRANT_BATCH = 1000
_GRANT_MISSING = """
SELECT fleet.grant_app_role(coalesce(array_agg(n.nspname::text), '{}'), true)
FROM (SELECT nspname FROM pg_catalog.pg_namespace n
      WHERE nspname ~ '^t_[0-9a-f]{32}$'
        AND NOT pg_catalog.has_schema_privilege(fleet.app_role(), n.oid, 'USAGE')
      LIMIT $1) n
"""

_SHARD_HARDENING = [
    # CVE-2018-1058: only the owner may create objects in public (PostgreSQL < 15 lets PUBLIC).
    "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
    # These run as their caller and fail without the owner's privileges anyway; nobody
    # else has a reason to call them.
    "REVOKE EXECUTE ON FUNCTION fleet.create_tenant_schema(text), fleet.drop_tenant_schema(text), "
    "fleet.grant_app_role(text[], boolean), fleet.ensure_app_role(name) FROM PUBLIC",
]


async def ensure_control(conn: AnyConnection) -> None:
    """Create the control-plane tables if missing (idempotent, safe to race)."""
    await _apply(conn, "control", tables.control_ddl())


async def ensure_shard(conn: AnyConnection, app_role: str = APP_ROLE) -> int:
    """Create a shard's ``fleet`` schema, ledger, fence and helper functions (idempotent,
    safe to race, also with other databases on the same server).

    ``conn`` must connect as the shard's owner role (the shard DSN). Also revokes CREATE
    on ``public`` from PUBLIC (CVE-2018-1058), creates the NOLOGIN ``app_role`` the
    host's request path switches to (USAGE and DML on tenant schemas, read on public, the
    fence; no CREATE, not even TEMPORARY), and grants it the tenant schemas created
    before it existed. Returns how many tenant schemas were caught up.
    """
    await _apply(conn, "shard", [*tables.shard_ddl(), *_SHARD_HARDENING],
                 calls=[("SELECT fleet.ensure_app_role($1)", (app_role,))])
    caught_up = 0
    while True:
        # under the bootstrap lock: two processes GRANTing on one schema at once would
        # fail with "tuple concurrently updated"
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _BOOTSTRAP_LOCK)
            n: int = await conn.fetchval(_GRANT_MISSING, GRANT_BATCH)
        caught_up += n
        if n < GRANT_BATCH:
            return caught_up


async def _apply(conn: AnyConnection, component: str, statements: list[str],
                 calls: Sequence[tuple[str, tuple[object, ...]]] = ()) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _BOOTSTRAP_LOCK)
        for stmt in statements:
            await conn.execute(stmt)
        for sql, args in calls:
            await conn.execute(sql, *args)
        if component == "control":
            await conn.execute(
                "INSERT INTO tenantfleet_schema (component, version) VALUES ($1, $2) "
                "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, updated_at = now()",
                component, tables.SCHEMA_VERSION,
            )
