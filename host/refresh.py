"""Refresh-ahead for the host's TTL caches (principals, the plugin registry).

A cached entry is re-read in the background once it has lived `REFRESH_AFTER` of its TTL
and a request uses it; the request is answered from the cached entry, which is still
inside its TTL. So an entry in use never expires on the request path, and what the TTL
promises is unchanged: an entry is never served past its TTL (an invalidation still drops
it at once), and a re-read whose generation changed meanwhile is not kept.

Why: every TTL expiry put a control-plane query (5-12 ms under load) on some request's
path, and the entries filled at the same time (a load's first seconds, the first requests
after an invalidation) all expired at the same time, 10 or 30 s later: a p95 doubled for
a second on a cheap route (``GET /api/manifest``, two registry entries per request).

A host's caches share one `RefreshAhead` (`host.runtime`): at most `MAX_IN_FLIGHT`
re-reads run at once, one per key, so they hold at most that many of the control pool's
connections (10 by default) and requests that miss keep the rest; beyond that an entry
waits for the next request that finds it due, or expires as before. A re-read that fails
(the control plane away) is only logged at DEBUG and its key is not re-read again for
`FAILED_BACKOFF_S` (a failing control plane isn't asked again by every request that finds
the entry due); the entry then expires at its TTL and the request path reads it itself
and answers honestly, as without refresh-ahead.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Coroutine, Hashable

log = logging.getLogger("tenantfleet.host.refresh")

REFRESH_AFTER = 0.75   # of the TTL
MAX_IN_FLIGHT = 4
FAILED_BACKOFF_S = 2.0


class RefreshAhead:
    """One background re-read per key at a time, `MAX_IN_FLIGHT` at most; `close` cancels them."""

    def __init__(self, name: str, *, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.name = name
        self._max = max_in_flight
        self._tasks: dict[Hashable, asyncio.Task[Any]] = {}
        self._failed: dict[Hashable, float] = {}   # key -> when its last re-read failed (monotonic)
        self._closed = False
        self.started = 0   # re-reads started (tests, metrics)

    def due(self, expires: float, now: float, ttl: float) -> bool:
        """Whether an entry expiring at ``expires`` (monotonic) is in its refresh window."""
        return expires - now < ttl * (1 - REFRESH_AFTER)

    def start(self, key: Hashable, reread: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Re-read ``key`` in the background unless it is being re-read, too many are, or
        its last re-read failed less than `FAILED_BACKOFF_S` ago."""
        if self._closed or key in self._tasks or len(self._tasks) >= self._max:
            return
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() - failed < FAILED_BACKOFF_S:
            return
        task = asyncio.get_running_loop().create_task(reread(), name=f"refresh:{self.name}")
        self._tasks[key] = task
        self.started += 1
        task.add_done_callback(lambda t: self._done(key, t))

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if task.cancelled():
            return
        if task.exception() is None:
            self._failed.pop(key, None)
        else:
            if len(self._failed) > 10_000:
                self._failed.clear()
            self._failed[key] = time.monotonic()
            log.debug("%s: a refresh-ahead re-read failed (%r); the entry expires at its TTL", self.name,
                      task.exception())

    async def wait(self) -> None:
        """Until the re-reads running now have ended (tests; a failure is the entry's TTL's business)."""
        await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
