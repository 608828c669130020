"""Benchmark: the host's inventory list route against the bare yardstick (prints figures).

    .venv/bin/python bench/request_path.py [--duration 5] [--rounds 3] [--profile]

Starts its own embedded fleet (control plane + 1 shard + Valkey) under a temp dir, puts
the yardstick's data (../shared/bench/seed_items.sql: t_1..t_100 with 100 items) and 100
host tenants with inventory enabled (100 items each, one API key each) on the same shard
server, then runs, in alternating rounds under the same wrk load (-t1 -c32, random
tenant per request):

  host   GET /api/plugins/inventory/items?limit=10 with X-Tenant + bearer key: resolve,
         gate, RBAC, fence (switching to the tenant's role), metrics, one JSON log line
         (to a file), 10 rows
  host_noswitch   the same host with the fence of before tenant roles: a bench-only copy
         of fleet.enter_tenant without the role switch, run by a TenantTx subclass of this
         file on that host's own object, the app role given back its old rights on the
         bench's tenant schemas (this throwaway fleet only); the with/without ratio is
         what the per-tenant role switch costs (the two swap places every other round)
  host_noclean   the same host ending each transaction with a bare COMMIT, without the
         session clean-up (a bench-only TenantTx subclass again); host/host_noclean is
         what the clean-up costs (it swaps places with host every other round too)
  bare4 / bare3 / bare1   bare_tenant_server.py with 4, 3 and 1 round trips

Every server is its own single process with a pool of 8, on uvloop when it is installed
(the yardstick picks it the same way). Medians of throughput, p99 and CPU per request
(the server's, PostgreSQL's and wrk's: they share the cores) go to stdout and
bench/results/request_path.json (with ratios). ``--profile`` runs one
extra host round under pyinstrument and writes bench/results/request_path_profile.txt.
It also times `with_tenant_tx` sequentially with asyncpg's statement cache on and off, and
as the app role with the per-tenant role switch and without, and without the session
clean-up (the variants take turns call by call).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "bench"
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
TENANTS = 100


def _wrk(url: str, script: Path, duration: int) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{duration}s", "-s", str(script), "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only wrk exits meanwhile: its CPU
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([0-9.]+)(us|ms|s)", out)
    assert p99 is not None, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale, "non2xx": float(errors.group(1)) if errors else 0.0,
            "wrk_cpu_s": wrk_cpu}


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc)."""
    import os
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu_s(postmaster: int) -> float:
    """utime + stime of a PostgreSQL server: the postmaster, its live children, and (through
    the postmaster's cutime + cstime) the children it has reaped, such as autovacuum workers."""
    import os
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(stat.parent.name) == postmaster:
            total += sum(int(f) for f in fields[11:15])
        elif int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def _postmaster_pid(dsn: str) -> int:
    import asyncpg
    conn = await asyncpg.connect(dsn)
    try:  # the backend's parent, read while the backend is still there
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        return int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    finally:
        await conn.close()


def _wait_port(port: int, deadline_s: float = 30.0) -> None:
    import socket
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


async def _prepare(control_dsn: str, shard_dsn: str, redis_url: str) -> list[tuple[str, str]]:
    """Register the shard, create 100 tenants with inventory + 100 items + a key; seed the yardstick."""
    import asyncpg

    from host.provision import provision_tenants
    from router.runtime import open_runtime
    from router.settings import Settings

    settings = Settings.load(environ={}, control_dsn=control_dsn, redis_url=redis_url, admin_key="bench")
    conn = await asyncpg.connect(shard_dsn)
    try:
        await conn.execute((SHARED / "seed_items.sql").read_text())
    finally:
        await conn.close()
    async with open_runtime(settings) as rt:
        await rt.directory.add_shard("shard1", shard_dsn)
        tenants = [await rt.directory.create_tenant(f"bench-{i:03d}") for i in range(TENANTS)]
    keys = await provision_tenants(settings, tenants, plugins=("inventory",), name="bench")
    conn = await asyncpg.connect(shard_dsn)
    try:
        for t in tenants:
            async with conn.transaction():
                await conn.execute("SELECT set_config('search_path', quote_ident($1), true)", t.schema)
                await conn.execute("INSERT INTO items (sku, qty) SELECT 'sku-' || g, g FROM generate_series(1, 100) g")
        await _prepare_unswitched(conn, [t.schema for t in tenants])
    finally:
        await conn.close()
    return [(t.code, keys[t.code]) for t in tenants]


# The role switch in fleet.enter_tenant, and what the bench-only copy has instead.
_SWITCH = "pg_catalog.set_config('role', fleet.tenant_role(f.schema_name)::text, true)"
_UNSWITCHED_FENCE = "fleet.bench_enter_tenant_unswitched"


async def _prepare_unswitched(conn: Any, schemas: list[str]) -> None:
    """Bench-only, on this run's throwaway shard: the fence as it was before tenant roles
    (fleet.enter_tenant's own text minus the switch), and the app role's rights of then on
    the bench tenants' schemas and public, for the host_noswitch rounds."""
    from router.keys import APP_ROLE

    body: str = await conn.fetchval("SELECT pg_get_functiondef('fleet.enter_tenant(uuid, bigint, int)'::regprocedure)")
    assert body.count(_SWITCH) == 1 and body.count("fleet.enter_tenant(") == 1, "the fence changed: update the bench"
    await conn.execute(body.replace(_SWITCH, "NULL::text").replace("fleet.enter_tenant(", _UNSWITCHED_FENCE + "("))
    # bench-only DDL, names passed as values and quoted by the server (format %I)
    await conn.execute("SELECT set_config('tf.bench_app', $1, false), set_config('tf.bench_schemas', $2, false)",
                       APP_ROLE, ",".join(schemas))
    await conn.execute("""
        DO $$
        DECLARE
          app text := current_setting('tf.bench_app');
          s text;
        BEGIN
          EXECUTE format('GRANT EXECUTE ON FUNCTION fleet.bench_enter_tenant_unswitched(uuid, bigint, int) TO %I', app);
          EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA public TO %I', app);
          FOREACH s IN ARRAY string_to_array(current_setting('tf.bench_schemas'), ',') LOOP
            EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, app);
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO %I', s, app);
            EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO %I', s, app);
          END LOOP;
        END $$""")


def _unswitched_tx_class() -> Any:
    """A TenantTx subclass whose fence doesn't switch roles (bench-only, see above)."""
    import functools

    from host.tx import TenantTx, enter_sql
    from router.models import TenantRecord

    @functools.lru_cache(maxsize=65536)  # as the product's: one text per (tenant, epoch)
    def statement(rec: TenantRecord, wait_ms: int) -> str:
        return enter_sql(rec, wait_ms).replace("fleet.enter_tenant(", _UNSWITCHED_FENCE + "(")

    class UnswitchedTenantTx(TenantTx):
        def _enter_statement(self, rec: TenantRecord) -> str:
            return statement(rec, self._settings.fence_wait_ms)

    return UnswitchedTenantTx


def _uncleaned_tx_class() -> Any:
    """A TenantTx subclass that ends transactions with a bare COMMIT (bench-only: no session clean-up)."""
    from asyncpg.pool import PoolConnectionProxy

    from host.tx import TenantTx

    class UncleanedTenantTx(TenantTx):
        async def _commit_statement(self, conn: PoolConnectionProxy) -> str:
            return "COMMIT"

    return UncleanedTenantTx


async def _tx_micro(control_dsn: str, redis_url: str, calls: int = 500, batches: int = 8) -> dict[str, float]:
    """with_tenant_tx sequentially (one 10-row read), variants taking turns call by call,
    median microseconds per call: as the owner with asyncpg's statement cache on and off; as the app role (the
    host's way) with the per-tenant role switch and without (the bench-only fence), and
    without the session clean-up (role_switch_on is the host's own way: with it)."""
    from contextlib import AsyncExitStack

    from host.metrics import HostMetrics
    from host.tx import TenantTx, keep_connection
    from router.client import ResolveClient
    from router.directory import Directory
    from router.keys import APP_ROLE
    from router.pools import ShardPools, create_pool
    from router.settings import Settings

    settings = Settings.load(environ={}, control_dsn=control_dsn, redis_url=redis_url)
    out: dict[str, float] = {}
    async with AsyncExitStack() as stack:
        control = await create_pool(control_dsn, settings, min_size=1, max_size=2)
        stack.push_async_callback(control.close)
        directory = Directory(control, ShardPools(settings, lambda s: asyncio.sleep(0, None)), settings)
        resolver = await stack.enter_async_context(ResolveClient(settings, directory.lookup))
        tenant_ids = [r["tenant_id"] for r in await control.fetch("SELECT tenant_id::text FROM tenants LIMIT 20")]
        txs: dict[str, TenantTx] = {}
        for label, extra in (("statement_cache_on", {}), ("statement_cache_off", {"statement_cache_size": 0})):
            pools = await stack.enter_async_context(
                ShardPools(settings, directory.dsn_of, reset=keep_connection, **extra))
            txs[label] = await stack.enter_async_context(TenantTx(settings, resolver, pools, HostMetrics()))
        # as the host: logged in as the shard's login role, switched to the app role
        for label, cls in (("role_switch_on", TenantTx), ("role_switch_off", _unswitched_tx_class()),
                           ("cleanup_off", _uncleaned_tx_class())):
            pools = await stack.enter_async_context(
                ShardPools(settings, directory.login_dsn_of, role=APP_ROLE, reset=keep_connection))
            txs[label] = await stack.enter_async_context(cls(settings, resolver, pools, HostMetrics()))

        async def read(conn: Any) -> Any:
            return await conn.fetch("SELECT id, sku, qty FROM items ORDER BY id LIMIT 10")
        samples: dict[str, list[float]] = {label: [] for label in txs}
        labels = list(txs)
        # The variants take turns call by call (the order rotating) and each call is timed
        # alone, so a neighbour's load falls on all of them alike; the median per variant.
        for i in range(calls * (batches + 1)):
            k = i % len(labels)
            for label in labels[k:] + labels[:k]:
                started = time.perf_counter()
                await txs[label].run(tenant_ids[i % len(tenant_ids)], read)
                if i >= calls:  # the first calls warm pools and caches
                    samples[label].append((time.perf_counter() - started) * 1e6)
        out = {label: statistics.median(v) for label, v in samples.items()}
    return out


def _serve_host(args: argparse.Namespace) -> None:
    """Child process: run the host (optionally under pyinstrument) until SIGTERM; with
    ``--unswitched``, with the fence of before tenant roles, with ``--uncleaned`` without the
    session clean-up (bench-only, on its own object)."""
    from host.app import run, serving
    from host.logs import json_logging
    from host.runtime import RUNTIME
    from router.settings import Settings

    settings = Settings.load(environ={}, control_dsn=args.control_dsn, redis_url=args.redis_url, admin_key="bench",
                             shard_pool_min=8, shard_pool_max=8, host_port=args.port)
    profiler = None
    if args.profile_out:
        from pyinstrument import Profiler
        profiler = Profiler(interval=0.0005, async_mode="disabled")

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with serving(settings) as (app, _):
            rt = app[RUNTIME]
            variant = _unswitched_tx_class() if args.unswitched else _uncleaned_tx_class() if args.uncleaned else None
            if variant is not None:
                plain, rt.tx = rt.tx, variant(rt.settings, rt.resolver, rt.shard_pools, rt.metrics)
                await plain.close()
            try:
                if profiler is not None:
                    profiler.start()
                await stop.wait()
            finally:
                if variant is not None:
                    await rt.tx.close()  # before the pools close
    name = "host_noswitch" if args.unswitched else "host_noclean" if args.uncleaned else "host"
    with open(RESULTS / f"{name}.log", "w") as log_file, \
            json_logging(args.host_log_level, log_file):
        run(main())  # on uvloop when installed, as `tenantfleet serve` (the yardstick does the same)
    if profiler is not None:
        profiler.stop()
        Path(args.profile_out).write_text(profiler.output_text(unicode=False, color=False, show_all=True))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--targets", default="all",
                   help="comma-separated, from: host, host_noswitch, host_noclean, bare4, bare3, bare1 (default: all; "
                        "host is always run). E.g. --targets host,host_noclean --rounds 12 for the clean-up's A/B alone")
    p.add_argument("--host-log-level", default="INFO",
                   help="the host's log level (WARNING drops the access line: shows what it costs)")
    p.add_argument("--serve-host", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--control-dsn", help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    p.add_argument("--unswitched", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--uncleaned", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.serve_host:
        _serve_host(args)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install -y wrk)")

    from host.fleet.embedded import EmbeddedFleet, free_port

    root = Path(tempfile.mkdtemp(prefix="tenantfleet-bench-"))
    root.chmod(0o755)
    fleet = EmbeddedFleet(root, shards=1, tuned_for_tests=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        info = fleet.start()
        shard_dsn = info.shard_dsns["shard1"]
        pairs = asyncio.run(_prepare(info.control_dsn, shard_dsn, info.redis_url))
        host_lua = RESULTS / "host_tenants.lua"
        entries = ",\n".join(f'  {{"{c}", "{k}"}}' for c, k in pairs)
        host_lua.write_text(
            "local tenants = {\n" + entries + "\n}\n"
            "request = function()\n  local t = tenants[math.random(1, #tenants)]\n"
            '  return wrk.format("GET", "/api/plugins/inventory/items?limit=10", '
            '{["X-Tenant"] = t[1], ["Authorization"] = "Bearer " .. t[2]})\nend\n')
        ports = {name: free_port() for name in ("host", "host_noswitch", "host_noclean", "bare4", "bare3", "bare1")}

        def start_host(profile_out: str | None = None, unswitched: bool = False,
                       uncleaned: bool = False) -> subprocess.Popen[bytes]:
            name = "host_noswitch" if unswitched else "host_noclean" if uncleaned else "host"
            cmd = [PY, __file__, "--serve-host", "--control-dsn", info.control_dsn, "--redis-url", info.redis_url,
                   "--port", str(ports[name]), "--host-log-level", args.host_log_level]
            if profile_out:
                cmd += ["--profile-out", profile_out]
            if unswitched:
                cmd += ["--unswitched"]
            if uncleaned:
                cmd += ["--uncleaned"]
            proc = subprocess.Popen(cmd, cwd=ROOT)
            _wait_port(ports[name])
            return proc

        procs.append(start_host())
        procs.append(start_host(unswitched=True))
        procs.append(start_host(uncleaned=True))
        for rt in (4, 3, 1):
            procs.append(subprocess.Popen([PY, str(SHARED / "bare_tenant_server.py"), "--dsn", shard_dsn,
                                           "--roundtrips", str(rt), "--port", str(ports[f"bare{rt}"]),
                                           "--pool-size", "8"], stdout=subprocess.DEVNULL))
            _wait_port(ports[f"bare{rt}"])
        targets = {"host": (ports["host"], host_lua), "host_noswitch": (ports["host_noswitch"], host_lua),
                   "host_noclean": (ports["host_noclean"], host_lua),
                   **{f"bare{n}": (ports[f"bare{n}"], SHARED / "random_tenant.lua") for n in (4, 3, 1)}}
        if args.targets != "all":
            chosen = {"host", *args.targets.split(",")}
            targets = {n: t for n, t in targets.items() if n in chosen}
        pids = {"host": procs[0].pid, "host_noswitch": procs[1].pid, "host_noclean": procs[2].pid,
                "bare4": procs[3].pid, "bare3": procs[4].pid, "bare1": procs[5].pid}
        postmaster = asyncio.run(_postmaster_pid(shard_dsn))
        for name, (port, script) in targets.items():  # warm-up: pools, caches, prepared statements
            _wrk(f"http://127.0.0.1:{port}", script, 2)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for r in range(args.rounds):
            hosts = [n for n in targets if n.startswith("host")]
            if r % 2:  # host after its variants every other round: neither side of an A/B always goes first
                hosts = [*hosts[1:], hosts[0]]
            order = [*hosts, *(n for n in targets if n not in hosts)]
            for name in order:
                port, script = targets[name]
                cpu, pg_cpu = _cpu_s(pids[name]), _postgres_cpu_s(postmaster)
                res = _wrk(f"http://127.0.0.1:{port}", script, args.duration)
                served = res["rps"] * args.duration
                # CPU per request: robust to noisy neighbours, unlike req/s. The three
                # processes share the machine's cores: the server, PostgreSQL (only this
                # target's connections are busy during its round), and wrk itself.
                res["cpu_us_per_req"] = (_cpu_s(pids[name]) - cpu) / served * 1e6
                res["pg_cpu_us_per_req"] = (_postgres_cpu_s(postmaster) - pg_cpu) / served * 1e6
                res["wrk_cpu_us_per_req"] = res.pop("wrk_cpu_s") / served * 1e6
                runs[name].append(res)
                print(f"round {r + 1} {name:13s} {res['rps']:9.0f} req/s  p99 {res['p99_ms']:7.2f} ms"
                      f"  CPU us/req: server {res['cpu_us_per_req']:4.0f} postgres {res['pg_cpu_us_per_req']:4.0f}"
                      f" wrk {res['wrk_cpu_us_per_req']:3.0f}  non-2xx {res['non2xx']:.0f}", flush=True)
        med = {n: {k: statistics.median(x[k] for x in v)
                   for k in ("rps", "p99_ms", "cpu_us_per_req", "pg_cpu_us_per_req", "wrk_cpu_us_per_req")}
               for n, v in runs.items()}
        others = [b for b in runs if b != "host"]
        ratios = {f"host/{b}": {"rps": med["host"]["rps"] / med[b]["rps"], "p99": med["host"]["p99_ms"] / med[b]["p99_ms"]}
                  for b in others}
        cpu_keys = ("cpu_us_per_req", "pg_cpu_us_per_req", "wrk_cpu_us_per_req")
        for b in (b for b in others if b.startswith("host_")):
            ratios[f"host/{b}"]["cpu"] = sum(med["host"][k] for k in cpu_keys) / sum(med[b][k] for k in cpu_keys)
            # the same ratios round by round (the two ran seconds apart), then their median:
            # steadier than a ratio of medians when neighbours' load swings between rounds
            side_by_side = list(zip(runs["host"], runs[b]))
            ratios[f"host/{b}"]["rps_paired"] = statistics.median(h["rps"] / v["rps"] for h, v in side_by_side)
            ratios[f"host/{b}"]["cpu_paired"] = statistics.median(
                sum(h[k] for k in cpu_keys) / sum(v[k] for k in cpu_keys) for h, v in side_by_side)
        micro = asyncio.run(_tx_micro(info.control_dsn, info.redis_url))
        result: dict[str, Any] = {"medians": med, "ratios": ratios, "rounds": runs, "tx_micro_us": micro,
                                  "duration_s": args.duration, "wrk": "-t1 -c32", "tenants": TENANTS}
        print("\nmedians:")
        for n, m in med.items():
            print(f"  {n:13s} {m['rps']:9.0f} req/s  p99 {m['p99_ms']:7.2f} ms  CPU us/req: server"
                  f" {m['cpu_us_per_req']:4.0f} postgres {m['pg_cpu_us_per_req']:4.0f} wrk {m['wrk_cpu_us_per_req']:3.0f}")
        print("ratios (host / yardstick): " + ", ".join(
            f"{k}: {v['rps']:.2f}x throughput, {v['p99']:.2f}x p99" for k, v in ratios.items()))
        for b, what in (("host_noswitch", "per-tenant role switch"), ("host_noclean", "session clean-up")):
            if f"host/{b}" in ratios:
                v = ratios[f"host/{b}"]
                print(f"{what}, with/without: {v['rps']:.3f}x throughput, {v['p99']:.2f}x p99, {v['cpu']:.3f}x CPU per "
                      f"request (server + PostgreSQL + wrk); round by round, median: {v['rps_paired']:.3f}x throughput, "
                      f"{v['cpu_paired']:.3f}x CPU per request")
        print("with_tenant_tx sequential, us/call: " + ", ".join(f"{k} {v:.0f}" for k, v in micro.items())
              + f"; role switch on/off {micro['role_switch_on'] / micro['role_switch_off']:.3f}x"
              + f"; clean-up on/off {micro['role_switch_on'] / micro['cleanup_off']:.3f}x")
        if args.profile:
            procs[0].send_signal(signal.SIGTERM)
            procs[0].wait(30)
            out = RESULTS / "request_path_profile.txt"
            procs[0] = start_host(str(out))
            _wrk(f"http://127.0.0.1:{ports['host']}", host_lua, args.duration)
            procs[0].send_signal(signal.SIGTERM)
            procs[0].wait(60)
            result["profile"] = str(out)
            print(f"profile: {out}")
        (RESULTS / "request_path.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {RESULTS / 'request_path.json'}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        fleet.reset()


if __name__ == "__main__":
    main()
