"""Resolve-client metrics: plain counters for tests and a Prometheus view of them.

The hot path (an in-process hit) only bumps an int on `ResolveStats`; a prometheus-client
``Counter.inc()`` takes a lock and would cost more than the hit itself. `ResolveMetrics`
exposes those ints at scrape time through a collector registered in the caller's
`CollectorRegistry` (never the global default, so several clients can live in one
process), next to a real miss-latency `Histogram`. Names:

- ``tenantfleet_resolve_lookups_total{level="memory|redis|control|negative"}``: resolves
  answered, by the level that answered (``control`` includes "no such tenant" answers).
- ``tenantfleet_resolve_hit_ratio``: share of resolves answered without the control plane.
- ``tenantfleet_resolve_miss_seconds{level="redis|control"}``: time to load a name that
  missed the in-process level, by where it was found.
- ``tenantfleet_resolve_redis_errors_total``, ``tenantfleet_resolve_invalidations_total``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LEVELS = ("memory", "redis", "control", "negative")
MISS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(slots=True)
class ResolveStats:
    """Counters of one client; read them in tests, scrape them through `ResolveMetrics`."""
    memory: int = 0          # answered from the in-process level
    redis: int = 0           # answered from Redis
    control: int = 0         # answered by the control plane (found or not)
    negative: int = 0        # answered "unknown" from the negative cache
    lookup_calls: int = 0    # control-plane queries actually made
    coalesced: int = 0       # resolves that joined a load already in flight
    redis_errors: int = 0    # Redis calls that failed (each opens the breaker)
    redis_skipped: int = 0   # Redis calls skipped because the breaker was open
    invalidations: int = 0   # invalidation messages received and applied
    published: int = 0       # invalidations this client published

    @property
    def resolves(self) -> int:
        return self.memory + self.redis + self.control + self.negative

    @property
    def hit_ratio(self) -> float:
        total = self.resolves
        return (total - self.control) / total if total else 0.0

    def level(self, name: str) -> int:
        value: int = getattr(self, name)
        return value


class _StatsCollector(Collector):
    def __init__(self, stats: ResolveStats) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self._stats
        lookups = CounterMetricFamily("tenantfleet_resolve_lookups", "Resolves answered, by the cache level that answered",
                                      labels=["level"])
        for level in LEVELS:
            lookups.add_metric([level], s.level(level))
        yield lookups
        yield GaugeMetricFamily("tenantfleet_resolve_hit_ratio",
                                "Share of resolves answered without the control plane", value=s.hit_ratio)
        yield CounterMetricFamily("tenantfleet_resolve_redis_errors", "Redis calls of the resolve client that failed",
                                  value=s.redis_errors)
        yield CounterMetricFamily("tenantfleet_resolve_invalidations", "Invalidation messages applied",
                                  value=s.invalidations)


class ResolveMetrics:
    """Registers the resolve metrics of ``stats`` in ``registry``; `unregister` removes them."""

    def __init__(self, registry: CollectorRegistry, stats: ResolveStats) -> None:
        self.registry = registry
        self.stats = stats
        self._collector = _StatsCollector(stats)
        self.miss_seconds = Histogram("tenantfleet_resolve_miss_seconds",
                                      "Time to load a name that missed the in-process cache, by the level that had it",
                                      ["level"], registry=registry, buckets=MISS_BUCKETS)
        self.miss_by_level = {level: self.miss_seconds.labels(level) for level in ("redis", "control")}
        try:
            registry.register(self._collector)
        except ValueError:
            registry.unregister(self.miss_seconds)
            raise

    def unregister(self) -> None:
        """Take this client's metrics out of the registry (so a new client can register)."""
        self.registry.unregister(self._collector)
        self.registry.unregister(self.miss_seconds)
