"""One limiter per shard for every shard-wide action (migrations now; moves and drains later).

A `ShardLimiter` bounds how many operations run on its shard at once and backs the
shard off alone when it errors, times out or answers its probe slowly: exponential,
capped at ``settings.backoff_max_s``, with full jitter (tenacity's
``wait_random_exponential``). Other shards are not affected. A shard that keeps failing
for ``settings.shard_give_up_s`` is marked down; the caller reports it and moves on.
`ShardLimiters` hands out one limiter per shard id and snapshots them all for progress
displays and metrics. The SLO throttle (`shard_migrations.slo_throttle`) lowers and raises
a limiter's ``allowed`` concurrency (0 pauses the shard's new operations) from the live
request latency the hosts publish; it never goes above ``concurrency``. It can also pace
the shard (``pace_s``: at least that long between two operations starting on it), which
is how a run starts on a shard serving requests (the throttle's slow start).
"""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import asyncpg
from tenacity import RetryCallState, wait_random_exponential

from router.settings import Settings
from shard_migrations.keys import SHARD_BACKOFF_INITIAL_S


def backoff_delay(strategy: wait_random_exponential, attempt: int) -> float:
    """The delay tenacity's ``strategy`` gives for retry number ``attempt`` (1-based)."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(strategy(state))


class SlowProbe(Exception):
    """The shard answered its probe slower than settings.probe_slow_ms."""


@dataclass(frozen=True)
class LimiterState:
    shard_id: str
    state: str              # "ok" | "backing_off" | "down"
    in_flight: int
    failures: int           # consecutive
    backoff_s: float        # remaining
    last_error: str | None
    allowed: int = 0          # the concurrency the SLO throttle allows now (= concurrency when not throttled)
    throttled: str | None = None   # why, when the SLO throttle holds the shard below its concurrency
    rate: float | None = None      # operations per second the throttle's pacing allows (None: not paced)


class ShardLimiter:
    """Concurrency limit and backoff for one shard. Use `slot()` around each operation and
    report the outcome with `success()` / `failure()`."""

    def __init__(self, shard_id: str, settings: Settings, concurrency: int | None = None) -> None:
        self.shard_id = shard_id
        self.concurrency = concurrency or settings.shard_concurrency
        self._sem = asyncio.Semaphore(self.concurrency)
        self.allowed = self.concurrency
        self.throttled: str | None = None
        self._room = asyncio.Condition()
        self._wait = wait_random_exponential(multiplier=SHARD_BACKOFF_INITIAL_S, max=settings.backoff_max_s)
        self._give_up_s = settings.shard_give_up_s
        self._probe_slow_s = settings.probe_slow_ms / 1000
        self._timeout_s = settings.connect_timeout_s
        self.failures = 0
        self.failing_since: float | None = None
        self.backoff_until = 0.0
        self.down = False
        self.last_error: str | None = None
        self.in_flight = 0
        self.pace_s = 0.0           # the SLO throttle's pacing: this long at least between two starts
        self._next_start = 0.0

    async def wait_clear(self) -> None:
        """Return when the shard is out of backoff (at once if it is not backing off)."""
        while not self.down:
            left = self.backoff_until - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of the shard's ``concurrency`` slots, taken once the shard is out of backoff,
        within its allowed concurrency and, when paced, ``pace_s`` after the last start.
        Waiting for the pace holds no slot: a pause, a backoff or a new pace that comes
        meanwhile applies to the waiter, and a waiter that is cancelled leaves no start
        scheduled behind it."""
        async with self._sem:
            while True:
                await self.wait_clear()
                async with self._room:
                    await self._room.wait_for(lambda: self.in_flight < self.allowed or self.down)
                    now = time.monotonic()
                    if not self.down and now < self.backoff_until:
                        continue                  # backed off meanwhile: wait_clear again
                    if self.down or self.pace_s <= 0 or self._next_start <= now:
                        if self.pace_s > 0 and not self.down:
                            self._next_start = now + self.pace_s
                        self.in_flight += 1
                        break
                    try:                          # set_pace / set_allowed wake it early
                        async with asyncio.timeout(self._next_start - now):
                            await self._room.wait()
                    except TimeoutError:
                        pass
            try:
                yield
            finally:
                async with self._room:
                    self.in_flight -= 1
                    self._room.notify_all()

    async def set_allowed(self, allowed: int, reason: str | None = None) -> None:
        """The SLO throttle's concurrency for this shard (clamped to 0..concurrency; 0 pauses
        new operations, running ones finish); ``reason`` is shown while it is below
        ``concurrency``."""
        async with self._room:
            self.allowed = max(0, min(self.concurrency, allowed))
            self.throttled = reason if self.allowed < self.concurrency or self.pace_s > 0 else None
            self._room.notify_all()

    async def set_pace(self, pace_s: float, reason: str | None = None) -> None:
        """The SLO throttle's pacing of this shard: at least ``pace_s`` between two
        operations starting (0: none); ``reason`` is shown while it paces. A start already
        scheduled further out is brought forward to the new pace."""
        async with self._room:
            self.pace_s = max(0.0, pace_s)
            self._next_start = min(self._next_start, time.monotonic() + self.pace_s)
            self.throttled = reason if self.allowed < self.concurrency or self.pace_s > 0 else None
            self._room.notify_all()

    def success(self) -> None:
        self.failures = 0
        self.failing_since = None
        self.last_error = None

    def failure(self, exc: BaseException) -> None:
        """Back the shard off; mark it down once it has failed for shard_give_up_s."""
        now = time.monotonic()
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = now
        self.last_error = f"{exc.__class__.__name__}: {exc}"
        self.backoff_until = max(self.backoff_until, now + backoff_delay(self._wait, self.failures))
        if now - self.failing_since >= self._give_up_s:
            self.down = True

    async def probe(self, pool: asyncpg.Pool) -> None:
        """Time a trivial query; a slow or failed answer backs the shard off (never raises
        for the shard's own errors)."""
        start = time.monotonic()
        try:
            async with pool.acquire(timeout=self._timeout_s) as conn:
                await conn.fetchval("SELECT 1", timeout=self._timeout_s)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError) as exc:
            self.failure(exc)
            return
        took = time.monotonic() - start
        if took > self._probe_slow_s:
            self.failure(SlowProbe(f"probe took {took * 1000:.0f} ms"))
        else:
            self.success()

    def snapshot(self) -> LimiterState:
        left = max(0.0, self.backoff_until - time.monotonic())
        state = "down" if self.down else "backing_off" if left > 0 else "ok"
        return LimiterState(self.shard_id, state, self.in_flight, self.failures, left, self.last_error,
                            self.allowed, self.throttled, 1 / self.pace_s if self.pace_s > 0 else None)


class ShardLimiters:
    """One `ShardLimiter` per shard id, created on first use."""

    def __init__(self, settings: Settings, concurrency: int | None = None) -> None:
        self._settings = settings
        self._concurrency = concurrency
        self._limiters: dict[str, ShardLimiter] = {}

    def get(self, shard_id: str) -> ShardLimiter:
        lim = self._limiters.get(shard_id)
        if lim is None:
            lim = self._limiters[shard_id] = ShardLimiter(shard_id, self._settings, self._concurrency)
        return lim

    def snapshot(self) -> dict[str, LimiterState]:
        return {sid: lim.snapshot() for sid, lim in sorted(self._limiters.items())}

    def all(self) -> list[ShardLimiter]:
        return list(self._limiters.values())
