"""`tenantfleet loadtest prepare` and `run` on a real fleet: short real Locust runs of the
`steady` and `upgrade` scenarios that write the report and a verdict, an abort, and bad
input refused before any load is sent.

Locust runs in its own process (the CLI starts `python -m loadtests.run`, which starts
`python -m locust`); the host it loads is served by this test's event loop on 127.0.0.1:0.
Nothing here is timed: the runs are judged against limits chosen so the verdict does not
depend on the machine's speed (very loose to pass, impossible to meet to fail).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import stat
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from loadtests import run as runner
from loadtests.errors import LoadtestError

from host.fleet.embedded import free_port
from host.loadprep import prepare_load_tenants
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.hostkit import Host, host_settings, running_host
from tests.migratekit import cli_env, run_cli

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


async def prepare_here(f: Fleet, host: Host, tmp_path: Path, n: int) -> dict[str, Any]:
    """`prepare` through its service function (what the CLI command calls), in this process."""
    path = tmp_path / "targets.json"
    known = {t["code"]: t["apiKey"] for t in json.loads(path.read_text())["tenants"]} if path.exists() else {}
    doc = await prepare_load_tenants(f.settings, tenants=n, url=host.url, prefix="lt", items=5, known_keys=known)
    path.write_text(json.dumps(doc))
    return dict(doc, path=str(path))


async def loadtest(f: Fleet, *args: str) -> tuple[int, str, str]:
    return await run_cli(f, "loadtest", "run", *args, timeout=180)


def report_files(out: Path) -> dict[str, Any]:
    for name in ("report.html", "locust_stats.csv", "summary.json", "plot.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return dict(json.loads((out / "summary.json").read_text()))


async def test_a_steady_run_on_two_workers_writes_the_report_and_passes_loose_limits(
        fleet: Fleet, shared_targets: Path, tmp_path: Path) -> None:
    f = fleet
    loose = tmp_path / "loose.toml"
    loose.write_text(LOOSE_SLO)
    async with running_host(host_settings(f)) as host:
        doc = {"path": str(shared_targets)}
        out = tmp_path / "steady"
        rc, stdout, err = await loadtest(f, "steady", "--targets", doc["path"], "--url", host.url, "--out", str(out),
                                         "--slo", str(loose), "--users", "4", "--duration", "6", "--warmup", "1",
                                         "--rate", "5", "--workers", "2")
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
        # a Locust master and two workers: every request the workers made reached the gate
        # (its percentiles are exact, not Locust's 2-digit buckets), as many as Locust counted
        assert summary["workers"] == 2
        assert summary["recordedRequests"] == summary["locust"]["requests"]



async def test_a_master_waits_for_workers_started_on_their_own_as_compose_starts_them(
        fleet: Fleet, shared_targets: Path, tmp_path: Path) -> None:
    """compose's load profile, without containers: ``python -m loadtests.run ... --expect-workers
    1`` (locust-master's entrypoint) and a Locust worker started on its own (locust-worker's:
    ``--worker --master-host ... --tf-plan OUT/plan.json``), started first, which waits for the
    run's plan; the master waits for it, and every request it made reaches the gate."""
    import sys

    from tests.migratekit import ROOT

    loose = tmp_path / "loose.toml"
    loose.write_text(LOOSE_SLO)
    out = tmp_path / "external"
    env = cli_env(fleet)
    async with running_host(host_settings(fleet)) as host:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--worker",
            "--master-host", "127.0.0.1", "--tf-plan", str(out / "plan.json"), cwd=str(ROOT), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            master = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtests.run", "steady", "--targets", str(shared_targets), "--url", host.url,
                "--out", str(out), "--slo", str(loose), "--users", "4", "--duration", "6", "--warmup", "1",
                "--expect-workers", "1", "--cli", f"{sys.executable} -m host.cli", cwd=str(ROOT), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            stdout, err = await asyncio.wait_for(master.communicate(), 180)
            assert master.returncode == 0, (stdout + err).decode()
            await asyncio.wait_for(worker.wait(), 60)  # the master's end stops it
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    summary = report_files(out)
    assert summary["verdict"] == "pass" and summary["workers"] == 1
    assert summary["recordedRequests"] == summary["locust"]["requests"] > 20


async def test_prepare_then_upgrade_migrates_the_plugin_under_load_and_judges_the_event_phase(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    slo = tmp_path / "loose.toml"
    slo.write_text(LOOSE_SLO)
    async with running_host(host_settings(f)) as host:
        doc = await prepare_here(f, host, tmp_path, n=6)
        # prepare: tenants one version behind the shipped one, spread over the shards, a key
        # and items each; run again, it reuses the tenants and their keys
        assert doc["url"] == host.url and doc["pluginVersion"] == "1.0.0"
        assert [t["code"] for t in doc["tenants"]] == [f"lt-{i:04d}" for i in range(1, 7)]
        assert len({t["shardId"] for t in doc["tenants"]}) == 3
        t = doc["tenants"][0]
        async with host.http.get("/api/plugins/inventory/items/5", headers={
                "Authorization": f"Bearer {t['apiKey']}", "X-Tenant": t["code"]}) as resp:
            item = await resp.json()
            assert resp.status == 200 and item["sku"] == "seed-5" and "location" not in item, item
        versions = await f.control.fetch("SELECT DISTINCT version_installed FROM sys_tenant_plugins "
                                         "WHERE plugin_id = 'inventory'")
        assert [r["version_installed"] for r in versions] == ["1.0.0"]
        again = await prepare_here(f, host, tmp_path, n=7)
        assert [t["apiKey"] for t in again["tenants"][:6]] == [t["apiKey"] for t in doc["tenants"]]
        assert await f.control.fetchval("SELECT count(*) FROM tenants") == 7

        out = tmp_path / "upgrade"
        rc, stdout, err = await loadtest(f, "upgrade", "--targets", doc["path"], "--out", str(out), "--slo", str(slo),
                                         "--users", "4", "--duration", "8", "--warmup", "1", "--steady", "2")
        assert rc == 0, stdout + err
        summary = report_files(out)
        event = summary["event"]
        assert summary["timeline"]["endS"] >= event["endS"] + 3, summary["timeline"]   # an "after" phase
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

        # nothing left to upgrade: refused before any load
        argv = ["upgrade", "--targets", doc["path"], "--out", str(tmp_path / "again"), "--slo", str(slo),
                "--duration", "8", "--warmup", "1", "--steady", "2"]
        with pytest.raises(LoadtestError, match="plugin inventory has nothing pending") as refused:
            await asyncio.to_thread(runner.execute, dataclasses.replace(runner.options_from(argv), env=cli_env(f)))
        assert refused.value.code == "NOTHING_PENDING" and not (tmp_path / "again" / "plan.json").exists()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shared_targets(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six load-test tenants of this module's own on the session's fleet (each test passes its
    host's URL with --url)."""
    path = tmp_path_factory.mktemp("loadtest") / "targets.json"
    rc, out, err = await run_cli(fleet, "--json", "loadtest", "prepare", "--tenants", "6", "--url",
                                 "http://127.0.0.1:9", "--out", str(path), "--prefix", "lt" + uuid.uuid4().hex[:8],
                                 "--items", "5")
    assert rc == 0, out + err
    return path


async def test_bad_input_is_refused_before_any_load_naming_the_fault(fleet: Fleet, shared_targets: Path,
                                                                   tmp_path: Path) -> None:
    """The runner's checks, called in this process (they run before Locust is started; a
    thread, since they call the host this loop serves); then the CLI's one line and exit 2."""
    async with running_host(host_settings(fleet)) as host:
        doc = dict(json.loads(shared_targets.read_text()), url=host.url)
        doc["tenants"] = doc["tenants"][:3]
        mine = tmp_path / "targets.json"
        mine.write_text(json.dumps(doc))
        doc["path"] = str(mine)
        good = ["--targets", doc["path"], "--duration", "5", "--warmup", "1"]

        async def refused(*args: str, code: str, named: str) -> None:
            out = tmp_path / f"out-{uuid.uuid4().hex[:6]}"
            with pytest.raises(LoadtestError) as err:
                await asyncio.to_thread(runner.execute, runner.options_from([*args, "--out", str(out)]))
            assert err.value.code == code and named in err.value.message, err.value
            assert err.value.exit_code == 2
            assert not (out / "plan.json").exists() and not (out / "report.html").exists()

        await refused("nosuch", *good, code="USAGE", named="unknown scenario 'nosuch'")
        await refused("move", *good, "--users", "3", "--pinned", "3", code="USAGE", named="--pinned")
        await refused("steady", *good, "--workers", "2", "--expect-workers", "2", code="USAGE",
                      named="exclude each other")
        await refused("move", *good, "--duration", "20", "--move-shard", "nosuch", code="VALIDATION_FAILED", named="--move-shard 'nosuch'")
        await refused("steady", *good, "--move-op", "rebalance", code="USAGE", named="--move-op is for the move")
        await refused("move", *good, "--duration", "20", "--move-to", "shard1", code="USAGE",
                      named="--move-to is for --move-op tenant")
        bad_slo = tmp_path / "bad.toml"
        bad_slo.write_text("[limits]\np95_ms = 'fast'\n")
        await refused("steady", *good, "--slo", str(bad_slo), code="VALIDATION_FAILED", named="limits.p95_ms")
        await refused("steady", *good, "--url", f"http://127.0.0.1:{free_port()}", code="UNREACHABLE",
                      named="does not answer")
        await refused("steady", *good, "--duration", "99999", code="USAGE", named="--duration")
        await refused("upgrade", *good, code="USAGE", named="leaves no time after the event")

        tampered = json.loads(Path(doc["path"]).read_text())
        tampered["tenants"][1]["code"] = "nosuchtenant"
        tampered["tenants"][2]["apiKey"] = "tf_not_a_key"
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps(tampered))
        await refused("steady", "--targets", str(wrong), "--duration", "5", "--warmup", "1", code="VALIDATION_FAILED",
                      named="2 of 3 tenants")
        remote = dict(json.loads(Path(doc["path"]).read_text()), url="http://192.0.2.1:8400")
        far = tmp_path / "remote.json"
        far.write_text(json.dumps(remote))
        await refused("steady", "--targets", str(far), "--duration", "5", "--warmup", "1", code="VALIDATION_FAILED",
                      named="not loopback: give it with --url")
        await refused("shard-slow", *good, "--duration", "30", "--slow-shard", "shard9", code="VALIDATION_FAILED",
                      named="shard9")

        # from the command line: one line, exit 2, nothing written
        out = tmp_path / "cli-refused"
        rc, stdout, err = await loadtest(fleet, "steady", *good, "--slo", str(bad_slo), "--out", str(out))
        assert rc == 2 and err.strip().startswith("error: VALIDATION_FAILED: SLO file ") and \
            len(err.strip().splitlines()) == 1, (stdout, err)
        assert not (out / "plan.json").exists()
        rc, stdout, err = await loadtest(fleet, "nosuch", *good)
        assert rc == 2 and err.startswith("error: USAGE: ") and "nosuch" in err, err


async def test_the_fleet_check_leaves_the_plugin_registry_to_the_run(fleet: Fleet, shared_targets: Path) -> None:
    """The check before any load asks /api/whoami for every target tenant: it checks each key
    and fills no tenant's plugin-registry copy (a manifest would, for all of them at once, to
    expire in one wave 30 s later, in the middle of the run); a tenant it doesn't know fails it."""
    from loadtests.targets import parse_targets
    from tests.hostkit import runtime

    async with running_host(host_settings(fleet)) as host:
        doc = dict(json.loads(shared_targets.read_text()), url=host.url)
        targets = parse_targets(doc, "targets")
        registry = runtime(host).registry
        registry._tenant.clear()
        await asyncio.to_thread(runner.check_fleet, targets)
        ids = {t.tenantId for t in targets.tenants}
        assert not [k for k in registry._tenant if k[0] in ids]
        doc["tenants"] = [dict(doc["tenants"][0], code="nosuchtenant")] + doc["tenants"][1:]
        with pytest.raises(LoadtestError) as err:
            await asyncio.to_thread(runner.check_fleet, parse_targets(doc, "targets"))
        assert err.value.code == "VALIDATION_FAILED" and "nosuchtenant (403 FORBIDDEN)" in err.value.message
        # a targets file whose tenant id is stale (the code now names another tenant) is refused too
        doc["tenants"] = [dict(doc["tenants"][1], tenantId=str(uuid.uuid4()))] + doc["tenants"][2:]
        with pytest.raises(LoadtestError) as err:
            await asyncio.to_thread(runner.check_fleet, parse_targets(doc, "targets"))
        assert "not the targets'" in err.value.message, err.value.message


async def test_a_breach_longer_than_the_abort_grace_stops_the_run_early_with_exit_4(
        fleet: Fleet, shared_targets: Path, tmp_path: Path) -> None:
    impossible = tmp_path / "abort.toml"
    impossible.write_text("[run]\nmin_samples = 5\nabort_grace_s = 1\n[limits]\np95_ms = 0.001\n")
    async with running_host(host_settings(fleet)) as host:
        out = tmp_path / "aborted"
        rc, stdout, err = await loadtest(fleet, "steady", "--targets", str(shared_targets), "--url", host.url,
                                         "--out", str(out), "--slo",
                                         str(impossible), "--users", "4", "--duration", "120", "--warmup", "1")
        assert rc == 4, stdout + err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["verdict"] == "aborted" and summary["exitCode"] == 4
        assert "p95" in summary["aborted"]["reason"] and summary["aborted"]["phase"] == "steady"
        assert summary["timeline"]["endS"] < 60          # stopped long before its 120 s
        assert "ABORTED" in stdout


async def test_shard_slow_judges_only_the_other_shards_and_fails_them_with_exit_3_on_an_impossible_limit(
        fleet: Fleet, shared_targets: Path, tmp_path: Path) -> None:
    slo = tmp_path / "event-strict.toml"
    slo.write_text(LOOSE_SLO + "p95_ms = 0.001\n")     # appended to [phases.event]
    async with running_host(host_settings(fleet)) as host:
        doc = json.loads(shared_targets.read_text())
        slow = sorted({t["shardId"] for t in doc["tenants"]})[-1]
        out = tmp_path / "slow"
        rc, stdout, err = await loadtest(fleet, "shard-slow", "--targets", str(shared_targets), "--url", host.url,
                                         "--out", str(out), "--slo",
                                         str(slo), "--users", "20", "--duration", "8", "--warmup", "1", "--steady",
                                         "2", "--event-seconds", "3", "--zipf", "0")
        # (each user works for one tenant picked at random: with 4 users, one run in five had
        # none on the slow shard; with 20, (2/3)**20 = 0.03%)
        assert rc == 3, stdout + err
        summary = report_files(out)
        assert summary["verdict"] == "fail" and "shard-slow: FAIL" in stdout
        assert summary["event"]["exitCode"] == 0, summary["event"]
        held = json.loads(summary["event"]["output"])
        assert held["shardId"] == slow and held["holds"] >= 1
        routes = set(summary["phases"]["event"])
        assert any(r.startswith("[slow shard] ") for r in routes) and "all routes" in routes
        assert all(r["verdict"] in ("info", "few") for r in summary["rows"] if r["route"].startswith("[slow shard] "))
        failed = [r for r in summary["rows"] if r["verdict"] == "FAIL"]
        assert failed and all(r["phase"] == "event" and r["figure"] == "p95 ms" and "[slow shard]" not in r["route"]
                              for r in failed), failed


async def test_move_drains_a_shard_under_load_and_judges_the_pinned_tenants_write_pause(
        fresh_fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fresh_fleet()
    slo = tmp_path / "loose.toml"
    slo.write_text(LOOSE_SLO + "write_pause_p99_ms = 60000\n")
    async with running_host(host_settings(f)) as host:
        doc = await prepare_here(f, host, tmp_path, n=6)
        drained = sorted({t["shardId"] for t in doc["tenants"]})[-1]
        on_it = [t for t in doc["tenants"] if t["shardId"] == drained]
        out = tmp_path / "move"
        rc, stdout, err = await loadtest(f, "move", "--targets", doc["path"], "--out", str(out), "--slo", str(slo),
                                         "--users", "5", "--pinned", "2", "--duration", "8", "--warmup", "1",
                                         "--steady", "2")
        assert rc == 0, stdout + err
        summary = report_files(out)
        event = summary["event"]
        assert event["exitCode"] == 0 and event["command"][-2:] == ["drain", drained], event
        # the drained shard's tenants all moved; the pinned ones (its first two) were written
        # to throughout and each has a measured pause
        left = await f.control.fetchval("SELECT count(*) FROM tenants WHERE shard_id = $1", drained)
        assert left == 0
        pause = summary["writePause"]
        pinned = [t["code"] for t in on_it[:2]]
        assert sorted(pause["tenants"]) == sorted(pinned) and pause["n"] == 2
        for code in pinned:
            p = pause["tenants"][code]
            assert p["moved"] is True and p["pauseMs"] > 0 and p["serverPauseMs"] is not None, p
            assert p["window"] == "cutover", p     # measured around its own commit point
        assert pause["max"] >= pause["p99"] >= pause["p50"] > 0
        row = [r for r in summary["rows"] if r["route"] == "pinned writes"]
        assert row == [{"phase": "event", "route": "pinned writes", "figure": "write pause p99 ms",
                        "value": pause["p99"], "limit": 60000.0, "n": 2, "verdict": "pass", "bound": None}]
        assert "write pause of 2 pinned tenants" in stdout and "pinned writes" in stdout
        # the drain ran with the SLO throttle (on by default) and said what it did
        assert summary["sloThrottle"] is True and "decreases" in summary["throttle"], summary["throttle"]
        # and whether its moves yielded the CPU, with the load average that decided it
        cpu = summary["operationCpu"]
        assert isinstance(cpu["yielding"], bool) and cpu["cpus"] >= 1 and cpu["load1"] >= 0, cpu
        assert summary["slowest"]["event"] and all(r["ms"] > 0 for r in summary["slowest"]["event"])

        # a limit no pause can meet fails the gate (exit 3) on that row; nothing left to drain is refused
        strict = tmp_path / "strict.toml"
        strict.write_text(LOOSE_SLO + "write_pause_p99_ms = 0\n")
        rc, stdout, err = await loadtest(f, "move", "--targets", doc["path"], "--out", str(tmp_path / "again"),
                                         "--slo", str(strict), "--users", "3", "--pinned", "1", "--duration", "8",
                                         "--warmup", "1", "--steady", "2", "--move-shard", drained)
        assert rc == 2 and "NOTHING_PENDING" in err and f"shard {drained} has no tenant" in err, stdout + err

        # the same scenario with a rebalance: the emptied shard back in service, its plan's
        # tenants are moved under load and the pinned users write to those
        rc, stdout, err = await run_cli(f, "shards", "set-state", drained, "active")
        assert rc == 0, stdout + err
        rc, stdout, err = await run_cli(f, "--json", "rebalance", "--plan")
        assert rc == 0, stdout + err
        planned = {m["tenantId"] for m in json.loads(stdout)["moves"]}
        first = [t["code"] for t in doc["tenants"] if t["tenantId"] in planned][:1]
        assert first, (planned, doc["tenants"])  # the plan moves some target tenant back
        out = tmp_path / "rebalance"
        rc, stdout, err = await loadtest(f, "move", "--move-op", "rebalance", "--targets", doc["path"],
                                         "--out", str(out), "--slo", str(slo), "--users", "5", "--pinned", "1",
                                         "--duration", "8", "--warmup", "1", "--steady", "2")
        assert rc == 0, stdout + err
        summary = report_files(out)
        assert summary["event"]["exitCode"] == 0 and summary["event"]["command"][-2:] == ["rebalance", "--apply"]
        assert list(summary["writePause"]["tenants"]) == first
        assert summary["writePause"]["tenants"][first[0]]["moved"] is True
        now_on = await f.control.fetchval("SELECT count(*) FROM tenants WHERE shard_id = $1", drained)
        assert now_on == len(planned)
        # balanced now: nothing to rebalance is refused before any load, as is a shard named for it
        rc, stdout, err = await loadtest(f, "move", "--move-op", "rebalance", "--targets", doc["path"],
                                         "--out", str(tmp_path / "balanced"), "--slo", str(slo), "--users", "3",
                                         "--pinned", "1", "--duration", "8", "--warmup", "1", "--steady", "2")
        assert rc == 2 and "NOTHING_PENDING" in err and "balanced" in err, stdout + err
        rc, stdout, err = await loadtest(f, "move", "--move-op", "rebalance", "--move-shard", drained,
                                         "--targets", doc["path"], "--duration", "8", "--warmup", "1")
        assert rc == 2 and "USAGE" in err and "--move-shard" in err, stdout + err

        # one tenant moved online (`move TENANT --to SHARD`): --move-shard's busiest target tenant
        # still there, its pinned user's write pause measured; a server that can't be an online
        # move's source (no wal_level=logical) is refused before any load, by the move's pre-flight
        from tests.test_moves import _online_capable

        where = {r["code"]: r["shard_id"] for r in await f.control.fetch(
            "SELECT code, shard_id FROM tenants WHERE code = ANY($1::text[])", [t["code"] for t in doc["tenants"]])}
        doc2 = dict(json.loads(Path(doc["path"]).read_text()))
        doc2["tenants"] = [dict(t, shardId=where[t["code"]]) for t in doc2["tenants"]]  # as `prepare` re-reads it
        moved_path = tmp_path / "now.json"
        moved_path.write_text(json.dumps(doc2))
        source = where[doc2["tenants"][0]["code"]]
        to = next(s for s in sorted(set(where.values()) | {drained}) if s != source)
        first_code = next(t["code"] for t in doc2["tenants"] if t["shardId"] == source)
        out = tmp_path / "one"
        rc, stdout, err = await loadtest(f, "move", "--move-op", "tenant", "--move-shard", source, "--move-to", to,
                                         "--targets", str(moved_path), "--out", str(out), "--slo", str(slo),
                                         "--users", "5", "--duration", "8", "--warmup", "1", "--steady", "2")
        if await _online_capable(f):
            assert rc == 0, stdout + err
            summary = report_files(out)
            assert summary["event"]["command"][-4:] == ["move", first_code, "--to", to], summary["event"]
            assert list(summary["writePause"]["tenants"]) == [first_code]
            assert summary["writePause"]["tenants"][first_code]["moved"] is True
            assert summary["sloThrottle"] is None  # a single move is not throttled
            assert await f.control.fetchval("SELECT shard_id FROM tenants WHERE code = $1", first_code) == to
        else:
            assert rc == 2 and "VALIDATION_FAILED" in err and "refused it" in err, stdout + err
        rc, stdout, err = await loadtest(f, "move", "--move-op", "tenant", "--no-slo-throttle",
                                         "--targets", str(moved_path), "--duration", "8", "--warmup", "1")
        assert rc == 2 and "USAGE" in err and "never throttled" in err, stdout + err
