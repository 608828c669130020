"""Does making a tenant's schema and role cost the same at 10,000 tenants as at 500 (issue 12)?

On one embedded shard (or the shard DSN given with ``--dsn``; it must be a prepared
shard), ``--batches`` batches of ``--batch`` tenants, each batch in one transaction the
way `tenants import` makes them: the schemas, then ``fleet.create_tenant_roles`` over the
batch's names (each tenant's role, its grants, one GRANT of them all to the login role;
``--function ensure``: ``fleet.ensure_tenant_roles``, which checks each role first).
Prints ms per tenant for every batch and the last batch against the first (the floor,
measured in the same run): flat means linear in tenants. Before the fix a role created
just now was still checked for the login role's membership, which walks every membership
of the login role after each CREATE ROLE: 0.9 -> 6.4 ms per tenant over the first 2,000
tenants and 31 -> 53 ms at 4,000-6,000.

    .venv/bin/python bench/tenant_roles.py [--batches 16] [--batch 500] [--function create|ensure]
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

import asyncpg  # noqa: E402

from bench.common import machine, print_table, write_results  # noqa: E402
from host.fleet.embedded import EmbeddedFleet  # noqa: E402
from router.runtime import open_runtime  # noqa: E402
from router.settings import Settings  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=16, help="batches, one transaction each")
    ap.add_argument("--batch", type=int, default=500, help="tenants per batch")
    ap.add_argument("--dsn", default=None, help="a prepared shard to use instead of an embedded one")
    ap.add_argument("--function", choices=("create", "ensure"), default="create",
                    help="create: fleet.create_tenant_roles (what `tenants import` runs for fresh tenants); "
                         "ensure: fleet.ensure_tenant_roles (one tenant at a time, moves, a resumed batch)")
    return ap.parse_args()


async def batches(dsn: str, args: argparse.Namespace) -> list[float]:
    conn = await asyncpg.connect(dsn)
    out = []
    try:
        for i in range(args.batches):
            names = ["t_" + uuid.uuid4().hex for _ in range(args.batch)]
            t0 = time.perf_counter()
            async with conn.transaction():
                # bench-only: system-made t_<32 hex> names, so quoting them is exact
                await conn.execute("".join(f'CREATE SCHEMA "{n}";' for n in names))
                if args.function == "create":
                    await conn.execute("SELECT fleet.create_tenant_roles($1::text[])", names)
                else:
                    await conn.execute("SELECT fleet.ensure_tenant_roles($1::text[], false)", names)
            out.append(1000 * (time.perf_counter() - t0) / args.batch)
            print(f"batch {i + 1}/{args.batches}: {out[-1]:.2f} ms per tenant", flush=True)
    finally:
        await conn.close()
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.dsn:
        per = await batches(args.dsn, args)
    else:
        root = Path(tempfile.mkdtemp(prefix="tenantfleet-bench-"))
        root.chmod(0o755)  # the unprivileged PostgreSQL user must reach it when we run as root
        fleet = EmbeddedFleet(root, shards=1, tuned_for_tests=False)
        try:
            info = await asyncio.to_thread(fleet.start)
            settings = Settings.load().model_copy(update={"control_dsn": info.control_dsn,
                                                          "redis_url": info.redis_url})
            async with open_runtime(settings) as rt:
                await rt.directory.add_shard("shard1", info.shard_dsns["shard1"])
            per = await batches(info.shard_dsns["shard1"], args)
        finally:
            await asyncio.to_thread(fleet.reset)
    return {"machine": machine(), "config": vars(args), "ms_per_tenant": per, "last_over_first": per[-1] / per[0]}


if __name__ == "__main__":
    a = parse_args()
    d = asyncio.run(main(a))
    per = d["ms_per_tenant"]
    print_table(f"schema + role per tenant, batches of {a.batch}", ["tenants before the batch", "ms per tenant"],
                [(f"{i * a.batch:,}", f"{v:.2f}") for i, v in enumerate(per)])
    print(f"last batch / first batch: {d['last_over_first']:.2f}x (flat: about 1x)")
    print(f"wrote {write_results('tenant_roles', d)}")
