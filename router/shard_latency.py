"""Request latency per shard, shared through Redis for the SLO-aware throttle.

Hosts time every tenant transaction per shard (`ShardLatency`: per-second histograms
with fine logarithmic buckets, a rolling window of ``WINDOW_S``; one `observe` is a
`bisect` and an addition) and publish each shard's rolling p95 about once a second
(`publish_latency`) into one Redis hash per shard, a field per host, with a short TTL:
a host that stops publishing drops out within ``TTL_S``. The fleet migrator and the
mover read the hash (`read_shard_figures`) and slow down on a shard
whose p95 nears its limit (`shard_migrations.slo_throttle`). Here, in the base package,
because both the host (writer) and the migrator (reader) use the same names and format.

A transaction's time is not all a client waits: a request also waits for the host's
event loop (its process waiting for a CPU, other requests' callbacks), and on a busy
machine that is where the time goes first (a drain of 61 tenants raised the clients' p95
1.66x while the transactions' p95 rose 1.2x). So hosts also sample their loop's lag
(`watch_loop_lag`: how late a 20 ms sleep wakes) and publish each shard's figure as the
transactions' p95 plus the lag's p95 (`host_figures`), over the ``WINDOW_S`` window
(``p95Ms``: the steady baseline) and over the last ``RECENT_S`` seconds (``recentMs``: what
the throttle acts on, so that a burst shorter than the long window is seen while it lasts).
"""
from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_left
from collections import deque
from typing import Any, Mapping

import orjson

WINDOW_S = 10           # the rolling window the p95 is taken over
RECENT_S = 3            # the short window of the figure the throttle acts on
LAG_SAMPLE_S = 0.02     # the loop-lag probe's sleep
TTL_S = 5               # a shard's hash expires this long after its last publication
FRESH_S = 5.0           # a host's figure older than this is ignored
MIN_REQUESTS = 20       # a p95 from fewer transactions is not published
# bucket upper bounds in ms: 0.1 ms .. ~100 s, 5% apart (p95 is off by at most 5%)
BOUNDS_MS = tuple(0.1 * 1.05 ** i for i in range(int(math.log(1e6) / math.log(1.05)) + 2))


def latency_key(namespace: str, shard_id: str) -> str:
    """The hash of ``shard_id``'s published p95s (``shard_id`` is a registered shard id)."""
    return f"{namespace}:slo:p95:{shard_id}"


class ShardLatency:
    """Per-shard per-second histograms over the last ``WINDOW_S`` seconds."""

    def __init__(self, window_s: int = WINDOW_S) -> None:
        self.window_s = window_s
        self._shards: dict[str, deque[tuple[int, list[int]]]] = {}

    def observe(self, shard_id: str, seconds: float, now: float | None = None) -> None:
        sec = int(now if now is not None else time.monotonic())
        q = self._shards.get(shard_id)
        if q is None:
            q = self._shards[shard_id] = deque()
        if not q or q[-1][0] != sec:
            q.append((sec, [0] * (len(BOUNDS_MS) + 1)))
            while q and q[0][0] <= sec - self.window_s:
                q.popleft()
        q[-1][1][bisect_left(BOUNDS_MS, seconds * 1000)] += 1

    def p95(self, now: float | None = None, window_s: int | None = None) -> dict[str, tuple[float, int]]:
        """``{shard: (p95 ms, transactions)}`` over the window (or the last ``window_s``
        seconds of it), for shards with at least MIN_REQUESTS transactions in it (the
        bucket's upper bound: never below the truth)."""
        sec = int(now if now is not None else time.monotonic())
        span = self.window_s if window_s is None else min(window_s, self.window_s)
        out: dict[str, tuple[float, int]] = {}
        for shard_id, q in self._shards.items():
            counts = [0] * (len(BOUNDS_MS) + 1)
            for s, hist in q:
                if s > sec - span:
                    counts = [a + b for a, b in zip(counts, hist)]
            n = sum(counts)
            if n < MIN_REQUESTS:
                continue
            rank, acc = math.ceil(0.95 * n), 0
            for i, c in enumerate(counts):
                acc += c
                if acc >= rank:
                    out[shard_id] = (BOUNDS_MS[i] if i < len(BOUNDS_MS) else BOUNDS_MS[-1], n)
                    break
        return out


LOOP = "loop"           # the `ShardLatency` key `watch_loop_lag` records under


async def watch_loop_lag(lag: ShardLatency, sample_s: float = LAG_SAMPLE_S) -> None:
    """Forever: sleep ``sample_s`` and record how late the loop woke us (under `LOOP`)."""
    while True:
        t0 = time.monotonic()
        await asyncio.sleep(sample_s)
        lag.observe(LOOP, max(0.0, time.monotonic() - t0 - sample_s))


def host_figures(latency: ShardLatency, lag: ShardLatency | None = None,
                 now: float | None = None) -> tuple[dict[str, tuple[float, int]], dict[str, float]]:
    """What a host publishes: ``({shard: (p95 ms, transactions)}, {shard: recent p95 ms})``,
    each shard's transactions' p95 plus the loop lag's p95 over the same window (the long
    one, and the last RECENT_S seconds where that holds MIN_REQUESTS transactions)."""
    def with_lag(figures: dict[str, tuple[float, int]], window_s: int | None) -> dict[str, tuple[float, int]]:
        extra = (lag.p95(now, window_s).get(LOOP, (0.0, 0))[0]) if lag is not None else 0.0
        return {sid: (p95 + extra, n) for sid, (p95, n) in figures.items()}
    long = with_lag(latency.p95(now), None)
    recent = {sid: p95 for sid, (p95, _n) in with_lag(latency.p95(now, RECENT_S), RECENT_S).items()}
    return long, recent


async def publish_latency(redis: Any, namespace: str, host_id: str, figures: Mapping[str, tuple[float, int]],
                          recent: Mapping[str, float] | None = None) -> None:
    """One host's p95 per shard (and, where given, its recent p95) into each shard's hash
    (TTL_S); raises Redis's errors."""
    if not figures:
        return
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        for shard_id, (p95, n) in figures.items():
            key = latency_key(namespace, shard_id)
            doc: dict[str, Any] = {"p95Ms": round(p95, 2), "n": n, "at": now}
            if recent and shard_id in recent:
                doc["recentMs"] = round(recent[shard_id], 2)
            pipe.hset(key, host_id, orjson.dumps(doc))
            pipe.expire(key, TTL_S)
        await pipe.execute()


async def read_shard_figures(redis: Any, namespace: str, shard_ids: list[str]) -> dict[str, tuple[float, float]]:
    """``{shard: (p95, recent p95)}``: the highest fresh figures any host published for
    each shard (a host that published no recent figure counts with its p95); shards with
    none are left out, a figure that is not a positive number is none; raises Redis's
    errors."""
    if not shard_ids:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for shard_id in shard_ids:
            pipe.hgetall(latency_key(namespace, shard_id))
        hashes = await pipe.execute()
    now = time.time()
    out: dict[str, tuple[float, float]] = {}
    for shard_id, fields in zip(shard_ids, hashes):
        best: tuple[float, float] | None = None
        for raw in (fields or {}).values():
            try:
                doc = orjson.loads(raw)
                p95, at = float(doc["p95Ms"]), float(doc["at"])
                recent = float(doc.get("recentMs", p95))
            except (ValueError, TypeError, KeyError, AttributeError, orjson.JSONDecodeError):
                continue
            if not 0 < p95 < math.inf:  # a zero baseline would make the limit 0: nothing is within it
                continue
            if not 0 < recent < math.inf:
                recent = p95
            if now - at <= FRESH_S:
                best = (p95, recent) if best is None else (max(best[0], p95), max(best[1], recent))
        if best is not None:
            out[shard_id] = best
    return out
