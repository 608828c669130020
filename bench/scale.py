"""Many tenants on one fleet (issue 12): import, fleet migration, no-op CLI runs, the request
path over many tenants, backend memory and disk, in one run.

On an embedded fleet of 3 shards (fsync on; or the servers named by
TENANTFLEET_CONTROL_DSN, whose shards are registered already), with ``--tenants`` tenants
(default 2,000 so it runs in minutes; ``--tenants 100000`` for issue 12's figure), all with
inventory enabled:

  import     the tenants from a CSV file through `tenants import` (TenantImporter), in
             tenants/s (aim: at least 1,000);
  disk       pg_database_size of every shard and the control plane before and after the
             import, per 1,000 tenants;
  no-op CLI  `tenantfleet migrate apply inventory` and `migrate verify inventory` as whole
             processes once every tenant is up to date (aim: under 5 s each);
  migrate    a new tenant file (``ALTER TABLE items ADD COLUMN ...``, the next version of
             inventory, built in memory) over every tenant through the fleet migrator, in
             tenants/s, against its floor: one psql session per shard running the same kind
             of statement (another column) for every tenant of its shard, all shards at once;
  requests   the request path in process (resolve through the two-level cache, the fenced
             tenant transaction as the tenant's role, a read of ``items`` by key), ``--workers``
             concurrent callers, tenants picked in a Zipf mix (s=1.1) over ``--distinct``
             tenants (10,000, capped at --tenants) and then over 100 tenants: p50/p99 and their
             ratio (aim: within 1.5x);
  memory     the backend of one host connection after serving ``--memory-tenants`` tenants
             of shard1, without and with the recycling bound (bench/backend_memory.py's pass).

Prints the figures with their ratios and writes bench/results/scale.json. The machine's
load average at the start and end is recorded: figures from a shared machine say so.

    .venv/bin/python bench/scale.py [--tenants 2000] [--batch-size 200] [--seconds 10]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import semver  # noqa: E402

from bench.backend_memory import one_pass  # noqa: E402
from bench.common import cpu_probe_ms, machine, percentile, print_table, write_results  # noqa: E402
from bench.migrate import bench_fleet, cli_seconds, run_floor  # noqa: E402
from host.metrics import HostMetrics  # noqa: E402
from host.tx import TenantTx, keep_connection  # noqa: E402
from router.client import ResolveClient  # noqa: E402
from router.keys import APP_ROLE  # noqa: E402
from router.models import TenantRecord  # noqa: E402
from router.pools import ShardPools  # noqa: E402
from router.runtime import open_runtime  # noqa: E402
from router.settings import Settings  # noqa: E402
from shard_migrations.fleet import FleetMigrator, RunOptions, migration_pools  # noqa: E402
from shard_migrations.packages import MigrationFile, PluginPackage, discover  # noqa: E402
from shard_migrations.tenant_import import TenantImporter  # noqa: E402

AIMS = {"import_tps": 1000.0, "cli_s": 5.0, "zipf_ratio": 1.5}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tenants", type=int, default=2000, help="tenants imported (issue 12: 100000)")
    ap.add_argument("--batch-size", type=int, default=200, help="tenants per shard transaction in the import")
    ap.add_argument("--distinct", type=int, default=10_000, help="tenants in the wide Zipf mix (capped at --tenants)")
    ap.add_argument("--narrow", type=int, default=100, help="tenants in the narrow Zipf mix (the floor)")
    ap.add_argument("--workers", type=int, default=16, help="concurrent callers on the request path")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each request-path measurement")
    ap.add_argument("--memory-tenants", type=int, default=3000, help="tenants one connection serves (capped)")
    ap.add_argument("--bound", type=int, default=200, help="pool_recycle_tenants of the bounded memory pass")
    ap.add_argument("--skip-migrate", action="store_true", help="skip the fleet migration and its floor")
    return ap.parse_args()


def load_average() -> float:
    return os.getloadavg()[0]


async def database_bytes(dsns: dict[str, str], control_dsn: str) -> dict[str, int]:
    import asyncpg

    out = {}
    for name, dsn in {**dsns, "control": control_dsn}.items():
        conn = await asyncpg.connect(dsn)
        try:
            out[name] = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        finally:
            await conn.close()
    return out


def next_version(pkg: PluginPackage, sql: str, workdir: Path) -> PluginPackage:
    """``pkg`` with one more tenant file (``sql``) as its next minor version, in memory."""
    version = pkg.version.bump_minor()
    path = workdir / "900_scale_bench.sql"
    text = f"-- fleet:version {version}\n{sql}\n"
    path.write_text(text)
    extra = MigrationFile(plugin_id=pkg.id, scope="tenant", name=path.name, path=path, sql=text,
                          checksum=hashlib.sha256(text.encode()).hexdigest(), since=semver.Version.parse(str(version)),
                          no_transaction=False)
    return dataclasses.replace(pkg, version=version, migrations=(*pkg.migrations, extra))


def zipf_picks(ids: list[str], k: int, seed: int, s: float = 1.1) -> list[str]:
    weights = [1 / (r + 1) ** s for r in range(len(ids))]
    order = ids[:]
    random.Random(seed).shuffle(order)
    return random.Random(seed + 1).choices(order, weights=weights, k=k)


async def read_items(db: Any) -> None:
    await db.fetchval("SELECT count(*) FROM items WHERE id = 1 OR sku = 'x'")


async def request_path(settings: Settings, lookup: Any, dsn_of: Any, ids: list[str], workers: int,
                       seconds: float) -> dict[str, float]:
    """p50/p99 (ms) and tx/s of the in-process request path over ``ids`` in a Zipf mix; one
    untimed pass over every tenant first warms the caches and the pool."""
    picks = zipf_picks(ids, 200_000, seed=len(ids))
    samples: list[float] = []
    metrics = HostMetrics()
    async with ShardPools(settings, dsn_of, role=APP_ROLE, reset=keep_connection) as pools, \
            ResolveClient(settings, lookup) as resolver, TenantTx(settings, resolver, pools, metrics) as tx:
        sem = asyncio.Semaphore(workers)

        async def warm(tid: str) -> None:
            async with sem:
                await tx.run(tid, read_items)

        await asyncio.gather(*(warm(t) for t in ids))
        deadline = time.perf_counter() + seconds
        cursor = iter(range(10**12))

        async def worker() -> None:
            while time.perf_counter() < deadline:
                tid = picks[next(cursor) % len(picks)]
                t0 = time.perf_counter()
                await tx.run(tid, read_items)
                samples.append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        took = time.perf_counter() - t0
    samples.sort()
    return {"tenants": len(ids), "p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99),
            "tx_per_s": len(samples) / took}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    packages = discover()
    inventory = packages.get("inventory")
    out: dict[str, Any] = {"machine": machine(), "config": vars(args), "load_average_start": load_average(),
                           "cpu_probe_ms_start": cpu_probe_ms()}
    async with bench_fleet() as (base, shard_dsns), open_runtime(base) as rt:
        settings = rt.settings
        for sid, dsn in shard_dsns.items():
            await rt.directory.add_shard(sid, dsn)
        dsns = {s.shard_id: s.dsn for s in await rt.directory.list_shards()}
        disk_before = await database_bytes(dsns, settings.control_dsn)

        # --- import --------------------------------------------------------------------
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tenants.csv"
            path.write_text("code,domains,plugins\n" + "".join(
                f"x{tag}-{i:06d},x{tag}-{i:06d}.scale.example,inventory\n" for i in range(args.tenants)))
            last = [0.0]

            def progress(done: int, total: int) -> None:
                if time.monotonic() - last[0] > 5 or done == total:
                    last[0] = time.monotonic()
                    print(f"import: {done:,}/{total:,}", flush=True)

            importer = TenantImporter(rt.control, rt.shard_pools, settings, packages, batch_size=args.batch_size,
                                      progress=progress)
            t0 = time.perf_counter()
            report = await importer.start(path)
            out["import_s"] = time.perf_counter() - t0
        assert report.created == args.tenants and not report.refused, report.to_dict()
        out["import_tps"] = args.tenants / out["import_s"]
        disk_after = await database_bytes(dsns, settings.control_dsn)
        out["disk_bytes_per_1000"] = {k: (disk_after[k] - disk_before[k]) * 1000 / args.tenants for k in disk_after}

        rows = await rt.control.fetch("SELECT tenant_id::text AS tenant_id, code, schema_name, shard_id, state, epoch "
                                      "FROM tenants WHERE code LIKE $1 ORDER BY code", f"x{tag}-%")
        tenants = [TenantRecord(tenant_id=r["tenant_id"], code=r["code"], schema=r["schema_name"],
                                shard_id=r["shard_id"], state=r["state"], epoch=r["epoch"]) for r in rows]

        # --- no-op CLI runs (every tenant up to date) ----------------------------------------
        out["noop_apply_cli_s"], rc1 = await asyncio.to_thread(cli_seconds, settings, "migrate", "apply", "inventory")
        out["verify_cli_s"], rc2 = await asyncio.to_thread(cli_seconds, settings, "migrate", "verify", "inventory")
        assert (rc1, rc2) == (0, 0), (rc1, rc2)

        # --- a new tenant file over every tenant, and its psql floor ------------------------
        if not args.skip_migrate:
            with tempfile.TemporaryDirectory(prefix="tenantfleet-bench-scale-") as workdir:
                newer = next_version(inventory, "ALTER TABLE items ADD COLUMN scale_note text;", Path(workdir))
                async with migration_pools(settings, rt.directory.dsn_of) as pools:
                    t0 = time.perf_counter()
                    rep = await FleetMigrator(rt.control, pools, settings, newer).apply(RunOptions())
                    out["migrate_s"] = time.perf_counter() - t0
                assert rep.state == "done" and rep.applied_files == args.tenants, rep.to_dict()
                out["migrate_floor_s"] = await run_floor(rt, tenants, "ALTER TABLE items ADD COLUMN scale_floor text;",
                                                         Path(workdir))
            out["migrate_tps"] = args.tenants / out["migrate_s"]
            out["migrate_floor_tps"] = args.tenants / out["migrate_floor_s"]

        # --- the request path: many tenants against few ---------------------------------------
        ids = [t.tenant_id for t in tenants]
        random.Random(7).shuffle(ids)
        wide, narrow = ids[:min(args.distinct, len(ids))], ids[:args.narrow]
        req = []
        for group in (narrow, wide, narrow, wide):  # alternated, medians of two
            r = await request_path(settings, rt.directory.lookup, rt.directory.dsn_of, group, args.workers,
                                   args.seconds)
            print(f"requests over {r['tenants']:,} tenants: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                  f"{r['tx_per_s']:,.0f} tx/s", flush=True)
            req.append(r)
        out["requests"] = req

        # --- backend memory, without and with the recycling bound -----------------------------
        shard1 = [t.tenant_id for t in tenants if t.shard_id == "shard1"][:args.memory_tenants]
        owner = await rt.shard_pools.get("shard1")
        # throwaway fleet only (APP_ROLE is a constant): the view is the superuser's by default
        await owner.execute(f'GRANT SELECT ON pg_catalog.pg_backend_memory_contexts TO "{APP_ROLE}"; '
                            f'GRANT EXECUTE ON FUNCTION pg_catalog.pg_get_backend_memory_contexts() TO "{APP_ROLE}"')
        out["memory_tenants"] = len(shard1)
        out["memory"] = [await one_pass(settings, rt.directory.lookup, rt.directory.dsn_of, shard1, bound)
                         for bound in (0, args.bound)]
    out["load_average_end"] = load_average()
    out["cpu_probe_ms_end"] = cpu_probe_ms()
    return out


def mib(v: float) -> float:
    return v / 2**20


def report(args: argparse.Namespace, d: dict[str, Any]) -> None:
    n = args.tenants
    shared = (f"load average {d['load_average_start']:.1f} at the start, {d['load_average_end']:.1f} at the end; "
              f"CPU probe {d['cpu_probe_ms_start']:.0f} / {d['cpu_probe_ms_end']:.0f} ms")
    rows: list[tuple[Any, ...]] = [
        ("import (tenants/s)", f"{d['import_tps']:,.0f}", f">= {AIMS['import_tps']:,.0f}",
         f"{d['import_tps'] / AIMS['import_tps']:.2f}x of the aim"),
        ("no-op `migrate apply` CLI (s)", f"{d['noop_apply_cli_s']:.2f}", f"< {AIMS['cli_s']:.0f}", ""),
        ("`migrate verify` CLI (s)", f"{d['verify_cli_s']:.2f}", f"< {AIMS['cli_s']:.0f}", ""),
    ]
    if "migrate_tps" in d:
        rows.append(("migrate a new tenant file (tenants/s)", f"{d['migrate_tps']:,.0f}", "",
                     f"{d['migrate_tps'] / d['migrate_floor_tps']:.2f}x of psql per shard "
                     f"({d['migrate_floor_tps']:,.0f}/s)"))
    narrow = [r for r in d["requests"] if r["tenants"] == min(x["tenants"] for x in d["requests"])]
    wide = [r for r in d["requests"] if r not in narrow]
    for q in ("p50_ms", "p99_ms"):
        a, b = statistics.median(r[q] for r in wide), statistics.median(r[q] for r in narrow)
        rows.append((f"request path {q[:3]} over {wide[0]['tenants']:,} vs {narrow[0]['tenants']} tenants (ms)",
                     f"{a:.2f} vs {b:.2f}", f"<= {AIMS['zipf_ratio']}x", f"{a / b:.2f}x"))
    m0, m1 = d["memory"]
    rows.append((f"backend memory contexts after {d['memory_tenants']:,} tenants (MiB)", f"{mib(m0['after']['contexts_bytes']):.1f} unbounded, "
                 f"{mib(m1['after']['contexts_bytes']):.1f} with bound {m1['bound']}", "",
                 f"{m0['after']['contexts_bytes'] / m1['after']['contexts_bytes']:.1f}x less"))
    disk = d["disk_bytes_per_1000"]
    rows.append(("disk per 1,000 tenants (MiB)", ", ".join(f"{k} {mib(v):.1f}" for k, v in sorted(disk.items())),
                 "", f"total {mib(sum(disk.values())):.1f}"))
    print_table(f"{n:,} tenants over 3 shards with inventory ({shared})", ["measure", "figure", "aim", "ratio"], rows)


if __name__ == "__main__":
    a = parse_args()
    data = asyncio.run(main(a))
    report(a, data)
    print(f"wrote {write_results('scale', data)}")
