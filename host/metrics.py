"""Host metrics: one `CollectorRegistry` per app (never the process-global one).

Request figures are labelled by plugin, route *template* (``/api/plugins/inventory/items/{id}``,
never the raw path, so label cardinality is bounded by the routes that exist) and
status class (``2xx`` ...). Pool figures are read from the live pools at scrape time.
"""
from __future__ import annotations

from typing import Callable, Iterable

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

PoolSource = Callable[[], dict[str, asyncpg.Pool]]


class _PoolCollector(Collector):
    def __init__(self, source: PoolSource) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        size = GaugeMetricFamily("tenantfleet_host_pool_connections", "Connections open in a shard pool",
                                 labels=["shard"])
        idle = GaugeMetricFamily("tenantfleet_host_pool_idle", "Idle connections in a shard pool", labels=["shard"])
        cap = GaugeMetricFamily("tenantfleet_host_pool_max", "Upper bound of a shard pool", labels=["shard"])
        for shard_id, pool in sorted(self._source().items()):
            size.add_metric([shard_id], pool.get_size())
            idle.add_metric([shard_id], pool.get_idle_size())
            cap.add_metric([shard_id], pool.get_max_size())
        return [size, idle, cap]


class HostMetrics:
    """The host's collectors, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        labels = ["plugin", "route", "status_class"]
        self.requests = Counter("tenantfleet_plugin_requests", "Plugin requests served", labels,
                                registry=self.registry)
        self.errors = Counter("tenantfleet_plugin_errors", "Plugin requests answered with a 5xx", labels,
                              registry=self.registry)
        self.latency = Histogram("tenantfleet_plugin_request_seconds", "Plugin request latency", labels,
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.fence_retries = Counter("tenantfleet_fence_retries", "Tenant transactions retried after a stale fence",
                                     registry=self.registry)
        self.cached_statement_retries = Counter(
            "tenantfleet_cached_statement_retries",
            "Tenant transactions retried after a cached statement's result type changed (mixed rollout)",
            registry=self.registry)
        self.event_handler_errors = Counter("tenantfleet_event_handler_errors", "Event handlers that raised",
                                            ["plugin", "event"], registry=self.registry)
        self.cron_runs = Counter("tenantfleet_cron_runs", "Cron ticks this host ran", ["plugin", "job"],
                                 registry=self.registry)
        # label children cached by tuple: .labels() costs a few microseconds per call
        self._children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    def watch_pools(self, source: PoolSource) -> None:
        self.registry.register(_PoolCollector(source))

    def observe(self, plugin: str, route: str, status: int, seconds: float) -> None:
        status_class = f"{status // 100}xx"
        key = (plugin, route, status_class)
        child = self._children.get(key)
        if child is None:
            child = (self.requests.labels(*key), self.latency.labels(*key))
            self._children[key] = child
        child[0].inc()
        child[1].observe(seconds)
        if status >= 500:
            self.errors.labels(*key).inc()
