"""Bulk onboarding benchmark: `tenants import` against its floor (issue 12).

On an embedded fleet of 3 shards (fsync on; or the servers named by
TENANTFLEET_CONTROL_DSN, whose shards are registered already), ``--runs`` rounds, each on
fresh tenants with inventory enabled, the two sides alternating which goes first (after
``--warmup`` tenants of each, not counted):

  floor    per shard ONE connection sending, per batch of ``--batch-size`` tenants, ONE
           simple-query script with exactly the SQL the importer has the shard run for
           those tenants: BEGIN; the schemas; each tenant's role, USAGE on its schema and
           the two default privileges; one GRANT of the tenants' group to the batch's
           roles and one of them to the login role; the fences; each tenant's inventory
           files after ``SET LOCAL search_path``; the ledger rows; COMMIT. The 3 shards at
           once. No checks, no locks, no control plane, no Python between statements.
  import   ``--tenants`` tenants from a CSV file through TenantImporter (`tenantfleet
           tenants import`), the whole run: reading and checking the file, placement, the
           run's records, directory rows, the shards' transactions, activation.

Prints tenants/s for each, import/floor, the load average (1 min) before each side, and
the CPU seconds each server (control, shard1..3) and this process spent on each side
(embedded fleet only): where the importer spends more than the floor. Medians over the
runs. ``--single`` tenants made one at a time first (`tenants create` + `plugins enable
--tenant`, in process), for reference. Then checks that imported tenants are usable:
one per shard, as its own role, writes and reads its ``items``.

    .venv/bin/python bench/tenant_import.py [--tenants 3000] [--runs 3] [--batch-size 200] [--single 100] [--warmup 600]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import asyncpg  # noqa: E402

from bench.common import cpu_probe_ms, machine, print_table, write_results  # noqa: E402
from host.fleet.embedded import EmbeddedFleet  # noqa: E402
from router.runtime import open_runtime  # noqa: E402
from router.settings import Settings  # noqa: E402
from shard_migrations.engine import apply_tenant  # noqa: E402
from shard_migrations.packages import MigrationFile, PluginPackage, discover  # noqa: E402
from shard_migrations.tenant_import import TenantImporter  # noqa: E402

AIM = 1000.0
BG = "servers' background"
_SAFE = re.compile(r"[0-9A-Za-z_.\-]+")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tenants", type=int, default=3000, help="Tenants per side and run.")
    ap.add_argument("--runs", type=int, default=3, help="Rounds (fresh tenants each, order alternated); medians.")
    ap.add_argument("--batch-size", type=int, default=200, help="Tenants per shard transaction, both sides.")
    ap.add_argument("--single", type=int, default=100, help="Tenants made one at a time first (0: skip).")
    ap.add_argument("--warmup", type=int, default=600, help="Tenants each side makes first, not counted.")
    ap.add_argument("--sides", default="floor,import", help="Which sides to run (comma-separated).")
    return ap.parse_args()


# --- where the CPU goes ------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields from the 3rd (state) on


def server_cpu(postmaster: int) -> tuple[float, float]:
    """CPU seconds of a PostgreSQL server (the postmaster, the children it reaped, and the
    children alive now), and of those its background processes alive now spent
    (checkpointer, background writer, WAL writer, autovacuum, ...: not serving a client)."""
    f = _stat(postmaster)
    total = sum(int(x) for x in f[11:15])  # utime, stime, cutime, cstime
    background = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                g = _stat(int(entry.name))
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if int(g[1]) == postmaster:
                total += int(g[11]) + int(g[12])
                if b"127.0.0.1(" not in cmdline:  # a backend's title names its client
                    background += int(g[11]) + int(g[12])
    return total / _TICK, background / _TICK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Cpu:
    def __init__(self, servers: dict[str, int]) -> None:
        self.servers = servers

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        background = 0.0
        for name, pid in self.servers.items():
            out[name], bg = server_cpu(pid)
            background += bg
        out["client"] = self_cpu()
        out[BG] = background  # part of the servers' figures, not added to them
        return out

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in a}


@asynccontextmanager
async def fleet() -> AsyncIterator[tuple[Settings, dict[str, str], dict[str, int]]]:
    """(settings, shards to register, postmaster pid by server name)."""
    base = Settings.load()
    if base.control_dsn:
        yield base, {}, {}
        return
    root = Path(tempfile.mkdtemp(prefix="tenantfleet-bench-"))
    root.chmod(0o755)  # the unprivileged PostgreSQL user must reach it when we run as root
    f = EmbeddedFleet(root, shards=3, tuned_for_tests=False)
    try:
        info = await asyncio.to_thread(f.start)
        pids = {s.name: int((s.datadir / "postmaster.pid").read_text().split()[0]) for s in f.pg_servers}
        yield (base.model_copy(update={"control_dsn": info.control_dsn, "redis_url": info.redis_url}),
               info.shard_dsns, pids)
    finally:
        await asyncio.to_thread(f.reset)


# --- the floor ---------------------------------------------------------------------------
def _lit(value: str) -> str:
    # bench-only: every value here is system-made (uuids, file names, versions, hex)
    assert _SAFE.fullmatch(value), value
    return f"'{value}'"


def _ident(value: str) -> str:
    assert _SAFE.fullmatch(value), value
    return f'"{value}"'


def floor_script(schemas: Sequence[tuple[str, str]], names: dict[str, str], pkg: PluginPackage,
                 files: Sequence[MigrationFile]) -> str:
    """One batch's script: what fleet.ensure_tenant_roles and create_batch have the shard
    run for a batch of new tenants ((tenant id, schema) each), as plain statements."""
    out = ["BEGIN;"]
    out += [f"CREATE SCHEMA {_ident(s)};" for _, s in schemas]
    roles = []
    for _, s in schemas:
        role = _ident(names["prefix"] + s)
        roles.append(role)
        out.append(f"CREATE ROLE {role} NOLOGIN INHERIT; GRANT USAGE ON SCHEMA {_ident(s)} TO {role}; "
                   f"ALTER DEFAULT PRIVILEGES IN SCHEMA {_ident(s)} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES "
                   f"TO {role}; ALTER DEFAULT PRIVILEGES IN SCHEMA {_ident(s)} GRANT USAGE, SELECT ON SEQUENCES "
                   f"TO {role};")
    out.append(f"GRANT {_ident(names['group'])} TO {', '.join(roles)};")
    out.append(f"GRANT {', '.join(roles)} TO {_ident(names['login'])} {names['grant_with']};")
    out.append("INSERT INTO fleet.tenant_fence (tenant_id, schema_name, epoch) VALUES "
               + ", ".join(f"({_lit(t)}, {_lit(s)}, 1)" for t, s in schemas) + ";")
    for _, s in schemas:
        out.append(f"SET LOCAL search_path = {_ident(s)}, public;")
        out += [f"{f.sql}\n;" for f in files]
    out.append("INSERT INTO fleet.sys_plugin_migrations (plugin_id, scope, tenant_id, name, version, checksum) VALUES "
               + ", ".join(f"({_lit(pkg.id)}, 'tenant', {_lit(t)}, {_lit(f.name)}, {_lit(str(f.since))}, "
                           f"{_lit(f.checksum)})" for t, _ in schemas for f in files) + ";")
    out.append("COMMIT;")
    return "\n".join(out)


async def shard_names(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT fleet.login_role()::text AS login, fleet.tenant_group_role()::text AS grp, "
            "fleet.tenant_role('')::text AS prefix, current_setting('server_version_num')::int >= 160000 AS pg16")
    finally:
        await conn.close()
    assert row is not None
    return {"login": row["login"], "group": row["grp"], "prefix": row["prefix"],
            "grant_with": "WITH INHERIT FALSE, SET TRUE" if row["pg16"] else ""}


async def run_floor(dsns: dict[str, str], names: dict[str, dict[str, str]], n: int, batch: int,
                    pkg: PluginPackage) -> float:
    files = pkg.files("tenant", pkg.version)
    per_shard: dict[str, list[tuple[str, str]]] = {sid: [] for sid in dsns}
    sids = sorted(dsns)
    for i in range(n):
        tid = uuid.uuid4()
        per_shard[sids[i % len(sids)]].append((str(tid), "t_" + tid.hex))
    scripts = {sid: [floor_script(ts[i:i + batch], names[sid], pkg, files) for i in range(0, len(ts), batch)]
               for sid, ts in per_shard.items()}
    conns = {sid: await asyncpg.connect(dsn) for sid, dsn in dsns.items()}
    try:
        async def one(sid: str) -> None:
            for script in scripts[sid]:
                await conns[sid].execute(script)  # no arguments: the simple query protocol, one round trip

        t0 = time.perf_counter()
        await asyncio.gather(*(one(sid) for sid in sids))
        return time.perf_counter() - t0
    finally:
        for c in conns.values():
            await c.close()


# --- the importer ------------------------------------------------------------------------
async def run_import(rt: Any, packages: Any, n: int, batch: int, tag: str) -> tuple[float, dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tenants.csv"
        path.write_text("code,domains,plugins\n" + "".join(
            f"i{tag}-{i:06d},i{tag}-{i:06d}.bench.example,inventory\n" for i in range(n)))
        importer = TenantImporter(rt.control, rt.shard_pools, rt.settings, packages, batch_size=batch)
        t0 = time.perf_counter()
        report = await importer.start(path)
        seconds = time.perf_counter() - t0
    assert report.created == n and not report.refused, report.to_dict()
    return seconds, report.shards


async def single(rt: Any, inventory: PluginPackage, n: int) -> float:
    """`tenants create` + `plugins enable --tenant`, one tenant after the other, in process."""
    tag = uuid.uuid4().hex[:6]
    t0 = time.perf_counter()
    for i in range(n):
        rec = await rt.directory.create_tenant(f"s{tag}-{i:06d}", [f"s{tag}-{i:06d}.bench.example"])
        await apply_tenant(rt.shard_pools, rt.settings, inventory, rec)
        await rt.control.execute(
            "INSERT INTO sys_plugins (plugin_id, api_version, version_installed) VALUES ($1, $2, $3) "
            "ON CONFLICT (plugin_id) DO NOTHING", inventory.id, inventory.api, str(inventory.version))
        await rt.control.execute(
            "INSERT INTO sys_tenant_plugins (tenant_id, plugin_id, enabled, version_installed) "
            "VALUES ($1::uuid, $2, true, $3)", rec.tenant_id, inventory.id, str(inventory.version))
    return time.perf_counter() - t0


async def usable(rt: Any, tag: str) -> int:
    """One imported tenant per shard, as its own role, writes and reads its items."""
    rows = await rt.control.fetch(
        "SELECT DISTINCT ON (shard_id) tenant_id::text AS tenant_id, schema_name, shard_id FROM tenants "
        "WHERE code LIKE $1 AND state = 'active' ORDER BY shard_id, code DESC", f"i{tag}-%")
    for r in rows:
        pool = await rt.shard_pools.get(r["shard_id"])
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('role', fleet.tenant_role($1), true), "
                               "set_config('search_path', quote_ident($1) || ', public', true)", r["schema_name"])
            await conn.execute("INSERT INTO items (sku, name, location) VALUES ('bench-1', 'x', 'a1')")
            got = await conn.fetchval("SELECT count(*) FROM items WHERE location = 'a1'")
            assert got == 1, (r["schema_name"], got)
    return len(rows)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    packages = discover()
    inventory = packages.get("inventory")
    sides = [s for s in args.sides.split(",") if s]
    async with fleet() as (base, shard_dsns, pids), open_runtime(base) as rt:
        for sid, dsn in shard_dsns.items():
            await rt.directory.add_shard(sid, dsn)
        shards = {s.shard_id: s.dsn for s in await rt.directory.list_shards()}
        names = {sid: await shard_names(dsn) for sid, dsn in shards.items()}
        cpu = Cpu(pids)
        figures: dict[str, Any] = {"machine": machine(), "config": vars(args), "shards": len(shards), "runs": [],
                                   "cpu_probe_ms": cpu_probe_ms()}
        if args.single:
            s = await single(rt, inventory, args.single)
            figures["single_tenants_per_s"] = args.single / s
            print(f"one at a time: {args.single} tenants in {s:.1f} s = {args.single / s:.1f}/s", flush=True)
        if args.warmup:
            for side in sides:
                if side == "floor":
                    await run_floor(shards, names, args.warmup, args.batch_size, inventory)
                else:
                    await run_import(rt, packages, args.warmup, args.batch_size, uuid.uuid4().hex[:6])
        tags = []
        for r in range(args.runs):
            this: dict[str, Any] = {}
            for side in (sides if r % 2 == 0 else sides[::-1]):
                load = os.getloadavg()[0]
                before = cpu.sample()
                if side == "floor":
                    seconds = await run_floor(shards, names, args.tenants, args.batch_size, inventory)
                else:
                    tag = uuid.uuid4().hex[:6]
                    tags.append(tag)
                    seconds, _ = await run_import(rt, packages, args.tenants, args.batch_size, tag)
                used = Cpu.delta(before, cpu.sample())
                this[side] = {"seconds": seconds, "tenants_per_s": args.tenants / seconds, "load1": load,
                              "cpu_s": used}
                print(f"run {r + 1} {side}: {args.tenants / seconds:,.0f} tenants/s (load {load:.2f}); CPU s "
                      + ", ".join(f"{k} {v:.1f}" for k, v in used.items()), flush=True)
            if "floor" in this and "import" in this:
                this["ratio"] = this["import"]["tenants_per_s"] / this["floor"]["tenants_per_s"]
            figures["runs"].append(this)
        if tags:
            figures["usable_checked"] = await usable(rt, tags[-1])
    for side in sides:
        figures[side] = {"tenants_per_s": statistics.median(x[side]["tenants_per_s"] for x in figures["runs"]),
                         "load1": statistics.median(x[side]["load1"] for x in figures["runs"]),
                         "cpu_ms_per_tenant": {k: 1000 * statistics.median(x[side]["cpu_s"][k] for x in figures["runs"])
                                               / args.tenants for k in figures["runs"][0][side]["cpu_s"]}}
    if len(sides) == 2:
        figures["ratio"] = statistics.median(x["ratio"] for x in figures["runs"])
    return figures


def report(args: argparse.Namespace, d: dict[str, Any]) -> None:
    sides = [s for s in args.sides.split(",") if s]
    rows = []
    for i, run in enumerate(d["runs"], start=1):
        rows.append([f"run {i}"] + [f"{run[s]['tenants_per_s']:,.0f} (load {run[s]['load1']:.1f})" for s in sides]
                    + ([f"{run['ratio']:.2f}"] if "ratio" in run else []))
    rows.append(["median"] + [f"{d[s]['tenants_per_s']:,.0f} (load {d[s]['load1']:.1f})" for s in sides]
                + ([f"{d['ratio']:.2f}"] if "ratio" in d else []))
    print_table(f"{args.tenants:,} tenants with inventory over {d['shards']} shards, batches of {args.batch_size}: "
                "tenants/s", ["", *sides] + (["import / floor"] if len(sides) == 2 else []), rows)
    keys = list(d[sides[0]]["cpu_ms_per_tenant"])
    print_table("CPU ms per tenant (medians; the servers' background is part of their figures)", ["", *keys, "all"],
                [[s, *(f"{d[s]['cpu_ms_per_tenant'][k]:.2f}" for k in keys),
                  f"{sum(v for k, v in d[s]['cpu_ms_per_tenant'].items() if k != BG):.2f}"] for s in sides])
    print(f"CPU probe at the start: {d['cpu_probe_ms']:.0f} ms (bench/common.py cpu_probe_ms; lower is faster)")
    if "import" in d:
        print(f"import: {d['import']['tenants_per_s']:,.0f} tenants/s (aim: at least {AIM:,.0f})"
              + (f"; {d['ratio']:.2f}x the floor ({d['floor']['tenants_per_s']:,.0f}/s)" if "ratio" in d else ""))


if __name__ == "__main__":
    a = parse_args()
    data = asyncio.run(main(a))
    report(a, data)
    print(f"wrote {write_results('tenant_import', data)}")
