"""The host's request path runs as the NOLOGIN app role: tenant DML only, CREATE nowhere
(CVE-2018-1058), no DDL on tenant tables; the owner role keeps schema creation and
migrations; shards prepared before the role existed catch up on `prepare_shards`."""
from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio
import semver

from host.metrics import HostMetrics
from host.runtime import RUNTIME, HostRuntime
from host.tx import TenantTx, keep_connection
from router import schema
from router.client import ResolveClient
from router.errors import ShardUnreachable
from router.keys import APP_ROLE
from router.models import TenantRecord
from router.pools import ShardPools
from router.settings import Settings
from shard_migrations.engine import apply_tenant
from shard_migrations.packages import discover
from tests.fleetkit import Fleet, Servers, create_database, drop_database
from tests.hostkit import Host, auth, code, host_settings, running_host, tenant_with_key


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def host(fleet: Fleet) -> AsyncIterator[Host]:
    async with running_host(host_settings(fleet)) as h:
        yield h


def runtime(host: Host) -> HostRuntime:
    return host.app[RUNTIME]


async def _as_host(host: Host, rec: TenantRecord, sql: str, *args: Any) -> Any:
    """Run one statement the way a plugin does: in the host's fenced tenant transaction."""
    async def fn(db: Any) -> Any:
        return await db.fetchval(sql, *args)
    return await runtime(host).tx.run(rec.tenant_id, fn)


async def test_host_request_connections_run_as_the_app_role_which_is_no_superuser(fleet: Fleet, host: Host) -> None:
    rec, _ = await tenant_with_key(fleet, host)

    async def who(db: Any) -> Any:
        return await db.fetchrow(
            "SELECT current_user AS cur, r.rolsuper, r.rolcanlogin, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls "
            "FROM pg_roles r WHERE r.rolname = current_user")
    row = await runtime(host).tx.run(rec.tenant_id, who)
    assert row["cur"] == APP_ROLE
    assert not any((row["rolsuper"], row["rolcanlogin"], row["rolcreaterole"], row["rolcreatedb"], row["rolbypassrls"]))


async def test_the_app_role_holds_create_on_no_schema_and_no_database_privilege_to_create(
        fleet: Fleet, host: Host) -> None:
    rec, _ = await tenant_with_key(fleet, host)

    async def rights(db: Any) -> Any:
        return await db.fetchrow(
            "SELECT (SELECT array_agg(nspname) FROM pg_namespace WHERE has_schema_privilege(current_user, oid, 'CREATE'))"
            " AS creatable, has_database_privilege(current_database(), 'CREATE') AS db_create, "
            "has_database_privilege(current_database(), 'TEMPORARY') AS db_temp")
    row = await runtime(host).tx.run(rec.tenant_id, rights)
    assert row["creatable"] is None and not row["db_create"] and not row["db_temp"]


@pytest.mark.parametrize("sql", [
    "CREATE TABLE public.tf_hijack (x int)",
    "CREATE FUNCTION public.lower(text) RETURNS text LANGUAGE sql AS 'SELECT $1'",  # the CVE's trick
    "CREATE TABLE tf_extra (x int)",              # lands in the tenant schema, first on the path
    "CREATE TEMP TABLE items (x int)",            # pg_temp would shadow items for the next tenant
    "CREATE SCHEMA tf_mine",
    "CREATE INDEX ON items (qty)",
    "ALTER TABLE items ADD COLUMN tf_x int",
    "DROP TABLE items",
    "TRUNCATE items",
    "UPDATE fleet.tenant_fence SET epoch = epoch + 1",
    "INSERT INTO inventory_units (code, name) VALUES ('tf', 'tf')",
])
async def test_the_host_request_role_can_create_alter_or_drop_nothing_nor_write_fence_or_public(
        fleet: Fleet, host: Host, sql: str) -> None:
    rec, _ = await tenant_with_key(fleet, host)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # SQLSTATE 42501
        await _as_host(host, rec, sql)
    assert await _as_host(host, rec, "SELECT count(*) FROM items") == 0  # the table is still there


async def test_the_host_request_role_does_the_inventory_dml_and_reads_public_tables(fleet: Fleet, host: Host) -> None:
    rec, key = await tenant_with_key(fleet, host)
    async with host.http.post("/api/plugins/inventory/items", json={"sku": "LP-1", "qty": 2},
                              headers=auth(key, rec.code)) as r:
        assert r.status == 201, await r.text()  # INSERT and the id sequence's nextval

    async def dml(db: Any) -> Any:
        await db.execute("UPDATE items SET qty = qty + 1 WHERE sku = 'LP-1'")
        await db.execute("INSERT INTO items (sku, qty) VALUES ('LP-2', 1)")
        await db.execute("DELETE FROM items WHERE sku = 'LP-2'")
        return (await db.fetchval("SELECT qty FROM items WHERE sku = 'LP-1'"),
                await db.fetchval("SELECT count(*) FROM inventory_units"))
    qty, units = await runtime(host).tx.run(rec.tenant_id, dml)
    assert qty == 3 and units > 0


async def test_the_role_is_switched_once_per_connection_never_per_request(fleet: Fleet) -> None:
    settings = fleet.settings.model_copy(update={"shard_pool_min": 1, "shard_pool_max": 1})
    rec = await fleet.directory.create_tenant(code(), shard_id="shard1")
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(
            ShardPools(settings, fleet.directory.dsn_of, role=APP_ROLE, reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(settings, fleet.directory.lookup))
        tx = await stack.enter_async_context(TenantTx(settings, resolver, pools, HostMetrics()))

        async def who(db: Any) -> Any:
            return await db.fetchrow("SELECT current_user AS cur, pg_backend_pid() AS pid")
        first = await tx.run(rec.tenant_id, who)  # opens the pool's one connection (and switches it)
        logged: list[str] = []
        async with tx.connection("shard1") as conn:
            conn.add_query_logger(lambda q: logged.append(q.query))
        rows = [await tx.run(rec.tenant_id, who) for _ in range(5)]
        await asyncio.sleep(0)  # asyncpg calls query loggers with call_soon
        assert {(r["cur"], r["pid"]) for r in rows} == {(APP_ROLE, first["pid"])}
        # per request: the fence (with BEGIN), the plugin's query, COMMIT; nothing about the role
        assert len(logged) == 3 * 5 and not [q for q in logged if "role" in q]


async def test_the_role_outlives_asyncpgs_default_reset_between_borrowers(fleet: Fleet) -> None:
    # the host skips the reset (keep_connection); a pool that keeps asyncpg's RESET ALL
    # must not hand the next borrower the owner role either
    settings = fleet.settings.model_copy(update={"shard_pool_min": 1, "shard_pool_max": 1})
    async with ShardPools(settings, fleet.directory.dsn_of, role=APP_ROLE) as pools:
        pool = await pools.get("shard1")
        seen = []
        for _ in range(3):
            async with pool.acquire() as conn:
                seen.append((await conn.fetchval("SELECT current_user"), conn.get_server_pid()))
    assert len(set(seen)) == 1 and seen[0][0] == APP_ROLE


async def test_a_tenant_schema_made_before_the_app_role_gets_its_grants_on_prepare_shards(fleet: Fleet) -> None:
    rec = await fleet.directory.create_tenant(code(), shard_id="shard2")
    pkg = discover().get("inventory")
    await apply_tenant(fleet.shard_pools, fleet.settings, pkg, rec, to=semver.Version.parse("1.1.0"))
    owner = await asyncpg.connect(fleet.shard_dsns["shard2"])
    try:
        # take back everything the app role got, as on a schema made before it existed
        # (test-only DDL: the identifiers are quoted by the server)
        s, r = await owner.fetchrow("SELECT quote_ident($1), quote_ident($2)", rec.schema, APP_ROLE)
        for stmt in (f"REVOKE ALL ON SCHEMA {s} FROM {r}", f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {r}",
                     f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM {r}",
                     f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} REVOKE ALL ON TABLES FROM {r}",
                     f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} REVOKE ALL ON SEQUENCES FROM {r}"):
            await owner.execute(stmt)
    finally:
        await owner.close()
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(
            ShardPools(fleet.settings, fleet.directory.dsn_of, role=APP_ROLE, reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(fleet.settings, fleet.directory.lookup))
        tx = await stack.enter_async_context(TenantTx(fleet.settings, resolver, pools, HostMetrics()))

        async def write(db: Any) -> Any:
            await db.execute("INSERT INTO items (sku, qty, location) VALUES ('old-1', 1, 'A')")
            return await db.fetchval("SELECT count(*) FROM items")
        # without USAGE the schema is skipped on the search_path: items is not even found
        with pytest.raises(asyncpg.UndefinedTableError):
            await tx.run(rec.tenant_id, write)

        assert await fleet.directory.prepare_shards() == []
        assert await tx.run(rec.tenant_id, write) == 1
        # and a table a migration creates afterwards (as the owner) is the app role's to use
        await apply_tenant(fleet.shard_pools, fleet.settings, discover().get("restock"), rec)

        async def restock(db: Any) -> Any:
            return await db.fetchval("INSERT INTO restock_requests (sku, qty) VALUES ('old-1', 2) RETURNING id")
        assert await tx.run(rec.tenant_id, restock) >= 1


async def test_a_shard_without_the_role_is_shard_unreachable_naming_the_role(fleet: Fleet) -> None:
    missing = "tf_missing_" + uuid.uuid4().hex[:8]
    async with ShardPools(fleet.settings, fleet.directory.dsn_of, role=missing) as pools:
        pool = await pools.get("shard1")
        with pytest.raises(ShardUnreachable) as caught:
            async with pool.acquire():
                pass
    assert caught.value.details["role"] == missing and missing in str(caught.value)


async def _backend_waits_on_a_lock(admin: asyncpg.Connection, pid: int, task: asyncio.Task[Any]) -> None:
    """Poll until backend ``pid`` waits on a lock (or ``task`` ended early: awaiting it tells why)."""
    deadline = asyncio.get_running_loop().time() + 10
    while not task.done() and not await admin.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid):
        assert asyncio.get_running_loop().time() < deadline, "the second CREATE ROLE never waited"
        await asyncio.sleep(0.01)


async def test_shard_databases_on_one_server_racing_to_create_the_role_both_get_it(servers: Servers) -> None:
    # a role name of this test's own: the shared one can't be dropped to race on it
    role = "tf_app_" + uuid.uuid4().hex[:10]
    admin_dsn = next(iter(servers.shard_admin_dsns.values()))
    db_name = f"tf_{uuid.uuid4().hex[:12]}_race"
    dsn = await create_database(admin_dsn, db_name)
    holder = await asyncpg.connect(admin_dsn)
    quoted = await holder.fetchval("SELECT quote_ident($1)", role)  # test-only DDL, quoted by the server
    try:
        shard = await asyncpg.connect(dsn)
        try:
            async with holder.transaction():
                await holder.execute(f"CREATE ROLE {quoted} NOLOGIN")  # "another database" is mid-way
                racing = asyncio.create_task(schema.ensure_shard(shard, role))
                await _backend_waits_on_a_lock(holder, shard.get_server_pid(), racing)
                assert not racing.done() or await racing is None, "ensure_shard never waited on the role"
            assert await racing == 0  # the loser's unique violation was absorbed
            assert await shard.fetchval("SELECT fleet.app_role()") == role
            assert await shard.fetchval("SELECT has_schema_privilege($1, 'fleet', 'USAGE') "
                                        "AND NOT has_schema_privilege($1, 'public', 'CREATE')", role)
        finally:
            await shard.close()
    finally:
        await drop_database(admin_dsn, db_name)
        await holder.execute(f"DROP ROLE IF EXISTS {quoted}")
        await holder.close()


async def test_a_shard_owned_by_a_non_superuser_creates_joins_and_switches_to_the_app_role(servers: Servers) -> None:
    # Managed servers (RDS and the like) give no superuser: the DSN's owner has CREATEROLE
    # and owns its database. Role names of this test's own, dropped at the end.
    tag = uuid.uuid4().hex[:10]
    owner_role, app_role = f"tf_owner_{tag}", f"tf_app_{tag}"
    admin_dsn = next(iter(servers.shard_admin_dsns.values()))
    db_name = f"tf_{tag}ab_owned"
    dsn = await create_database(admin_dsn, db_name)
    admin = await asyncpg.connect(admin_dsn)
    # test-only DDL: identifiers quoted by the server
    o, a, d = await admin.fetchrow("SELECT quote_ident($1), quote_ident($2), quote_ident($3)",
                                   owner_role, app_role, db_name)
    try:
        password = uuid.uuid4().hex  # servers that don't trust local connections (the embedded ones) want one
        await admin.execute(await admin.fetchval("SELECT format('CREATE ROLE %I LOGIN CREATEROLE PASSWORD %L', $1::text, $2::text)",
                                                 owner_role, password))
        await admin.execute(f"ALTER DATABASE {d} OWNER TO {o}")
        parts = urlsplit(dsn)
        owner_dsn = urlunsplit(parts._replace(netloc=f"{owner_role}:{password}@{parts.hostname}:{parts.port}"))
        assert owner_dsn != dsn
        owner = await asyncpg.connect(owner_dsn)
        try:
            assert not await owner.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            await schema.ensure_shard(owner, app_role)
            await owner.execute("SELECT fleet.create_tenant_schema('t_' || repeat('b', 32))")
        finally:
            await owner.close()
        settings = Settings.load(environ={}, control_dsn=owner_dsn)

        async def lookup(_: str) -> str:
            return owner_dsn
        async with ShardPools(settings, lookup, role=app_role) as pools:
            pool = await pools.get("owned")
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT current_user") == app_role
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("CREATE TABLE public.tf_hijack (x int)")
                assert await conn.fetchval("SELECT has_schema_privilege('t_' || repeat('b', 32), 'USAGE')")
    finally:
        await drop_database(admin_dsn, db_name)
        await admin.execute(f"DROP ROLE IF EXISTS {a}")
        await admin.execute(f"DROP ROLE IF EXISTS {o}")
        await admin.close()
