"""Shard backend memory after one host connection served many tenants, with and without
the recycling bound (issue 12, `TENANTFLEET_POOL_RECYCLE_TENANTS`).

A PostgreSQL backend caches the catalog entries of every table it touched and never
evicts them. On an embedded fleet (or the servers named by TENANTFLEET_CONTROL_DSN), in
one run:

  1. ``--tenants`` tenants with inventory are imported onto shard1 (`tenants import`);
  2. for each setting of the bound (0 = none, then ``--bound``), a fresh `TenantTx` with a
     pool of ONE app-role connection runs one fenced transaction per tenant, each reading
     its ``items`` table through its primary key and unique index (what a request does);
  3. after each pass, the backend behind that connection is measured: its RSS and
     private (anonymous) RSS from /proc/<pid>/status when the server is on this machine,
     and ``sum(total_bytes)`` of ``pg_backend_memory_contexts`` (all contexts, and
     CacheMemoryContext, the catalog cache) read on that same connection. (On this
     throwaway fleet only, the app role is granted that view, a superuser's by default.)

The floor is the same backend measured after serving one tenant. Prints a table and
writes bench/results/backend_memory.json.

    .venv/bin/python bench/backend_memory.py [--tenants 3000] [--bound 200]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import machine, print_table, write_results  # noqa: E402
from bench.migrate import bench_fleet  # noqa: E402
from host.metrics import HostMetrics  # noqa: E402
from host.tx import TenantTx, keep_connection  # noqa: E402
from router.client import ResolveClient  # noqa: E402
from router.keys import APP_ROLE  # noqa: E402
from router.pools import ShardPools  # noqa: E402
from router.runtime import open_runtime  # noqa: E402
from router.settings import Settings  # noqa: E402
from shard_migrations.packages import discover  # noqa: E402
from shard_migrations.tenant_import import TenantImporter  # noqa: E402

SHARD = "shard1"
MEMORY_SQL = ("SELECT sum(total_bytes)::bigint, "
              "coalesce(sum(total_bytes) FILTER (WHERE name = 'CacheMemoryContext'), 0)::bigint "
              "FROM pg_catalog.pg_backend_memory_contexts")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tenants", type=int, default=3000, help="Tenants one connection serves in each pass.")
    ap.add_argument("--bound", type=int, default=200,
                    help="pool_recycle_tenants for the bounded pass (the other pass has none).")
    return ap.parse_args()


def proc_kib(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon (KiB) of a local process; {} when it is not on this machine."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0])
    return out


async def measure(tx: TenantTx) -> dict[str, Any]:
    async with tx.connection(SHARD) as conn:
        pid = conn.get_server_pid()
        total, cache = await conn.fetchrow(MEMORY_SQL)
    return {"pid": pid, "contexts_bytes": int(total), "cache_bytes": int(cache), **proc_kib(pid)}


async def read_items(db: Any) -> None:
    await db.fetchval("SELECT count(*) FROM items WHERE id = 1 OR sku = 'x'")


async def one_pass(settings: Settings, lookup: Any, dsn_of: Any, tenant_ids: list[str], bound: int) -> dict[str, Any]:
    settings = settings.model_copy(update={"shard_pool_min": 0, "shard_pool_max": 1, "pool_recycle_tenants": bound})
    metrics = HostMetrics()
    async with AsyncExitStack() as stack:
        pools = await stack.enter_async_context(ShardPools(settings, dsn_of, role=APP_ROLE, reset=keep_connection))
        resolver = await stack.enter_async_context(ResolveClient(settings, lookup))
        tx = await stack.enter_async_context(TenantTx(settings, resolver, pools, metrics))
        await tx.run(tenant_ids[0], read_items)
        floor = await measure(tx)
        t0 = time.perf_counter()
        for tid in tenant_ids:
            await tx.run(tid, read_items)
        seconds = time.perf_counter() - t0
        after = await measure(tx)
        recycled = metrics.registry.get_sample_value("tenantfleet_host_connections_recycled_total") or 0.0
    return {"bound": bound, "floor": floor, "after": after, "seconds": seconds, "recycled": int(recycled),
            "tx_per_s": len(tenant_ids) / seconds}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    packages = discover()
    async with bench_fleet() as (base, shard_dsns), open_runtime(base) as rt:
        for sid, dsn in shard_dsns.items():
            await rt.directory.add_shard(sid, dsn)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tenants.csv"
            path.write_text("code,domains,plugins,shard\n" + "".join(
                f"m{tag}-{i:06d},,inventory,{SHARD}\n" for i in range(args.tenants)))
            report = await TenantImporter(rt.control, rt.shard_pools, rt.settings, packages).start(path)
        assert report.created == args.tenants and not report.refused, report.to_dict()
        tenant_ids = [str(r["tenant_id"]) for r in await rt.control.fetch(
            "SELECT tenant_id FROM tenants WHERE code LIKE $1 ORDER BY code", f"m{tag}-%")]
        owner = await rt.shard_pools.get(SHARD)
        # throwaway fleet only (APP_ROLE is a constant): the view is the superuser's by default
        await owner.execute(f'GRANT SELECT ON pg_catalog.pg_backend_memory_contexts TO "{APP_ROLE}"; '
                            f'GRANT EXECUTE ON FUNCTION pg_catalog.pg_get_backend_memory_contexts() TO "{APP_ROLE}"')
        passes = []
        for bound in (0, args.bound):
            print(f"pass with bound {bound or 'none'}: {len(tenant_ids):,} tenants over one connection", flush=True)
            passes.append(await one_pass(rt.settings, rt.directory.lookup, rt.directory.dsn_of, tenant_ids, bound))
    return {"machine": machine(), "config": vars(args), "passes": passes}


def mib(value: float) -> float:
    return value / (1024 * 1024)


if __name__ == "__main__":
    a = parse_args()
    data = asyncio.run(main(a))
    rows = []
    floor = data["passes"][0]["floor"]
    rows.append(("fresh backend after 1 tenant (floor)", mib(floor["contexts_bytes"]), mib(floor["cache_bytes"]),
                 floor.get("VmRSS", 0) / 1024, floor.get("RssAnon", 0) / 1024, "1.0x", "", ""))
    for p in data["passes"]:
        after = p["after"]
        rows.append((f"after {a.tenants:,} tenants, bound {p['bound'] or 'none'}", mib(after["contexts_bytes"]),
                     mib(after["cache_bytes"]), after.get("VmRSS", 0) / 1024, after.get("RssAnon", 0) / 1024,
                     f"{after['contexts_bytes'] / floor['contexts_bytes']:.1f}x", p["recycled"], p["tx_per_s"]))
    print_table(f"shard backend memory behind one host connection ({a.tenants:,} tenants with inventory)",
                ["backend", "contexts MiB", "CacheMemoryContext MiB", "VmRSS MiB", "RssAnon MiB",
                 "contexts vs floor", "recycled", "tx/s"], rows)
    print(f"wrote {write_results('backend_memory', data)}")
