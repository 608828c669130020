"""Fleet migrator: a shard stopped mid-run, and a file edited after it was applied."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import asyncpg
import pytest

from host.fleet.embedded import PgServer, _RunAs, free_port
from router.errors import MigrationDrift, ShardUnreachable
from shard_migrations.engine import apply_tenant
from shard_migrations.fleet import RunOptions
from shard_migrations.keys import advisory_key
from shard_migrations.verify import verify
from tests.conftest import FleetFactory
from tests.migratekit import (ledger_rows, make_tenants, migrator, reload_plugin, shipped, snake_keys, temp_plugin,
                              wait_for)


async def count_tenant_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM fleet.sys_plugin_migrations WHERE scope = 'tenant'"))
    finally:
        await conn.close()


async def test_a_shard_stopped_mid_run_is_reported_while_the_others_finish_and_resume_completes_it(
        fresh_fleet: FleetFactory) -> None:
    root = Path(tempfile.mkdtemp(prefix="tenantfleet-shard4-"))
    root.chmod(0o755)
    runas = _RunAs.for_postgres()
    server = PgServer("shard4", root, free_port(), tuned_for_tests=True)
    try:
        await asyncio.to_thread(server.init, runas)
        await asyncio.to_thread(server.start, runas)
        f = await fresh_fleet(shard_give_up_s=5.0, shard_concurrency=2, backoff_max_s=0.5)
        await f.directory.add_shard("shard4", server.dsn())
        f.shard_dsns["shard4"] = server.dsn()
        elsewhere = [t for sid in ("shard1", "shard2", "shard3")
                     for t in await make_tenants(f, 10, prefix=f"up-{sid}", shard_id=sid)]
        on4 = sorted(await make_tenants(f, 20, prefix="down", shard_id="shard4"), key=lambda t: t.code)
        # hold the advisory locks of the last few shard4 tenants: the run can't finish shard4 before we stop it
        blocker = await asyncpg.connect(server.dsn())
        for t in on4[-5:]:
            assert await blocker.fetchval("SELECT pg_try_advisory_lock($1)", advisory_key("inventory", "tenant", t.tenant_id))
        inv = shipped("inventory")
        async with migrator(f, inv) as m:
            run = asyncio.create_task(m.apply(RunOptions()))

            async def shard4_half_done() -> bool:
                return await count_tenant_rows(server.dsn()) >= 2 * 15

            await wait_for(shard4_half_done, timeout=60, what="shard4 progress")
            await asyncio.to_thread(server.stop, runas, "fast")
            blocker.terminate()
            report = await asyncio.wait_for(run, 60)
        assert report.state == "failed" and list(report.unreachable) == ["shard4"]
        with pytest.raises(ShardUnreachable) as caught:
            report.raise_for_failure()
        assert "shard4" in str(caught.value) and "--resume" in str(caught.value)
        for sid in ("shard1", "shard2", "shard3"):
            assert await count_tenant_rows(f.shard_dsns[sid]) == 2 * 10, sid
        statuses = await f.control.fetch(
            "SELECT shard_id, status, count(*) AS n FROM fleet_run_items WHERE run_id = $1 GROUP BY 1, 2",
            report.run_id)
        by = {(r["shard_id"], r["status"]): r["n"] for r in statuses}
        assert by[("shard4", "failed")] >= 5 and not any(s == "failed" for (sid, s) in by if sid != "shard4")
        assert await f.control.fetchval("SELECT version_installed FROM sys_plugins WHERE plugin_id = 'inventory'") \
            == "0.0.0"

        await asyncio.to_thread(server.start, runas)
        async with migrator(f, inv) as m:
            resumed = await m.apply(RunOptions(), resume=report.run_id)
        assert resumed.state == "done"
        assert await count_tenant_rows(server.dsn()) == 2 * 20
        rows = await ledger_rows(f, "inventory")
        assert len(rows) == 4 + 2 * (len(elsewhere) + len(on4))
        assert await f.control.fetchval("SELECT version_installed FROM sys_plugins WHERE plugin_id = 'inventory'") \
            == "1.1.0"
        assert await f.control.fetchval("SELECT count(*) FROM fleet_run_items WHERE run_id = $1 AND status <> 'done'",
                                        report.run_id) == 0
    finally:
        await asyncio.to_thread(server.stop, runas, "immediate")
        shutil.rmtree(root, ignore_errors=True)


async def test_a_file_edited_after_it_was_applied_is_reported_as_drift_by_verify_and_apply(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    tenants = await make_tenants(f, 6)
    pkg = temp_plugin(tmp_path, "drifty", {"tenant/001_notes.sql": "CREATE TABLE notes (id bigint PRIMARY KEY);\n"})
    async with migrator(f, pkg) as m:
        assert (await m.apply(RunOptions())).state == "done"
    before = await ledger_rows(f, "drifty")
    (tmp_path / "drifty" / "migrations" / "tenant" / "001_notes.sql").write_text(
        "CREATE TABLE notes (id bigint PRIMARY KEY, body text);\n")
    edited = reload_plugin(tmp_path, "drifty")

    async with migrator(f, edited) as m:
        report = await verify(f.control, m.pools, edited)
        assert not report.ok and len(report.drift) == len(tenants)
        d = report.drift[0]
        assert d.name == "001_notes.sql" and d.tenant_id in {t.tenant_id for t in tenants} and d.shard_id in f.shard_dsns
        as_json = report.to_dict()   # what `migrate verify --json` prints (the CLI sees shipped plugins only)
        assert not snake_keys(as_json) and as_json["drift"][0]["tenantId"] in {t.tenant_id for t in tenants}
        planned = (await m.plan(RunOptions())).to_dict()
        assert not snake_keys(planned) and {d["shardId"] for d in planned["drift"]} <= set(f.shard_dsns)
        with pytest.raises(MigrationDrift) as caught:
            report.raise_for_problems()
        assert "tenant/001_notes.sql" in caught.value.message and d.shard_id in caught.value.message
        with pytest.raises(MigrationDrift) as caught:
            await m.apply(RunOptions())
        assert "001_notes.sql" in caught.value.message and "tenant" in caught.value.message
        with pytest.raises(MigrationDrift):
            await apply_tenant(m.pools, f.settings, edited, tenants[0])
        assert await ledger_rows(f, "drifty") == before
        allowed = await m.apply(RunOptions(allow_drift=True))
        assert allowed.state == "done" and allowed.applied_files == 0 and allowed.drift_allowed == len(tenants)
        assert allowed.to_dict()["driftAllowed"] == len(tenants) and not snake_keys(allowed.to_dict())
