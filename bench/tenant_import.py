"""Bulk onboarding benchmark: `tenants import` against one tenant at a time (issue 12).

On an embedded fleet of 3 shards (or the servers named by TENANTFLEET_CONTROL_DSN, whose
shards are registered already), in one run:

  single   ``--single`` tenants made the way `tenants create` and `plugins enable
           --tenant` make them, one after the other: Directory.create_tenant, then the
           migrator's apply_tenant for inventory and its sys_tenant_plugins row (the
           floor: in-process, so without the CLI's start-up per tenant)
  import   ``--tenants`` tenants with inventory from a CSV file through TenantImporter
           (`tenantfleet tenants import`), ``--batch-size`` per shard transaction

and prints tenants/s for each and their ratio (aim: at least 1,000 tenants/s for the
import on this machine).

    .venv/bin/python bench/tenant_import.py [--tenants 3000] [--single 100] [--batch-size 200]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import machine, print_table, write_results  # noqa: E402
from bench.migrate import bench_fleet  # noqa: E402
from router.runtime import open_runtime  # noqa: E402
from shard_migrations.engine import apply_tenant  # noqa: E402
from shard_migrations.packages import discover  # noqa: E402
from shard_migrations.tenant_import import TenantImporter  # noqa: E402

AIM = 1000.0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tenants", type=int, default=3000, help="Tenants imported from the file.")
    ap.add_argument("--single", type=int, default=100, help="Tenants made one at a time (the floor).")
    ap.add_argument("--batch-size", type=int, default=200, help="Tenants per shard transaction in the import.")
    return ap.parse_args()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    packages = discover()
    inventory = packages.get("inventory")
    async with bench_fleet() as (base, shard_dsns), open_runtime(base) as rt:
        for sid, dsn in shard_dsns.items():
            await rt.directory.add_shard(sid, dsn)
        shards = len(await rt.directory.list_shards())
        # the floor: one tenant at a time, as `tenants create` + `plugins enable --tenant`
        t0 = time.perf_counter()
        for i in range(args.single):
            rec = await rt.directory.create_tenant(f"s{tag}-{i:06d}", [f"s{tag}-{i:06d}.bench.example"])
            await apply_tenant(rt.shard_pools, rt.settings, inventory, rec)
            await rt.control.execute(
                "INSERT INTO sys_plugins (plugin_id, api_version, version_installed) VALUES ($1, $2, $3) "
                "ON CONFLICT (plugin_id) DO NOTHING", inventory.id, inventory.api, str(inventory.version))
            await rt.control.execute(
                "INSERT INTO sys_tenant_plugins (tenant_id, plugin_id, enabled, version_installed) "
                "VALUES ($1::uuid, $2, true, $3)", rec.tenant_id, inventory.id, str(inventory.version))
        single_s = time.perf_counter() - t0
        print(f"single: {args.single} tenants in {single_s:.1f} s", flush=True)

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tenants.csv"
            path.write_text("code,domains,plugins\n" + "".join(
                f"i{tag}-{i:06d},i{tag}-{i:06d}.bench.example,inventory\n" for i in range(args.tenants)))
            last = [0.0]

            def progress(done: int, total: int) -> None:
                if time.monotonic() - last[0] > 2 or done == total:
                    last[0] = time.monotonic()
                    print(f"import: {done:,}/{total:,}", flush=True)

            importer = TenantImporter(rt.control, rt.shard_pools, rt.settings, packages,
                                      batch_size=args.batch_size, progress=progress)
            t0 = time.perf_counter()
            report = await importer.start(path)
            import_s = time.perf_counter() - t0
        assert report.created == args.tenants and not report.refused, report.to_dict()
    single_rate, import_rate = args.single / single_s, args.tenants / import_s
    print_table(f"tenant onboarding with inventory over {shards} shards (import: batches of {args.batch_size})",
                ["measure", "tenants", "seconds", "tenants/s", "vs one at a time"], [
                    ("one at a time (create + enable)", args.single, single_s, single_rate, "1.0x"),
                    ("tenants import (whole run)", args.tenants, import_s, import_rate,
                     f"{import_rate / single_rate:.1f}x"),
                ])
    print(f"import: {import_rate:,.0f} tenants/s (aim: at least {AIM:,.0f}); "
          f"{import_rate / single_rate:.1f}x one tenant at a time")
    return {"machine": machine(), "config": vars(args), "shards": shards, "single_s": single_s,
            "import_s": import_s, "single_tenants_per_s": single_rate, "import_tenants_per_s": import_rate,
            "ratio": import_rate / single_rate, "per_shard": report.shards}


if __name__ == "__main__":
    data = asyncio.run(main(parse_args()))
    print(f"wrote {write_results('tenant_import', data)}")
