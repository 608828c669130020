"""Prometheus collectors for fleet migrations, registered on a registry the caller passes in
(the host's, or a run's own for a textfile), never on the global default."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class MigrateMetrics:
    """The figures the progress bar shows, as metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.units = Counter("tenantfleet_migrate_units_total",
                             "Units (a shard's public scope or a tenant) finished, by outcome (applied|noop|failed).",
                             ["plugin", "shard", "scope", "outcome"], registry=registry)
        self.files = Counter("tenantfleet_migrate_files_applied_total", "Migration files applied.",
                             ["plugin", "shard", "scope"], registry=registry)
        self.retries = Counter("tenantfleet_migrate_retries_total",
                               "Unit attempts retried, by reason (lock: busy advisory lock or lock_timeout; "
                               "shard: connection error, timeout).", ["plugin", "shard", "reason"], registry=registry)
        self.unit_seconds = Histogram("tenantfleet_migrate_unit_seconds", "Time to apply one unit's pending files.",
                                      ["plugin", "shard"], registry=registry,
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.pending = Gauge("tenantfleet_migrate_units_pending", "Units of the current run not finished yet.",
                             ["plugin", "shard"], registry=registry)
        self.backoff = Gauge("tenantfleet_migrate_shard_backoff_seconds", "Seconds left in the shard's backoff.",
                             ["shard"], registry=registry)
        self.down = Gauge("tenantfleet_migrate_shard_down", "1 when the run gave up on the shard.", ["shard"],
                          registry=registry)
