"""Fleet migrator: how files are run (no-transaction files, search_path, ledger versions)."""
from __future__ import annotations

from pathlib import Path

import asyncpg

from shard_migrations.fleet import RunOptions
from shard_migrations.keys import advisory_key
from tests.conftest import FleetFactory
from tests.migratekit import ledger_rows, make_tenants, migrator, temp_plugin


async def test_no_transaction_file_runs_outside_a_transaction_and_is_recorded_after_it_succeeds(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    tenants = await make_tenants(f, 6)
    pkg = temp_plugin(tmp_path, "concur", {
        "tenant/001_things.sql": "-- fleet:version 1.0.0\nCREATE TABLE things (id bigint PRIMARY KEY, tag text);\n",
        "tenant/002_tag_idx.sql": "-- fleet:version 1.0.0\n-- fleet:no-transaction\n"
                                  "CREATE INDEX CONCURRENTLY IF NOT EXISTS things_tag_idx ON things (tag);\n",
        "tenant/003_note.sql": "-- fleet:version 1.0.0\nALTER TABLE things ADD COLUMN note text;\n",
    })
    assert [m.no_transaction for m in pkg.migrations] == [False, True, False]
    async with migrator(f, pkg) as m:
        canaries = await m.dry_run(await m.plan(RunOptions()))
        assert all(c["ok"] and c["tried"] == ["tenant/001_things.sql", "tenant/003_note.sql"] for c in canaries)
        report = await m.apply(RunOptions())
    assert report.state == "done" and report.applied_files == 3 * len(tenants)
    rows = await ledger_rows(f, "concur")
    assert sorted({r["name"] for r in rows}) == ["001_things.sql", "002_tag_idx.sql", "003_note.sql"]
    assert len(rows) == 3 * len(tenants)
    for t in tenants:
        conn = await asyncpg.connect(f.shard_dsns[t.shard_id])
        try:
            valid = await conn.fetchval(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = 'things_tag_idx'",
                t.schema)
            assert valid is True, t.code
            # the session settings a no-transaction file needs were reset, and no advisory lock is left
            assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
        finally:
            await conn.close()


async def test_tenant_files_use_unqualified_names_that_land_in_each_tenant_schema(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet(shards=1)
    a, b = await make_tenants(f, 2)
    pkg = temp_plugin(tmp_path, "scoped", {
        "public/001_shared.sql": "CREATE TABLE IF NOT EXISTS scoped_shared (k text PRIMARY KEY);\n"
                                 "INSERT INTO scoped_shared VALUES ('x') ON CONFLICT DO NOTHING;\n",
        "tenant/001_local.sql": "CREATE TABLE local_copy AS SELECT k FROM scoped_shared;\n",
    })
    async with migrator(f, pkg) as m:
        await m.apply(RunOptions())
    conn = await asyncpg.connect(f.shard_dsns["shard1"])
    try:
        for t in (a, b):
            assert await conn.fetchval(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'local_copy'",
                t.schema) == 1
        assert await conn.fetchval("SELECT count(*) FROM information_schema.tables WHERE table_name = 'local_copy' "
                                   "AND table_schema = 'public'") == 0
        key = advisory_key("scoped", "tenant", a.tenant_id)
        assert key != advisory_key("scoped", "tenant", b.tenant_id) and -(2**63) <= key < 2**63
    finally:
        await conn.close()
