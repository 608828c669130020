"""Creating and upgrading tenantfleet's own tables on the control plane and on shards.

`ensure_control` and `ensure_shard` build the baseline (schema version 5, Alembic
revision 0005) idempotently, then run the Alembic revisions after it (`router.revisions`),
all in one transaction under the bootstrap lock.

SQLAlchemy (the tables' declarations, `router.tables`) and Alembic are loaded only when
something is to be set up: a control plane already at this version costs two short queries.
"""
from __future__ import annotations

import base64
from typing import Sequence

import scramp  # type: ignore[import-untyped]  # no type hints; one call, checked by tests

from router import revisions
from router.errors import SchemaTooNew
from router.keys import APP_ROLE, BOOTSTRAP_LOCK, SCHEMA_RE, SCHEMA_VERSION
from router.pools import AnyConnection

# Tenant schemas given their roles per statement when catching up: each batch is its
# own transaction, so a shard with 100k schemas from before tenant roles never holds
# 100k schemas' catalog locks at once; once caught up, one cheap query finds nothing.
# A schema needs it when its role is missing, lacks USAGE, or the request path's login
# role (version 4) may not switch to it (CASE, not OR:
# has_schema_privilege raises on a role that doesn't exist, and only CASE fixes the
# order of evaluation). Then, batched the same way, the app role loses what shards
# prepared by an earlier version gave it on tenant schemas.
GRANT_BATCH = 1000
_SCRAM = scramp.ScramMechanism("SCRAM-SHA-256")
_ROLES_MISSING = """
SELECT fleet.ensure_tenant_roles(coalesce(array_agg(n.nspname::text), '{}'), true)
FROM (SELECT nspname FROM pg_catalog.pg_namespace n
      WHERE nspname ~ '^t_[0-9a-f]{32}$'
        AND CASE WHEN pg_catalog.to_regrole(fleet.tenant_role(n.nspname)) IS NULL THEN true
                 ELSE NOT pg_catalog.has_schema_privilege(fleet.tenant_role(n.nspname), n.oid, 'USAGE')
                      OR NOT pg_catalog.pg_has_role(fleet.login_role(), fleet.tenant_role(n.nspname), 'MEMBER') END
      LIMIT $1) n
"""
_LEGACY_HELD = """
SELECT fleet.revoke_app_role_legacy(coalesce(array_agg(n.nspname::text), '{}'))
FROM (SELECT nspname FROM pg_catalog.pg_namespace n
      WHERE nspname ~ '^t_[0-9a-f]{32}$' AND pg_catalog.has_schema_privilege(fleet.app_role(), n.oid, 'USAGE')
      LIMIT $1) n
"""

# PostgreSQL's session-level advisory lock functions (the transaction-level ones are
# pg_advisory_xact_lock* and pg_try_advisory_xact_lock*): revoked from PUBLIC below.
SESSION_LOCK_FUNCTIONS = tuple(
    f"pg_catalog.{name}({args})"
    for name in ("pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared")
    for args in ("bigint", "integer, integer"))

_SHARD_HARDENING = [
    # CVE-2018-1058: only the owner may create objects in public (PostgreSQL < 15 lets PUBLIC).
    "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
    # These run as their caller and fail without the owner's privileges anyway; nobody
    # else has a reason to call them. (The fence is the app role's alone: `tables.fence_ddl`.)
    "REVOKE EXECUTE ON FUNCTION fleet.create_tenant_schema(text), fleet.drop_tenant_schema(text), "
    "fleet.ensure_tenant_roles(text[], boolean), fleet.create_tenant_roles(text[]), fleet.ensure_tenant_role(text), "
    "fleet.ensure_app_role(name), "
    "fleet.ensure_nologin_role(name), fleet.grant_role_to_owner(name), fleet.revoke_app_role_legacy(text[]), "
    "fleet.ensure_login_role(text) "
    "FROM PUBLIC",
    # No role of the request path needs large objects, and a tenant role creating them
    # would store data outside its schema (pg_largeobject) that no one cleans up: these
    # are the functions that make one (server-side lo_import is PostgreSQL's superuser-only
    # already). Takes effect where the shard's owner owns them, i.e. is a superuser; a
    # non-superuser owner's REVOKE is a warning that changes nothing (README, Status).
    "REVOKE EXECUTE ON FUNCTION pg_catalog.lo_create(oid), pg_catalog.lo_creat(integer), "
    "pg_catalog.lo_from_bytea(oid, bytea) FROM PUBLIC",
    # Session-level advisory locks outlive the transaction that took them: one held by a
    # pooled connection (say on another tenant's fleet.tenant_lock_key) would hold off that
    # tenant's moves. No role of the request path needs them (the fence uses the
    # transaction-level ones, which stay PUBLIC's; the migrator and movers run as the
    # owner). Revoked,
    # the host ends each transaction without releasing them (host/tx.py: a SELECT less,
    # ~30 us of the server's CPU per transaction). Same limit as above: only a superuser
    # owner's REVOKE takes effect; elsewhere the host sees that and keeps releasing them.
    f"REVOKE EXECUTE ON FUNCTION {', '.join(SESSION_LOCK_FUNCTIONS)} FROM PUBLIC",
]
# Where each component records the tenantfleet schema version that set it up.
_VERSION_TABLE = {"control": "tenantfleet_schema", "shard": "fleet.tenantfleet_schema"}


async def ensure_control(conn: AnyConnection) -> None:
    """Create the control-plane tables if missing and upgrade them (idempotent, safe to
    race). A control plane that records this code's schema version and Alembic head was set
    up by this version: two short queries, no lock, nothing loaded (every CLI command and service
    start calls this)."""
    if await up_to_date(conn, "control"):
        return
    from router import tables

    await _apply(conn, "control", tables.control_ddl())


async def up_to_date(conn: AnyConnection, component: str) -> bool:
    """Whether the database records exactly this code's schema version (`SCHEMA_VERSION`)
    and Alembic head for ``component``. Read without the bootstrap lock: the set-up writes
    both rows in the transaction that builds what they describe, so seeing them means it
    committed; anything else (older, newer, missing) goes the locked way."""
    version_table, alembic_table = _VERSION_TABLE[component], revisions.version_table(component)
    present = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
                                  version_table, alembic_table)
    if not present:
        return False
    row = await conn.fetchrow(f"SELECT (SELECT max(version) FROM {version_table}) AS version, "  # constant names
                              f"(SELECT max(version_num) FROM {alembic_table}) AS revision")
    assert row is not None
    return bool(row["version"] == SCHEMA_VERSION and row["revision"] == revisions.HEADS[component])


async def ensure_shard(conn: AnyConnection, app_role: str = APP_ROLE, login_verifier: str | None = None) -> int:
    """Create a shard's ``fleet`` schema, ledger, fence and helper functions (idempotent,
    safe to race, also with other databases on the same server).

    ``conn`` must connect as the shard's owner role (the shard DSN). Also revokes CREATE
    on ``public`` from PUBLIC (CVE-2018-1058), creates the NOLOGIN ``app_role`` the
    host's request path switches to (the fence only), its group of tenant roles (read on
    public) and one role per tenant schema (`ensure_tenant_role`), and takes back what
    ``app_role`` held on tenant schemas and public before tenant roles existed. No role
    gets CREATE, not even TEMPORARY. Creates the request path's LOGIN role
    (``fleet.login_role()``, see README "Database roles") and lets it switch to the app
    role and every tenant role; ``login_verifier`` (`scram_verifier` of its password) sets
    its password, None leaves it as it is. Returns how many tenant schemas were caught up.
    """
    from router import tables

    await _apply(conn, "shard", [*tables.shard_ddl(), *_SHARD_HARDENING],
                 calls=[("SELECT fleet.ensure_app_role($1)", (app_role,)),
                        ("SELECT fleet.ensure_login_role($1)", (login_verifier,))])
    # Order matters on a live shard from an earlier version: every tenant gets its role
    # first, then the fence that switches to it, then the app role loses its old rights
    # (until the new fence is in, the old one still runs tenants as the app role).
    caught_up = await _batches(conn, _ROLES_MISSING)
    await _apply(conn, "fence", tables.fence_ddl())
    await _batches(conn, _LEGACY_HELD)
    return caught_up


async def login_role(conn: AnyConnection) -> str:
    """The request path's login role on a prepared shard (``fleet.login_role()``)."""
    name: str = await conn.fetchval("SELECT fleet.login_role()::text")
    return name


def scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (what ``ALTER ROLE ...
    PASSWORD`` keeps as it is when given one): the server never sees the password."""
    salt, stored_key, server_key, iterations = _SCRAM.make_auth_info(password, iteration_count=4096)
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


async def _batches(conn: AnyConnection, sql: str) -> int:
    done = 0
    while True:
        async with conn.transaction():  # the SQL function takes the bootstrap lock itself
            n: int = await conn.fetchval(sql, GRANT_BATCH)
        done += n
        if n < GRANT_BATCH:
            return done


async def ensure_tenant_role(conn: AnyConnection, schema_name: str) -> None:
    """Give one tenant schema its role and grants, tables already in it included
    (idempotent, safe to race): what a tenant move runs on the target shard after
    copying the tables. ``conn`` connects as the shard's owner; the shard must have been
    prepared (`ensure_shard`). ValueError for a name that is not ``t_<32 hex>``."""
    if not SCHEMA_RE.match(schema_name):
        raise ValueError(f"not a tenant schema name: {schema_name!r}")
    await conn.execute("SELECT fleet.ensure_tenant_role($1)", schema_name)


async def _apply(conn: AnyConnection, component: str, statements: list[str],
                 calls: Sequence[tuple[str, tuple[object, ...]]] = ()) -> None:
    table = _VERSION_TABLE.get(component)  # a constant name, never user text
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", BOOTSTRAP_LOCK)
        recorded: str | None = None
        if table is not None:
            await _refuse_newer(conn, component, table)
            recorded = await revisions.check_known(conn, component)
        for stmt in statements:
            await conn.execute(stmt)
        for sql, args in calls:
            await conn.execute(sql, *args)
        if table is not None:
            await conn.execute(
                f"INSERT INTO {table} (component, version) VALUES ($1, $2) "
                "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version, updated_at = now()",
                component, SCHEMA_VERSION,
            )
            # the baseline is in place: Alembic's revisions after it (router/revisions)
            await revisions.upgrade(conn, component, recorded)


async def _refuse_newer(conn: AnyConnection, component: str, table: str) -> None:
    """SCHEMA_TOO_NEW if the database records a version newer than this code's: an older
    tenantfleet must not set up, over a newer one's, what it knows (an older fence that
    doesn't switch roles, say). Asked before any statement, under the bootstrap lock."""
    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
        return  # set up before versions were recorded there (or never): older, not newer
    recorded = await conn.fetchval(f"SELECT max(version) FROM {table}")
    if recorded is not None and recorded > SCHEMA_VERSION:
        raise SchemaTooNew(f"this {component} database was set up by a newer tenantfleet (schema version "
                           f"{recorded}; this one knows up to {SCHEMA_VERSION}): upgrade tenantfleet "
                           f"before preparing it", component=component, version=recorded)
