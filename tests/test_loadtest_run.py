"""`tenantfleet loadtest prepare` and `run` on a real fleet: short real Locust runs of the
`steady` and `upgrade` scenarios that write the report and a verdict, an abort, and bad
input refused before any load is sent.

Locust runs in its own process (the CLI starts `python -m loadtests.run`, which starts
`python -m locust`); the host it loads is served by this test's event loop on 127.0.0.1:0.
Nothing here is timed: the runs are judged against limits chosen so the verdict does not
depend on the machine's speed (very loose to pass, impossible to meet to fail).
"""
from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.hostkit import Host, host_settings, running_host
from tests.migratekit import run_cli

LOOSE_SLO = """
[run]
min_samples = 5
event_min_s = 2
[limits]
p95_ms = 60000
p99_ms = 60000
error_ratio = 0.5
[phases.event]
p95_ratio_to_steady = 1000
"""


async def prepare(f: Fleet, host: Host, tmp_path: Path, n: int = 9, prefix: str = "lt") -> dict[str, Any]:
    targets = tmp_path / f"{prefix}-targets.json"
    rc, out, err = await run_cli(f, "--json", "loadtest", "prepare", "--tenants", str(n), "--url", host.url,
                                 "--out", str(targets), "--prefix", prefix, "--items", "5")
    assert rc == 0, out + err
    assert json.loads(out)["tenants"] == n
    assert stat.S_IMODE(targets.stat().st_mode) == 0o600   # it holds API keys
    return dict(json.loads(targets.read_text()), path=str(targets))


async def loadtest(f: Fleet, *args: str) -> tuple[int, str, str]:
    return await run_cli(f, "loadtest", "run", *args, timeout=180)


def report_files(out: Path) -> dict[str, Any]:
    for name in ("report.html", "locust_stats.csv", "summary.json", "plot.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return dict(json.loads((out / "summary.json").read_text()))


async def test_prepare_sets_up_tenants_one_version_behind_with_keys_and_items_and_reuses_them(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    async with running_host(host_settings(f)) as host:
        doc = await prepare(f, host, tmp_path, n=6)
        assert doc["url"] == host.url and doc["pluginVersion"] == "1.0.0"
        codes = [t["code"] for t in doc["tenants"]]
        assert codes == [f"lt-{i:04d}" for i in range(1, 7)]
        assert len({t["shardId"] for t in doc["tenants"]}) == 3
        for t in doc["tenants"][:2]:
            async with host.http.get("/api/plugins/inventory/items/5", headers={
                    "Authorization": f"Bearer {t['apiKey']}", "X-Tenant": t["code"]}) as resp:
                item = await resp.json()
                assert resp.status == 200 and item["sku"] == "seed-5" and "location" not in item, item
        versions = await f.control.fetch("SELECT DISTINCT version_installed FROM sys_tenant_plugins "
                                         "WHERE plugin_id = 'inventory'")
        assert [r["version_installed"] for r in versions] == ["1.0.0"]
        again = await prepare(f, host, tmp_path, n=7)       # reused tenants keep their keys
        assert [t["apiKey"] for t in again["tenants"][:6]] == [t["apiKey"] for t in doc["tenants"]]
        assert await f.control.fetchval("SELECT count(*) FROM tenants") == 7


async def test_steady_run_writes_the_report_and_passes_loose_limits_and_fails_impossible_ones(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    loose, strict = tmp_path / "loose.toml", tmp_path / "strict.toml"
    loose.write_text(LOOSE_SLO)
    strict.write_text(LOOSE_SLO.replace("p95_ms = 60000", "p95_ms = 0.001"))
    async with running_host(host_settings(f)) as host:
        doc = await prepare(f, host, tmp_path)
        out = tmp_path / "steady"
        rc, stdout, err = await loadtest(f, "steady", "--targets", doc["path"], "--out", str(out), "--slo", str(loose),
                                         "--users", "4", "--duration", "6", "--warmup", "1", "--rate", "5")
        assert rc == 0, stdout + err
        summary = report_files(out)
        assert summary["verdict"] == "pass" and summary["exitCode"] == 0
        assert "steady: PASS" in stdout and "GET /items" in stdout and "p95 ms" in stdout
        rows = summary["rows"]
        assert {r["phase"] for r in rows} == {"steady"} and all(r["verdict"] in ("pass", "few") for r in rows)
        judged = summary["phases"]["steady"]["all routes"]
        assert judged["n"] > 20 and judged["errors"] == 0
        assert {"GET /items", "GET /items/{id}", "PATCH /items/{id}", "GET /manifest"} <= set(
            summary["phases"]["steady"])
        # the judged percentiles are exact (not Locust's 2-digit buckets); counts match Locust's own
        assert summary["recordedRequests"] == summary["locust"]["requests"]

        out2 = tmp_path / "strict"
        rc, stdout, err = await loadtest(f, "steady", "--targets", doc["path"], "--out", str(out2), "--slo",
                                         str(strict), "--users", "2", "--duration", "4", "--warmup", "1")
        assert rc == 3, stdout + err
        failed = json.loads((out2 / "summary.json").read_text())
        assert failed["verdict"] == "fail"
        assert any(r["figure"] == "p95 ms" and r["verdict"] == "FAIL" and r["route"] == "all routes"
                   for r in failed["rows"])
        assert "FAIL" in stdout


async def test_upgrade_migrates_the_plugin_under_load_and_judges_the_event_phase(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    slo = tmp_path / "loose.toml"
    slo.write_text(LOOSE_SLO)
    async with running_host(host_settings(f)) as host:
        doc = await prepare(f, host, tmp_path)
        out = tmp_path / "upgrade"
        rc, stdout, err = await loadtest(f, "upgrade", "--targets", doc["path"], "--out", str(out), "--slo", str(slo),
                                         "--users", "4", "--duration", "8", "--warmup", "1", "--steady", "2")
        assert rc == 0, stdout + err
        summary = report_files(out)
        event = summary["event"]
        assert event["exitCode"] == 0 and event["command"][-3:] == ["migrate", "apply", "inventory"], event
        assert summary["timeline"]["eventAtS"] == 3 and event["endS"] > event["startS"]
        phases = {r["phase"] for r in summary["rows"]}
        assert {"steady", "event", "after"} <= phases
        assert any(r["figure"] == "p95 / steady p95" and r["phase"] == "event" for r in summary["rows"])
        assert any(r["figure"] == "operation exit code" and r["verdict"] == "pass" for r in summary["rows"])
        versions = await f.control.fetch("SELECT DISTINCT version_installed FROM sys_tenant_plugins "
                                         "WHERE plugin_id = 'inventory'")
        assert [r["version_installed"] for r in versions] == ["1.1.0"]
        shard = next(iter(f.shard_dsns.values()))
        conn = await asyncpg.connect(shard)
        try:
            assert await conn.fetchval("SELECT count(*) FROM information_schema.columns "
                                       "WHERE table_name = 'items' AND column_name = 'location'") >= 1
        finally:
            await conn.close()

        # nothing left to upgrade: refused before any load, nothing written but the folder
        rc, stdout, err = await loadtest(f, "upgrade", "--targets", doc["path"], "--out", str(tmp_path / "again"),
                                         "--slo", str(slo), "--duration", "8", "--warmup", "1", "--steady", "2")
        assert rc == 2 and err.strip().startswith("error: NOTHING_PENDING: plugin inventory"), err
        assert not (tmp_path / "again" / "summary.json").exists()
