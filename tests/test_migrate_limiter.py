"""The per-shard limiter: concurrency, backoff on one shard alone, slow probes, giving up."""
from __future__ import annotations

import asyncio
import time

from shard_migrations.limiter import ShardLimiter, ShardLimiters
from tests.fleetkit import Fleet


async def test_a_slow_probe_backs_off_that_shard_alone(fleet: Fleet) -> None:
    slow = ShardLimiter("shard1", fleet.settings.model_copy(update={"probe_slow_ms": 0.0001, "backoff_max_s": 5.0}))
    normal = ShardLimiters(fleet.settings)
    await slow.probe(await fleet.shard_pools.get("shard1"))
    await normal.get("shard2").probe(await fleet.shard_pools.get("shard2"))
    assert slow.snapshot().state == "backing_off" and "probe took" in (slow.last_error or "")
    assert normal.snapshot()["shard2"].state == "ok"
    async with normal.get("shard2").slot():          # the other shard is not held up
        assert normal.get("shard2").in_flight == 1


async def test_backoff_grows_exponentially_with_jitter_is_capped_and_gives_up_after_the_window(fleet: Fleet) -> None:
    lim = ShardLimiter("shard1", fleet.settings.model_copy(update={"backoff_max_s": 0.5, "shard_give_up_s": 0.3}))
    delays = []
    for _ in range(8):
        lim.backoff_until = 0.0
        lim.failure(ConnectionRefusedError("refused"))
        delays.append(lim.backoff_until - time.monotonic())
    assert all(d <= 0.5 for d in delays) and max(delays) > 0
    assert not lim.down
    deadline = time.monotonic() + 5
    while not lim.down:       # keeps failing: down once the give-up window has passed
        assert time.monotonic() < deadline
        lim.failure(ConnectionRefusedError("refused"))
        await asyncio.sleep(0.05)
    assert lim.snapshot().state == "down"
    lim2 = ShardLimiter("shard2", fleet.settings.model_copy(update={"shard_give_up_s": 0.3}))
    lim2.failure(ConnectionRefusedError("refused"))
    lim2.success()
    assert (lim2.failures, lim2.last_error, lim2.down) == (0, None, False)


async def test_slots_bound_concurrency_per_shard(fleet: Fleet) -> None:
    lim = ShardLimiter("shard1", fleet.settings, concurrency=2)
    peak = 0

    async def op() -> None:
        nonlocal peak
        async with lim.slot():
            peak = max(peak, lim.in_flight)
            await asyncio.sleep(0.01)

    await asyncio.gather(*(op() for _ in range(10)))
    assert peak == 2 and lim.in_flight == 0
