"""The directory at 100k tenants (issue 12): a per-shard tenant counter kept in the same
transaction as every change to `tenants`, placement that reads it, keyset pages, and
control-plane hot paths that walk an index (checked on the plans, not by timing)."""
from __future__ import annotations

import json
import uuid
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from router import schema
from router.directory import LOOKUP_SQL, _LIST_SQL
from router.errors import ValidationFailed
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet, serve_router

READ = {"Authorization": "Bearer scale-read-key"}


async def _counts(control: asyncpg.Pool) -> tuple[dict[str, int], dict[str, int]]:
    """(the counter of each shard, its tenants counted)."""
    counter = {r["shard_id"]: r["tenant_count"] for r in await control.fetch("SELECT shard_id, tenant_count FROM shards")}
    counted = {r["shard_id"]: 0 for r in await control.fetch("SELECT shard_id FROM shards")}
    for r in await control.fetch("SELECT shard_id, count(*)::int AS n FROM tenants GROUP BY shard_id"):
        counted[r["shard_id"]] = r["n"]
    return counter, counted


async def _insert_rows(conn: asyncpg.Connection, shard_ids: list[str], prefix: str) -> None:
    """Directory rows only (no schemas): what the counter sees of a bulk insert."""
    await conn.executemany(
        "INSERT INTO tenants (tenant_id, code, schema_name, shard_id, state) VALUES ($1, $2, $3, $4, 'active')",
        [(u, f"{prefix}-{i:03d}", "t_" + u.hex, s) for i, (u, s) in enumerate((uuid.uuid4(), s) for s in shard_ids)])


async def test_shard_counter_follows_creates_bulk_inserts_moves_deletes_and_rollbacks(
        fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    for i in range(7):
        await f.directory.create_tenant(f"cnt-{i}")
    counter, counted = await _counts(f.control)
    assert counter == counted and sum(counter.values()) == 7
    async with f.control.acquire() as conn:
        # one statement over three shards (COPY-like bulk insert), then a move, then deletes
        await conn.execute(
            "INSERT INTO tenants (tenant_id, code, schema_name, shard_id, state) "
            "SELECT u, 'bulk-' || i, 't_' || replace(u::text, '-', ''), 'shard' || (1 + i % 3), 'active' "
            "FROM (SELECT gen_random_uuid() AS u, i FROM generate_series(1, 30) i) x")
        moved = await conn.fetchval("UPDATE tenants SET shard_id = 'shard3' WHERE code = 'bulk-1' RETURNING 1")
        assert moved == 1
        await conn.execute("UPDATE tenants SET epoch = epoch + 1 WHERE code LIKE 'bulk-%'")  # no shard change
        await conn.execute("DELETE FROM tenants WHERE code IN ('bulk-2', 'bulk-5', 'bulk-6')")
        async with conn.transaction():
            await _insert_rows(conn, ["shard1"] * 5, "gone")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():  # the counter rolls back with the rows
                await _insert_rows(conn, ["shard2"] * 4, "dup")
                await _insert_rows(conn, ["shard2"], "dup")
        await conn.execute("DELETE FROM tenants WHERE code LIKE 'gone-%'")
    counter, counted = await _counts(f.control)
    assert counter == counted
    assert sum(counter.values()) == 7 + 30 - 3
    assert [s.tenants for s in await f.directory.list_shards()] == [counter[s] for s in sorted(counter)]


async def test_placement_reads_the_counter_not_the_tenants(fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    # shard1 claims to be full: placement must believe the counter (it counts nothing itself)
    await f.control.execute("UPDATE shards SET tenant_count = 900 WHERE shard_id = 'shard1'")
    placed = [(await f.directory.create_tenant(f"pl-{i}")).shard_id for i in range(6)]
    assert "shard1" not in placed
    assert sorted(placed) == ["shard2"] * 3 + ["shard3"] * 3


async def test_a_control_plane_from_before_the_counter_is_caught_up_in_place(fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    for i in range(5):
        await f.directory.create_tenant(f"old-{i}")
    async with f.control.acquire() as conn:
        # the tables as schema version 4 made them: no counter, no triggers, the old index
        for trigger in ("tenants_count_insert", "tenants_count_delete", "tenants_count_move"):
            await conn.execute(f"DROP TRIGGER {trigger} ON tenants")  # constant names
        await conn.execute("DROP FUNCTION tenantfleet_count_tenants()")
        await conn.execute("ALTER TABLE shards DROP COLUMN tenant_count")
        await conn.execute("DROP INDEX tenants_shard_code_idx")
        await conn.execute("CREATE INDEX tenants_shard_idx ON tenants (shard_id)")
        await conn.execute("UPDATE tenantfleet_schema SET version = 4 WHERE component = 'control'")
        await schema.ensure_control(conn)
        await schema.ensure_control(conn)  # idempotent: the second run counts nothing twice
        assert await conn.fetchval("SELECT to_regclass('tenants_shard_idx')") is None
        assert await conn.fetchval("SELECT to_regclass('tenants_shard_code_idx')") is not None
    counter, counted = await _counts(f.control)
    assert counter == counted and sum(counter.values()) == 5
    await f.directory.create_tenant("old-new")
    counter, counted = await _counts(f.control)
    assert counter == counted and sum(counter.values()) == 6


async def test_tenant_list_pages_by_code_after_the_last_one(fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    codes = sorted(f"pg-{i:02d}" for i in range(23))
    for c in codes:
        await f.directory.create_tenant(c)
    await f.directory.suspend((await f.directory.get(code="pg-04")).tenant_id)

    async def walk(**filters: Any) -> list[str]:
        seen: list[str] = []
        after = None
        while True:
            page = await f.directory.list_tenants(limit=5, after=after, **filters)
            seen += [r.code for r in page]
            if len(page) < 5:
                return seen
            after = page[-1].code

    assert await walk() == codes
    on_shard2 = sorted(r["code"] for r in await f.control.fetch("SELECT code FROM tenants WHERE shard_id = 'shard2'"))
    assert await walk(shard_id="shard2") == on_shard2
    assert await walk(state="suspended") == ["pg-04"]
    assert await walk(state="active", shard_id="shard2") == [c for c in on_shard2 if c != "pg-04"]
    # the old offset still works (deprecated), also on top of after
    assert [r.code for r in await f.directory.list_tenants(limit=3, offset=4)] == codes[4:7]
    assert [r.code for r in await f.directory.list_tenants(limit=3, after=codes[1], offset=2)] == codes[4:7]
    for bad in ("", "PG-01", "x" * 100, "a'; DROP TABLE tenants; --"):
        with pytest.raises(ValidationFailed) as refused:
            await f.directory.list_tenants(after=bad)
        assert refused.value.details["field"] == "after"


@pytest_asyncio.fixture(loop_scope="session")
async def router_url(fleet: Fleet) -> AsyncIterator[str]:
    settings = fleet.settings.model_copy(update={"admin_key": "scale-admin-key", "read_key": "scale-read-key"})
    async with AsyncExitStack() as stack:
        yield await serve_router(settings, stack)


async def test_router_pages_tenants_with_a_next_link(fleet: Fleet, router_url: str) -> None:
    prefix = "lk" + uuid.uuid4().hex[:6]
    mine = sorted(f"{prefix}-{i}" for i in range(5))
    for c in mine:
        await fleet.directory.create_tenant(c, shard_id="shard1")
    async with aiohttp.ClientSession() as http:
        url: str | None = f"{router_url}/v1/tenants?shard=shard1&limit=2&after={prefix}"
        seen: list[str] = []
        while url is not None:
            async with http.get(url, headers=READ) as r:
                assert r.status == 200
                page = await r.json()
                link = r.headers.get("Link")
            seen += [t["code"] for t in page if t["code"].startswith(prefix)]
            if link is None:
                assert len(page) < 2
                url = None
            else:
                assert len(page) == 2 and link.endswith('>; rel="next"') and "shard=shard1" in link
                url = router_url + link[1:link.index(">")]
        assert seen == mine
        for query, field in (("after=NOT%20A%20CODE", "after"), ("after=a&offset=-3", "offset")):
            async with http.get(f"{router_url}/v1/tenants?{query}", headers=READ) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["code"] == "VALIDATION_FAILED"
                assert body["error"]["field"] == field


def _seq_scans(plan: Any, tables: set[str]) -> list[str]:
    found: list[str] = []
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("Node Type") == "Seq Scan" and node.get("Relation Name") in tables:
                found.append(node["Relation Name"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value  # the pool may decode json itself


BIG = {"tenants", "tenant_domains", "principals", "sys_tenant_plugins", "roles", "fleet_run_items"}


async def test_control_plane_hot_queries_walk_an_index(fleet: Fleet) -> None:
    """With sequential scans priced out, every hot query still has an index to use; a query
    on a column without one shows a Seq Scan (so the check can fail)."""
    rec = await fleet.directory.create_tenant("ix" + uuid.uuid4().hex[:8], ["ix.example.com"])
    tid = uuid.UUID(rec.tenant_id)
    queries: list[tuple[str, tuple[object, ...]]] = [
        (LOOKUP_SQL["id"], (rec.tenant_id,)), (LOOKUP_SQL["code"], (rec.code,)),
        (LOOKUP_SQL["domain"], ("ix.example.com",)),
        (_LIST_SQL[(False, False)], ("", 100, 0)), (_LIST_SQL[(True, False)], ("", 100, 0, "shard1")),
        (_LIST_SQL[(False, True)], ("", 100, 0, "suspended")),
        (_LIST_SQL[(True, True)], ("", 100, 0, "shard1", "active")),
        ("SELECT 1 FROM tenants WHERE shard_id = $1 ORDER BY code", ("shard1",)),
        ("SELECT principal_id FROM principals WHERE tenant_id = $1::uuid", (tid,)),
        ("DELETE FROM principals WHERE tenant_id = $1::uuid", (tid,)),  # the cascade when a tenant goes
        ("SELECT enabled FROM sys_tenant_plugins WHERE tenant_id = $1::uuid AND plugin_id = $2", (tid, "inventory")),
        ("SELECT DISTINCT version_installed FROM sys_tenant_plugins WHERE plugin_id = $1", ("inventory",)),
        ("SELECT role_key FROM roles WHERE tenant_id = $1::uuid", (tid,)),
        ("SELECT 1 FROM fleet_run_items WHERE run_id = $1 AND status = $2", (1, "pending")),
    ]
    async with fleet.control.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        wrong = []
        for sql, args in queries:
            plan = _json(await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args))
            if _seq_scans(plan, BIG):
                wrong.append(f"{' '.join(sql.split())[:100]}: {_seq_scans(plan, BIG)}")
        control = _json(await conn.fetchval("EXPLAIN (FORMAT JSON) SELECT 1 FROM tenants WHERE updated_at < now()"))
        assert _seq_scans(control, BIG) == ["tenants"]
    assert wrong == []
