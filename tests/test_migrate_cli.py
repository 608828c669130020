"""`tenantfleet migrate ...` from the command line: plan, dry-run, status, verify and bad input.

Bad input gets one line ``error: CODE: message`` naming what and where, a non-zero exit,
and the ledger unchanged for what did not apply.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from host.fleet.embedded import free_port
from router.errors import MigrationFailed
from shard_migrations.fleet import RunOptions
from tests.conftest import FleetFactory
from tests.migratekit import camel_json, ledger_rows, make_tenants, migrator, run_cli, temp_plugin, tenant_objects


def one_error_line(err: str, code: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {code}: "), err
    return lines[0]


async def test_plan_dry_run_apply_status_and_verify_from_the_command_line_with_camel_case_json(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    """Every ``--json`` output of the migrate commands is parsed by `camel_json`, which fails on
    any key (at any depth) with an underscore: a snake_case key added later fails here."""
    f = await fresh_fleet()
    tenants = await make_tenants(f, 12)

    rc, out, err = await run_cli(f, "--json", "migrate", "plan", "inventory")
    assert rc == 0, err
    plan = camel_json(out)
    assert plan["version"] == "1.1.0" and plan["filesPending"] == 3 + 12 * 2
    assert all(s["tenantsPending"] and s["publicPending"] for s in plan["shards"]), plan

    rc, out, err = await run_cli(f, "--json", "migrate", "apply", "inventory", "--dry-run")
    assert rc == 0, err
    dry = camel_json(out)
    canaries = dry["canaries"]
    assert dry["plan"]["filesPending"] == plan["filesPending"]
    assert {c["shardId"] for c in canaries} == set(f.shard_dsns)
    assert all(c["ok"] and "tenant/002_location.sql" in c["tried"] for c in canaries), canaries
    assert await ledger_rows(f, "inventory") == []
    for dsn in f.shard_dsns.values():
        assert all(not o["tables"] for o in (await tenant_objects(dsn)).values())  # rolled back

    rc, out, err = await run_cli(f, "migrate", "verify", "inventory")
    assert rc == 4
    one_error_line(err, "MIGRATION_INCOMPLETE")
    rc, out, err = await run_cli(f, "--json", "migrate", "verify", "inventory")
    assert rc == 4
    missing = camel_json(out)["missing"]
    assert {m["shardId"] for m in missing} == set(f.shard_dsns)
    assert {m["tenantId"] for m in missing if m["tenantId"]} == {t.tenant_id for t in tenants}

    metrics = tmp_path / "migrate.prom"
    rc, out, err = await run_cli(f, "migrate", "apply", "inventory", "--metrics-file", str(metrics))
    assert rc == 0, out + err
    assert "run " in out and "done" in out
    assert re.search(r"^shard1: (\d+)/\1 done, 0 failed", out, re.M), out    # plain progress lines off a terminal
    exposed = metrics.read_text()
    assert 'tenantfleet_migrate_files_applied_total{plugin="inventory",scope="tenant",shard="shard1"}' in exposed

    rc, out, err = await run_cli(f, "--json", "migrate", "status")
    assert rc == 0, err
    runs = camel_json(out)
    run_id = runs[0]["runId"]
    assert runs[0]["summary"]["appliedFiles"] == 3 + 12 * 2 and runs[0]["finishedAt"]
    rc, out, err = await run_cli(f, "--json", "migrate", "status", str(run_id))
    assert rc == 0, err
    status = camel_json(out)
    assert status["state"] == "done" and sum(s["done"] for s in status["shards"]) == 3 + 12
    assert {s["shardId"] for s in status["shards"]} == set(f.shard_dsns) and status["failedItems"] == []
    assert all(s["state"] for s in status["shards"]), status   # the live state, from the stored summary

    rc, out, err = await run_cli(f, "--json", "migrate", "verify", "inventory")
    assert rc == 0, err
    verified = camel_json(out)
    assert verified["ok"] is True and verified["tenants"] == len(tenants)

    # the second shipped plugin has tenant files only
    rc, out, err = await run_cli(f, "--json", "migrate", "apply", "restock")
    assert rc == 0, err
    applied = camel_json(out)
    assert applied["appliedFiles"] == 2 * len(tenants) and applied["runId"] > run_id
    assert {r["name"] for r in await ledger_rows(f, "restock")} == {"001_requests.sql", "002_events_seen.sql"}


async def test_missing_plugin_unknown_version_downgrade_and_unknown_run_are_one_line_errors(
        fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    await make_tenants(f, 6)
    rc, _, err = await run_cli(f, "migrate", "apply", "nosuchplugin")
    assert rc != 0 and "nosuchplugin" in one_error_line(err, "PLUGIN_NOT_FOUND")
    for bad in ("9.9.9", "1.0.5", "one"):
        rc, _, err = await run_cli(f, "migrate", "apply", "inventory", "--to", bad)
        assert rc != 0 and bad in one_error_line(err, "VALIDATION_FAILED")
    rc, _, err = await run_cli(f, "migrate", "apply", "inventory", "--from", "007_nothing.sql")
    assert rc != 0 and "007_nothing.sql" in one_error_line(err, "VALIDATION_FAILED")
    rc, _, err = await run_cli(f, "migrate", "status", "424242")
    assert rc != 0 and "424242" in one_error_line(err, "RUN_NOT_FOUND")
    assert await ledger_rows(f, "inventory") == []

    rc, out, err = await run_cli(f, "migrate", "apply", "inventory")
    assert rc == 0, out + err
    before = await ledger_rows(f, "inventory")
    rc, _, err = await run_cli(f, "migrate", "apply", "inventory", "--to", "1.0.0")
    assert rc != 0 and "downgrade" in one_error_line(err, "VALIDATION_FAILED")
    # the ledgers say so too, even when the registry has been lost
    await f.control.execute("DELETE FROM sys_tenant_plugins")
    rc, _, err = await run_cli(f, "migrate", "apply", "inventory", "--to", "1.0.0")
    line = one_error_line(err, "VALIDATION_FAILED")
    assert rc != 0 and "downgrade" in line and "002_location.sql" in line and "shard" in line
    assert await ledger_rows(f, "inventory") == before


def old_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A run summary as the code before camelCase JSON stored it in fleet_runs.summary."""
    return {"applied_files": summary["appliedFiles"], "failed": summary["failed"],
            "unreachable": {u["shardId"]: u["error"] for u in summary["unreachable"]},
            "shards": [{"shard_id": r["shardId"], "state": r["state"], "backoff_s": r["backoffS"],
                        "deferred": r["deferred"], "done": r["done"], "failed": r["failed"], "files": r["files"],
                        "rate": r["rate"], "eta_s": r["etaS"], "error": r["error"]} for r in summary["shards"]]}


async def test_unreachable_shard_dsn_is_reported_by_name_and_the_other_shards_finish(
        fresh_fleet: FleetFactory) -> None:
    """...also when the failed run was recorded by older code (snake_case summary): `status`
    shows it in camelCase and `--resume` finishes it."""
    f = await fresh_fleet()
    tenants = await make_tenants(f, 9)
    good_dsn = f.shard_dsns["shard3"]
    await f.control.execute("UPDATE shards SET dsn = $1 WHERE shard_id = 'shard3'",
                            f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    for dry in ((), ("--dry-run",)):
        rc, out, err = await run_cli(f, "migrate", "plan" if not dry else "apply", "inventory", *dry)
        assert rc != 0 and "shard3" in one_error_line(err, "SHARD_UNREACHABLE")
    rc, out, err = await run_cli(f, "migrate", "apply", "inventory")
    assert rc != 0
    line = one_error_line(err, "SHARD_UNREACHABLE")
    assert "shard3" in line and "127.0.0.1" in line and "--resume" in line
    rows = await ledger_rows(f, "inventory")   # shard3's ledger is read through its real DSN
    on3 = {t.tenant_id for t in tenants if t.shard_id == "shard3"}
    assert not [r for r in rows if r["shard_id"] == "shard3"]
    assert {r["tenant_id"] for r in rows if r["scope"] == "tenant"} == {t.tenant_id for t in tenants} - on3

    run_id = await f.control.fetchval("SELECT max(run_id) FROM fleet_runs")
    stored = json.loads(await f.control.fetchval("SELECT summary::text FROM fleet_runs WHERE run_id = $1", run_id))
    assert stored["unreachable"][0]["shardId"] == "shard3", stored
    await f.control.execute("UPDATE fleet_runs SET summary = $2::text::jsonb WHERE run_id = $1",
                            run_id, json.dumps(old_summary(stored)))
    rc, out, err = await run_cli(f, "--json", "migrate", "status")
    assert rc == 0, err
    listed = next(r for r in camel_json(out) if r["runId"] == run_id)
    assert listed["state"] == "failed" and listed["summary"]["unreachable"][0]["shardId"] == "shard3"
    rc, out, err = await run_cli(f, "--json", "migrate", "status", str(run_id))
    assert rc == 0, err
    status = camel_json(out)
    assert {s["shardId"]: s["state"] for s in status["shards"]}["shard3"] == "down"   # from the old summary
    assert status["failedItems"] and {i["shardId"] for i in status["failedItems"]} == {"shard3"}
    assert all(i["itemKey"] and "shard3" in i["lastError"] for i in status["failedItems"]), status
    rc, out, err = await run_cli(f, "migrate", "status", str(run_id))
    assert rc == 0 and "down" in out and "shard3" in out, out + err   # the table, from the same keys

    await f.control.execute("UPDATE shards SET dsn = $1 WHERE shard_id = 'shard3'", good_dsn)
    rc, out, err = await run_cli(f, "migrate", "apply", "inventory", "--resume", str(run_id))
    assert rc == 0, out + err
    assert len(await ledger_rows(f, "inventory")) == 3 + 2 * len(tenants)


async def test_syntax_error_in_a_file_names_file_shard_and_tenant_and_records_nothing_of_it(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    await make_tenants(f, 6)
    pkg = temp_plugin(tmp_path, "broken", {
        "public/001_ref.sql": "CREATE TABLE IF NOT EXISTS broken_ref (k text PRIMARY KEY);",
        "tenant/001_ok.sql": "CREATE TABLE broken_things (id bigint PRIMARY KEY);",
        "tenant/002_bad.sql": "ALTER TABLE broken_things ADD COLUMN note text;\nCREAT INDEX oops ON broken_things (note);",
    })
    async with migrator(f, pkg) as m:
        canaries = await m.dry_run(await m.plan(RunOptions()))
        assert all(not c["ok"] and "002_bad.sql" in c["error"] and "42601" in c["error"] for c in canaries)
        with pytest.raises(MigrationFailed) as caught:
            await m.apply(RunOptions())
    msg = caught.value.message
    assert "tenant/002_bad.sql" in msg and "shard" in msg and "tenant" in msg and "42601" in msg, msg
    rows = await ledger_rows(f, "broken")
    assert {r["name"] for r in rows} <= {"001_ref.sql"}      # only the public file, which did apply
    assert await f.control.fetchval("SELECT state FROM fleet_runs WHERE plugin_id = 'broken'") == "failed"
    for dsn in f.shard_dsns.values():
        assert all("broken_things" not in o["tables"] for o in (await tenant_objects(dsn)).values())
