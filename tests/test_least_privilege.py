"""The host's request path runs as the NOLOGIN app role, and each tenant transaction as
that tenant's own role: its schema's DML and read on public only, so another tenant's
tables are refused by PostgreSQL whatever name a query spells; CREATE nowhere
(CVE-2018-1058), no DDL on tenant tables; the owner role keeps schema creation and
migrations; shards prepared before tenant roles existed catch up on `prepare_shards`."""
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

from router import schema
from router.errors import ShardUnreachable
from router.keys import APP_ROLE, tenant_group_role, tenant_role
from router.models import TenantRecord
from router.pools import ShardPools
from router.settings import Settings
from shard_migrations.engine import apply_tenant
from shard_migrations.packages import discover
from tests.fleetkit import Fleet, Servers, create_database, drop_database, owner_fetchval
from tests.hostkit import (Host, auth, code, host_settings, qualified, request_path_tx, running_host, runtime,
                           tenant_with_key)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def host(fleet: Fleet) -> AsyncIterator[Host]:
    async with running_host(host_settings(fleet)) as h:
        yield h


async def _as_host(host: Host, rec: TenantRecord, sql: str, *args: Any) -> Any:
    """Run one statement the way a plugin does: in the host's fenced tenant transaction."""
    async def fn(db: Any) -> Any:
        return await db.fetchval(sql, *args)
    return await runtime(host).tx.run(rec.tenant_id, fn)


async def test_a_tenant_transaction_runs_as_its_own_role_and_the_connection_as_the_app_role_between(
        fleet: Fleet, host: Host) -> None:
    rec, _ = await tenant_with_key(fleet, host)

    async def who(db: Any) -> Any:
        return await db.fetchrow(
            "SELECT current_user AS cur, r.rolsuper, r.rolcanlogin, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls, "
            "r.rolreplication FROM pg_roles r WHERE r.rolname = current_user")
    row = await runtime(host).tx.run(rec.tenant_id, who)
    assert row["cur"] == tenant_role(rec.schema) and len(row["cur"].encode()) <= 63
    assert not any(row[k] for k in ("rolsuper", "rolcanlogin", "rolcreaterole", "rolcreatedb", "rolbypassrls",
                                    "rolreplication"))
    async with runtime(host).tx.connection(rec.shard_id) as conn:  # the transaction-local role is gone
        row = await conn.fetchrow(
            "SELECT current_user AS cur, r.rolsuper, r.rolcanlogin, r.rolinherit, "
            "(SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid) AS memberships "
            "FROM pg_roles r WHERE r.rolname = current_user")
    # the app role inherits nothing and is a member of no role: SET ROLE to a tenant role
    # is checked against the session user (the shard's owner), not against it
    assert (row["cur"], row["rolsuper"], row["rolcanlogin"], row["rolinherit"], row["memberships"]) == \
        (APP_ROLE, False, False, False, 0)


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


async def test_the_app_role_is_set_once_per_connection_and_the_tenant_role_by_the_fence_itself(fleet: Fleet) -> None:
    rec = await fleet.directory.create_tenant(code(), shard_id="shard1")
    async with AsyncExitStack() as stack:
        tx = await request_path_tx(fleet, stack)

        async def who(db: Any) -> Any:
            return await db.fetchrow("SELECT current_user AS cur, pg_backend_pid() AS pid")
        first = await tx.run(rec.tenant_id, who)  # opens the pool's one connection (and switches it)
        logged: list[str] = []
        async with tx.connection("shard1") as conn:
            conn.add_query_logger(lambda q: logged.append(q.query))
        rows = [await tx.run(rec.tenant_id, who) for _ in range(5)]
        await asyncio.sleep(0)  # asyncpg calls query loggers with call_soon
        assert {(r["cur"], r["pid"]) for r in rows} == {(tenant_role(rec.schema), first["pid"])}
        # per request: the fence (with BEGIN), the plugin's query, COMMIT; no statement of
        # its own for either role: the fence switches to the tenant's (one round trip)
        assert len(logged) == 3 * 5 and not [q for q in logged if "role" in q]
        async with tx.connection("shard1") as conn:
            assert await conn.fetchval("SELECT current_user") == APP_ROLE


async def test_a_role_set_at_session_level_inside_a_tenant_transaction_does_not_break_the_connection_for_others(
        fleet: Fleet) -> None:
    # set_config(..., false) outlives the transaction's COMMIT: the pooled connection would
    # run as the other tenant's role, which may not run the fence, for every later request
    mine = await fleet.directory.create_tenant(code(), shard_id="shard1")
    other = await fleet.directory.create_tenant(code(), shard_id="shard1")
    async with AsyncExitStack() as stack:
        tx = await request_path_tx(fleet, stack)

        async def leave_role(db: Any) -> Any:
            await db.execute("SELECT set_config('role', $1, false)", tenant_role(other.schema))
            return await db.fetchval("SELECT pg_backend_pid()")
        poisoned = await tx.run(mine.tenant_id, leave_role)

        async def who(db: Any) -> Any:
            return await db.fetchrow("SELECT current_user AS cur, pg_backend_pid() AS pid")
        for rec in (other, mine):  # the pool's one connection: replaced, each runs as its own role
            row = await tx.run(rec.tenant_id, who)
            assert row["cur"] == tenant_role(rec.schema) and row["pid"] != poisoned
        async with tx.connection("shard1") as conn:
            assert await conn.fetchval("SELECT current_user") == APP_ROLE


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


async def test_a_shard_from_before_tenant_roles_gets_them_and_the_app_role_loses_its_rights_on_prepare_shards(
        fleet: Fleet) -> None:
    rec = await fleet.directory.create_tenant(code(), shard_id="shard2")
    pkg = discover().get("inventory")
    await apply_tenant(fleet.shard_pools, fleet.settings, pkg, rec, to=semver.Version.parse("1.1.0"))
    owner = await asyncpg.connect(fleet.shard_dsns["shard2"])
    try:
        # set the schema up as an earlier version left it: no tenant role, the app role
        # holding the schema (test-only DDL: the identifiers are quoted by the server)
        s, r, t = await owner.fetchrow("SELECT quote_ident($1), quote_ident($2), quote_ident($3)",
                                       rec.schema, APP_ROLE, tenant_role(rec.schema))
        for stmt in (f"REVOKE ALL ON SCHEMA {s} FROM {t}", f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {t}",
                     f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM {t}",
                     f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} REVOKE ALL ON TABLES FROM {t}",
                     f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} REVOKE ALL ON SEQUENCES FROM {t}",
                     f"DROP ROLE {t}",
                     f"GRANT USAGE ON SCHEMA {s} TO {r}",
                     f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {r}",
                     f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {r}",
                     f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}"):
            await owner.execute(stmt)
    finally:
        await owner.close()
    async with AsyncExitStack() as stack:
        tx = await request_path_tx(fleet, stack, settings=fleet.settings)

        async def write(db: Any) -> Any:
            await db.execute("INSERT INTO items (sku, qty, location) VALUES ('old-1', 1, 'A')")
            return await db.fetchval("SELECT count(*) FROM items")
        # the fence switches to a role that doesn't exist yet: refused, nothing written
        with pytest.raises(ShardUnreachable, match="no role for tenant"):
            await tx.run(rec.tenant_id, write)

        assert await fleet.directory.prepare_shards() == []
        assert await tx.run(rec.tenant_id, write) == 1
        async with tx.connection("shard2") as conn:  # the app role alone holds nothing there now
            assert await conn.fetchrow(
                "SELECT has_schema_privilege($1, 'USAGE') AS usage, "
                "has_table_privilege((SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                " WHERE n.nspname = $1 AND c.relname = 'items'), 'SELECT') AS sel, "
                "(SELECT count(*) FROM pg_default_acl d JOIN pg_namespace n ON n.oid = d.defaclnamespace "
                " WHERE n.nspname = $1 AND array_to_string(d.defaclacl, ',') ~ ('(^|,)' || current_user || '=')) "
                " AS defaults", rec.schema) == (False, False, 0)
        # and a table a migration creates afterwards (as the owner) is the tenant role's to use
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
    # test-only DDL, quoted by the server
    quoted, group = await holder.fetchrow("SELECT quote_ident($1), quote_ident($2)", role, tenant_group_role(role))
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
        await holder.execute(f"DROP ROLE IF EXISTS {group}")
        await holder.execute(f"DROP ROLE IF EXISTS {quoted}")
        await holder.close()


async def test_a_shard_owned_by_a_non_superuser_creates_joins_and_switches_to_the_app_and_tenant_roles(
        servers: Servers) -> None:
    # Managed servers (RDS and the like) give no superuser: the DSN's owner has CREATEROLE
    # and owns its database. Role names of this test's own, dropped at the end.
    tag = uuid.uuid4().hex[:10]
    owner_role, app_role = f"tf_owner_{tag}", f"tf_app_{tag}"
    tenant_id = uuid.uuid4()
    schema_name = "t_" + tenant_id.hex
    admin_dsn = next(iter(servers.shard_admin_dsns.values()))
    db_name = f"tf_{tag}ab_owned"
    dsn = await create_database(admin_dsn, db_name)
    admin = await asyncpg.connect(admin_dsn)
    # test-only DDL: identifiers quoted by the server
    o, a, g, t, d = await admin.fetchrow(
        "SELECT quote_ident($1), quote_ident($2), quote_ident($3), quote_ident($4), quote_ident($5)",
        owner_role, app_role, tenant_group_role(app_role), tenant_role(schema_name, app_role), db_name)
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
            await owner.execute("SELECT fleet.create_tenant_schema($1)", schema_name)
            await owner.execute("INSERT INTO fleet.tenant_fence (tenant_id, schema_name, epoch) VALUES ($1, $2, 1)",
                                tenant_id, schema_name)
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
                assert not await conn.fetchval("SELECT has_schema_privilege($1, 'USAGE')", schema_name)
                async with conn.transaction():
                    await conn.execute("SELECT fleet.enter_tenant($1, 1, 100)", tenant_id)
                    assert await conn.fetchrow("SELECT current_user, has_schema_privilege($1, 'USAGE')",
                                               schema_name) == (tenant_role(schema_name, app_role), True)
                assert await conn.fetchval("SELECT current_user") == app_role
    finally:
        await drop_database(admin_dsn, db_name)  # drops the tenant role too
        for role in (g, a, o):
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        assert not await admin.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[])",
                                        [tenant_role(schema_name, app_role), app_role, owner_role])
        await admin.close()


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM {other}",
    "SELECT sku FROM {other} WHERE qty > 0 LIMIT 1",
    "INSERT INTO {other} (sku, qty) VALUES ('injected', 1)",
    "UPDATE {other} SET qty = 0",
    "DELETE FROM {other}",
])
async def test_a_tenant_transaction_gets_permission_denied_on_another_tenants_table_by_its_full_name(
        fleet: Fleet, host: Host, sql: str) -> None:
    mine, _ = await tenant_with_key(fleet, host, shard_id="shard1")
    other, other_key = await tenant_with_key(fleet, host, shard_id="shard1")  # same shard, same database
    async with host.http.post("/api/plugins/inventory/items", json={"sku": "OTHER-1", "qty": 7},
                              headers=auth(other_key, other.code)) as r:
        assert r.status == 201, await r.text()
    before = await owner_fetchval(fleet, "shard1", f"SELECT array_agg((sku, qty)::text) FROM {qualified(other, 'items')}")

    async def plugin(db: Any) -> Any:
        # the tenant's own tables and public still work in the same transaction ...
        await db.execute("INSERT INTO items (sku, qty) VALUES ('MINE-1', 1)")
        assert await db.fetchval(f"SELECT count(*) FROM {qualified(mine, 'items')}") == 1
        assert await db.fetchval("SELECT count(*) FROM public.inventory_units") > 0
        # ... another tenant's, spelled out in full, does not
        return await db.fetchval(sql.format(other=qualified(other, "items")))
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:  # SQLSTATE 42501
        await runtime(host).tx.run(mine.tenant_id, plugin)
    assert caught.value.sqlstate == "42501"
    assert await owner_fetchval(fleet, "shard1", f"SELECT array_agg((sku, qty)::text) FROM {qualified(other, 'items')}") \
        == before == ["(OTHER-1,7)"]
    # the failed transaction was rolled back whole; the tenant's own table works on
    assert await _as_host(host, mine, "SELECT count(*) FROM items") == 0


async def test_a_tenant_transaction_cannot_reenter_the_fence_to_hop_to_another_tenant(fleet: Fleet, host: Host) -> None:
    mine, _ = await tenant_with_key(fleet, host, shard_id="shard1")
    other, _ = await tenant_with_key(fleet, host, shard_id="shard1")

    async def hop(db: Any) -> Any:
        await db.execute("SELECT fleet.enter_tenant($1::uuid, $2, 100)", other.tenant_id, other.epoch)
        return await db.fetchval("SELECT count(*) FROM items")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await runtime(host).tx.run(mine.tenant_id, hop)


async def test_a_tenant_transaction_writes_events_for_its_own_tenant_only(fleet: Fleet, host: Host) -> None:
    # fleet.emit_event is SECURITY DEFINER and every tenant role may run it; the ids of the
    # shard's other tenants can be read off the schema names (t_<id hex>) by any SQL there
    mine, _ = await tenant_with_key(fleet, host, shard_id="shard1")
    other, _ = await tenant_with_key(fleet, host, shard_id="shard1")
    forged = "SELECT fleet.emit_event($1::uuid, 'inventory', 'inventory.item_created', '{\"sku\": \"x\", \"qty\": 0}', 0)"

    async def forge(db: Any) -> Any:
        ids = await db.fetch("SELECT substr(nspname, 3)::uuid::text AS id FROM pg_namespace WHERE nspname = $1",
                             other.schema)
        return await db.fetchval(forged, ids[0]["id"])
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="only in its own transaction"):
        await runtime(host).tx.run(mine.tenant_id, forge)
    # the tenant's own events are written as before
    assert await _as_host(host, mine, forged, mine.tenant_id) is not None
    assert await owner_fetchval(
        fleet, "shard1", f"SELECT count(*) FROM fleet.event_outbox WHERE tenant_id = '{uuid.UUID(other.tenant_id)}'") == 0


async def test_the_app_role_outside_a_tenant_transaction_reads_no_tenant_table(fleet: Fleet, host: Host) -> None:
    rec, _ = await tenant_with_key(fleet, host, shard_id="shard1")
    async with runtime(host).tx.connection("shard1") as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval(f"SELECT count(*) FROM {qualified(rec, 'items')}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT count(*) FROM public.inventory_units")


async def test_a_table_a_later_plugin_migration_adds_is_the_tenants_own_and_no_one_elses(
        fleet: Fleet, host: Host) -> None:
    mine, _ = await tenant_with_key(fleet, host, shard_id="shard3")
    other, _ = await tenant_with_key(fleet, host, shard_id="shard3")
    restock = discover().get("restock")
    for rec in (mine, other):  # run by the migrator, as the shard's owner, after the schema was made
        await apply_tenant(fleet.shard_pools, fleet.settings, restock, rec)
    assert await _as_host(host, mine, "INSERT INTO restock_requests (sku, qty) VALUES ('m-1', 2) RETURNING qty") == 2
    assert await _as_host(host, mine, "SELECT count(*) FROM restock_requests") == 1
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _as_host(host, mine, f"SELECT count(*) FROM {qualified(other, 'restock_requests')}")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _as_host(host, other, f"INSERT INTO {qualified(mine, 'restock_requests')} (sku, qty) VALUES ('x', 1)")
    assert await _as_host(host, other, "SELECT count(*) FROM restock_requests") == 0
    assert await _as_host(host, mine, "SELECT count(*) FROM restock_requests") == 1


async def _tenant_db(admin_dsn: str, label: str) -> tuple[str, str]:
    """A prepared shard database of the test's own: (name, DSN)."""
    name = f"tf_{uuid.uuid4().hex[:12]}_{label}"
    dsn = await create_database(admin_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await schema.ensure_shard(conn)
    finally:
        await conn.close()
    return name, dsn


async def test_shard_databases_on_one_server_racing_to_create_one_tenant_role_both_get_it(servers: Servers) -> None:
    # the same tenant schema in two databases of one server (a tenant moved between them)
    schema_name = "t_" + uuid.uuid4().hex
    role = tenant_role(schema_name)
    admin_dsn = next(iter(servers.shard_admin_dsns.values()))
    db_name, dsn = await _tenant_db(admin_dsn, "race")
    holder = await asyncpg.connect(admin_dsn)
    quoted = await holder.fetchval("SELECT quote_ident($1)", role)  # test-only DDL, quoted by the server
    try:
        shard = await asyncpg.connect(dsn)
        try:
            async with holder.transaction():
                await holder.execute(f"CREATE ROLE {quoted} NOLOGIN")  # "another database" is mid-way
                racing = asyncio.create_task(shard.execute("SELECT fleet.create_tenant_schema($1)", schema_name))
                await _backend_waits_on_a_lock(holder, shard.get_server_pid(), racing)
                assert not racing.done(), "create_tenant_schema never waited on the role"
            await racing  # the loser's unique violation was absorbed
            assert await shard.fetchrow(
                "SELECT has_schema_privilege($1, $2, 'USAGE'), pg_has_role($1, $3, 'MEMBER')",
                role, schema_name, tenant_group_role()) == (True, True)
        finally:
            await shard.close()
    finally:
        await drop_database(admin_dsn, db_name)
        await holder.execute(f"DROP ROLE IF EXISTS {quoted}")
        await holder.close()


async def test_a_dropped_tenant_schema_takes_its_role_along_unless_another_database_still_uses_it(
        servers: Servers) -> None:
    schema_name = "t_" + uuid.uuid4().hex
    admin_dsn = next(iter(servers.shard_admin_dsns.values()))
    names: list[str] = []
    admin = await asyncpg.connect(admin_dsn)
    try:
        dsns = []
        for label in ("src", "dst"):
            name, dsn = await _tenant_db(admin_dsn, label)
            names.append(name)
            dsns.append(dsn)
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("SELECT fleet.create_tenant_schema($1)", schema_name)
            finally:
                await conn.close()
        exists = "SELECT count(*) FROM pg_roles WHERE rolname = $1"
        for dsn, left in zip(dsns, (1, 0)):
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute("SELECT fleet.drop_tenant_schema($1)", schema_name)
            finally:
                await conn.close()
            assert await admin.fetchval(exists, tenant_role(schema_name)) == left
    finally:
        for name in names:
            await drop_database(admin_dsn, name)
        await admin.close()


async def test_a_role_of_a_tenants_name_with_other_rights_is_refused_not_used(fleet: Fleet) -> None:
    schema_name = "t_" + uuid.uuid4().hex
    owner = await asyncpg.connect(fleet.shard_dsns["shard1"])
    quoted = await owner.fetchval("SELECT quote_ident($1)", tenant_role(schema_name))  # test-only DDL
    try:
        await owner.execute(f"CREATE ROLE {quoted} NOLOGIN IN ROLE pg_read_all_data")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="memberships a tenant role must not have"):
            await owner.execute("SELECT fleet.create_tenant_schema($1)", schema_name)
        assert await owner.fetchval("SELECT to_regnamespace($1)", schema_name) is None  # nothing left behind
    finally:
        await owner.execute(f"DROP ROLE IF EXISTS {quoted}")
        await owner.close()


async def test_ensure_tenant_role_gives_a_schema_made_elsewhere_its_role_and_its_tables_idempotently(
        fleet: Fleet) -> None:
    # as a tenant move will: the schema and its tables arrive on the target shard first
    schema_name = "t_" + uuid.uuid4().hex
    owner = await asyncpg.connect(fleet.shard_dsns["shard3"])
    try:
        quoted = await owner.fetchval("SELECT quote_ident($1)", schema_name)  # test-only DDL, quoted by the server
        await owner.execute(f"CREATE SCHEMA {quoted}")
        await owner.execute(f"CREATE TABLE {quoted}.moved (id bigserial PRIMARY KEY, v text)")
        for _ in range(2):
            await schema.ensure_tenant_role(owner, schema_name)
        rights = ("SELECT has_schema_privilege($1, $2, 'USAGE'), "
                  "has_table_privilege($1, (quote_ident($2) || '.moved')::regclass, 'INSERT'), "
                  "has_sequence_privilege($1, (quote_ident($2) || '.moved_id_seq')::regclass, 'USAGE'), "
                  "has_table_privilege($1, (quote_ident($2) || '.moved')::regclass, 'TRUNCATE')")
        assert await owner.fetchrow(rights, tenant_role(schema_name), schema_name) == (True, True, True, False)
        assert await owner.fetchrow(rights, APP_ROLE, schema_name) == (False, False, False, False)
        with pytest.raises(ValueError):
            await schema.ensure_tenant_role(owner, "public")
    finally:
        await owner.execute("SELECT fleet.drop_tenant_schema($1)", schema_name)
        assert not await owner.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", tenant_role(schema_name))
        await owner.close()
