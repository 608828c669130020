"""The in-process resolve cache against another revision of itself, in one process.

Loads ``router/models.py`` and ``router/cache.py`` as they are at ``--base`` (a git
revision, default ``main``) beside the working tree's, fills a cache of each with the
same ``--tenants`` tenants (decoded from their Redis value, as the client holds them)
and, round after round, times ``cache.get("code", k)`` of both and a bare ``dict[k]``
over the same Zipf key mix, interleaved (A, B, dict; then B, A, dict; ...) so a load
change on a shared machine hits both sides alike. Prints medians of per-round ns/op and
of the per-round ratios, and the bytes per cached tenant of both (tracemalloc, the
methods bench/resolve.py prints). No fleet, no I/O.

    .venv/bin/python bench/cache_ab.py [--base main] [--tenants 100000] [--rounds 15]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import ROOT  # noqa: E402
import router.cache as new_cache  # noqa: E402
import router.models as new_models  # noqa: E402
import router.redis_format as new_format  # noqa: E402


def load_revision(rev: str, tmp: Path) -> tuple[ModuleType, ModuleType, ModuleType]:
    """models, cache and redis_format at ``rev``, as modules of their own."""
    mods = []
    for name in ("models", "cache", "redis_format"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:router/{name}.py"], check=True,
                             capture_output=True, text=True).stdout
        src = src.replace("from router.models import", "from ab_base_models import")
        path = tmp / f"ab_base_{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"ab_base_{name}", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods[0], mods[1], mods[2]


def payloads(n: int, shard_id: str) -> list[tuple[bytes, bytes, str]]:
    """Tenants named as bench/resolve.py names them (a 14-character code, one domain)."""
    tag = uuid.uuid4().hex[:6]
    out = []
    for i in range(n):
        tid = uuid.uuid4()
        code = f"b{tag}-{i:06d}"
        rec = new_models.TenantRecord(str(tid), code, "t_" + tid.hex, shard_id, "active", 1,
                                      (f"{code}.bench.example",))
        out.append((tid.bytes, new_format.encode_record(rec), code))
    return out


def zipf_keys(codes: list[str], s: float, k: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    order = list(range(len(codes)))
    rng.shuffle(order)
    cum = list(itertools.accumulate(1.0 / (r ** s) for r in range(1, len(codes) + 1)))
    return [codes[order[r]] for r in rng.choices(range(len(codes)), cum_weights=cum, k=k)]


def fill(cache_mod: ModuleType, fmt: ModuleType, data: list[tuple[bytes, bytes, str]]) -> Any:
    cache = cache_mod.TenantCache(len(data), 3600.0, 5.0)
    for tid, raw, _ in data:
        assert cache.put(fmt.decode_record(tid, raw))
    return cache


def bytes_per_tenant(cache_mod: ModuleType, fmt: ModuleType, data: list[tuple[bytes, bytes, str]],
                     *, ids_counted: bool) -> float:
    """tracemalloc bytes per tenant of a cache of ``data``: with the id strings decoded
    from 16 bytes (counted), or with ids made before counting (bench/resolve.py's
    "memory per 10,000")."""
    ids: list[str | bytes] = [tid if ids_counted else str(uuid.UUID(bytes=tid)) for tid, _, _ in data]
    fmt.decode_record(data[0][0], data[0][1])  # interning of shard id and state, outside the count
    gc.collect()
    tracemalloc.start()
    cache = cache_mod.TenantCache(len(data), 3600.0, 5.0)
    for tid, (_, raw, _) in zip(ids, data):
        cache.put(fmt.decode_record(tid, raw))
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(cache) == len(data)
    return held / len(data)


def timed(loop: Callable[[list[str]], None], keys: list[str]) -> float:
    """ns per key of one pass of ``loop`` over ``keys``."""
    t0 = time.perf_counter_ns()
    loop(keys)
    return (time.perf_counter_ns() - t0) / len(keys)


def main() -> None:
    p = argparse.ArgumentParser(prog="python bench/cache_ab.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default="main", help="git revision to compare the working tree's cache with")
    p.add_argument("--tenants", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--keys", type=int, default=200_000, help="keys per timed pass (Zipf s=1.1 over the codes)")
    p.add_argument("--seed", type=int, default=20261125)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        base_models, base_cache, base_format = load_revision(args.base, Path(tmp))
    shard_id = sys.intern(f"bench-{uuid.uuid4().hex[:6]}")
    data = payloads(args.tenants, shard_id)
    keys = zipf_keys([c for _, _, c in data], 1.1, args.keys, args.seed)
    keys = [k.encode().decode() for k in keys]  # the caller's strings, not the cache's keys

    sides = {"base": (base_cache, base_format), "new": (new_cache, new_format)}
    memory = {}
    for name, (cm, fm) in sides.items():
        memory[name] = (bytes_per_tenant(cm, fm, data[:10_000], ids_counted=False),
                        bytes_per_tenant(cm, fm, data[:5_000], ids_counted=True),
                        bytes_per_tenant(cm, fm, data, ids_counted=True))
    caches = {name: fill(cm, fm, data) for name, (cm, fm) in sides.items()}
    table = {c: i for i, (_, _, c) in enumerate(data)}

    def dict_loop(ks: list[str]) -> None:
        for k in ks:
            table[k]

    def get_loop(get: Callable[[str, str], Any]) -> Callable[[list[str]], None]:
        def loop(ks: list[str]) -> None:
            for k in ks:
                get("code", k)
        return loop

    loops = {"base": get_loop(caches["base"].get), "new": get_loop(caches["new"].get), "dict": dict_loop}
    for loop in loops.values():
        loop(keys)  # warm up: every used bit set, the code specialised
    rounds: list[dict[str, float]] = []
    for i in range(args.rounds):
        order = ["base", "new"] if i % 2 == 0 else ["new", "base"]
        r = {name: timed(loops[name], keys) for name in [*order, "dict"]}
        rounds.append(r)
    med = {name: statistics.median(r[name] for r in rounds) for name in loops}
    ratio_new_base = statistics.median(r["new"] / r["base"] for r in rounds)
    ratio_new_dict = statistics.median(r["new"] / r["dict"] for r in rounds)
    ratio_base_dict = statistics.median(r["base"] / r["dict"] for r in rounds)
    load = os.getloadavg()
    print(f"cache.get('code', k) over {args.tenants:,} tenants, {args.keys:,} Zipf keys a pass, "
          f"{args.rounds} interleaved rounds; base = {args.base}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"  ns/op (median): base {med['base']:.0f}, new {med['new']:.0f}, bare dict {med['dict']:.0f}")
    print(f"  new / base {ratio_new_base:.2f}x; new / dict {ratio_new_dict:.1f}x; base / dict {ratio_base_dict:.1f}x "
          f"(medians of per-round ratios)")
    print("  bytes per cached tenant (tracemalloc):")
    for name, (m10k, m5k, mall) in memory.items():
        print(f"    {name:>4}: {m10k:.0f} B at 10,000 (ids not counted, the bench's 'memory per 10,000'); "
              f"{m5k:.0f} B at 5,000 and {mall:.0f} B at {args.tenants:,} counting everything")


if __name__ == "__main__":
    main()
