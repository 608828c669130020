"""Host constants: request-state keys, Redis keys and channels, request-state keys, limits.

Redis names live under the configured namespace (``TENANTFLEET_REDIS_NAMESPACE``) so
several fleets can share one Redis.
"""
from __future__ import annotations

from typing import Final

from aiohttp import web

from plugins.api import Caller

# App-state keys are declared next to the classes they hold (host.runtime.RUNTIME,
# host.metrics.METRICS, host.context.PLUGIN_HOST), so this module imports nothing of host.

# --- request state (web.RequestKey, never strings) -------------------------------------------
REQ_PLUGIN: Final[web.RequestKey[str]] = web.RequestKey("tenantfleet_plugin_id")
REQ_TENANT: Final[web.RequestKey[str]] = web.RequestKey("tenantfleet_tenant_id")
REQ_CALLER: Final[web.RequestKey[Caller]] = web.RequestKey("tenantfleet_caller")

TENANT_HEADER: Final = "X-Tenant"

# Headers: aiohttp's parser accepts up to PARSER_MAX_FIELD bytes per line/field (beyond
# that it answers a plain-text 400 itself); the shared edge refuses anything over
# router.http.MAX_HEADER_BYTES with the envelope, so every oversized header a client is
# likely to send gets a proper error body. (The request id and its header: router.http.)
PARSER_MAX_FIELD: Final = 65536

# How long a cached principal or tenant-plugin row may be used before it is re-read even
# without an invalidation (a lost pub/sub message can't keep a revoked key alive longer).
AUTH_CACHE_TTL_S: Final = 10.0
REGISTRY_CACHE_TTL_S: Final = 30.0

# Shutdown: how long in-flight requests get to finish after the listener closes.
DRAIN_TIMEOUT_S: Final = 10.0

# SQLSTATEs raised by fleet.enter_tenant (router/tables.py)
SQLSTATE_NOT_ON_SHARD: Final = "TF404"
SQLSTATE_FENCE_STALE: Final = "TF409"
SQLSTATE_LOCK_TIMEOUT: Final = "55P03"


def registry_channel(ns: str) -> str:
    """Pub/sub: a plugin registry, kill-switch, role or principal change; every host reloads."""
    return f"{ns}:host:registry"


def events_channel(ns: str) -> str:
    """Pub/sub: plugin events (``events.emit``), delivered to handlers on every host."""
    return f"{ns}:host:events"


def cron_lock_key(ns: str, job: str, tick: int) -> str:
    """SET NX lock: the one host that runs ``job`` for the tick at epoch second ``tick``."""
    return f"{ns}:host:cron:{job}:{tick}"
