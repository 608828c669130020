"""Benchmark: what ending a tenant transaction costs, by the way its session clean-up is done.

    .venv/bin/python bench/session_cleanup.py [--calls 1000] [--batches 5] [--variants a,b,...|all]

Starts its own embedded fleet (control plane + 1 shard + Valkey) under a temp dir, makes
20 tenants, and on one connection logged in as the shard's login role and switched to
the app role (as the host's are) runs the host's transaction sequentially:
``BEGIN; SELECT fleet.enter_tenant(...)`` (the fence), ``SELECT 1``, and one of the
endings below. ``--batches`` batches (and one more to warm up) of ``--calls`` transactions
per variant; medians over single transactions of:
wall time per transaction (client + server + loopback), the backend's CPU time and the
client's CPU time (from /proc/<pid>/schedstat: nanoseconds). The variants take turns
transaction by transaction, so a neighbour's load falls on all of them alike. The floor is a bare
``COMMIT``; each variant is printed as a ratio against it and as microseconds more.
Results also go to bench/results/session_cleanup.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

# Each variant: the fence function its first statement calls, and what ends the
# transaction (one simple query each). `now` and `now_unlock` are the host's own endings
# (host/tx.py); the others are what was there before and the alternatives measured.
FENCE = "fleet.enter_tenant"
ENDINGS: dict[str, tuple[str, str]] = {
    "commit": (FENCE, "COMMIT"),  # the floor: no clean-up at all
    "now": (FENCE, "host.tx.COMMIT_SQL"),  # where session advisory locks are revoked (a superuser owner)
    "now_unlock": (FENCE, "host.tx.COMMIT_UNLOCK_SQL"),  # where they are not
    "issue8": (FENCE, "COMMIT; RESET ALL; SELECT pg_catalog.pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *"),
    "reset_all": (FENCE, "COMMIT; RESET ALL"),
    "close_all": (FENCE, "COMMIT; CLOSE ALL"),
    "unlisten": (FENCE, "COMMIT; UNLISTEN *"),
    "unlock_all": (FENCE, "COMMIT; SELECT pg_catalog.pg_advisory_unlock_all()"),
    "select_1": (FENCE, "COMMIT; SELECT 1"),
    "before_commit": (FENCE, "RESET ALL; CLOSE ALL; UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); COMMIT"),
    "fn_after": (FENCE, "COMMIT; SELECT fleet.bench_clean()"),  # one plpgsql function doing all four
    "fn_before": (FENCE, "SELECT fleet.bench_clean(); COMMIT"),
    "in_fence": ("fleet.bench_enter_clean", "COMMIT"),  # all four inside the fence, at the next BEGIN
}
DEFAULT = ("now", "now_unlock", "issue8")
_CLEAN_BODY = "RESET ALL; PERFORM pg_catalog.pg_advisory_unlock_all(); EXECUTE 'CLOSE ALL'; UNLISTEN *;"


def _schedstat_ns(pid: int) -> int:
    """Time the task has spent on a CPU, in nanoseconds (Linux /proc/<pid>/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


async def _prepare(control_dsn: str, shard_dsn: str, redis_url: str) -> tuple[list[str], str]:
    from router.runtime import open_runtime
    from router.settings import Settings

    settings = Settings.load(environ={}, control_dsn=control_dsn, redis_url=redis_url, admin_key="bench")
    async with open_runtime(settings) as rt:
        await rt.directory.add_shard("shard1", shard_dsn)
        tenants = [await rt.directory.create_tenant(f"bench-{i:03d}") for i in range(20)]
        login = await rt.directory.login_dsn_of("shard1")
    assert login is not None
    import asyncpg
    conn = await asyncpg.connect(shard_dsn)
    try:  # bench-only functions on this throwaway shard
        await conn.execute(f"CREATE FUNCTION fleet.bench_clean() RETURNS void LANGUAGE plpgsql AS $$ BEGIN {_CLEAN_BODY} END $$")
        body: str = await conn.fetchval("SELECT pg_get_functiondef('fleet.enter_tenant(uuid, bigint, int)'::regprocedure)")
        body = body.replace("fleet.enter_tenant(", "fleet.bench_enter_clean(")
        head, tail = body.split("BEGIN\n", 1)
        await conn.execute(head + "BEGIN\n" + _CLEAN_BODY + "\n" + tail)
        await conn.execute("GRANT EXECUTE ON FUNCTION fleet.bench_enter_clean(uuid, bigint, int) TO PUBLIC")
    finally:
        await conn.close()
    return [t.tenant_id for t in tenants], login


async def _measure(login_dsn: str, tenant_ids: list[str], endings: dict[str, tuple[str, str]], calls: int,
                   batches: int, shard_dsn: str) -> dict[str, dict[str, float]]:
    import asyncpg

    from host.tx import enter_sql
    from router.keys import APP_ROLE
    from router.models import TenantRecord

    conn = await asyncpg.connect(login_dsn)
    try:
        await conn.execute("SELECT pg_catalog.set_config('role', $1, false)", APP_ROLE)
        backend = conn.get_server_pid()
        fences = [enter_sql(TenantRecord(tenant_id=t, code="x", schema="t_" + t.replace("-", ""), shard_id="shard1",
                                         epoch=1, state="active"), 500) for t in tenant_ids]
        samples: dict[str, dict[str, list[float]]] = {k: {"wall_us": [], "server_us": [], "client_us": []}
                                                      for k in endings}
        starts = {name: [f.replace(FENCE + "(", fence + "(") for f in fences] for name, (fence, _) in endings.items()}
        names = list(endings)
        # Variants take turns transaction by transaction (the order rotating), so a noisy
        # neighbour's load falls on all of them alike; each transaction is timed alone.
        for i in range(calls * (batches + 1)):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                end = endings[name][1]
                start = starts[name][i % len(fences)]
                wall, server, client = time.perf_counter_ns(), _schedstat_ns(backend), time.process_time_ns()
                await conn.execute(start)
                await conn.fetchval("SELECT 1")
                await conn.execute(end)
                client = time.process_time_ns() - client
                wall = time.perf_counter_ns() - wall
                server = _schedstat_ns(backend) - server
                if i >= calls:  # the first batch warms caches
                    for key, value in (("wall_us", wall), ("server_us", server), ("client_us", client)):
                        samples[name][key].append(value / 1e3)
        return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    finally:
        await conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1000, help="transactions per variant and batch (default 1000)")
    p.add_argument("--batches", type=int, default=5, help="batches, after one to warm up (default 5)")
    p.add_argument("--variants", default=",".join(DEFAULT),
                   help=f"comma-separated, from: {', '.join(ENDINGS)}; or all (default: {','.join(DEFAULT)}; "
                        "the floor, commit, is always run)")
    args = p.parse_args()
    chosen = list(ENDINGS) if args.variants == "all" else args.variants.split(",")
    names = ["commit", *[v for v in chosen if v and v != "commit"]]
    unknown = [n for n in names if n not in ENDINGS]
    if unknown:
        p.error(f"unknown variant(s): {', '.join(unknown)}")
    import host.tx
    for name in ("now", "now_unlock"):  # the host's own, as the code has them now
        fence, ending = ENDINGS[name]
        ENDINGS[name] = (fence, getattr(host.tx, ending.rsplit(".", 1)[1]))
    RESULTS.mkdir(parents=True, exist_ok=True)

    from host.fleet.embedded import EmbeddedFleet

    root = Path(tempfile.mkdtemp(prefix="tenantfleet-bench-"))
    root.chmod(0o755)
    fleet = EmbeddedFleet(root, shards=1, tuned_for_tests=True)
    try:
        info = fleet.start()
        shard_dsn = info.shard_dsns["shard1"]
        tenant_ids, login_dsn = asyncio.run(_prepare(info.control_dsn, shard_dsn, info.redis_url))
        med = asyncio.run(_measure(login_dsn, tenant_ids, {n: ENDINGS[n] for n in names}, args.calls,
                                   args.batches, shard_dsn))
    finally:
        fleet.reset()
    floor = med["commit"]
    print(f"{args.batches} batches of {args.calls} transactions (fence, SELECT 1, ending), medians per transaction:")
    print(f"  {'ending':13s} {'wall us':>9s} {'server CPU us':>14s} {'client CPU us':>14s}   vs bare COMMIT")
    result: dict[str, Any] = {"calls": args.calls, "batches": args.batches, "medians": med, "endings": ENDINGS,
                              "ratios": {}}
    for name, m in med.items():
        ratio = {k: m[k] / floor[k] for k in m}
        result["ratios"][name] = ratio
        print(f"  {name:13s} {m['wall_us']:9.1f} {m['server_us']:14.1f} {m['client_us']:14.1f}"
              f"   wall {ratio['wall_us']:.3f}x ({m['wall_us'] - floor['wall_us']:+.1f} us),"
              f" CPU {m['server_us'] - floor['server_us']:+.1f} us server, {m['client_us'] - floor['client_us']:+.1f} us"
              " client")
    (RESULTS / "session_cleanup.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'session_cleanup.json'}")


if __name__ == "__main__":
    main()
