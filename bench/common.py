"""Helpers shared by the benchmark scripts: a control plane to run against, timing
statistics, a readable table and the JSON results file.

Scripts run as ``python bench/<name>.py``; `ensure_importable` puts the repository root
on ``sys.path`` so ``router``/``host`` import without installing.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


def ensure_importable() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


ensure_importable()

from host.fleet.embedded import EmbeddedFleet  # noqa: E402  (needs the path set above)
from router.settings import Settings  # noqa: E402


@dataclass
class Target:
    """Where a benchmark runs: a control-plane DSN and a Redis URL, and who started them."""
    settings: Settings
    embedded: bool


@asynccontextmanager
async def fleet_target(*, shards: int = 0, **overrides: Any) -> AsyncIterator[Target]:
    """The servers named by ``TENANTFLEET_CONTROL_DSN``/``_REDIS_URL`` if set (via Settings),
    else an embedded fleet (control plane + ``shards`` shard servers + Valkey) in a temp
    dir, stopped and wiped on exit."""
    configured = Settings.load(**overrides)
    if configured.control_dsn:
        yield Target(configured, embedded=False)
        return
    root = Path(tempfile.mkdtemp(prefix="tenantfleet-bench-"))
    root.chmod(0o755)  # the unprivileged PostgreSQL user must reach it when we run as root
    fleet = EmbeddedFleet(root, shards=shards, tuned_for_tests=False)
    try:
        info = await asyncio.to_thread(fleet.start)
        settings = Settings.load(**{"control_dsn": info.control_dsn, "redis_url": info.redis_url, **overrides})
        yield Target(settings, embedded=True)
    finally:
        await asyncio.to_thread(fleet.reset)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def latency_summary(samples_ns: Sequence[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    return {"n": len(s), "p50_us": percentile(s, 50) / 1000, "p99_us": percentile(s, 99) / 1000,
            "mean_us": (sum(s) / len(s) / 1000) if s else float("nan")}


def median_of(rounds: Iterable[dict[str, Any]], *path: str) -> float:
    values = []
    for r in rounds:
        v: Any = r
        for p in path:
            v = v[p]
        values.append(float(v))
    return statistics.median(values)


def cpu_probe_ms() -> float:
    """How fast this machine's CPU is right now: the best of 3 timings of a fixed pure-Python
    loop, in ms (~100 ms on a fast core). This VM's speed moves between and within sessions
    (the same code's figures by up to 2x), so benchmarks print it beside their figures."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(escape(v) if isinstance(v, str) else f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" for v in row))
    Console(width=140).print(table)


def write_results(name: str, data: dict[str, Any], path: Path | None = None) -> Path:
    out = path or RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out
