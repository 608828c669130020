"""Plugin uninstall (keep, export, purge), re-import of an export, a fleet-wide uninstall
killed with SIGKILL and resumed, and bad input from the CLI and the admin API."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.hostkit import ADMIN_KEY, Host, auth, host_settings, running_host, tenant_with_key
from tests.migratekit import ROOT, camel_json, cli_env, ledger_rows, make_tenants, run_cli, wait_for

# values COPY has to quote: a comma, a quote, a newline, a backslash, non-ASCII, and NULL
TRICKY = [{"sku": "A,1", "name": 'say "hi"', "qty": 3, "location": "B2"},
          {"sku": "B-2", "name": "two\nlines\\and a backslash", "qty": 0, "location": None},
          {"sku": "C-3", "name": "Grüße ✓", "qty": 42, "location": "Z9"}]


async def add_items(host: Host, key: str, code: str, items: list[dict[str, Any]] = TRICKY) -> None:
    for item in items:
        body = {k: v for k, v in item.items() if v is not None}
        async with host.http.post("/api/plugins/inventory/items", json=body, headers=auth(key, code)) as r:
            assert r.status == 201, await r.text()


async def items_of(host: Host, key: str, code: str) -> tuple[int, Any]:
    async with host.http.get("/api/plugins/inventory/items", headers=auth(key, code)) as r:
        return r.status, await r.json()


async def post(host: Host, path: str, body: Any) -> tuple[int, Any]:
    async with host.http.post(path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        return r.status, await r.json()


async def tenant_plugin_row(f: Fleet, tenant_id: str) -> Any:
    return await f.control.fetchrow("SELECT enabled, version_installed FROM sys_tenant_plugins "
                                    "WHERE tenant_id = $1::uuid AND plugin_id = 'inventory'", tenant_id)


async def has_items_table(f: Fleet, shard_id: str, schema: str) -> bool:
    conn = await asyncpg.connect(f.shard_dsns[shard_id])
    try:
        return bool(await conn.fetchval("SELECT to_regclass(quote_ident($1) || '.items') IS NOT NULL", schema))
    finally:
        await conn.close()


def table_checksums(export: Path) -> dict[str, tuple[int, str]]:
    manifest = json.loads((export / "manifest.json").read_text())
    return {t["name"]: (t["rows"], t["sha256"]) for t in manifest["tables"]}


async def uninstall_runs(f: Fleet) -> int:
    return int(await f.control.fetchval("SELECT count(*) FROM fleet_runs WHERE kind = 'uninstall'"))


async def test_keep_disables_the_plugin_and_enabling_it_again_finds_the_rows(fleet: Fleet) -> None:
    async with running_host(host_settings(fleet)) as host:
        rec, key = await tenant_with_key(fleet, host)
        await add_items(host, key, rec.code)
        status, report = await post(host, "/admin/plugins/inventory/uninstall", {"policy": "keep", "tenant": rec.code})
        assert status == 202 and report["state"] == "done" and report["done"] == 1, report
        status, body = await items_of(host, key, rec.code)
        assert status == 403 and body["error"]["code"] == "PLUGIN_DISABLED", body
        assert await has_items_table(fleet, rec.shard_id, rec.schema)
        await host.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/inventory/enable")
        status, body = await items_of(host, key, rec.code)
        assert status == 200 and sorted(i["sku"] for i in body["items"]) == ["A,1", "B-2", "C-3"], body


async def test_export_purge_reinstall_and_reimport_bring_the_rows_back_with_equal_checksums(
        fleet: Fleet, tmp_path: Path) -> None:
    async with running_host(host_settings(fleet, export_dir=tmp_path / "exports")) as host:
        rec, key = await tenant_with_key(fleet, host)
        other, other_key = await tenant_with_key(fleet, host)
        await add_items(host, key, rec.code)
        _, before = await items_of(host, key, rec.code)

        rc, out, err = await run_cli(fleet, "--json", "plugins", "uninstall", "inventory", "--tenant", rec.code,
                                     "--policy", "export", "--export-dir", str(tmp_path / "exports"))
        assert rc == 0, err
        report = camel_json(out)
        export = tmp_path / "exports" / "inventory" / rec.tenant_id
        assert report["state"] == "done" and report["exports"] == [str(export)], report
        sums = table_checksums(export)
        assert sums["items"][0] == 3
        assert not (export.parent / f"{rec.tenant_id}.partial").exists()
        assert (await tenant_plugin_row(fleet, rec.tenant_id))["enabled"] is False
        assert await has_items_table(fleet, rec.shard_id, rec.schema)  # export drops nothing

        # purge with a grace period: disabled, nothing dropped yet, and the run can't finish early
        rc, out, err = await run_cli(fleet, "--json", "plugins", "uninstall", "inventory", "--tenant", rec.code,
                                     "--policy", "purge", "--grace", "1h")
        assert rc == 0, err
        waiting = camel_json(out)
        assert waiting["state"] == "waiting" and waiting["purgeAfter"], waiting
        assert await has_items_table(fleet, rec.shard_id, rec.schema)
        rc, out, err = await run_cli(fleet, "plugins", "uninstall", "inventory", "--resume", str(waiting["runId"]))
        assert rc != 0 and err.startswith("error: RUN_BUSY: ") and "grace period" in err, err
        status, body = await post(host, f"/admin/runs/{waiting['runId']}/resume", None)  # the console's resume
        assert body["error"]["code"] == "RUN_BUSY" and "grace period" in body["error"]["message"], body

        rc, out, err = await run_cli(fleet, "--json", "plugins", "uninstall", "inventory", "--tenant", rec.code,
                                     "--policy", "purge", "--grace", "0")
        assert rc == 0, err
        assert camel_json(out)["state"] == "done"
        assert not await has_items_table(fleet, rec.shard_id, rec.schema)
        assert not [r for r in await ledger_rows(fleet, "inventory") if r["tenant_id"] == rec.tenant_id]
        assert await tenant_plugin_row(fleet, rec.tenant_id) is None

        # a later install starts from the first migration
        enabled = await host.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/inventory/enable")
        assert "tenant/001_init.sql" in enabled["applied"], enabled
        assert (await items_of(host, key, rec.code))[1]["items"] == []

        rc, out, err = await run_cli(fleet, "--json", "plugins", "import-export", str(export), "--tenant", rec.code)
        assert rc == 0, err
        assert camel_json(out)["rows"] == {"items": 3} and camel_json(out)["verified"] is True
        _, after = await items_of(host, key, rec.code)
        assert after == before
        # new rows get new ids: the sequence was moved past the imported ones
        await add_items(host, key, rec.code, [{"sku": "D-4", "qty": 1}])

        # into another tenant through the admin API (its own rows untouched before: empty)
        status, body = await post(host, f"/admin/tenants/{other.code}/plugin-exports/import",
                                  {"export": f"inventory/{rec.tenant_id}"})
        assert status == 200 and body["rows"] == {"items": 3}, body
        _, copied = await items_of(host, other_key, other.code)
        assert [(i["sku"], i["name"], i["qty"], i["location"]) for i in copied["items"]] == \
            [(i["sku"], i["name"], i["qty"], i["location"]) for i in before["items"]]

        # exported again, the other tenant's table reads back byte for byte as the first export
        status, again = await post(host, "/admin/plugins/inventory/uninstall", {"policy": "export", "tenant": other.code})
        assert status == 202 and again["state"] == "done", again
        assert table_checksums(tmp_path / "exports" / "inventory" / other.tenant_id) == sums


async def test_bad_input_is_refused_with_a_clear_error_and_nothing_changed(fleet: Fleet, tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    async with running_host(host_settings(fleet, export_dir=blocked / "sub")) as host:  # can't be written
        rec, key = await tenant_with_key(fleet, host)
        await add_items(host, key, rec.code)
        runs_before = await uninstall_runs(fleet)
        cli_cases = [
            (["no_such_plugin", "--tenant", rec.code, "--policy", "keep"], "PLUGIN_NOT_FOUND"),
            (["inventory", "--tenant", rec.code, "--policy", "shred"], "VALIDATION_FAILED"),
            (["inventory", "--tenant", "no-such-tenant-xyz", "--policy", "keep"], "TENANT_NOT_FOUND"),
            (["inventory", "--tenant", rec.code, "--policy", "export"], "VALIDATION_FAILED"),
            (["inventory", "--tenant", rec.code, "--policy", "export", "--export-dir", str(blocked / "sub")],
             "VALIDATION_FAILED"),
            (["inventory", "--tenant", rec.code, "--policy", "purge", "--grace", "soon"], "VALIDATION_FAILED"),
            (["inventory", "--resume", "999999999"], "RUN_NOT_FOUND"),
            (["inventory", "--resume", "1", "--policy", "purge"], "VALIDATION_FAILED"),
        ]
        for args, code in cli_cases:
            rc, out, err = await run_cli(fleet, "plugins", "uninstall", *args)
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            assert rc != 0 and len(lines) == 1 and lines[0].startswith(f"error: {code}: "), (args, err)
        api_cases = [
            ("/admin/plugins/no_such_plugin/uninstall", {"policy": "keep", "tenant": rec.code}, 404, "PLUGIN_NOT_FOUND"),
            ("/admin/plugins/inventory/uninstall", {"policy": "shred", "tenant": rec.code}, 400, "VALIDATION_FAILED"),
            ("/admin/plugins/inventory/uninstall", {"policy": "keep", "tenant": "no-such-tenant-xyz"}, 404,
             "TENANT_NOT_FOUND"),
            ("/admin/plugins/inventory/uninstall", {"policy": "export", "tenant": rec.code}, 400, "VALIDATION_FAILED"),
            ("/admin/plugins/inventory/uninstall", {"policy": "purge", "tenant": rec.code, "grace": "0"}, 400,
             "VALIDATION_FAILED"),   # purge exports first when the host has an export dir: this one can't
            ("/admin/plugins/inventory/uninstall", {"tenant": rec.code, "grace": "forever"}, 400, "VALIDATION_FAILED"),
            ("/admin/plugins/inventory/uninstall", {"policy": "keep", "tenant": rec.code, "extra": 1}, 400,
             "VALIDATION_FAILED"),
            ("/admin/plugins/inventory/uninstall", {"policy": "keep", "tenant": rec.code, "exportDir": "a\x00b"}, 400,
             "VALIDATION_FAILED"),
        ]
        for path, body, status, code in api_cases:
            got, answer = await post(host, path, body)
            assert (got, answer["error"]["code"]) == (status, code), (path, body, answer)
        async with host.http.post("/admin/plugins/inventory/uninstall", data=b"[1,2",
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                           "Content-Type": "application/json"}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "VALIDATION_FAILED"
        async with host.http.post("/admin/plugins/inventory/uninstall", json={"policy": "keep"}) as r:
            assert r.status == 401
        # nothing changed: still enabled with its rows, no run recorded
        assert (await tenant_plugin_row(fleet, rec.tenant_id))["enabled"] is True
        assert len((await items_of(host, key, rec.code))[1]["items"]) == 3
        assert await uninstall_runs(fleet) == runs_before

        # a corrupt export is refused before anything is imported
        target, target_key = await tenant_with_key(fleet, host)
        rc, out, err = await run_cli(fleet, "--json", "plugins", "uninstall", "inventory", "--tenant", rec.code,
                                     "--policy", "export", "--export-dir", str(tmp_path / "x"))
        assert rc == 0, err
        export = tmp_path / "x" / "inventory" / rec.tenant_id
        csv = export / "items.csv"
        csv.write_bytes(csv.read_bytes().replace(b"42", b"43"))
        rc, out, err = await run_cli(fleet, "plugins", "import-export", str(export), "--tenant", target.code)
        assert rc != 0 and err.startswith("error: VALIDATION_FAILED: ") and "items.csv has sha256" in err, err
        (export / "manifest.json").write_text("{not json")
        rc, out, err = await run_cli(fleet, "plugins", "import-export", str(export), "--tenant", target.code)
        assert rc != 0 and err.startswith("error: VALIDATION_FAILED: ") and "manifest.json" in err, err
        got, answer = await post(host, f"/admin/tenants/{target.code}/plugin-exports/import",
                                 {"export": f"inventory/{rec.tenant_id}"})
        assert got == 404 and "no manifest.json" in answer["error"]["message"], answer
        got, answer = await post(host, f"/admin/tenants/{target.code}/plugin-exports/import",
                                 {"export": "../../etc"})
        assert got == 400 and answer["error"]["code"] == "VALIDATION_FAILED", answer
        assert (await items_of(host, target_key, target.code))[1]["items"] == []


async def test_fleet_wide_purge_killed_then_resumed_purges_every_tenant_once(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    """A move holds one tenant (its hold key exclusive), so the run can't finish: it is
    killed with SIGKILL while it waits; the hold is let go and ``--resume`` finishes, with
    every tenant exported and purged, the held one included."""
    f = await fresh_fleet()
    tenants = await make_tenants(f, 12)
    rc, out, err = await run_cli(f, "migrate", "apply", "inventory")
    assert rc == 0, err
    held = tenants[0]
    hold = await asyncpg.connect(f.shard_dsns[held.shard_id])
    try:
        assert await hold.fetchval("SELECT pg_try_advisory_lock(fleet.tenant_hold_key($1::uuid))", held.tenant_id)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "host.cli", "plugins", "uninstall", "inventory", "--policy", "purge", "--grace", "0",
            "--export-dir", str(tmp_path), "--concurrency", "1", cwd=str(ROOT), env=cli_env(f),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

        async def others_done() -> bool:
            n = await f.control.fetchval("SELECT count(*) FROM fleet_run_items i JOIN fleet_runs r USING (run_id) "
                                         "WHERE r.kind = 'uninstall' AND i.status = 'done'")
            return bool(n == len(tenants) - 1)
        await wait_for(others_done, timeout=60, what="every tenant but the held one")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        await hold.close()  # the move is over
    run_id, state = await f.control.fetchrow("SELECT run_id, state FROM fleet_runs WHERE kind = 'uninstall'")
    assert state == "running"
    assert await has_items_table(f, held.shard_id, held.schema)

    async def heartbeat_stale() -> bool:  # the killed process's heartbeat ages out (3 beats)
        age = await f.control.fetchval("SELECT extract(epoch FROM now() - heartbeat_at) FROM fleet_runs "
                                       "WHERE run_id = $1", run_id)
        return bool(age > 6.5)
    await wait_for(heartbeat_stale, timeout=30, what="the killed run's heartbeat to age")
    rc, out, err = await run_cli(f, "--json", "plugins", "uninstall", "inventory", "--resume", str(run_id))
    assert rc == 0, err
    report = camel_json(out)
    assert report["state"] == "done" and report["done"] == 1, report
    statuses = await f.control.fetch("SELECT status, count(*) AS n FROM fleet_run_items WHERE run_id = $1 "
                                     "GROUP BY status", run_id)
    assert {r["status"]: r["n"] for r in statuses} == {"done": len(tenants)}
    for t in tenants:
        assert not await has_items_table(f, t.shard_id, t.schema), t.code
        assert table_checksums(tmp_path / "inventory" / t.tenant_id)["items"][0] == 0
    assert not [r for r in await ledger_rows(f, "inventory") if r["scope"] == "tenant"]
    assert await f.control.fetchval("SELECT count(*) FROM sys_tenant_plugins WHERE plugin_id = 'inventory'") == 0
    rc, out, err = await run_cli(f, "plugins", "uninstall", "inventory", "--resume", str(run_id))
    assert rc != 0 and err.startswith("error: RUN_BUSY: ") and "done" in err, err


async def test_a_tenant_moved_while_its_uninstall_waits_is_exported_where_it_lives_now(
        fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The run is planned with the tenant on shard1; another migrator holds the tenant's
    unit lock there while the tenant is moved to shard2: the uninstall follows it (the
    shard1 fence no longer names it at the planned epoch) and exports it from shard2."""
    from shard_migrations.fleet import migration_pools
    from shard_migrations.keys import advisory_key
    from shard_migrations.moves.mover import Mover
    from shard_migrations.packages import discover
    from shard_migrations.uninstall import UninstallOptions, uninstall

    caplog.set_level(logging.INFO, logger="tenantfleet.uninstall")
    async with running_host(host_settings(fleet)) as host:
        await tenant_with_key(fleet, host, shard_id="shard2")  # the plugin's public scope on shard2
        rec, key = await tenant_with_key(fleet, host, shard_id="shard1")
        await add_items(host, key, rec.code)
    lock = await asyncpg.connect(fleet.shard_dsns["shard1"])
    async with migration_pools(fleet.settings, fleet.directory.dsn_of) as pools:
        try:
            assert await lock.fetchval("SELECT pg_try_advisory_lock($1)",
                                       advisory_key("inventory", "tenant", rec.tenant_id))
            task = asyncio.ensure_future(uninstall(
                fleet.control, pools, fleet.settings, discover().get("inventory"),
                UninstallOptions(policy="export", tenant_ids=(rec.tenant_id,), export_dir=tmp_path)))

            async def planned() -> bool:
                return await has_uninstall_item(fleet, rec.tenant_id)
            await wait_for(planned, what="the uninstall run to be planned")
            moved = await Mover(fleet.directory, fleet.settings).start(rec, "shard2", "offline")
            assert moved.phase == "done"
        finally:
            await lock.close()
        report = await task
    assert report.state == "done" and report.done == 1, report.to_dict()
    assert any("is now on shard shard2" in r.getMessage() for r in caplog.records), caplog.text
    assert (await fleet.directory.get(id=rec.tenant_id)).shard_id == "shard2"
    assert table_checksums(tmp_path / "inventory" / rec.tenant_id)["items"][0] == 3


async def has_uninstall_item(f: Fleet, tenant_id: str) -> bool:
    return bool(await f.control.fetchval(
        "SELECT EXISTS (SELECT 1 FROM fleet_run_items i JOIN fleet_runs r USING (run_id) "
        "WHERE r.kind = 'uninstall' AND i.tenant_id = $1::uuid)", tenant_id))
