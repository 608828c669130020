"""Request latency per shard, shared through Redis for the SLO-aware throttle.

Hosts time every tenant transaction per shard (`ShardLatency`: per-second histograms
with fine logarithmic buckets, a rolling window of ``WINDOW_S``; one `observe` is a
`bisect` and an addition) and publish each shard's rolling p95 about once a second
(`publish_latency`) into one Redis hash per shard, a field per host, with a short TTL:
a host that stops publishing drops out within ``TTL_S``. The fleet migrator and the
mover read the hash (`read_shard_p95`) and slow down on a shard whose p95 nears its
limit (`shard_migrations.slo_throttle`). Here, in the base package, because both the
host (writer) and the migrator (reader) use the same names and format.
"""
from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from typing import Any, Mapping

import orjson

WINDOW_S = 10           # the rolling window the p95 is taken over
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

    def p95(self, now: float | None = None) -> dict[str, tuple[float, int]]:
        """``{shard: (p95 ms, transactions)}`` over the window, for shards with at least
        MIN_REQUESTS transactions in it (the bucket's upper bound: never below the truth)."""
        sec = int(now if now is not None else time.monotonic())
        out: dict[str, tuple[float, int]] = {}
        for shard_id, q in self._shards.items():
            counts = [0] * (len(BOUNDS_MS) + 1)
            for s, hist in q:
                if s > sec - self.window_s:
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


async def publish_latency(redis: Any, namespace: str, host_id: str, figures: Mapping[str, tuple[float, int]]) -> None:
    """One host's p95 per shard into each shard's hash (TTL_S); raises Redis's errors."""
    if not figures:
        return
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        for shard_id, (p95, n) in figures.items():
            key = latency_key(namespace, shard_id)
            pipe.hset(key, host_id, orjson.dumps({"p95Ms": round(p95, 2), "n": n, "at": now}))
            pipe.expire(key, TTL_S)
        await pipe.execute()


async def read_shard_p95(redis: Any, namespace: str, shard_ids: list[str]) -> dict[str, float]:
    """The highest fresh p95 any host published for each shard (shards with none are left
    out; a figure that is not a positive number is none); raises Redis's errors."""
    if not shard_ids:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for shard_id in shard_ids:
            pipe.hgetall(latency_key(namespace, shard_id))
        hashes = await pipe.execute()
    now = time.time()
    out: dict[str, float] = {}
    for shard_id, fields in zip(shard_ids, hashes):
        best: float | None = None
        for raw in (fields or {}).values():
            try:
                doc = orjson.loads(raw)
                p95, at = float(doc["p95Ms"]), float(doc["at"])
            except (ValueError, TypeError, KeyError, orjson.JSONDecodeError):
                continue
            if not 0 < p95 < math.inf:  # a zero baseline would make the limit 0: nothing is within it
                continue
            if now - at <= FRESH_S and (best is None or p95 > best):
                best = p95
        if best is not None:
            out[shard_id] = best
    return out
