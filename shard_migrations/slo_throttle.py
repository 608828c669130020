"""The SLO-aware throttle: migrations and moves slow down on a shard whose request latency
nears its SLO, before the SLO breaks.

Hosts publish a rolling p95 of their tenant transactions per shard, their event loop's
lag added, to Redis about once a second, over 10 s and over the last 3 s
(`router.shard_latency`). Once a second `SloThrottle` reads them for every shard a run's
limiters know and sets each `ShardLimiter`'s allowed concurrency, additive increase,
multiplicative decrease, on the recent figure (a drain's burst lasts a few seconds: the
10 s figure moves too late), against a limit made from the 10 s one:

- p95 at or above ``HIGH`` of the shard's limit: halve (1 becomes 0: new operations on
  the shard pause; running ones finish);
- p95 at or below ``LOW`` of the limit: one more, up to the limiter's configured
  concurrency;
- in between: hold.

Slow start: a run's first operations on a shard are where it hurts most (a migration of a
few hundred tenants is over in a second, before a reading could slow it). So a shard that
has a p95 figure when the run starts (it serves requests) starts paced, at
``slo_throttle_start_rate`` operations per second (10); each second its p95 stays at or
below ``HIGH`` of the limit the rate doubles, and past ``SLOW_START_CAP`` times the start
rate pacing ends (then the concurrency moves as above); between ``HIGH`` and the limit the
rate holds, and at or above the limit itself it halves, down to ``MIN_RATE`` (a ramp
that waits near the limit and backs off past it: the one reading a second is a rolling
10 s p95 that moves by 10-15% on its own). A shard without a figure (no traffic, Redis
down) starts at full speed.

The limit is ``slo_throttle_p95_ms`` when set, else the shard's p95 when the throttle
first saw it (the run's start: the steady load) times ``slo_throttle_ratio`` (the default
SLO's 1.25); ``slo_throttle_file`` (an SLO file,
`loadtests/slo/default.toml`'s format) gives ``p95_ms`` and ``p95_ratio_to_steady`` from its
``[phases.event]`` or ``[limits]`` table instead (the lower of the two where both are known). Fails safe: Redis down or no figure for
a shard means no throttling data, and the shard runs at its configured concurrency (said
once in the log); a shard paused for ``slo_throttle_max_pause_s`` gets one slot back (the
run never hangs on a latency it can't lower).
"""
from __future__ import annotations

import asyncio
import logging
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge

from router.client import redis_address
from router.settings import Settings
from router.shard_latency import read_shard_figures
from shard_migrations.limiter import ShardLimiter

log = logging.getLogger("tenantfleet.slo_throttle")

TICK_S = 1.0
HIGH = 0.9
LOW = 0.75
SLOW_START_CAP = 32      # times the start rate: past it, a shard is no longer paced
MIN_RATE = 1.0           # operations per second: the slowest pace of a slow start
REDIS_TIMEOUT_S = 1.0


def file_limits(path: str) -> tuple[float | None, float | None]:
    """(p95_ms, p95_ratio_to_steady) of an SLO file's event phase (``[phases.event]`` over
    ``[limits]``); a missing or bad file raises ValueError naming it."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"slo_throttle_file {path}: {exc}") from None
    limits = dict(doc.get("limits", {}) or {})
    limits.update((doc.get("phases", {}) or {}).get("event", {}) or {})
    out: list[float | None] = []
    for key in ("p95_ms", "p95_ratio_to_steady"):
        value = limits.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"slo_throttle_file {path}: {key} must be a positive number")
        out.append(None if value is None else float(value))
    return out[0], out[1]


class SloThrottle:
    """``async with SloThrottle(settings, limiters):`` for the length of a run. ``limiters``
    returns the run's current limiters (they are created as shards come up). ``shards`` and
    ``limiter_for`` (the run's shard ids and how it gets a shard's limiter): the shards to
    slow-start before the run's first operation."""

    def __init__(self, settings: Settings, limiters: Callable[[], Iterable[ShardLimiter]], *,
                 redis: Any = None, registry: CollectorRegistry | None = None,
                 shards: Iterable[str] = (), limiter_for: Callable[[str], ShardLimiter] | None = None) -> None:
        self.settings = settings
        self.limiters = limiters
        self._start_shards = sorted(set(shards))
        self._limiter_for = limiter_for
        self.enabled = settings.slo_throttle
        self._redis = redis
        self._own_redis = False
        self.absolute_ms: float | None = settings.slo_throttle_p95_ms or None
        # an absolute limit set replaces the ratio; an SLO file's two limits both hold
        self.ratio: float | None = None if self.absolute_ms else settings.slo_throttle_ratio
        if settings.slo_throttle_file:
            self.absolute_ms, self.ratio = file_limits(settings.slo_throttle_file)
        self.baseline: dict[str, float] = {}
        self.p95: dict[str, float] = {}
        self.paused_since: dict[str, float] = {}
        # (shard, allowed, why, rate in operations/s or None): each change the run saw
        self.decisions: list[tuple[str, int, str, float | None]] = []
        self._rates: dict[str, float | None] = {}         # each shard's pace as last recorded
        self._task: asyncio.Task[None] | None = None
        self._redis_failing = False
        self.throttled_total = 0
        self._gauge: Gauge | None = None
        self._flag: Gauge | None = None
        if registry is not None:
            self._gauge = Gauge("tenantfleet_slo_throttle_allowed", "Concurrency the SLO throttle allows per shard",
                                ["shard"], registry=registry)
            self._flag = Gauge("tenantfleet_slo_throttled", "1 while the SLO throttle holds a shard below its "
                               "configured concurrency (throttled by SLO)", ["shard"], registry=registry)

    async def __aenter__(self) -> "SloThrottle":
        if not self.enabled:
            return self
        if self._redis is None:
            if not self.settings.redis_url:
                log.warning("SLO throttle: no Redis configured, so no latency figures; running at the configured "
                            "limits")
                self.enabled = False
                return self
            self._redis = aioredis.Redis(**redis_address(self.settings.redis_url), socket_timeout=REDIS_TIMEOUT_S,
                                         socket_connect_timeout=REDIS_TIMEOUT_S)
            self._own_redis = True
        try:
            started = await self.slow_start()
        except BaseException:  # no __aexit__ follows: leave no shard paced, no client open
            await self._release()
            raise
        self._task = asyncio.create_task(self._loop(first_wait=started), name="slo-throttle")
        return self

    async def slow_start(self) -> bool:
        """Pace the run's shards that serve requests before its first operation; whether
        any was (then the first reading waits a tick, as it would be the same one)."""
        rate = self.settings.slo_throttle_start_rate
        if rate <= 0 or not self._start_shards or self._limiter_for is None:
            return False
        try:
            figures = await asyncio.wait_for(read_shard_figures(self._redis, self.settings.redis_namespace,
                                                                self._start_shards), REDIS_TIMEOUT_S * 2)
        except (aioredis.RedisError, OSError, asyncio.TimeoutError):
            return False  # the loop's first tick says so in the log
        for sid, (steady, p95) in sorted(figures.items()):
            self.p95[sid] = p95
            self.baseline.setdefault(sid, steady)
            lim = self._limiter_for(sid)
            await lim.set_pace(1 / rate)
            await self._set(lim, lim.allowed, self._why(lim, p95, self.limit_for(sid)))
        return bool(figures)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self._release()

    async def _unthrottle(self) -> None:
        """Every limiter back to its configured concurrency, unpaced."""
        for lim in self.limiters():
            await lim.set_pace(0)
            await lim.set_allowed(lim.concurrency)

    async def _release(self) -> None:
        """`_unthrottle`, and our Redis client closed."""
        await self._unthrottle()
        if self._own_redis and self._redis is not None:
            self._own_redis = False
            await self._redis.aclose()

    async def _loop(self, first_wait: bool = False) -> None:
        if first_wait:
            await asyncio.sleep(TICK_S)
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the throttle must never stop a run
                log.exception("SLO throttle tick failed; running at the configured limits")
                await self._unthrottle()
            await asyncio.sleep(TICK_S)

    def limit_for(self, shard_id: str) -> float | None:
        candidates = [x for x in (self.absolute_ms,
                                  None if self.ratio is None or shard_id not in self.baseline
                                  else self.baseline[shard_id] * self.ratio) if x is not None]
        return min(candidates) if candidates else None

    async def tick(self) -> None:
        """Read the shards' p95 once and set every limiter's allowed concurrency."""
        lims = {lim.shard_id: lim for lim in self.limiters()}
        if not lims:
            return
        try:
            figures = await asyncio.wait_for(read_shard_figures(self._redis, self.settings.redis_namespace,
                                                                sorted(lims)), REDIS_TIMEOUT_S * 2)
        except (aioredis.RedisError, OSError, asyncio.TimeoutError) as exc:
            if not self._redis_failing:
                log.warning("SLO throttle: Redis unreachable (%s), no latency figures; running at the configured "
                            "limits until it is back", exc.__class__.__name__)
            self._redis_failing = True
            figures = {}
        else:
            self._redis_failing = False
        now = time.monotonic()
        for sid, lim in lims.items():
            fig = figures.get(sid)
            if fig is None:
                self.p95.pop(sid, None)
                self.paused_since.pop(sid, None)
                await lim.set_pace(0)
                await self._set(lim, lim.concurrency, None)
                continue
            steady, p95 = fig  # the limit from the 10 s figure, decisions on the recent one
            self.p95[sid] = p95
            self.baseline.setdefault(sid, steady)
            limit = self.limit_for(sid)
            if limit is None:
                await lim.set_pace(0)
                await self._set(lim, lim.concurrency, None)
                continue
            allowed = lim.allowed
            if lim.pace_s > 0 and allowed > 0:
                # slow start: the pace moves, the concurrency stays
                if p95 >= limit:
                    await lim.set_pace(max(lim.pace_s, min(lim.pace_s * 2, 1 / MIN_RATE)))
                elif p95 <= HIGH * limit:  # the rate doubles, then pacing ends
                    start = self.settings.slo_throttle_start_rate
                    faster = lim.pace_s / 2
                    await lim.set_pace(0 if start <= 0 or 1 / faster > start * SLOW_START_CAP else faster)
            elif p95 >= HIGH * limit:
                allowed = allowed // 2
            elif p95 <= LOW * limit:
                allowed = allowed + 1
            allowed = max(0, min(lim.concurrency, allowed))
            if allowed == 0:
                since = self.paused_since.setdefault(sid, now)
                if now - since >= self.settings.slo_throttle_max_pause_s:
                    log.warning("SLO throttle: shard %s paused for %.0f s with p95 %.1f ms still near its limit "
                                "%.1f ms; letting one operation through", sid, now - since, p95, limit)
                    allowed = 1
                    self.paused_since[sid] = now
            else:
                self.paused_since.pop(sid, None)
            await self._set(lim, allowed, self._why(lim, p95, limit, allowed))

    @staticmethod
    def _why(lim: ShardLimiter, p95: float, limit: float | None, allowed: int | None = None) -> str:
        allowed = lim.allowed if allowed is None else allowed
        pace = f", {1 / lim.pace_s:.0f}/s" if lim.pace_s > 0 and allowed > 0 else ""
        return (f"throttled by SLO: p95 {p95:.0f} ms, limit {'-' if limit is None else f'{limit:.0f}'} ms, "
                f"{'paused' if allowed == 0 else f'{allowed} of {lim.concurrency}'}{pace}")

    async def _set(self, lim: ShardLimiter, allowed: int, why: str | None) -> None:
        rate = 1 / lim.pace_s if lim.pace_s > 0 else None
        if allowed != lim.allowed or rate != self._rates.get(lim.shard_id):
            self._rates[lim.shard_id] = rate
            self.decisions.append((lim.shard_id, allowed, why or "no latency figures: configured limit",
                                   None if rate is None else round(rate, 2)))
            if allowed < lim.allowed:
                self.throttled_total += 1
        await lim.set_allowed(allowed, why)
        if self._gauge is not None and self._flag is not None:
            self._gauge.labels(lim.shard_id).set(lim.allowed)
            self._flag.labels(lim.shard_id).set(1 if lim.throttled else 0)


def throttle_api(throttle: "SloThrottle | None") -> dict[str, Any] | None:
    """The SLO throttle's record of a run: each change of a shard's allowed concurrency."""
    if throttle is None or not throttle.enabled:
        return None
    return {"decreases": throttle.throttled_total, "baselineP95Ms": dict(throttle.baseline),
            "changes": [{"shardId": sid, "allowed": n, "rate": rate, "why": why}
                        for sid, n, why, rate in throttle.decisions][-50:]}
