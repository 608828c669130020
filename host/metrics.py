"""Host metrics: one `CollectorRegistry` per app (never the process-global one).

Request figures are labelled by plugin, route *template* (``/api/plugins/inventory/items/{id}``,
never the raw path, so label cardinality is bounded by the routes that exist) and
status class (``2xx`` ...). Pool figures are read from the live pools at scrape time.
"""
from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from typing import Callable, Final, Iterable, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from host.keys import SHARD_WINDOW_KEEP, SHARD_WINDOW_S
from host.leases import PoolFigures

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_LABELS = ("plugin", "route", "status_class")

PoolSource = Callable[[], Mapping[str, PoolFigures]]


class _PoolCollector(Collector):
    def __init__(self, source: PoolSource) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        size = GaugeMetricFamily("tenantfleet_host_pool_connections", "Connections open in a shard pool",
                                 labels=["shard"])
        idle = GaugeMetricFamily("tenantfleet_host_pool_idle", "Idle connections in a shard pool", labels=["shard"])
        cap = GaugeMetricFamily("tenantfleet_host_pool_max", "Upper bound of a shard pool", labels=["shard"])
        waiting = GaugeMetricFamily("tenantfleet_host_pool_waiting",
                                    "Tenant transactions waiting for a connection to a shard", labels=["shard"])
        for shard_id, f in sorted(self._source().items()):
            size.add_metric([shard_id], f.size)
            idle.add_metric([shard_id], f.idle)
            cap.add_metric([shard_id], f.max)
            waiting.add_metric([shard_id], f.waiting)
        return [size, idle, cap, waiting]


class _RouteFigures:
    """One (plugin, route, status class): a count, a latency sum and per-bucket counts."""
    __slots__ = ("count", "total", "buckets", "created")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.created = time.time()


class _RequestCollector(Collector):
    """Plugin request count, 5xx count and latency histogram, exposed exactly as a labelled
    prometheus_client `Counter` pair and `Histogram` would be.

    Why not those: on the request path their ``inc``/``observe`` (a lock per value, a
    linear bucket search, exemplar checks) cost a few microseconds per request even with
    the label children bound once; here one request is three additions and a `bisect`
    in C. Only the event loop's thread records; a scrape reads plain ints and floats.
    """

    def __init__(self) -> None:
        self.figures: dict[tuple[str, str, str], _RouteFigures] = {}

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily("tenantfleet_plugin_requests", "Plugin requests served",
                                       labels=REQUEST_LABELS)
        errors = CounterMetricFamily("tenantfleet_plugin_errors", "Plugin requests answered with a 5xx",
                                     labels=REQUEST_LABELS)
        latency = HistogramMetricFamily("tenantfleet_plugin_request_seconds", "Plugin request latency",
                                        labels=REQUEST_LABELS)
        bounds = [repr(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]  # as prometheus_client spells them
        for key, f in sorted(self.figures.items()):
            requests.add_metric(key, f.count, created=f.created)
            if key[2] == "5xx":
                errors.add_metric(key, f.count, created=f.created)
            cumulative, acc = [], 0
            for bound, n in zip(bounds, f.buckets):
                acc += n
                cumulative.append((bound, float(acc)))
            latency.add_metric(key, cumulative, f.total)
            latency.samples.append(Sample("tenantfleet_plugin_request_seconds_created",
                                          dict(zip(REQUEST_LABELS, key)), f.created))
        return [requests, errors, latency]


class ShardLatency:
    """The latest plugin request latencies per shard (the console's "live p95"): a bounded
    window per shard of (when, seconds), read when a page asks. This host's requests only."""

    def __init__(self, keep: int = SHARD_WINDOW_KEEP) -> None:
        self._windows: dict[str, deque[tuple[float, float]]] = {}
        self._keep = keep

    def record(self, shard_id: str, seconds: float) -> None:
        w = self._windows.get(shard_id)
        if w is None:
            w = self._windows[shard_id] = deque(maxlen=self._keep)
        w.append((time.monotonic(), seconds))

    def p95(self, shard_id: str, window_s: float = SHARD_WINDOW_S) -> tuple[float | None, int]:
        """(p95 in seconds, requests counted) over the last ``window_s``; (None, 0) without any."""
        since = time.monotonic() - window_s
        values = sorted(v for t, v in self._windows.get(shard_id, ()) if t >= since)
        if not values:
            return None, 0
        return values[min(len(values) - 1, int(0.95 * len(values)))], len(values)


class HostMetrics:
    """The host's collectors, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._requests = _RequestCollector()
        self.registry.register(self._requests)
        self.fence_retries = Counter("tenantfleet_fence_retries", "Tenant transactions retried after a stale fence",
                                     registry=self.registry)
        self.fence_stale_waits = Counter(
            "tenantfleet_fence_stale_waits",
            "Back-offs of a tenant transaction whose re-resolve still named the placement its fence refused",
            registry=self.registry)
        self.moves_finished = Counter(
            "tenantfleet_moves_finished_by_host",
            "Moves whose directory switch a host made itself: the mover had stopped past its commit point",
            registry=self.registry)
        self.cached_statement_retries = Counter(
            "tenantfleet_cached_statement_retries",
            "Tenant transactions retried after a cached statement's result type changed (mixed rollout)",
            registry=self.registry)
        self.connections_recycled = Counter(
            "tenantfleet_host_connections_recycled",
            "Shard connections closed and replaced after serving more than pool_recycle_tenants distinct tenants",
            registry=self.registry)
        self.event_handler_errors = Counter("tenantfleet_event_handler_errors", "Event handlers that raised",
                                            ["plugin", "event"], registry=self.registry)
        self.events_pushed = Counter("tenantfleet_events_pushed", "Event messages this host pushed to Redis queues",
                                     registry=self.registry)
        self.events_not_repushed = Counter(
            "tenantfleet_events_not_repushed",
            "Relayed event messages not pushed again because their queue holds work older than half a lease",
            registry=self.registry)
        self.cron_runs = Counter("tenantfleet_cron_runs", "Cron ticks this host ran", ["plugin", "job"],
                                 registry=self.registry)
        self.shard_latency = ShardLatency()

    def watch_pools(self, source: PoolSource) -> None:
        self.registry.register(_PoolCollector(source))

    def observe(self, plugin: str, route: str, status: int, seconds: float) -> None:
        """Count one plugin request (a 5xx also as an error) and its latency."""
        key = (plugin, route, f"{status // 100}xx")
        f = self._requests.figures.get(key)
        if f is None:
            f = self._requests.figures[key] = _RouteFigures()
        f.count += 1
        f.total += seconds
        f.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: the first bound >= seconds


METRICS: Final[web.AppKey["HostMetrics"]] = web.AppKey("tenantfleet_metrics")
