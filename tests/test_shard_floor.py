"""A shard's preparation: tenant roles can't create large objects, and a database set up by
a newer tenantfleet is refused by an older one (the version floor)."""
from __future__ import annotations

import uuid
from typing import Any, AsyncIterator, Sequence

import asyncpg
import pytest
import pytest_asyncio

from host.runtime import RUNTIME
from router import schema, tables
from router.errors import SchemaTooNew
from router.keys import tenant_role
from tests.fleetkit import Fleet, Servers, create_database, drop_database, owner_fetchval
from tests.hostkit import Host, host_settings, running_host, tenant_with_key

LO_CREATORS = ("lo_create(oid)", "lo_creat(integer)", "lo_from_bytea(oid, bytea)")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def host(fleet: Fleet) -> AsyncIterator[Host]:
    async with running_host(host_settings(fleet)) as h:
        yield h


@pytest.mark.parametrize("sql", ["SELECT lo_create(0)", "SELECT lo_creat(-1)", "SELECT lo_from_bytea(0, 'x')"])
async def test_a_tenant_transaction_cannot_create_a_large_object(fleet: Fleet, host: Host, sql: str) -> None:
    rec, _ = await tenant_with_key(fleet, host)
    before = await owner_fetchval(fleet, rec.shard_id, "SELECT count(*) FROM pg_largeobject_metadata")

    async def plugin(db: Any) -> Any:
        return await db.fetchval(sql)
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
        await host.app[RUNTIME].tx.run(rec.tenant_id, plugin)
    assert caught.value.sqlstate == "42501"
    assert await owner_fetchval(fleet, rec.shard_id, "SELECT count(*) FROM pg_largeobject_metadata") == before


async def test_a_shard_prepared_before_the_revoke_loses_large_objects_and_records_its_version(fleet: Fleet) -> None:
    rec = await fleet.directory.create_tenant(f"lo-{uuid.uuid4().hex[:8]}", shard_id="shard2")
    owner = await asyncpg.connect(fleet.shard_dsns["shard2"])
    try:
        # as version 3 left a shard: large objects and session advisory locks open to
        # PUBLIC, no version recorded on it
        await owner.execute("GRANT EXECUTE ON FUNCTION " + ", ".join(LO_CREATORS) + " TO PUBLIC")
        await owner.execute("GRANT EXECUTE ON FUNCTION " + ", ".join(schema.SESSION_LOCK_FUNCTIONS) + " TO PUBLIC")
        await owner.execute("DROP TABLE fleet.tenantfleet_schema")
        assert await _can_create_lo(owner, tenant_role(rec.schema))
        assert await _can_run_any(owner, tenant_role(rec.schema), schema.SESSION_LOCK_FUNCTIONS)
        assert await fleet.directory.prepare_shards() == []
        assert not await _can_create_lo(owner, tenant_role(rec.schema))
        assert not await _can_run_any(owner, tenant_role(rec.schema), schema.SESSION_LOCK_FUNCTIONS)
        assert await owner.fetchval("SELECT version FROM fleet.tenantfleet_schema WHERE component = 'shard'") \
            == tables.SCHEMA_VERSION
    finally:
        await owner.close()


async def test_a_shard_set_up_by_a_newer_tenantfleet_is_refused_and_left_as_it_is(
        fleet: Fleet, servers: Servers) -> None:
    admin_dsn = servers.shard_admin_dsns["shard3"]
    db_name = f"tf_{uuid.uuid4().hex[:12]}_newer"
    dsn = await create_database(admin_dsn, db_name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await schema.ensure_shard(conn)
            newer = tables.SCHEMA_VERSION + 1
            await conn.execute("UPDATE fleet.tenantfleet_schema SET version = $1", newer)
            fence = "SELECT xmin::text FROM pg_proc WHERE oid = 'fleet.enter_tenant(uuid, bigint, int)'::regprocedure"
            before = await conn.fetchval(fence)
            with pytest.raises(SchemaTooNew, match=f"schema version {newer}"):
                await schema.ensure_shard(conn)
            assert await conn.fetchval(fence) == before  # not a statement ran: the fence is the newer one's
            assert await conn.fetchval("SELECT version FROM fleet.tenantfleet_schema") == newer
        finally:
            await conn.close()
        with pytest.raises(SchemaTooNew):  # `shards add` / POST /v1/shards: refused, nothing registered
            await fleet.directory.add_shard("newer", dsn)
        assert await fleet.control.fetchval("SELECT count(*) FROM shards WHERE shard_id = 'newer'") == 0
    finally:
        await drop_database(admin_dsn, db_name)


async def test_a_control_database_set_up_by_a_newer_tenantfleet_is_refused(servers: Servers) -> None:
    db_name = f"tf_{uuid.uuid4().hex[:12]}_newctl"
    dsn = await create_database(servers.control_admin_dsn, db_name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await schema.ensure_control(conn)
            await conn.execute("UPDATE tenantfleet_schema SET version = version + 1")
            with pytest.raises(SchemaTooNew):
                await schema.ensure_control(conn)
            assert await conn.fetchval("SELECT version FROM tenantfleet_schema") == tables.SCHEMA_VERSION + 1
        finally:
            await conn.close()
    finally:
        await drop_database(servers.control_admin_dsn, db_name)


async def _can_create_lo(conn: asyncpg.Connection, role: str) -> bool:
    return await _can_run_any(conn, role, LO_CREATORS)


async def _can_run_any(conn: asyncpg.Connection, role: str, functions: Sequence[str]) -> bool:
    return bool(await conn.fetchval(
        "SELECT bool_or(has_function_privilege($1, f, 'EXECUTE')) FROM unnest($2::text[]) f", role, list(functions)))


