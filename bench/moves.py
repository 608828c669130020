"""Tenant moves benchmark: offline copy speed against a raw COPY pipe, the online write
pause seen by a client, and a drain of many tenants under load.

1. copy: a tenant with ``--copy-mb`` MB over 3 tables (inventory's ``items`` and two
   tables of the bench's own) is moved offline from shard1 to shard2; the mover's copy
   rate (binary COPY streamed through a bounded queue, `copy_table`) against the floor:
   ``psql -c "COPY ... TO STDOUT (FORMAT binary)" | psql -c "COPY ... FROM STDIN (FORMAT
   binary)"`` between the same two servers into the same table definitions, table by table.
   ``--rounds`` rounds, order alternated; the median ratio is reported (aim >= 0.8).
2. pause: a client writes to one tenant through the host at a steady rate (one write every
   ``--write-every-ms``) while the tenant is moved online ``--moves`` times back and forth;
   per move, the longest gap between two acknowledged writes around its cutover, minus the
   writer's own interval, and the mover's own figure (fence to commit point).
   p50/p99/max (aim: p99 under 100 ms).
3. drain: ``--drain-tenants`` tenants on shard1 are drained (`tenantfleet drain`'s code:
   auto mode, the move limits) while readers and writers use tenants on shard2 and
   shard3; total time, moves/s, and those requests' p95 during the drain as a ratio to
   the p95 before it.

Runs on an embedded 3-shard fleet in a temp dir with production server settings (fsync
on). Prints a table and writes bench/results/moves.json.
"""
from __future__ import annotations

import argparse
import asyncio
import random
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

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402

from bench.common import machine, print_table, write_results  # noqa: E402
from host.app import serving  # noqa: E402
from host.fleet.embedded import EmbeddedFleet, _pg_bin  # noqa: E402
from router.models import TenantRecord  # noqa: E402
from router.runtime import open_runtime  # noqa: E402
from router.settings import Settings  # noqa: E402
from shard_migrations.moves import schema_copy  # noqa: E402
from shard_migrations.moves.batch import drain  # noqa: E402
from shard_migrations.moves.mover import Mover, mover_pools  # noqa: E402

ADMIN_KEY = "bench-admin-key-" + "x" * 24


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/moves.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copy-mb", type=int, default=60, help="size of the copied tenant (MB over 3 tables)")
    p.add_argument("--rounds", type=int, default=3, help="copy rounds (mover vs floor), order alternated")
    p.add_argument("--moves", type=int, default=20, help="online moves under a steady writer")
    p.add_argument("--write-every-ms", type=float, default=5.0, help="the steady writer's interval")
    p.add_argument("--drain-tenants", type=int, default=300, help="tenants drained off shard1")
    p.add_argument("--skip", choices=["copy", "pause", "drain"], action="append", default=[],
                   help="leave a part out (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="results file (default: bench/results/moves.json)")
    return p.parse_args(argv)


@asynccontextmanager
async def bench_fleet() -> AsyncIterator[tuple[Settings, dict[str, str]]]:
    root = Path(tempfile.mkdtemp(prefix="tenantfleet-bench-"))
    root.chmod(0o755)
    fleet = EmbeddedFleet(root, shards=3, tuned_for_tests=False)
    try:
        info = await asyncio.to_thread(fleet.start)
        base = Settings.load(environ={}, control_dsn=info.control_dsn, redis_url=info.redis_url,
                             admin_key=ADMIN_KEY)
        yield base, dict(info.shard_dsns)
    finally:
        await asyncio.to_thread(fleet.reset)


class Api:
    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            data = await r.json()
            if r.status >= 300:
                raise RuntimeError(f"{method} {path}: {r.status} {data}")
            return data

    async def tenant(self, rt: Any, shard_id: str) -> tuple[TenantRecord, dict[str, str]]:
        code = "b-" + uuid.uuid4().hex[:10]
        rec = await rt.directory.create_tenant(code, [], shard_id=shard_id)
        await self.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/inventory/enable")
        await self.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/inventory/role-templates/"
                                 "INVENTORY_MANAGER/apply")
        key = (await self.admin("POST", "/admin/principals",
                                {"tenant": code, "name": "bench", "roles": ["INVENTORY_MANAGER"]}))["apiKey"]
        return rec, {"Authorization": f"Bearer {key}", "X-Tenant": code}


# --- 1. copy ------------------------------------------------------------------------------
EXTRA_TABLES = ("bench_events", "bench_notes")


async def fill(conn: asyncpg.Connection, schema: str, mb: int) -> int:
    """Rows in items and two tables of our own until the schema holds about ``mb`` MB of heap."""
    q = await conn.fetchval("SELECT quote_ident($1)", schema)
    per = mb * 1024 * 1024 // 3
    rows = per // 250
    await conn.execute(f"INSERT INTO {q}.items (sku, name, qty) SELECT 'SKU-' || g, repeat(md5(g::text), 6), g "
                       f"FROM generate_series(1, {rows}) g")
    for t in EXTRA_TABLES:
        await conn.execute(f"CREATE TABLE {q}.{t} (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), "
                           f"body text NOT NULL, n numeric)")
        await conn.execute(f"INSERT INTO {q}.{t} (id, body, n) SELECT g, repeat(md5(g::text), 6), g * 1.5 "
                           f"FROM generate_series(1, {rows}) g")
    await conn.execute("SELECT fleet.ensure_tenant_role($1)", schema)
    return int(await conn.fetchval("SELECT sum(pg_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
                                   "ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'", schema))


def psql_pipe(src_dsn: str, dst_dsn: str, schema: str, table: str) -> None:
    psql = str(_pg_bin() / "psql")
    out = subprocess.Popen([psql, src_dsn, "-X", "-q", "-c", f'COPY "{schema}"."{table}" TO STDOUT (FORMAT binary)'],
                           stdout=subprocess.PIPE)
    inp = subprocess.run([psql, dst_dsn, "-X", "-q", "-c", f'COPY "{schema}"."{table}" FROM STDIN (FORMAT binary)'],
                         stdin=out.stdout, capture_output=True)
    assert out.stdout is not None
    out.stdout.close()
    if out.wait() != 0 or inp.returncode != 0:
        raise RuntimeError(f"psql pipe of {table} failed: {inp.stderr.decode()}")


async def floor_copy(src: asyncpg.Connection, dst: asyncpg.Connection, src_dsn: str, dst_dsn: str,
                     rec: TenantRecord) -> float:
    """The raw pipe into the same table definitions on the target (made, timed, dropped)."""
    ts = await schema_copy.read_tenant_schema(src, rec.schema)
    await dst.execute("SELECT fleet.create_tenant_schema($1)", rec.schema)
    await schema_copy.create_tenant_schema_objects(dst, ts, "pre")
    t0 = time.perf_counter()
    for t in ts.tables:
        await asyncio.to_thread(psql_pipe, src_dsn, dst_dsn, rec.schema, t.name)
    took = time.perf_counter() - t0
    await dst.execute(f"DROP SCHEMA {await dst.fetchval('SELECT quote_ident($1)', rec.schema)} CASCADE")
    return took


async def bench_copy(rt: Any, api: Api, shard_dsns: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    rec, _ = await api.tenant(rt, "shard1")
    src = await asyncpg.connect(shard_dsns["shard1"])
    dst = await asyncpg.connect(shard_dsns["shard2"])
    rounds = []
    try:
        heap = await fill(src, rec.schema, args.copy_mb)
        mover = Mover(rt.directory, rt.settings)
        for i in range(args.rounds):
            cur = await rt.directory.get(id=rec.tenant_id)
            a, b = (src, dst) if cur.shard_id == "shard1" else (dst, src)
            a_dsn, b_dsn = (shard_dsns[cur.shard_id], shard_dsns["shard2" if cur.shard_id == "shard1" else "shard1"])
            target = "shard2" if cur.shard_id == "shard1" else "shard1"
            floor_first = i % 2 == 1
            floor_s = await floor_copy(a, b, a_dsn, b_dsn, cur) if floor_first else 0.0
            info = await mover.start(cur, target, "offline")
            if not floor_first:
                back = await rt.directory.get(id=rec.tenant_id)
                floor_s = await floor_copy(b, a, b_dsn, a_dsn, back)
            mb = info.detail["bytesCopied"] / 1e6
            rounds.append({"mb": round(mb, 1), "mover_s": info.detail["copySeconds"], "floor_s": round(floor_s, 3),
                           "mover_MBps": round(mb / info.detail["copySeconds"], 1),
                           "floor_MBps": round(mb / floor_s, 1),
                           "ratio": round(floor_s / info.detail["copySeconds"], 3),
                           "pause_ms": info.detail["pauseMs"]})
            print(f"  copy round {i + 1}: {rounds[-1]}", flush=True)
    finally:
        await src.close()
        await dst.close()
    return {"heap_mb": round(heap / 1e6, 1), "rounds": rounds,
            "mover_MBps": statistics.median(r["mover_MBps"] for r in rounds),
            "floor_MBps": statistics.median(r["floor_MBps"] for r in rounds),
            "ratio": statistics.median(r["ratio"] for r in rounds)}


FLOOR_WINDOW_S = 0.45  # about one online move of a small tenant


# --- 2. pause -------------------------------------------------------------------------------
async def bench_pause(rt: Any, api: Api, args: argparse.Namespace) -> dict[str, Any]:
    rec, headers = await api.tenant(rt, "shard1")
    acks: list[float] = []
    statuses: dict[int, int] = {}
    stop = asyncio.Event()
    every = args.write_every_ms / 1000

    async def writer() -> None:
        n = 0
        nxt = time.perf_counter()
        while not stop.is_set():
            n += 1
            async with api.http.post("/api/plugins/inventory/items", json={"sku": f"P-{n:07d}", "qty": 1},
                                     headers=headers) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 201:
                    acks.append(time.perf_counter())
            nxt += every
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
            nxt = max(nxt, time.perf_counter() - every)

    task = asyncio.ensure_future(writer())
    client, mover_ms, floor = [], [], []
    try:
        await asyncio.sleep(1)
        # the floor: the same writer's longest gap in windows as long as a move, without one
        # (a commit's own stalls: fsync, checkpoints, the event loop)
        for _ in range(args.moves):
            t0 = time.perf_counter()
            await asyncio.sleep(FLOOR_WINDOW_S)
            window = [t for t in acks if t0 <= t <= time.perf_counter()]
            gaps = [b - a for a, b in zip(window, window[1:])]
            floor.append(max(0.0, max(gaps) - every) * 1000 if gaps else float("nan"))
        async with mover_pools(rt.directory, rt.settings) as pools:
            mover = Mover(rt.directory, rt.settings, pools=pools)
            for i in range(args.moves):
                cur = await rt.directory.get(id=rec.tenant_id)
                target = "shard2" if cur.shard_id == "shard1" else "shard1"
                t0 = time.perf_counter()
                info = await mover.start(cur, target, "online")
                await asyncio.sleep(0.2)  # writes after the cutover
                t1 = time.perf_counter()
                window = [t for t in acks if t0 - 0.2 <= t <= t1]
                gaps = [b - a for a, b in zip(window, window[1:])]
                client.append(max(0.0, max(gaps) - every) * 1000 if gaps else float("nan"))
                mover_ms.append(info.detail["pauseMs"])
                where = "; ".join(f"{k} {info.detail[k]}" for k in ("fenceWaitMs", "catchUpMs", "markerCommitMs",
                                                                      "switchMs", "cutoverAttempts") if k in info.detail)
                at = window[[b - a for a, b in zip(window, window[1:])].index(max(gaps)) if gaps else 0] - t0
                print(f"  move {i + 1}: client gap {client[-1]:.1f} ms (at +{at * 1000:.0f} ms of "
                      f"{(t1 - t0 - 0.2) * 1000:.0f}), mover {mover_ms[-1]:.1f} ms ({where})", flush=True)
    finally:
        stop.set()
        await task

    def pct(xs: list[float], q: float) -> float:
        s = sorted(xs)
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]
    return {"moves": args.moves, "client_p50_ms": round(pct(client, 0.5), 1), "client_p99_ms": round(pct(client, 0.99), 1),
            "client_max_ms": round(max(client), 1), "mover_p50_ms": round(pct(mover_ms, 0.5), 1),
            "mover_p99_ms": round(pct(mover_ms, 0.99), 1), "mover_max_ms": round(max(mover_ms), 1),
            "statuses": statuses, "writes": len(acks),
            "floor_p50_ms": round(pct(floor, 0.5), 1), "floor_p99_ms": round(pct(floor, 0.99), 1),
            "floor_max_ms": round(max(floor), 1)}


# --- 3. drain -------------------------------------------------------------------------------
async def bench_drain(rt: Any, api: Api, args: argparse.Namespace) -> dict[str, Any]:
    others = [await api.tenant(rt, sid) for sid in ("shard2", "shard3") for _ in range(5)]
    t0 = time.perf_counter()
    for _ in range(args.drain_tenants):
        await api.tenant(rt, "shard1")
    setup_s = time.perf_counter() - t0
    lat: list[tuple[float, float]] = []
    statuses: dict[int, int] = {}
    stop = asyncio.Event()

    async def user(seed: int) -> None:
        rnd = random.Random(seed)
        n = 0
        while not stop.is_set():
            _, h = rnd.choice(others)
            n += 1
            s = time.perf_counter()
            if n % 3 == 0:
                req = api.http.post("/api/plugins/inventory/items", json={"sku": f"D-{seed}-{n}", "qty": 1}, headers=h)
            else:
                req = api.http.get("/api/plugins/inventory/items?limit=5", headers=h)
            async with req as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
            lat.append((s, time.perf_counter() - s))
            await asyncio.sleep(0.005)

    tasks = [asyncio.ensure_future(user(i)) for i in range(4)]
    try:
        await asyncio.sleep(8)
        d0 = time.perf_counter()
        report = await drain(rt.directory, rt.settings, "shard1")
        d1 = time.perf_counter()
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    def p95(xs: list[float]) -> float:
        return statistics.quantiles(xs, n=100)[94] * 1000
    before = [x for s, x in lat if s < d0]
    during = [x for s, x in lat if d0 <= s <= d1]
    data = report.to_api()
    modes: dict[str, int] = {}
    for m in data["moves"]:
        modes[m.get("mode", "?")] = modes.get(m.get("mode", "?"), 0) + 1
    pauses = sorted(m["pauseMs"] for m in data["moves"] if m.get("pauseMs") is not None)
    steps: dict[str, list[float]] = {}
    for m in data["moves"]:
        for k, v in (m.get("stepsMs") or {}).items():
            steps.setdefault(k, []).append(v)
    print("  offline pause by step, median ms: " + ", ".join(
        f"{k} {statistics.median(v):.1f}" for k, v in steps.items()), flush=True)
    return {"tenants": args.drain_tenants, "setup_s": round(setup_s, 1), "drain_s": round(d1 - d0, 2),
            "moves_per_s": round(data["done"] / (d1 - d0), 2), "done": data["done"], "failed": data["failed"],
            "remaining": data["remaining"], "modes": modes, "p95_before_ms": round(p95(before), 2),
            "p95_during_ms": round(p95(during), 2), "p95_ratio": round(p95(during) / p95(before), 2),
            "pause_p50_ms": pauses[len(pauses) // 2] if pauses else None,
            "pause_p99_ms": pauses[int(0.99 * (len(pauses) - 1))] if pauses else None,
            "statuses": statuses}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"machine": machine()}
    async with bench_fleet() as (base, shard_dsns), open_runtime(base) as rt:
        for sid, dsn in shard_dsns.items():
            await rt.directory.add_shard(sid, dsn)
        async with serving(rt.settings, host="127.0.0.1", port=0) as (_app, url), \
                aiohttp.ClientSession(base_url=url) as http:
            api = Api(http)
            await api.admin("POST", "/admin/plugins/inventory/enable")
            for sid in shard_dsns:  # every shard gets inventory's public migrations, and the host a
                _, h = await api.tenant(rt, sid)  # connection to it (steady state: hosts serve every shard)
                async with http.get("/api/plugins/inventory/items?limit=1", headers=h) as r:
                    await r.read()
            if "copy" not in args.skip:
                figures["copy"] = await bench_copy(rt, api, shard_dsns, args)
            if "pause" not in args.skip:
                figures["pause"] = await bench_pause(rt, api, args)
            if "drain" not in args.skip:
                figures["drain"] = await bench_drain(rt, api, args)
    return figures


if __name__ == "__main__":
    a = parse_args()
    fig = asyncio.run(main(a))
    rows = []
    if "copy" in fig:
        c = fig["copy"]
        rows += [["offline copy: mover (binary COPY, bounded queue)", c["mover_MBps"], "MB/s", f"{c['heap_mb']} MB heap"],
                 ["offline copy: floor (psql COPY binary pipe)", c["floor_MBps"], "MB/s", ""],
                 ["offline copy: mover / floor (median)", c["ratio"], "x",
                  "aim >= 0.8; rounds " + ", ".join(str(r["ratio"]) for r in c["rounds"])]]
    if "pause" in fig:
        p = fig["pause"]
        rows += [["online pause, client gap p50 / p99 / max", f"{p['client_p50_ms']} / {p['client_p99_ms']} / "
                  f"{p['client_max_ms']}", "ms", f"{p['moves']} moves; aim p99 < 100"],
                 ["online pause, mover fence->commit p50 / p99 / max", f"{p['mover_p50_ms']} / {p['mover_p99_ms']} / "
                  f"{p['mover_max_ms']}", "ms", f"writer statuses {p['statuses']}"],
                 ["floor: writer's longest gap without a move, p50 / p99 / max",
                  f"{p['floor_p50_ms']} / {p['floor_p99_ms']} / {p['floor_max_ms']}", "ms",
                  f"{p['moves']} windows of {FLOOR_WINDOW_S} s"]]
    if "drain" in fig:
        d = fig["drain"]
        rows += [["drain: total", d["drain_s"], "s", f"{d['done']} moved, {d['failed']} failed, modes {d['modes']}"],
                 ["drain: moves/s", d["moves_per_s"], "/s", f"pause p50 {d['pause_p50_ms']} p99 {d['pause_p99_ms']} ms"],
                 ["drain: other tenants' p95 during / before", d["p95_ratio"], "x",
                  f"{d['p95_during_ms']} / {d['p95_before_ms']} ms; statuses {d['statuses']}"]]
    print_table("tenant moves", ["measure", "value", "unit", "note"], rows)
    write_results("moves", fig, a.out)
