"""`tenantfleet tenants import FILE` (issue 12): good rows land as working tenants (schema,
role, fence, plugins enabled with their migrations recorded), bad rows are refused with
their line and reason, nothing is half-created, and a run killed with SIGKILL resumes
without duplicates."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from router.errors import ValidationFailed
from router.keys import tenant_role
from router.models import TenantRecord
from shard_migrations.engine import Unit, apply_unit
from shard_migrations.import_batch import BatchFallback, NewTenant, create_batch
from shard_migrations.packages import MigrationFile, discover
from shard_migrations.tenant_import import TenantImporter
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.migratekit import ROOT, cli_env, ledger_rows, run_cli, wait_for


def importer(f: Fleet, batch_size: int = 3) -> TenantImporter:
    return TenantImporter(f.control, f.shard_pools, f.settings, discover(), batch_size=batch_size)


async def shard_schemas(f: Fleet) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for shard_id, dsn in f.shard_dsns.items():
        conn = await asyncpg.connect(dsn)
        try:
            out[shard_id] = {r["nspname"] for r in await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname ~ '^t_[0-9a-f]{32}$'")}
        finally:
            await conn.close()
    return out


async def check_whole(f: Fleet) -> list[dict[str, Any]]:
    """Every tenant is active with its schema on its shard and nowhere else; every schema
    on a shard is a tenant's; the shard counters agree. Returns the tenants."""
    tenants = [dict(r) for r in await f.control.fetch(
        "SELECT tenant_id::text AS tenant_id, code, schema_name, shard_id, state FROM tenants ORDER BY code")]
    assert {t["state"] for t in tenants} <= {"active"}, [t for t in tenants if t["state"] != "active"]
    schemas = await shard_schemas(f)
    for shard_id in f.shard_dsns:
        assert schemas[shard_id] == {t["schema_name"] for t in tenants if t["shard_id"] == shard_id}
    counts = {r["shard_id"]: r["tenant_count"] for r in await f.control.fetch("SELECT shard_id, tenant_count FROM shards")}
    assert counts == {s: sum(1 for t in tenants if t["shard_id"] == s) for s in f.shard_dsns}
    return tenants


MIXED_CSV = """code,domains,plugins,shard
alpha-1,alpha.example.com,inventory,
beta-2,beta.example.com;www.beta.example.com,inventory;restock,
BAD CODE,,,
gamma-3,,nosuchplugin,
alpha-1,,,
delta-4,beta.example.com,,
eps-5,,,shard9
zeta-6,,,shard2
taken-7,,,
eta-8,bad_domain!,,
theta-9,a.example.com,inventory,
"""


async def test_a_mixed_file_lands_its_good_rows_and_refuses_each_bad_one_with_its_line(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    await f.directory.create_tenant("taken-7")
    path = tmp_path / "tenants.csv"
    path.write_text(MIXED_CSV)
    report = await importer(f).start(path)
    refused = {r.line: r.reason for r in report.refused}
    assert sorted(refused) == [4, 5, 6, 7, 8, 10, 11]
    assert "code" in refused[4] and "unknown plugin nosuchplugin" in refused[5]
    assert refused[6] == "duplicate code alpha-1 (line 2)"
    assert refused[7] == "duplicate domain beta.example.com (line 3)"
    assert refused[8] == "unknown shard shard9" and refused[10] == "code taken-7 exists in the directory"
    assert "domain" in refused[11]
    assert report.created == 4 and report.rows == 11

    tenants = await check_whole(f)
    assert [t["code"] for t in tenants] == ["alpha-1", "beta-2", "taken-7", "theta-9", "zeta-6"]
    assert next(t for t in tenants if t["code"] == "zeta-6")["shard_id"] == "shard2"
    beta = await f.directory.get(code="beta-2")
    assert beta.domains == ("beta.example.com", "www.beta.example.com") and beta.state == "active"
    assert (await f.directory.get(domain="www.beta.example.com")).code == "beta-2"
    enabled = {(r["code"], r["plugin_id"]) for r in await f.control.fetch(
        "SELECT t.code, p.plugin_id FROM sys_tenant_plugins p JOIN tenants t USING (tenant_id) WHERE p.enabled")}
    assert enabled == {("alpha-1", "inventory"), ("beta-2", "inventory"), ("beta-2", "restock"),
                       ("theta-9", "inventory")}
    # the plugins' tenant files ran in each tenant's schema and are in the shard's ledger
    ledger = await ledger_rows(f, "inventory")
    by_code = {t["code"]: t for t in tenants}
    for c in ("alpha-1", "beta-2", "theta-9"):
        assert sorted(r["name"] for r in ledger if r["tenant_id"] == by_code[c]["tenant_id"]) == \
            ["001_init.sql", "002_location.sql"]
    conn = await asyncpg.connect(f.shard_dsns[by_code["alpha-1"]["shard_id"]])
    try:
        assert await conn.fetchval("SELECT to_regclass($1)", by_code["alpha-1"]["schema_name"] + ".items") is not None
    finally:
        await conn.close()
    run = await f.control.fetchrow("SELECT state, summary FROM fleet_runs WHERE run_id = $1", report.run_id)
    assert run["state"] == "done"
    statuses = {r["item_key"]: r["status"] for r in await f.control.fetch(
        "SELECT item_key, status FROM fleet_run_items WHERE run_id = $1", report.run_id)}
    assert sorted(k for k, s in statuses.items() if s == "done") == ["line:12", "line:2", "line:3", "line:9"]


@pytest.mark.parametrize("content, why", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "not UTF-8"),
    (b"hello,world\nacme,x\n", "header"),
    (b"", "no rows"),
    (b"code,domains\n\"unclosed,x\n", "CSV"),
], ids=["binary", "no code column", "empty", "broken quoting"])
async def test_a_file_that_is_not_csv_or_json_lines_changes_nothing(
        fleet: Fleet, tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "tenants.csv"
    path.write_bytes(content)
    runs_before = await fleet.control.fetchval("SELECT count(*) FROM fleet_runs")
    tenants_before = await fleet.control.fetchval("SELECT count(*) FROM tenants")
    with pytest.raises(ValidationFailed) as refused:
        await importer(fleet).start(path)
    assert refused.value.details["field"] == "file" and why in refused.value.message
    assert await fleet.control.fetchval("SELECT count(*) FROM fleet_runs") == runs_before
    assert await fleet.control.fetchval("SELECT count(*) FROM tenants") == tenants_before


async def test_json_lines_rows_are_checked_one_by_one(fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    path = tmp_path / "tenants.jsonl"
    path.write_text("\n".join([
        json.dumps({"code": "jl-1", "domains": ["jl1.example.com"], "plugins": ["inventory"]}),
        "not json at all",
        json.dumps({"code": "jl-2", "colour": "red"}),
        json.dumps(["jl-3"]),
        "",
        json.dumps({"code": "jl-4", "shard": "shard3"}),
    ]) + "\n")
    report = await importer(f).start(path)
    assert {r.line: r.reason for r in report.refused} == {
        2: "not a JSON object", 3: "unknown field colour (fields: code, domains, plugins, shard)",
        4: "not a JSON object"}
    assert report.created == 2
    tenants = await check_whole(f)
    assert [(t["code"], t["shard_id"] if t["code"] == "jl-4" else "") for t in tenants] == [("jl-1", ""),
                                                                                          ("jl-4", "shard3")]


async def test_an_import_killed_with_sigkill_resumes_without_duplicates(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    path = tmp_path / "many.csv"
    rows = ["code,domains,plugins"] + [f"k-{i:04d},k{i}.example.com,inventory" for i in range(300)]
    rows.insert(50, "BAD,,")  # line 51: refused, and stays refused after the resume
    path.write_text("\n".join(rows) + "\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "host.cli", "tenants", "import", str(path), "--batch-size", "2",
        cwd=str(ROOT), env=cli_env(f), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    async def some_done() -> bool:
        n = await f.control.fetchval("SELECT count(*) FROM fleet_run_items WHERE status = 'done'")
        return proc.returncode is not None or n >= 40

    await wait_for(some_done, timeout=120, what="40 tenants imported")
    assert proc.returncode is None, "the import finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    run_id = await f.control.fetchval("SELECT max(run_id) FROM fleet_runs WHERE kind = 'import'")
    assert await f.control.fetchval("SELECT state FROM fleet_runs WHERE run_id = $1", run_id) == "running"
    done = await f.control.fetchval("SELECT count(*) FROM fleet_run_items WHERE run_id = $1 AND status = 'done'", run_id)
    assert 40 <= done < 300

    # a changed file is not the run's
    other = tmp_path / "other.csv"
    other.write_text("\n".join(rows[:-1]) + "\n")
    rc, _, err = await run_cli(f, "tenants", "import", str(other), "--resume", str(run_id))
    assert rc == 2 and "sha256" in err

    rc, out, err = await run_cli(f, "--json", "tenants", "import", str(path), "--resume", str(run_id))
    assert rc == 2, err  # the one bad row is still refused
    report = json.loads(out)
    assert report["runId"] == run_id and [r["line"] for r in report["refused"]] == [51]
    assert err.strip().startswith("error: VALIDATION_FAILED: 1 of 301 rows refused")
    tenants = await check_whole(f)
    assert [t["code"] for t in tenants] == [f"k-{i:04d}" for i in range(300)]
    assert await f.control.fetchval("SELECT count(*) FROM tenant_domains") == 300
    ledger = await ledger_rows(f, "inventory")
    assert len([r for r in ledger if r["scope"] == "tenant"]) == 2 * 300  # each file once per tenant
    assert await f.control.fetchval(
        "SELECT count(*) FROM sys_tenant_plugins WHERE plugin_id = 'inventory' AND enabled") == 300
    assert await f.control.fetchval("SELECT state FROM fleet_runs WHERE run_id = $1", run_id) == "done"


# A tenant file that fails in some schemas only: those whose name ends in 0-7 (about half).
PROBE_SQL = ("-- fleet:version {v}\nDO $$ BEGIN IF right(current_schema(), 1) < '8' THEN "
             "RAISE EXCEPTION 'probe refuses %', current_schema(); END IF; END $$;\n")


async def test_a_tenant_whose_plugin_file_fails_is_refused_alone_and_its_batch_lands(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    found = discover()
    inv = found.get("inventory")
    probe = tmp_path / "003_probe.sql"
    probe.write_text(PROBE_SQL.format(v=inv.version))
    extra = MigrationFile(plugin_id=inv.id, scope="tenant", name=probe.name, path=probe, sql=probe.read_text(),
                          checksum=hashlib.sha256(probe.read_bytes()).hexdigest(), since=inv.version,
                          no_transaction=False)
    found.plugins["inventory"] = dataclasses.replace(inv, migrations=(*inv.migrations, extra))
    path = tmp_path / "tenants.csv"
    path.write_text("code,domains,plugins\n" + "".join(f"p-{i:02d},p{i}.example.com,inventory\n" for i in range(24)))
    report = await TenantImporter(f.control, f.shard_pools, f.settings, found, batch_size=8).start(path)

    items = {int(r["item_key"].split(":")[1]): dict(r) for r in await f.control.fetch(
        "SELECT item_key, tenant_id::text AS tenant_id, status, last_error FROM fleet_run_items WHERE run_id = $1",
        report.run_id)}
    bad = {line for line, it in items.items() if it["tenant_id"].replace("-", "")[-1] < "8"}
    assert 0 < len(bad) < 24  # both kinds: 2^-23 that the ids say otherwise
    assert {r.line for r in report.refused} == bad and report.created == 24 - len(bad)
    for r in report.refused:
        assert "003_probe.sql" in r.reason and items[r.line]["status"] == "failed"
    # nothing half-made: the refused tenants are in no directory table and on no shard
    tenants = await check_whole(f)
    assert sorted(t["code"] for t in tenants) == sorted(f"p-{line - 2:02d}" for line in items if line not in bad)
    assert await f.control.fetchval("SELECT count(*) FROM tenant_domains") == 24 - len(bad)
    ledger = [r for r in await ledger_rows(f, "inventory") if r["scope"] == "tenant"]
    assert len(ledger) == 3 * (24 - len(bad))


async def test_a_batch_made_again_after_its_commit_is_found_done(fresh_fleet: FleetFactory) -> None:
    """What a resume does when a crash came between the shard's commit and the activation."""
    f = await fresh_fleet()
    inv = discover().get("inventory")
    new = []
    for i in range(3):
        tid = str(uuid.uuid4())
        rec = TenantRecord(tenant_id=tid, code=f"again-{i}", schema="t_" + uuid.UUID(tid).hex, shard_id="shard1",
                           state="provisioning", epoch=1)
        new.append(NewTenant(rec, ("inventory",)))
    pool = await f.shard_pools.get("shard1")
    runs = []
    for _ in range(2):
        async with pool.acquire() as conn, conn.transaction():
            runs.append(await create_batch(conn, "shard1", new, [inv], f.settings))
    assert runs == [2 * 3, 0]  # inventory's two tenant files per tenant, then nothing left to run
    ledger = [r for r in await ledger_rows(f, "inventory") if r["scope"] == "tenant"]
    assert sorted((r["tenant_id"], r["name"]) for r in ledger) == sorted(
        (t.record.tenant_id, n) for t in new for n in ("001_init.sql", "002_location.sql"))
    conn = await asyncpg.connect(f.shard_dsns["shard1"])
    try:
        for t in new:  # the tenant's own role may use its table, once each
            assert await conn.fetchval("SELECT has_table_privilege(fleet.tenant_role($1), $2, 'INSERT')",
                                       t.record.schema, t.record.schema + ".items")
        assert await conn.fetchval("SELECT count(*) FROM fleet.tenant_fence WHERE tenant_id = ANY($1::uuid[])",
                                   [t.record.tenant_id for t in new]) == 3
    finally:
        await conn.close()


# What a tenant's role is and holds, with its own names written ROLE and SCHEMA (and the
# login role LOGIN): equal for two tenants means they got the same rights.
RIGHTS_SQL = """
WITH r AS (SELECT oid, rolname FROM pg_roles WHERE rolname = fleet.tenant_role($1))
SELECT jsonb_build_object(
  'role', (SELECT to_jsonb(x) - 'oid' - 'rolname' - 'rolpassword' FROM pg_roles x WHERE x.oid = (SELECT oid FROM r)),
  'member_of', (SELECT jsonb_agg(to_jsonb(m) - 'oid' - 'roleid' - 'member' - 'grantor'
                                 || jsonb_build_object('of', g.rolname) ORDER BY g.rolname)
                FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = (SELECT oid FROM r)),
  'members', (SELECT jsonb_agg(to_jsonb(m) - 'oid' - 'roleid' - 'member' - 'grantor'
                               || jsonb_build_object('who', CASE WHEN u.rolname = fleet.login_role() THEN 'LOGIN'
                                                                 ELSE u.rolname END) ORDER BY u.rolname)
              FROM pg_auth_members m JOIN pg_roles u ON u.oid = m.member WHERE m.roleid = (SELECT oid FROM r)),
  'schema', (SELECT nspacl::text FROM pg_namespace WHERE nspname = $1),
  'defaults', (SELECT jsonb_agg(jsonb_build_array(d.defaclobjtype, d.defaclacl::text) ORDER BY d.defaclobjtype)
               FROM pg_default_acl d JOIN pg_namespace n ON n.oid = d.defaclnamespace WHERE n.nspname = $1),
  'relations', (SELECT jsonb_agg(jsonb_build_array(c.relname, c.relkind, c.relacl::text) ORDER BY c.relname)
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1))::text
"""


async def rights(conn: asyncpg.Connection, schema: str) -> Any:
    text: str = await conn.fetchval(RIGHTS_SQL, schema)
    return json.loads(text.replace(tenant_role(schema), "ROLE").replace(schema, "SCHEMA"))


def new_tenants(n: int, prefix: str) -> list[NewTenant]:
    out = []
    for i in range(n):
        tid = str(uuid.uuid4())
        out.append(NewTenant(TenantRecord(tenant_id=tid, code=f"{prefix}-{i}", schema="t_" + uuid.UUID(tid).hex,
                                          shard_id="shard1", state="provisioning", epoch=1), ("inventory",)))
    return out


async def test_imported_tenants_roles_hold_what_one_tenant_made_alone_holds(fleet: Fleet) -> None:
    """A batch's roles are made together (fleet.create_tenant_roles, no check per role):
    each holds exactly what a tenant made alone (fleet.create_tenant_schema, then its
    files through the engine) holds, no more."""
    inv = discover().get("inventory")
    batch = new_tenants(3, "same")
    alone = new_tenants(1, "alone")[0].record
    pool = await fleet.shard_pools.get("shard1")
    async with pool.acquire() as conn, conn.transaction():
        assert await create_batch(conn, "shard1", batch, [inv], fleet.settings) == 2 * 3
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT fleet.create_tenant_schema($1)", alone.schema)
        await conn.execute("INSERT INTO fleet.tenant_fence (tenant_id, schema_name, epoch) VALUES ($1::uuid, $2, 1)",
                           alone.tenant_id, alone.schema)
        await apply_unit(conn, inv.id, Unit("shard1", "tenant", alone, tuple(inv.files("tenant", inv.version))),
                         fleet.settings)
    conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        expected = await rights(conn, alone.schema)
        assert expected["relations"] and expected["defaults"] and expected["members"]  # the query sees them
        for t in batch:
            assert await rights(conn, t.record.schema) == expected
    finally:
        await conn.close()


async def test_a_batch_whose_role_exists_already_is_refused_whole_and_made_one_by_one(fleet: Fleet) -> None:
    """A role of a new tenant's name left on the server (by a dropped database, say):
    the batch's quick path refuses it with nothing made, and the path for one tenant at a
    time uses it."""
    inv = discover().get("inventory")
    batch = new_tenants(3, "left")
    left = batch[1].record
    admin = await asyncpg.connect(fleet.shard_dsns["shard1"])
    quoted = await admin.fetchval("SELECT quote_ident(fleet.tenant_role($1))", left.schema)  # test-only DDL
    try:
        await admin.execute(f"CREATE ROLE {quoted} NOLOGIN")
        pool = await fleet.shard_pools.get("shard1")
        with pytest.raises(BatchFallback, match="exists already"):
            async with pool.acquire() as conn, conn.transaction():
                await create_batch(conn, "shard1", batch, [inv], fleet.settings)
        assert await admin.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = ANY($1::text[])",
                                    [t.record.schema for t in batch]) == 0
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT fleet.create_tenant_schema($1)", left.schema)
        assert await admin.fetchval("SELECT pg_has_role(fleet.login_role(), fleet.tenant_role($1), 'MEMBER') "
                                    "AND has_schema_privilege(fleet.tenant_role($1), $1, 'USAGE')", left.schema)
    finally:
        await admin.execute("SELECT fleet.drop_tenant_schema($1)", left.schema)
        await admin.execute(f"DROP ROLE IF EXISTS {quoted}")
        await admin.close()
