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

# How long a cached principal or tenant-plugin row may be used before it is re-read even
# without an invalidation (a lost pub/sub message can't keep a revoked key alive longer).
AUTH_CACHE_TTL_S: Final = 10.0
REGISTRY_CACHE_TTL_S: Final = 30.0

# Redis on the host: every command is bounded, and a failure is answered at once (one
# immediate retry for a pooled socket the server closed), never by redis-py's default
# retries with backoff (seconds). Announcements (registry/principal changes) are
# best-effort within ANNOUNCE_TIMEOUT_S; the cache TTLs above are the backstop.
REDIS_TIMEOUT_S: Final = 0.5
ANNOUNCE_TIMEOUT_S: Final = 1.0
READYZ_REDIS_TIMEOUT_S: Final = 1.0
SUBSCRIBE_WAIT_S: Final = 2.0      # at start-up; past it the host starts without Redis and keeps retrying

# Events (host/events.py, host/outbox.py). Delivery is at least once; see host/outbox.py.
OUTBOX_LEASE_S: Final = 30.0           # the writer's (or a relay's claim's) hold on a row before it is retried
OUTBOX_SWEEP_S: Final = 1.0            # how often each host's relay looks for due rows on every shard
OUTBOX_BATCH: Final = 100              # rows claimed per statement
OUTBOX_RETRY_INITIAL_S: Final = 1.0    # after a failed delivery: exponential with full jitter ...
OUTBOX_RETRY_MAX_S: Final = 300.0      # ... capped here; never given up (retried until delivered)
OUTBOX_SHARD_BACKOFF_MAX_S: Final = 30.0  # an unreachable shard's sweeps back off up to this
OUTBOX_RETENTION_S: Final = 3600.0     # delivered rows are deleted after this
OUTBOX_CLEANUP_EVERY_S: Final = 60.0
OUTBOX_SHARDS_EVERY_S: Final = 10.0    # the relay re-reads the shard list this often
EVENTS_IN_FLIGHT: Final = 32           # events whose handlers run at once on one host
EVENTS_AFTER_COMMIT_MAX: Final = 1024  # committed events a host holds for its own delivery; past it, the relay's
EVENTS_POP_S: Final = 1                # BRPOP timeout (whole seconds)
MAX_EVENT_BYTES: Final = 65536         # an event's payload as JSON
OUTBOX_HANDOFF_S: Final = 1.0          # Redis down: a row left for a host with a handler this one lacks is due again after this
EVENTS_QUEUE_TTL_S: Final = 86400      # a subscription's queue nobody pushed to for this long expires (its rows are in the outboxes)
SUBSCRIPTIONS_EVERY_S: Final = 5.0     # each host refreshes its event subscriptions, and reads the fleet's, this often
SUBSCRIPTION_TTL_S: Final = 120.0      # a subscription not refreshed for this long is gone (longer than a host's restart)
SUBSCRIPTIONS_FORGET_S: Final = 86400.0  # rows of hosts gone this long are deleted

# The console's live p95 per shard (host.metrics.ShardLatency): plugin requests kept per
# shard, and the window the percentile is taken over.
SHARD_WINDOW_KEEP: Final = 2048
SHARD_WINDOW_S: Final = 60.0

# The console (host/console): its session cookie (the admin key exchanged at sign-in, see
# settings.console_session_s) and the sign-in form's own CSRF cookie.
CONSOLE_COOKIE: Final = "tf_console"
CONSOLE_LOGIN_COOKIE: Final = "tf_console_login"
CONSOLE_PATH: Final = "/console"
CSRF_HEADER: Final = "X-CSRF-Token"
AUDIT_PAGE: Final = 200              # audit entries the console shows

# The tenant app shell (host/appshell): its session cookie (a tenant's API key exchanged at
# sign-in, see settings.app_session_s), the sign-in form's own CSRF cookie, and where the
# shell's bridge runs a plugin route as the signed-in principal (/app/call/{plugin}{route}).
APP_PATH: Final = "/app"
APP_COOKIE: Final = "tf_app"
APP_LOGIN_COOKIE: Final = "tf_app_login"
APP_CALL: Final = "/call"

# Shutdown: how long in-flight requests get to finish after the listener closes.
DRAIN_TIMEOUT_S: Final = 10.0

# SQLSTATEs raised by fleet.enter_tenant (router/tables.py)
SQLSTATE_NOT_ON_SHARD: Final = "TF404"
SQLSTATE_FENCE_STALE: Final = "TF409"
SQLSTATE_LOCK_TIMEOUT: Final = "55P03"

# A stale fence whose re-resolve answers the same placement: the directory's cutover (and
# its invalidation) lands a moment after the source's fence rises. Back off from this,
# doubling up to the max, for at most fence_wait_ms in all, instead of retrying at once.
STALE_BACKOFF_INITIAL_S: Final = 0.002
STALE_BACKOFF_MAX_S: Final = 0.05
# How often (at most) a host looks for shards it no longer serves (settings.idle_shard_close_s)
SHARD_SWEEP_MAX_S: Final = 5.0


def registry_channel(ns: str) -> str:
    """Pub/sub: a plugin registry, kill-switch, role or principal change; every host reloads."""
    return f"{ns}:host:registry"


def events_queue_key(ns: str) -> str:
    """List: outbox events for whichever host pops them (what hosts before per-subscription
    queues pushed; still popped, each event run by the handlers of the popping host)."""
    return f"{ns}:host:events:queue"


def subscription_queue_key(ns: str, plugin_id: str, event_name: str) -> str:
    """List: events for one subscription (a plugin's handlers of one event name), popped by
    the hosts that have them. Plugin ids and event names are validated words and dots."""
    return f"{ns}:host:events:{plugin_id}:{event_name}"


def cron_lock_key(ns: str, job: str, tick: int) -> str:
    """SET NX lock: the one host that runs ``job`` for the tick at epoch second ``tick``."""
    return f"{ns}:host:cron:{job}:{tick}"
