"""Resolve benchmark: the two-level cache over many tenants with a Zipf key mix.

Registers ``--tenants`` tenants in a control plane (bulk COPY into ``tenants`` and
``tenant_domains``, the columns the Directory writes; resolve needs no shard schemas),
then, for ``--rounds`` rounds of ``--seconds`` per measurement, resolves by code with a
Zipf-distributed key mix and measures:

  dict         a bare ``table[code]`` (the floor), in the same loop shape as the others
  cache.get    TenantCache.get, the in-process level on its own
  memory hit   ``await client.resolve(code=...)`` answered in-process
  redis hit    the same with the in-process level emptied before each call (one in flight)
  miss         both levels emptied before each call: Redis, control plane, write-through

Latency percentiles are per call (they include tens of ns of timer overhead, shown as
the empty loop's p50/p99); throughput for dict/cache.get/memory hit comes from untimed batches,
for redis hit and miss from the sequential per-call timings. Medians over rounds are
printed and written to bench/results/resolve.json, with memory per 10,000 cached
tenants and per cached tenant over every tenant up to 100,000 (tracemalloc) and Redis bytes per cached tenant (MEMORY USAGE of 5,000 tenants'
keys, in the client's layout and in the one before issue 12; under the default
namespace "tf" on the bench's own Valkey).

Runs against an embedded fleet in a temp dir unless TENANTFLEET_CONTROL_DSN (and
TENANTFLEET_REDIS_URL) are set; then it adds its rows under a throwaway shard id and a
throwaway Redis namespace, and removes them at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import itertools
import random
import statistics
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import asyncpg  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from bench.common import (  # noqa: E402
    RESULTS_DIR, fleet_target, latency_summary, machine, median_of, print_table, write_results,
)
from router.cache import TenantCache  # noqa: E402
from router.client import ResolveClient, redis_address  # noqa: E402
from router.keys import redis_alias_key, redis_tenant_key  # noqa: E402
from router.models import TenantRecord  # noqa: E402
from router.redis_format import decode_record, encode_record  # noqa: E402
from router.runtime import open_runtime  # noqa: E402
from router.settings import Settings  # noqa: E402

BATCH = 10_000
SAMPLE = 200_000
MAX_SAMPLES = 200_000
SLOW_BATCH = 50
REDIS_SAMPLE = 5_000  # tenants whose Redis keys are measured (MEMORY USAGE, exact: SAMPLES 0)  # calls of ~0.1-1 ms between deadline checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/resolve.py",
        description="Benchmark tenant resolve (in-process hit, Redis hit, miss) over many tenants with a Zipf "
                    "key mix, against a bare dict lookup in the same run. Starts its own embedded fleet unless "
                    "TENANTFLEET_CONTROL_DSN is set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tenants", type=int, default=100_000, help="tenants registered in the directory")
    p.add_argument("--rounds", type=int, default=5, help="rounds of every measurement; medians are reported")
    p.add_argument("--seconds", type=float, default=2.0, help="time budget of each measurement in each round")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s of the key mix (weight of rank k is 1/k^s)")
    p.add_argument("--seed", type=int, default=20261125, help="random seed of the key mix")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "resolve.json", help="JSON results file")
    args = p.parse_args(argv)
    if args.tenants < 10_000 or args.rounds < 1 or args.seconds <= 0:
        p.error("need --tenants >= 10000, --rounds >= 1 and --seconds > 0")
    return args


def make_records(n: int, shard_id: str, tag: str) -> list[TenantRecord]:
    out = []
    for i in range(n):
        tid = uuid.uuid4()
        code = f"b{tag}-{i:06d}"
        out.append(TenantRecord(tenant_id=str(tid), code=code, schema="t_" + tid.hex, shard_id=shard_id,
                                state="active", epoch=1, domains=(f"{code}.bench.example",)))
    return out


def zipf_keys(records: list[TenantRecord], s: float, k: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)  # rank -> tenant: hot tenants are spread over the key space
    cum = list(itertools.accumulate(1.0 / (r ** s) for r in range(1, len(records) + 1)))
    ranks = rng.choices(range(len(records)), cum_weights=cum, k=k)
    return [records[order[r]].code for r in ranks]


async def register(control: asyncpg.Pool, records: list[TenantRecord], shard_id: str) -> None:
    async with control.acquire() as conn, conn.transaction():
        # a shard row for the foreign key; offline, so placement never picks it
        await conn.execute("INSERT INTO shards (shard_id, dsn, state) VALUES ($1, $2, 'offline')",
                           shard_id, "postgresql://bench.invalid/none")
        await conn.copy_records_to_table(
            "tenants", columns=["tenant_id", "code", "schema_name", "shard_id", "state", "epoch"],
            records=[(uuid.UUID(r.tenant_id), r.code, r.schema, r.shard_id, r.state, r.epoch) for r in records])
        await conn.copy_records_to_table(
            "tenant_domains", columns=["domain", "tenant_id"],
            records=[(d, uuid.UUID(r.tenant_id)) for r in records for d in r.domains])
        await conn.execute("ANALYZE tenants")
        await conn.execute("ANALYZE tenant_domains")


async def unregister(control: asyncpg.Pool, shard_id: str) -> None:
    await control.execute("DELETE FROM tenants WHERE shard_id = $1", shard_id)  # domains cascade
    await control.execute("DELETE FROM shards WHERE shard_id = $1", shard_id)


def redis_of(settings: Settings) -> aioredis.Redis:
    return aioredis.Redis(**redis_address(settings.redis_url))


def redis_keys(ns: str, rec: TenantRecord) -> list[str | bytes]:
    return [redis_tenant_key(ns, rec.tenant_id), redis_alias_key(ns, "code", rec.code),
            *(redis_alias_key(ns, "domain", d) for d in rec.domains)]


async def fill_redis(redis: aioredis.Redis, settings: Settings, records: list[TenantRecord]) -> None:
    """Warm the Redis level for every tenant, in the layout the client writes."""
    ns, ttl = settings.redis_namespace, settings.redis_ttl_s
    for start in range(0, len(records), 2000):
        async with redis.pipeline(transaction=False) as pipe:
            for rec in records[start:start + 2000]:
                rkey, *aliases = redis_keys(ns, rec)
                pipe.set(rkey, encode_record(rec), ex=ttl)
                for a in aliases:
                    pipe.set(a, uuid.UUID(rec.tenant_id).bytes, ex=ttl)
            await pipe.execute()


async def redis_bytes_per_tenant(redis: aioredis.Redis, ns: str, sample: list[TenantRecord]) -> dict[str, Any]:
    """Redis MEMORY USAGE per tenant of ``sample`` written under namespace ``ns`` as the
    client writes it (record and alias keys), and in the layout before issue 12 (JSON
    records with field names, 36-character ids in keys and alias values) under ``ns``-v1:
    both written, measured and removed here, in the same run."""
    async def usage(keys: list[str | bytes]) -> int:
        async with redis.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.memory_usage(k, samples=0)
            return sum(int(v or 0) for v in await pipe.execute())

    old_ns = ns + "-v1"
    new_keys: list[str | bytes] = []
    old_keys: list[str | bytes] = []
    async with redis.pipeline(transaction=False) as pipe:
        for r in sample:
            keys = redis_keys(ns, r)
            pipe.set(keys[0], encode_record(r), ex=300)
            for k in keys[1:]:
                pipe.set(k, uuid.UUID(r.tenant_id).bytes, ex=300)
            new_keys += keys
            legacy = {"tenant_id": r.tenant_id, "code": r.code, "schema": r.schema, "shard_id": r.shard_id,
                      "state": r.state, "epoch": r.epoch, "domains": list(r.domains)}
            keys = [f"{old_ns}:t:{r.tenant_id}", f"{old_ns}:a:code:{r.code}",
                    *(f"{old_ns}:a:domain:{d}" for d in r.domains)]
            pipe.set(keys[0], json.dumps(legacy, separators=(",", ":")), ex=300)
            for k in keys[1:]:
                pipe.set(k, r.tenant_id, ex=300)
            old_keys += keys
        await pipe.execute()
    try:
        now, before = await usage(new_keys), await usage(old_keys)
    finally:
        for start in range(0, len(new_keys), 5000):
            await redis.delete(*new_keys[start:start + 5000], *old_keys[start:start + 5000])
    return {"sample": len(sample), "namespace": ns, "bytes_per_tenant": now / len(sample),
            "before_issue12_bytes_per_tenant": before / len(sample)}


async def drop_namespace(redis: aioredis.Redis, ns: str) -> None:
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{ns}:*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            await redis.delete(*batch)
            batch.clear()
    if batch:
        await redis.delete(*batch)


# --- measurements ---------------------------------------------------------------------------
def batches(keys: list[str], size: int = BATCH) -> itertools.cycle[list[str]]:
    return itertools.cycle([keys[i:i + size] for i in range(0, len(keys), size)])


Chunk = Callable[[list[str]], Awaitable[None]]
TimedChunk = Callable[[list[str], list[int]], Awaitable[None]]


async def throughput(chunk: Chunk, keys: list[str], seconds: float) -> float:
    """Calls per second over untimed batches of keys, for ``seconds``."""
    n = 0
    started = time.perf_counter()
    deadline = started + seconds
    for keys_chunk in batches(keys):
        await chunk(keys_chunk)
        n += len(keys_chunk)
        if time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - started)


async def latencies(chunk: TimedChunk, keys: list[str], seconds: float, *, size: int = BATCH) -> list[int]:
    """Per-call nanoseconds, appended by ``chunk`` for each key, for ``seconds`` or
    MAX_SAMPLES calls, whichever comes first (sorting millions of samples of a 50 ns call
    would take longer than measuring them)."""
    out: list[int] = []
    deadline = time.perf_counter() + seconds
    for keys_chunk in batches(keys, size):
        await chunk(keys_chunk, out)
        if time.perf_counter() >= deadline or len(out) >= MAX_SAMPLES:
            break
    return out


async def one_round(client: ResolveClient, redis: aioredis.Redis, records: list[TenantRecord],
                    by_code: dict[str, TenantRecord], keys: list[str], seconds: float) -> dict[str, Any]:
    """Every measurement once. Each loop is written out inline (no helper call per key)
    so a row costs only what it names."""
    ns = client.settings.redis_namespace
    half = seconds / 2
    clock = time.perf_counter_ns
    table = {r.code: r for r in records}  # the bare dict the in-process hit is compared with
    for r in records:
        client.cache.put(r)
    get = client.cache.get
    resolve = client.resolve

    async def timer_floor(ks: list[str]) -> None:
        for k in ks:
            pass

    async def timer_floor_t(ks: list[str], out: list[int]) -> None:
        for k in ks:
            t0 = clock()
            out.append(clock() - t0)

    async def dict_lookup(ks: list[str]) -> None:
        for k in ks:
            table[k]

    async def dict_lookup_t(ks: list[str], out: list[int]) -> None:
        for k in ks:
            t0 = clock()
            table[k]
            out.append(clock() - t0)

    async def cache_get(ks: list[str]) -> None:
        for k in ks:
            get("code", k)

    async def cache_get_t(ks: list[str], out: list[int]) -> None:
        for k in ks:
            t0 = clock()
            get("code", k)
            out.append(clock() - t0)

    async def memory_hit(ks: list[str]) -> None:
        for k in ks:
            await resolve(code=k)

    async def memory_hit_t(ks: list[str], out: list[int]) -> None:
        for k in ks:
            t0 = clock()
            await resolve(code=k)
            out.append(clock() - t0)

    async def redis_hit_t(ks: list[str], out: list[int]) -> None:
        for k in ks:
            client.clear_local()
            t0 = clock()
            await resolve(code=k)
            out.append(clock() - t0)

    emptied: set[str] = set()

    async def miss_t(ks: list[str], out: list[int]) -> None:
        for k in ks:
            emptied.add(k)
            client.clear_local()
            await redis.delete(*redis_keys(ns, by_code[k]))
            t0 = clock()
            await resolve(code=k)
            out.append(clock() - t0)

    result: dict[str, Any] = {}
    memory_before = client.stats.memory
    for name, chunk, timed in (("loop_floor", timer_floor, timer_floor_t), ("dict", dict_lookup, dict_lookup_t),
                               ("cache_get", cache_get, cache_get_t), ("memory_hit", memory_hit, memory_hit_t)):
        ops = await throughput(chunk, keys, half)
        lat = await latencies(timed, keys, half)
        result[name] = {"ops_per_s": ops, "ns_per_op": 1e9 / ops, **latency_summary(lat)}
    assert client.stats.memory > memory_before, "the in-process hits were not answered in-process"

    redis_before = client.stats.redis
    lat = await latencies(redis_hit_t, keys, seconds, size=SLOW_BATCH)
    assert client.stats.redis - redis_before == len(lat), "a redis-hit call was not answered by Redis"
    result["redis_hit"] = {"ops_per_s": len(lat) / (sum(lat) / 1e9), **latency_summary(lat)}

    control_before = client.stats.control
    lat = await latencies(miss_t, keys, seconds, size=SLOW_BATCH)
    assert client.stats.control - control_before == len(lat), "a miss was answered by a cache"
    result["miss"] = {"ops_per_s": len(lat) / (sum(lat) / 1e9), **latency_summary(lat)}
    # put back what the misses deleted (they wrote through, but only after the delete)
    await fill_redis(redis, client.settings, [by_code[k] for k in emptied])
    return result


def memory_per_10k(records: list[TenantRecord]) -> dict[str, Any]:
    """Bytes held by a TenantCache of 10,000 tenants: structures only, and with the records
    (decoded from their Redis form, as the client holds them)."""
    # records no cache has held (a held one is copied on put, and the copy would count)
    sample = [r.replace() for r in records[:10_000]]
    payloads = [(r.tenant_id, encode_record(r)) for r in sample]
    gc.collect()
    tracemalloc.start()
    cache = TenantCache(len(sample), 3600, 5)
    for r in sample:
        cache.put(r)
    structures = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del cache
    gc.collect()
    tracemalloc.start()
    cache = TenantCache(len(sample), 3600, 5)
    for tid, p in payloads:
        cache.put(decode_record(tid, p))
    with_records = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"structures_bytes": structures, "with_records_bytes": with_records,
            "with_records_bytes_per_tenant": with_records / len(sample)}


def memory_per_cached_tenant(records: list[TenantRecord]) -> dict[str, Any]:
    """Bytes per tenant held by a TenantCache of every benchmark tenant (up to 100,000),
    everything it keeps alive counted: records decoded from their Redis value with the
    16-byte id, as the client decodes them, so each id string is the cache's too (the
    10,000-tenant figure reuses the benchmark's id strings and leaves them out)."""
    sample = records[:100_000]
    payloads = [(uuid.UUID(r.tenant_id).bytes, encode_record(r)) for r in sample]
    gc.collect()
    tracemalloc.start()
    cache = TenantCache(len(sample), 3600, 5)
    for tid, p in payloads:
        cache.put(decode_record(tid, p))
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"tenants": len(sample), "bytes": held, "bytes_per_tenant": held / len(sample)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    shard_id = f"bench-{tag}"
    # The in-process TTL is raised so the warmed entries outlive the run; everything
    # else is the ordinary configuration.
    overrides = {"cache_size": args.tenants, "cache_ttl_s": 3600.0, "redis_namespace": f"tfbench{tag}"}
    t0 = time.perf_counter()
    async with fleet_target(**overrides) as target:
        settings = target.settings
        print(f"fleet: {'embedded' if target.embedded else 'external'} ({time.perf_counter() - t0:.1f}s)", flush=True)
        records = make_records(args.tenants, shard_id, tag)
        # resolve reads the control plane only; the runtime's shard pools are never opened
        async with open_runtime(settings) as rt:
            t1 = time.perf_counter()
            await register(rt.control, records, shard_id)
            print(f"registered {len(records):,} tenants in {time.perf_counter() - t1:.1f}s", flush=True)
            by_code = {r.code: r for r in records}
            keys = zipf_keys(records, args.zipf, SAMPLE, args.seed)
            redis = redis_of(settings)
            try:
                await fill_redis(redis, settings, records)
                rounds = []
                async with ResolveClient(settings, rt.directory.lookup) as client:
                    for i in range(args.rounds):
                        started = time.perf_counter()
                        r = await one_round(client, redis, records, by_code, keys, args.seconds)
                        rounds.append(r)
                        print(f"round {i + 1}/{args.rounds} ({time.perf_counter() - started:.0f}s): memory hit {r['memory_hit']['ns_per_op']:.0f} ns/op, "
                              f"dict {r['dict']['ns_per_op']:.0f} ns/op, redis p50 {r['redis_hit']['p50_us']:.0f} us, "
                              f"miss p50 {r['miss']['p50_us']:.0f} us", flush=True)
                memory = memory_per_10k(records)
                memory["all"] = memory_per_cached_tenant(records)
                # the default namespace ("tf") on a Valkey of our own; on shared servers, ours
                size_ns = "tf" if target.embedded else settings.redis_namespace
                memory["redis"] = await redis_bytes_per_tenant(redis, size_ns, records[:REDIS_SAMPLE])
            finally:
                await drop_namespace(redis, settings.redis_namespace)
                await redis.aclose()
                if not target.embedded:
                    await unregister(rt.control, shard_id)
    return report(args, rounds, memory, len(set(keys)))


def report(args: argparse.Namespace, rounds: list[dict[str, Any]], memory: dict[str, Any],
           distinct: int) -> dict[str, Any]:
    names = ["loop_floor", "dict", "cache_get", "memory_hit", "redis_hit", "miss"]
    med = {n: {f: median_of(rounds, n, f) for f in ("ops_per_s", "p50_us", "p99_us")} for n in names}
    ns = {n: 1e9 / med[n]["ops_per_s"] for n in names}
    # Ratios are taken within each round (the two figures were measured seconds apart)
    # and then their median: on a shared machine a whole round can run slow.
    def ratio(top: str, bottom: str) -> float:
        return statistics.median(float(r[bottom]["ops_per_s"]) / float(r[top]["ops_per_s"]) for r in rounds)

    ratios = {"memory_hit_over_dict": ratio("memory_hit", "dict"), "cache_get_over_dict": ratio("cache_get", "dict"),
              "redis_hit_over_memory_hit": ratio("redis_hit", "memory_hit"), "miss_over_redis_hit": ratio("miss", "redis_hit")}
    labels = {"loop_floor": "empty loop (p50/p99: timer floor)", "dict": "bare dict d[k]",
              "cache_get": "cache.get (in-process level)", "memory_hit": "resolve: in-process hit",
              "redis_hit": "resolve: Redis hit (sequential)", "miss": "resolve: miss (sequential)"}
    rows = [[labels[n], med[n]["ops_per_s"], ns[n], med[n]["p50_us"] * 1000, med[n]["p99_us"] * 1000] for n in names]
    print()
    print_table(f"resolve by code over {args.tenants:,} tenants, Zipf s={args.zipf} ({distinct:,} distinct keys "
                f"in the mix), medians of {args.rounds} rounds x {args.seconds}s",
                ["measure", "ops/s", "ns/op", "p50 ns", "p99 ns"], rows)
    print(f"in-process hit / bare dict lookup: {ratios['memory_hit_over_dict']:.1f}x "
          f"(cache.get alone / dict: {ratios['cache_get_over_dict']:.1f}x; aim: within 10x; median of per-round ratios)")
    print(f"memory per 10,000 cached tenants: {memory['with_records_bytes'] / 1e6:.2f} MB with records "
          f"({memory['with_records_bytes_per_tenant']:.0f} B/tenant), "
          f"{memory['structures_bytes'] / 1e6:.2f} MB of cache structures alone")
    whole = memory["all"]
    print(f"in-process per cached tenant over {whole['tenants']:,} tenants (ids decoded from 16 bytes, id strings "
          f"included): {whole['bytes_per_tenant']:.0f} B (aim: at most 300)")
    red = memory["redis"]
    print(f"Redis per cached tenant (MEMORY USAGE of its record and alias keys, {red['sample']:,} tenants, "
          f"namespace {red['namespace']!r}): "
          f"{red['bytes_per_tenant']:.0f} B (aim: at most 300), the layout before issue 12 "
          f"{red['before_issue12_bytes_per_tenant']:.0f} B in the same run")
    return {"config": {"tenants": args.tenants, "rounds": args.rounds, "seconds": args.seconds, "zipf_s": args.zipf,
                       "seed": args.seed, "sample_keys": SAMPLE, "distinct_keys": distinct, "resolve_by": "code"},
            "machine": machine(), "median": med, "ns_per_op": ns, "ratios": ratios, "memory_per_10k": memory,
            "rounds": rounds}


if __name__ == "__main__":
    arguments = parse_args()
    data = asyncio.run(main(arguments))
    path = write_results("resolve", data, arguments.out)
    print(f"wrote {path}")
