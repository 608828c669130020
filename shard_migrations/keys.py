"""Migrator constants: advisory lock keys, SQLSTATE classes, timings."""
from __future__ import annotations

import hashlib
from typing import Final

# Advisory locks are per database, so a (plugin, scope[, tenant]) key is unique per shard.
# The key is the first 8 bytes of a blake2b digest, as a signed 64-bit integer (bigint).
_LOCK_NAMESPACE: Final = b"tenantfleet/migrate/v1"


def advisory_key(plugin_id: str, scope: str, tenant_id: str | None = None) -> int:
    """The 64-bit `pg_try_advisory_lock` key for one (plugin, scope[, tenant]); stable across processes."""
    h = hashlib.blake2b(digest_size=8, key=_LOCK_NAMESPACE)
    h.update(f"{plugin_id}\x00{scope}\x00{tenant_id or ''}".encode())
    return int.from_bytes(h.digest(), "big", signed=True)


# SQLSTATEs sorted by what the migrator does about them (never by message text).
LOCK_SQLSTATES: Final = frozenset({
    "55P03",   # lock_not_available: lock_timeout fired; this unit backs off, the shard goes on
    "40P01",   # deadlock_detected
    "40001",   # serialization_failure
})
SHARD_SQLSTATE_PREFIXES: Final = ("08", "53", "57P", "58")  # connection, resources, shutdown, system
STATEMENT_TIMEOUT_SQLSTATE: Final = "57014"  # query_canceled: statement_timeout (shard too slow)

# Per-unit retry (busy advisory lock, lock_timeout): exponential with full jitter.
UNIT_BACKOFF_INITIAL_S: Final = 0.05
UNIT_BACKOFF_MAX_S: Final = 2.0
# Per-shard backoff (connection errors, timeouts, slow probes): exponential, capped by
# settings.backoff_max_s, with full jitter.
SHARD_BACKOFF_INITIAL_S: Final = 0.2

HEARTBEAT_S: Final = 2.0            # fleet_runs.heartbeat_at refresh while a run is alive
FLUSH_S: Final = 0.5                # run-item status writes are batched at most this long
PROGRESS_TTY_S: Final = 0.2
PROGRESS_PLAIN_S: Final = 2.0
APPLY_TENANT_BUDGET_S: Final = 30.0  # apply_tenant's retry budget for busy locks and lock timeouts

RUN_KIND: Final = "migrate"
TENANT_STATES_TARGETED: Final = ("active", "suspended")
