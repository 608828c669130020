"""The directory: shard registration, placement, tenant lifecycle, bad input."""
from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from router.errors import ShardNotFound, ShardUnreachable, TenantExists, TenantNotFound, ValidationFailed
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet


def code() -> str:
    return "t-" + uuid.uuid4().hex[:10]


async def schema_exists(dsn: str, schema: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema))
    finally:
        await conn.close()


async def test_thousand_tenants_land_balanced_with_schemas_where_the_directory_says(fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    sem = asyncio.Semaphore(16)

    async def create(i: int) -> None:
        async with sem:
            await f.directory.create_tenant(f"bulk-{i:04d}")

    await asyncio.gather(*(create(i) for i in range(1000)))
    counts = {s.shard_id: s.tenants for s in await f.directory.list_shards()}
    assert sum(counts.values()) == 1000
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    rows = await f.control.fetch("SELECT tenant_id, schema_name, shard_id, state FROM tenants")
    assert {r["state"] for r in rows} == {"active"}
    for shard_id, dsn in f.shard_dsns.items():
        conn = await asyncpg.connect(dsn)
        try:
            on_shard = {r["nspname"] for r in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 't\\_%'")}
            fenced = {str(r["tenant_id"]) for r in await conn.fetch("SELECT tenant_id FROM fleet.tenant_fence")}
        finally:
            await conn.close()
        expected = [r for r in rows if r["shard_id"] == shard_id]
        assert on_shard == {r["schema_name"] for r in expected}
        assert fenced == {str(r["tenant_id"]) for r in expected}


async def test_tenant_resolves_by_id_code_and_domain(fleet: Fleet) -> None:
    c = code()
    rec = await fleet.directory.create_tenant(c, [f"{c}.example.com"])
    assert rec.state == "active" and rec.schema == "t_" + uuid.UUID(rec.tenant_id).hex
    assert await fleet.directory.get(id=rec.tenant_id) == rec
    assert await fleet.directory.get(code=c) == rec
    assert await fleet.directory.get(domain=f"{c.upper()}.example.com") == rec
    assert await schema_exists(fleet.shard_dsns[rec.shard_id], rec.schema)


async def test_suspend_and_resume_bump_the_epoch(fleet: Fleet) -> None:
    rec = await fleet.directory.create_tenant(code())
    s = await fleet.directory.suspend(rec.tenant_id)
    assert (s.state, s.epoch) == ("suspended", rec.epoch + 1)
    r = await fleet.directory.resume(rec.tenant_id)
    assert (r.state, r.epoch) == ("active", rec.epoch + 2)
    with pytest.raises(ValidationFailed):
        await fleet.directory.resume(rec.tenant_id)


@pytest.mark.parametrize("bad", ['x"; DROP SCHEMA public; --', "", "UPPER", "-lead", "a" * 64, "ü"])
async def test_bad_codes_are_refused_and_change_nothing(fleet: Fleet, bad: str) -> None:
    before = await fleet.control.fetchval("SELECT count(*) FROM tenants")
    with pytest.raises(ValidationFailed):
        await fleet.directory.create_tenant(bad)
    assert await fleet.control.fetchval("SELECT count(*) FROM tenants") == before
    conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        assert await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = 'public'") == 1
    finally:
        await conn.close()


async def test_duplicate_code_or_domain_is_a_conflict(fleet: Fleet) -> None:
    c = code()
    await fleet.directory.create_tenant(c, [f"{c}.example.org"])
    with pytest.raises(TenantExists):
        await fleet.directory.create_tenant(c)
    with pytest.raises(TenantExists):
        await fleet.directory.create_tenant(code(), [f"{c}.example.org"])


async def test_unknown_and_malformed_lookups(fleet: Fleet) -> None:
    with pytest.raises(TenantNotFound):
        await fleet.directory.get(id=str(uuid.uuid4()))
    with pytest.raises(ValidationFailed):
        await fleet.directory.get(id="not-a-uuid")
    with pytest.raises(ValidationFailed):
        await fleet.directory.get(code="a", domain="b.example.com")


async def test_unreachable_shard_is_refused_and_nothing_is_registered(fleet: Fleet) -> None:
    from host.fleet.embedded import free_port
    with pytest.raises(ShardUnreachable):
        await fleet.directory.add_shard("ghost", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    assert await fleet.control.fetchval("SELECT count(*) FROM shards WHERE shard_id = 'ghost'") == 0


async def test_only_a_shards_password_may_be_replaced_and_only_by_one_that_connects(fleet: Fleet) -> None:
    """What `up` does for an embedded fleet made before passwords (host/fleet/demo.ensure_shards)."""
    dsn = fleet.shard_dsns["shard1"]
    parts = urlsplit(dsn)
    with pytest.raises(ValidationFailed):  # another database is a move, not a credential change
        await fleet.directory.replace_shard_password("shard1", urlunsplit(parts._replace(path="/elsewhere")))
    with pytest.raises(ShardNotFound):
        await fleet.directory.replace_shard_password("shard9", dsn)
    if fleet.servers.embedded is not None:  # an external server may trust loopback and take any password
        wrong = urlunsplit(parts._replace(netloc=f"{parts.username}:wrong@{parts.hostname}:{parts.port}"))
        with pytest.raises(ShardUnreachable):
            await fleet.directory.replace_shard_password("shard1", wrong)
    assert (await fleet.directory.get_shard("shard1")).dsn == dsn  # nothing changed
    await fleet.directory.replace_shard_password("shard1", dsn)
    assert (await fleet.directory.get_shard("shard1")).dsn == dsn
