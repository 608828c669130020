"""The host's request path logs in as a LOGIN role of its own per shard, never the owner:
what SQL inside a tenant transaction can get back by resetting or setting the role holds
nothing; session state left by one transaction is gone before the next; the login
password is generated, stored with the shard, rotatable, and never shown."""
from __future__ import annotations

from router.tables import SCHEMA_VERSION

import logging
import os
import subprocess
import sys
import uuid
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from host.metrics import HostMetrics
from host.runtime import RUNTIME, HostRuntime
from host.tx import TenantTx, keep_connection
from router import schema
from router.client import ResolveClient
from router.directory import Directory
from router.errors import ShardUnreachable
from router.keys import APP_ROLE, SCHEMA_RE, tenant_role
from router.models import TenantRecord
from router.pools import ShardPools, connect
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet, Servers, create_database, drop_database, serve_router
from tests.hostkit import Host, code, host_settings, running_host


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def host(fleet: Fleet) -> AsyncIterator[Host]:
    async with running_host(host_settings(fleet)) as h:
        yield h


def runtime(host: Host) -> HostRuntime:
    return host.app[RUNTIME]


def _qualified(rec: TenantRecord, table: str) -> str:
    """Test-only SQL naming a tenant's table on purpose (the schema name is the system's own)."""
    assert SCHEMA_RE.match(rec.schema)
    return f'"{rec.schema}".{table}'


async def _login_of(fleet: Fleet, shard_id: str) -> tuple[str, str]:
    row = await fleet.control.fetchrow("SELECT login_role, login_password FROM shards WHERE shard_id = $1", shard_id)
    assert row is not None and row["login_role"] and row["login_password"]
    return row["login_role"], row["login_password"]


async def _owner_of(fleet: Fleet, shard_id: str) -> str:
    return urlsplit(fleet.shard_dsns[shard_id]).username or "postgres"


async def _tenants(fleet: Fleet) -> tuple[TenantRecord, TenantRecord]:
    mine = await fleet.directory.create_tenant(code(), shard_id="shard1")
    other = await fleet.directory.create_tenant(code(), shard_id="shard1")
    # both get the inventory tables (the host syncs plugin migrations on first use of a route:
    # the migrator does it here, as the owner)
    from shard_migrations.engine import apply_tenant
    from shard_migrations.packages import discover
    for rec in (mine, other):
        await apply_tenant(fleet.shard_pools, fleet.settings, discover().get("inventory"), rec)
    return mine, other


async def test_the_request_path_logs_in_as_the_shards_login_role_which_holds_nothing_of_its_own(
        fleet: Fleet, host: Host) -> None:
    rec = await fleet.directory.create_tenant(code(), shard_id="shard1")
    login, _ = await _login_of(fleet, "shard1")

    async def who(db: Any) -> Any:
        return await db.fetchrow(
            "SELECT session_user AS ses, current_user AS cur, r.rolsuper, r.rolcanlogin, r.rolinherit, "
            "r.rolcreaterole, r.rolcreatedb, r.rolbypassrls, r.rolreplication, "
            "(SELECT array_agg(g.rolname::text ORDER BY g.rolname) FROM pg_auth_members m "
            " JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid) AS member_of, "
            "has_database_privilege(r.oid, current_database(), 'CREATE') AS db_create, "
            "has_database_privilege(r.oid, current_database(), 'TEMPORARY') AS db_temp, "
            "(SELECT count(*) FROM pg_namespace n WHERE has_schema_privilege(r.oid, n.oid, 'CREATE')) AS creatable "
            "FROM pg_roles r WHERE r.rolname = session_user")
    row = await runtime(host).tx.run(rec.tenant_id, who)
    assert (row["ses"], row["cur"]) == (login, tenant_role(rec.schema))
    assert login != await _owner_of(fleet, "shard1") and len(login.encode()) <= 63
    assert row["rolcanlogin"] and not row["rolinherit"]
    assert not any(row[k] for k in ("rolsuper", "rolcreaterole", "rolcreatedb", "rolbypassrls", "rolreplication",
                                    "db_create", "db_temp"))
    assert row["creatable"] == 0
    # a member of the app role and of tenant roles only
    assert APP_ROLE in row["member_of"]
    assert all(r == APP_ROLE or r.startswith(APP_ROLE + "_t_") for r in row["member_of"])
    async with runtime(host).tx.connection("shard1") as conn:
        assert await conn.fetchrow("SELECT session_user, current_user") == (login, APP_ROLE)


ESCAPES = [
    "RESET ROLE",
    "SELECT set_config('role', 'none', true)",
    "SELECT set_config('role', 'none', false)",
    "SET ROLE NONE",
]
ACTIONS = [
    "SELECT count(*) FROM {other}",
    "INSERT INTO {other} (sku, qty) VALUES ('escaped', 1)",
    "UPDATE {other} SET qty = 0",
    "SELECT count(*) FROM {mine}",
    "CREATE TABLE public.tf_escaped (x int)",
    "CREATE TABLE {other_schema}.tf_escaped (x int)",
    "ALTER TABLE {other} ADD COLUMN tf_x int",
    "DROP TABLE {other}",
    "UPDATE fleet.tenant_fence SET epoch = epoch + 1",
    "SELECT count(*) FROM fleet.event_outbox",
    "CREATE TEMP TABLE tf_temp (x int)",
]


@pytest.mark.parametrize("escape", ESCAPES)
async def test_resetting_the_role_inside_a_tenant_transaction_gets_a_role_that_reaches_nothing(
        fleet: Fleet, host: Host, escape: str) -> None:
    mine, other = await _tenants(fleet)
    login, _ = await _login_of(fleet, "shard1")
    names = {"other": _qualified(other, "items"), "mine": _qualified(mine, "items"),
             "other_schema": f'"{other.schema}"'}
    for action in ACTIONS:
        async def escaped(db: Any) -> Any:
            await db.execute(escape)
            assert await db.fetchval("SELECT current_user") == login  # not the owner
            return await db.fetchval(action.format(**names))
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
            await runtime(host).tx.run(mine.tenant_id, escaped)
        assert caught.value.sqlstate == "42501", action
    owner = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        assert await owner.fetchval(f"SELECT count(*) FROM {_qualified(other, 'items')}") == 0
        assert await owner.fetchval("SELECT count(*) FROM pg_class WHERE relname = 'tf_escaped'") == 0
        assert await owner.fetchval("SELECT epoch FROM fleet.tenant_fence WHERE tenant_id = $1::uuid",
                                    other.tenant_id) == 1  # as create_tenant wrote it
    finally:
        await owner.close()


@pytest.mark.parametrize("statement", [
    "SET ROLE {owner}",
    "SELECT set_config('role', '{owner_raw}', true)",
    "SET SESSION AUTHORIZATION {owner}",
    "SELECT set_config('session_authorization', '{owner_raw}', false)",
    "SET ROLE pg_read_all_data",
    "SET ROLE pg_write_all_data",
])
async def test_the_owner_or_a_builtin_role_cannot_be_reached_from_a_tenant_transaction(
        fleet: Fleet, host: Host, statement: str) -> None:
    mine, _ = await _tenants(fleet)
    owner = await _owner_of(fleet, "shard1")
    assert owner.isidentifier()  # test-only SQL: the owner's name is spelled into it

    async def become(db: Any) -> Any:
        await db.execute(statement.format(owner=f'"{owner}"', owner_raw=owner))
        return await db.fetchval("SELECT current_user")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await runtime(host).tx.run(mine.tenant_id, become)


async def test_set_role_to_another_tenants_role_is_the_one_switch_left_and_reaches_that_tenant_only(
        fleet: Fleet, host: Host) -> None:
    # The documented limit (README "Database roles"): the login role must be able to SET
    # ROLE to every tenant role of its shard, because the fence does; SQL that names
    # another tenant's role gets that tenant's rows, and nothing more: no DDL, no third
    # tenant, no fence, no owner.
    mine, other = await _tenants(fleet)
    third = await fleet.directory.create_tenant(code(), shard_id="shard1")

    async def hop(db: Any, then: str) -> Any:
        await db.execute("SELECT set_config('role', $1, true)", tenant_role(other.schema))
        return await db.fetchval(then)
    assert await runtime(host).tx.run(
        mine.tenant_id, lambda db: hop(db, f"SELECT count(*) FROM {_qualified(other, 'items')}")) == 0
    for then in (f"CREATE TABLE \"{other.schema}\".tf_hop (x int)", f"SELECT count(*) FROM \"{third.schema}\".items",
                 "UPDATE fleet.tenant_fence SET epoch = epoch + 1", "CREATE TABLE public.tf_hop (x int)"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await runtime(host).tx.run(mine.tenant_id, lambda db, then=then: hop(db, then))


async def _single_connection_tx(fleet: Fleet, stack: AsyncExitStack) -> TenantTx:
    settings = fleet.settings.model_copy(update={"shard_pool_min": 1, "shard_pool_max": 1})
    pools = await stack.enter_async_context(
        ShardPools(settings, fleet.directory.login_dsn_of, role=APP_ROLE, reset=keep_connection))
    resolver = await stack.enter_async_context(ResolveClient(settings, fleet.directory.lookup))
    return await stack.enter_async_context(TenantTx(settings, resolver, pools, HostMetrics()))


@pytest.mark.parametrize("ending", ["commit", "rollback"])
async def test_session_locks_settings_and_cursors_left_by_one_transaction_are_gone_before_the_next(
        fleet: Fleet, ending: str) -> None:
    mine, other = await _tenants(fleet)
    async with AsyncExitStack() as stack:
        tx = await _single_connection_tx(fleet, stack)

        async def leave_state(db: Any) -> Any:
            # a session lock on the *other* tenant's key: it would hold off that tenant's
            # moves and suspends for as long as the pooled connection lives
            await db.execute("SELECT pg_advisory_lock(hashtextextended($1::uuid::text, 7466))", other.tenant_id)
            await db.execute("SELECT set_config('work_mem', '7MB', false)")
            await db.execute("SELECT set_config('tf.left', 'behind', false)")
            await db.execute("SET statement_timeout = '123s'")
            await db.execute("DECLARE tf_held CURSOR WITH HOLD FOR SELECT 1")
            await db.execute("LISTEN tf_channel")
            if ending == "rollback":
                await db.execute("SELECT 1/0")
            return await db.fetchval("SELECT pg_backend_pid()")
        if ending == "rollback":
            with pytest.raises(asyncpg.DivisionByZeroError):
                await tx.run(mine.tenant_id, leave_state)
            pid = None
        else:
            pid = await tx.run(mine.tenant_id, leave_state)

        async def look(db: Any) -> Any:
            return await db.fetchrow(
                "SELECT pg_backend_pid() AS pid, current_setting('work_mem') AS work_mem, "
                "current_setting('tf.left', true) AS tf_left, current_setting('statement_timeout') AS st, "
                "(SELECT count(*) FROM pg_cursors WHERE name = 'tf_held') AS cursors, "
                "(SELECT count(*) FROM pg_listening_channels()) AS channels")
        row = await tx.run(other.tenant_id, look)
        assert pid is None or row["pid"] == pid  # the same connection, not a replaced one
        assert (row["work_mem"], row["tf_left"] or "", row["st"], row["cursors"], row["channels"]) == \
            ("4MB", "", "0", 0, 0)
        owner = await asyncpg.connect(fleet.shard_dsns["shard1"])
        try:
            assert await owner.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
                                        row["pid"]) == 0
            # a mover can take the other tenant's lock at once
            async with owner.transaction():
                assert await owner.fetchval("SELECT pg_try_advisory_xact_lock(fleet.tenant_lock_key($1::uuid))",
                                            other.tenant_id)
        finally:
            await owner.close()


async def _checks_passwords(dsn: str) -> bool:
    parts = urlsplit(dsn)
    wrong = urlunsplit(parts._replace(netloc=f"{parts.username}:not-the-password@{parts.hostname}:{parts.port}"))
    try:
        await (await asyncpg.connect(wrong)).close()
    except asyncpg.InvalidPasswordError:
        return True
    return False


async def test_the_login_password_rotates_on_the_shard_and_in_the_directory_and_new_connections_use_it(
        fleet: Fleet) -> None:
    rec = await fleet.directory.create_tenant(code(), shard_id="shard2")
    before_dsn = await fleet.directory.login_dsn_of("shard2")
    assert before_dsn is not None
    _, before = await _login_of(fleet, "shard2")
    settings = fleet.settings.model_copy(update={"shard_pool_min": 1, "shard_pool_max": 1})
    async with ShardPools(settings, fleet.directory.login_dsn_of, role=APP_ROLE) as pools:
        pool = await pools.get("shard2")
        async with pool.acquire() as conn:
            first_pid = conn.get_server_pid()
        await fleet.directory.rotate_login_password("shard2")
        _, after = await _login_of(fleet, "shard2")
        assert after != before and len(after) >= 40
        if await _checks_passwords(before_dsn):  # the embedded servers do; a loopback-trusting one doesn't
            with pytest.raises(asyncpg.InvalidPasswordError):
                await (await asyncpg.connect(before_dsn)).close()
        else:
            assert fleet.servers.embedded is None
        async with pool.acquire() as conn:  # the open connection goes on
            assert conn.get_server_pid() == first_pid
        await pool.expire_connections()
        async with pool.acquire() as conn:  # a new one, with the new password, from the same pool
            assert conn.get_server_pid() != first_pid
            assert await conn.fetchval("SELECT current_user") == APP_ROLE
        async with AsyncExitStack() as stack:
            tx = await _single_connection_tx(fleet, stack)
            assert await tx.run(rec.tenant_id, lambda db: db.fetchval("SELECT current_user")) == tenant_role(rec.schema)
    # preparing again keeps the password
    assert await fleet.directory.prepare_shards() == []
    assert (await _login_of(fleet, "shard2"))[1] == after


async def test_a_shard_and_control_plane_of_the_previous_version_get_the_login_role_on_prepare(
        fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet(shards=1)
    tenants = [await f.directory.create_tenant(code()) for _ in range(3)]
    login, _ = await _login_of(f, "shard1")
    # as version 3 left them: no login role on the shard, no login columns on the control plane
    owner = await asyncpg.connect(f.shard_dsns["shard1"])
    try:
        q_login, q_db = await owner.fetchrow("SELECT quote_ident($1), quote_ident(current_database())", login)
        for stmt in (f"REVOKE CONNECT ON DATABASE {q_db} FROM {q_login}", f"DROP ROLE {q_login}",
                     "DROP FUNCTION fleet.login_role()", "DROP FUNCTION fleet.ensure_login_role(text)"):
            await owner.execute(stmt)
    finally:
        await owner.close()
    await f.control.execute("ALTER TABLE shards DROP COLUMN login_role, DROP COLUMN login_password")
    await f.control.execute("UPDATE tenantfleet_schema SET version = 3")
    # a host of this version refuses to fall back to the owner
    directory = Directory(f.control, f.shard_pools, f.settings)
    with pytest.raises(asyncpg.UndefinedColumnError):
        await directory.login_dsn_of("shard1")
    await Directory.bootstrap(f.control)
    assert await f.control.fetchval("SELECT version FROM tenantfleet_schema WHERE component = 'control'") == SCHEMA_VERSION
    with pytest.raises(ShardUnreachable, match="no login role"):
        await directory.login_dsn_of("shard1")
    assert await directory.prepare_shards() == []
    assert (await _login_of(f, "shard1"))[0] == login
    async with AsyncExitStack() as stack:
        tx = await _single_connection_tx(f, stack)
        for rec in tenants:  # every existing tenant's role is reachable from the new login role
            async def who(db: Any) -> Any:
                return await db.fetchrow("SELECT session_user, current_user")
            assert await tx.run(rec.tenant_id, who) == (login, tenant_role(rec.schema))
        # and a tenant made after the upgrade too
        new = await f.directory.create_tenant(code())
        assert (await tx.run(new.tenant_id, who))[1] == tenant_role(new.schema)


async def test_an_owner_without_createrole_is_refused_with_what_it_needs(servers: Servers, fleet: Fleet) -> None:
    tag = uuid.uuid4().hex[:10]
    owner_role = f"tf_norole_{tag}"
    admin_dsn = next(iter(servers.shard_admin_dsns.values()))
    db_name = f"tf_{tag}ab_norole"
    dsn = await create_database(admin_dsn, db_name)
    admin = await asyncpg.connect(admin_dsn)
    o, d = await admin.fetchrow("SELECT quote_ident($1), quote_ident($2)", owner_role, db_name)  # test-only DDL
    try:
        password = uuid.uuid4().hex
        await admin.execute(await admin.fetchval("SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)",
                                                 owner_role, password))
        await admin.execute(f"ALTER DATABASE {d} OWNER TO {o}")
        parts = urlsplit(dsn)
        owner_dsn = urlunsplit(parts._replace(netloc=f"{owner_role}:{password}@{parts.hostname}:{parts.port}"))
        # the fleet's roles exist on this server already: the owner may not take them on
        with pytest.raises(ShardUnreachable, match="as a superuser: GRANT") as caught:
            await fleet.directory.add_shard(f"norole-{tag[:6]}", owner_dsn)
        assert password not in str(caught.value) and password not in str(caught.value.details)
        assert await fleet.control.fetchval("SELECT count(*) FROM shards WHERE shard_id = $1", f"norole-{tag[:6]}") == 0
        # roles of its own to make: it needs CREATEROLE, and is told so
        conn = await asyncpg.connect(owner_dsn)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"needs CREATEROLE"):
                await schema.ensure_shard(conn, f"tf_app_{tag}", schema.scram_verifier("x"))
        finally:
            await conn.close()
    finally:
        await drop_database(admin_dsn, db_name)
        await admin.execute(f"DROP ROLE IF EXISTS {o}")
        await admin.close()


async def test_login_passwords_are_in_no_output(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await fleet.directory.rotate_login_password("shard3")
    assert await fleet.directory.prepare_shards() == []
    passwords = [r["login_password"] for r in await fleet.control.fetch("SELECT login_password FROM shards")]
    assert len(passwords) == 3 and all(passwords)
    outputs = [caplog.text, str([s.to_api() for s in await fleet.directory.list_shards()]),
               str(await fleet.directory.get_shard("shard3"))]
    async with AsyncExitStack() as stack:
        url = await serve_router(fleet.settings.model_copy(update={"read_key": "tf-test-read"}), stack)
        import aiohttp
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1/shards", headers={"Authorization": "Bearer tf-test-read"}) as r:
                assert r.status == 200
                outputs.append(await r.text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLEET_")}
    env.update(TENANTFLEET_CONTROL_DSN=fleet.control_dsn, TENANTFLEET_REDIS_URL=fleet.settings.redis_url)
    for args in (["shards", "list"], ["shards", "list", "--json"]):
        proc = subprocess.run([sys.executable, "-m", "host.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs += [proc.stdout, proc.stderr]
    assert "shard3" in outputs[-2]
    for out in outputs:
        assert not [p for p in passwords if p in out]
    # and the login DSN redacts like any other
    login_dsn = await fleet.directory.login_dsn_of("shard3")
    assert login_dsn is not None
    from router.pools import redact
    assert not [p for p in passwords if p in redact(login_dsn)]
    conn = await connect(login_dsn, fleet.settings)
    await conn.close()
    assert schema.scram_verifier("x") != schema.scram_verifier("x")  # salted
