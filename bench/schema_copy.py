"""Schema copy benchmark: a tenant schema's DDL from the catalog against ``pg_dump -n``.

Creates ``--schemas`` tenant schemas on one shard database (``fleet.create_tenant_schema``,
then the shipped plugins' tenant migration files, 100 schemas per transaction), then
times, for ``--sample`` of them spread over the lot:

  read         `read_tenant_schema` (statements, tables with sizes, problems, fingerprint)
  fingerprint  `fingerprint` (the same without table sizes)
  pg_dump      ``pg_dump --schema-only -n <schema>`` (process wall time), for ``--dumps`` of them

Prints medians and maxima and writes bench/results/schema_copy.json. Runs on an embedded
shard server in a temp dir (its pg_dump) unless ``--dsn`` names a database (the pg_dump on
PATH is used; the schemas it creates there are dropped at the end).
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import asyncpg  # noqa: E402

from bench.common import machine, print_table, write_results  # noqa: E402
from host.fleet.embedded import EmbeddedFleet, _pg_bin  # noqa: E402
from router.schema import ensure_shard  # noqa: E402
from shard_migrations.moves.schema_copy import fingerprint, read_tenant_schema  # noqa: E402
from shard_migrations.packages import discover  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/schema_copy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemas", type=int, default=2000, help="tenant schemas on the shard")
    p.add_argument("--sample", type=int, default=50, help="schemas read and fingerprinted (timed)")
    p.add_argument("--dumps", type=int, default=5, help="schemas dumped with pg_dump -n (timed)")
    p.add_argument("--dsn", default=None, help="a shard database to use instead of an embedded server")
    p.add_argument("--out", type=Path, default=None, help="results file (default: bench/results/schema_copy.json)")
    return p.parse_args(argv)


@asynccontextmanager
async def shard_database(dsn: str | None) -> AsyncIterator[tuple[str, str]]:
    """(dsn, pg_dump binary): ``dsn`` as given, else an embedded shard server's database."""
    if dsn:
        found = shutil.which("pg_dump")
        if found is None:
            raise SystemExit("no pg_dump on PATH")
        yield dsn, found
        return
    root = Path(tempfile.mkdtemp(prefix="tenantfleet-bench-"))
    root.chmod(0o755)  # the unprivileged PostgreSQL user must reach it when we run as root
    fleet = EmbeddedFleet(root, shards=1, tuned_for_tests=False)
    try:
        info = await asyncio.to_thread(fleet.start)
        yield next(iter(info.shard_dsns.values())), str(_pg_bin() / "pg_dump")
    finally:
        await asyncio.to_thread(fleet.reset)


def tenant_sql() -> list[str]:
    """Every shipped plugin's tenant-scope migration files, in order (what real tenants hold)."""
    out = []
    for _, package in sorted(discover().plugins.items()):
        out.extend(m.sql for m in package.migrations if m.scope == "tenant")
    return out


async def create_schemas(conn: asyncpg.Connection, names: list[str]) -> None:
    files = tenant_sql()
    for i in range(0, len(names), 100):
        async with conn.transaction():
            for name in names[i:i + 100]:
                await conn.execute("SELECT fleet.create_tenant_schema($1), "
                                   "set_config('search_path', quote_ident($1) || ', public', true)", name)
                for sql in files:
                    await conn.execute(sql)


def pg_dump_seconds(pg_dump: str, dsn: str, schema: str) -> float:
    started = time.perf_counter()
    subprocess.run([pg_dump, "--schema-only", "-n", schema, "-d", dsn], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


async def timed(fn: Any, conn: asyncpg.Connection, names: list[str]) -> list[float]:
    await fn(conn, names[0])  # statements prepared once per connection, as a mover's would be
    out = []
    for name in names:
        started = time.perf_counter()
        await fn(conn, name)
        out.append(time.perf_counter() - started)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    names = ["t_" + uuid.uuid4().hex for _ in range(args.schemas)]
    step = max(1, args.schemas // max(1, args.sample))
    sample = names[::step][:args.sample]
    async with shard_database(args.dsn) as (dsn, pg_dump):
        conn = await asyncpg.connect(dsn)
        try:
            await ensure_shard(conn)
            started = time.perf_counter()
            await create_schemas(conn, names)
            figures: dict[str, Any] = {"schemas": args.schemas, "create_s": time.perf_counter() - started,
                                       "server": await conn.fetchval("SELECT split_part(current_setting('server_version'), ' ', 1)")}
            read = await timed(read_tenant_schema, conn, sample)
            fp = await timed(fingerprint, conn, sample)
            dumps = [await asyncio.to_thread(pg_dump_seconds, pg_dump, dsn, n) for n in sample[:args.dumps]]
            if args.dsn:
                for name in names:
                    await conn.execute("SELECT fleet.drop_tenant_schema($1)", name)
        finally:
            await conn.close()
    for key, values in (("read", read), ("fingerprint", fp), ("pg_dump", dumps)):
        figures[f"{key}_median_ms"] = statistics.median(values) * 1000
        figures[f"{key}_max_ms"] = max(values) * 1000
    figures["pg_dump_over_read"] = figures["pg_dump_median_ms"] / figures["read_median_ms"]
    return figures


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    figures = asyncio.run(run(args))
    print_table(f"one tenant schema's DDL at {figures['schemas']:,} schemas (PostgreSQL {figures['server']})",
                ["", "median ms", "max ms"],
                [[k, figures[f"{k}_median_ms"], figures[f"{k}_max_ms"]] for k in ("read", "fingerprint", "pg_dump")])
    print(f"pg_dump -n / read_tenant_schema: {figures['pg_dump_over_read']:.0f}x")
    path = write_results("schema_copy", {"figures": figures, "machine": machine()}, args.out)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
