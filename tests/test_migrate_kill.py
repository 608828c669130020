"""Fleet migrator: SIGKILL at random points; resume finishes with every file applied once."""
from __future__ import annotations

import asyncio
import json
import random
import signal
import sys

from router.models import TenantRecord
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.migratekit import ROOT, cli_env, ledger_rows, make_tenants, run_cli, tenant_objects, wait_for

TRIALS = 10
PER_TRIAL = 30


async def check_no_tenant_half_migrated(f: Fleet, tenants: list[TenantRecord], *, complete: bool) -> None:
    """Each tenant has either no files or both (one transaction), the schema matches its
    ledger, and no file is recorded twice."""
    rows = await ledger_rows(f, "inventory")
    keys = [(r["shard_id"], r["scope"], r["tenant_id"], r["name"]) for r in rows]
    assert len(keys) == len(set(keys))
    recorded: dict[str, set[str]] = {}
    for r in rows:
        if r["tenant_id"]:
            recorded.setdefault(r["tenant_id"], set()).add(r["name"])
    objects = {sid: await tenant_objects(dsn) for sid, dsn in f.shard_dsns.items()}
    for t in tenants:
        names = recorded.get(t.tenant_id, set())
        assert names in (set(), {"001_init.sql", "002_location.sql"}), (t.code, names)
        o = objects[t.shard_id][t.schema]
        assert ("items" in o["tables"]) == ("001_init.sql" in names), t.code
        assert ("items.location" in o["columns"]) == ("002_location.sql" in names), t.code
        if complete:
            assert names == {"001_init.sql", "002_location.sql"}, t.code
    public = [r for r in rows if r["scope"] == "public"]
    if complete:
        assert sorted(r["shard_id"] for r in public) == sorted(f.shard_dsns)


async def test_sigkill_at_random_points_then_resume_completes_with_every_file_applied_once(
        fresh_fleet: FleetFactory) -> None:
    f = await fresh_fleet()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    env = cli_env(f)
    everyone: list[TenantRecord] = []
    for trial in range(TRIALS):
        new = await make_tenants(f, PER_TRIAL, prefix=f"kill{trial}")
        everyone += new
        new_ids = {t.tenant_id for t in new}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "host.cli", "migrate", "apply", "inventory", "--concurrency", "1",
            "--batch-size", "4", cwd=str(ROOT), env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        kill_after = rng.randrange(0, PER_TRIAL * 2, 2)   # ledger rows of this trial's tenants

        async def progressed() -> bool:
            if proc.returncode is not None:
                return True
            rows = await ledger_rows(f, "inventory")
            return sum(1 for r in rows if r["tenant_id"] in new_ids) >= kill_after

        await wait_for(progressed, timeout=60, what=f"trial {trial}: {kill_after} ledger rows (seed {seed})")
        if trial == 0 and proc.returncode is None:
            run_id = await f.control.fetchval("SELECT max(run_id) FROM fleet_runs")
            if run_id is not None:
                # status from another process while the run is alive
                rc, out, err = await run_cli(f, "--json", "migrate", "status", str(run_id), env=env)
                assert rc == 0, err
                assert json.loads(out)["runId"] == run_id
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await check_no_tenant_half_migrated(f, everyone, complete=False)

        run_id = await f.control.fetchval(
            "SELECT max(run_id) FROM fleet_runs WHERE state = 'running' AND plugin_id = 'inventory'")
        args = ["migrate", "apply", "inventory"] + (["--resume", str(run_id)] if run_id else [])
        rc, out, err = await run_cli(f, *args, env=env)
        assert rc == 0, f"trial {trial} (seed {seed}): {out}\n{err}"
        await check_no_tenant_half_migrated(f, everyone, complete=True)
        if run_id:
            open_items = await f.control.fetchval(
                "SELECT count(*) FROM fleet_run_items WHERE run_id = $1 AND status <> 'done'", run_id)
            assert open_items == 0, f"trial {trial}: run {run_id} still has {open_items} open items"
            assert await f.control.fetchval("SELECT state FROM fleet_runs WHERE run_id = $1", run_id) == "done"
    rows = await ledger_rows(f, "inventory")
    assert len(rows) == len(f.shard_dsns) + 2 * len(everyone)
