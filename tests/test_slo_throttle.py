"""The SLO-aware throttle against real servers: a host publishes its per-shard p95 to
Valkey while the test loads tenants of one shard; the shard is made slow on purpose
(`host.loadprep.hold_shard`, what `tenantfleet loadtest slow-shard` runs); the throttle
halves that shard's limiter down to a pause and, once the shard is quick again, raises it
one step at a time back to its concurrency. Redis unreachable: no figures, full
concurrency, and the tick returns. Nothing is timed: each step waits for the figure it needs.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from host.fleet.embedded import free_port
from host.loadprep import hold_shard, prepare_load_tenants
from router.client import redis_address
from router.shard_latency import (
    LOOP, RECENT_S, ShardLatency, host_figures, publish_latency, read_shard_figures, watch_loop_lag,
)
from shard_migrations.limiter import ShardLimiter
from shard_migrations.slo_throttle import SloThrottle, file_limits, throttle_api
from tests.fleetkit import Fleet
from tests.hostkit import host_settings, running_host
from tests.migratekit import wait_for

ITEMS = "/api/plugins/inventory/items"


async def test_the_throttle_halves_a_slow_shard_down_to_a_pause_and_raises_it_again_step_by_step(
        fleet: Fleet) -> None:
    s = host_settings(fleet)
    async with running_host(s) as host:
        doc = await prepare_load_tenants(fleet.settings, tenants=6, url=host.url, prefix="th" + uuid.uuid4().hex[:6],
                                         items=5, known_keys={})
        slow = doc["tenants"][0]["shardId"]
        mine = [t for t in doc["tenants"] if t["shardId"] == slow]
        stop = asyncio.Event()
        served = 0

        async def load(t: dict[str, Any]) -> None:
            nonlocal served
            headers = {"Authorization": f"Bearer {t['apiKey']}", "X-Tenant": t["code"]}
            while not stop.is_set():
                async with host.http.get(f"{ITEMS}/1", headers=headers) as resp:
                    await resp.read()
                    served += 1

        loaders = [asyncio.create_task(load(mine[i % len(mine)])) for i in range(4)]
        redis = aioredis.Redis(**redis_address(s.redis_url))
        lim = ShardLimiter(slow, s, concurrency=4)
        throttle = SloThrottle(s.model_copy(update={"slo_throttle_p95_ms": 150.0}), lambda: [lim], redis=redis)
        hold: asyncio.Task[Any] | None = None
        try:
            async def published() -> bool:
                return slow in await read_shard_figures(redis, s.redis_namespace, [slow])
            await wait_for(published, what="the host publishing the shard's p95")
            # a quick shard: nothing throttled
            await throttle.tick()
            assert throttle.p95[slow] < 150 and lim.allowed == 4 and lim.throttled is None

            hold = asyncio.create_task(hold_shard(s, slow, seconds=120, hold_ms=250, gap_ms=25))
            seen = []
            while lim.allowed > 0:
                await asyncio.sleep(1)
                await throttle.tick()
                if not seen or seen[-1] != lim.allowed:
                    seen.append(lim.allowed)
                assert len(seen) < 60, seen
            # multiplicative decrease, down to a pause; shown as "throttled by SLO"
            assert [x for x in seen if x < 4] == [2, 1, 0], seen
            assert lim.throttled is not None and lim.throttled.startswith("throttled by SLO") and "paused" in lim.throttled
            assert throttle.p95[slow] >= 0.9 * 150, throttle.decisions
            # paused: a new operation on the shard waits for a slot
            entered = asyncio.Event()

            async def operation() -> None:
                async with lim.slot():
                    entered.set()
            op = asyncio.create_task(operation())
            await asyncio.sleep(0)
            assert not entered.is_set() and lim.in_flight == 0

            hold.cancel()                       # the shard is quick again
            rises = [0]
            while lim.allowed < 4:
                await asyncio.sleep(1)
                await throttle.tick()
                if lim.allowed != rises[-1]:
                    rises.append(lim.allowed)
                assert len(rises) < 100
            assert rises == [0, 1, 2, 3, 4]     # additive increase, one step a tick
            assert lim.throttled is None
            await asyncio.wait_for(op, 10)      # the waiting operation got its slot
            assert entered.is_set() and served > 0
            assert [d[1] for d in throttle.decisions] == [2, 1, 0, 1, 2, 3, 4]
        finally:
            stop.set()
            if hold is not None:
                hold.cancel()
            await asyncio.gather(*loaders, *(t for t in [hold] if t), return_exceptions=True)
            await redis.aclose()


async def test_without_redis_the_throttle_runs_at_the_configured_limits_and_says_so(
        fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    s = fleet.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    lim = ShardLimiter("shard1", s, concurrency=3)
    await lim.set_allowed(1, "throttled by SLO: earlier")
    caplog.set_level(logging.WARNING, logger="tenantfleet.slo_throttle")
    async with SloThrottle(s, lambda: [lim]) as throttle:
        await asyncio.wait_for(throttle.tick(), 10)   # returns: a dead Redis never hangs a run
        assert lim.allowed == 3 and lim.throttled is None
        async with lim.slot():                         # and operations go on
            assert lim.in_flight == 1
    assert "Redis unreachable" in caplog.text and "configured limits" in caplog.text


async def test_the_throttle_is_off_by_setting_and_reads_its_limits_from_an_slo_file(fleet: Fleet, tmp_path: Any) -> None:
    off = fleet.settings.model_copy(update={"slo_throttle": False})
    lim = ShardLimiter("shard1", off, concurrency=2)
    async with SloThrottle(off, lambda: [lim]) as throttle:
        assert not throttle.enabled and throttle._task is None
    assert lim.allowed == 2
    slo = tmp_path / "slo.toml"
    slo.write_text("[limits]\np95_ms = 500\n[phases.event]\np95_ratio_to_steady = 1.5\n")
    assert file_limits(str(slo)) == (500.0, 1.5)
    t = SloThrottle(fleet.settings.model_copy(update={"slo_throttle_file": str(slo)}), lambda: [lim])
    t.baseline["shard1"] = 100.0
    assert t.limit_for("shard1") == 150.0 and t.limit_for("shard2") == 500.0
    slo.write_text("[limits]\np95_ms = 'fast'\n")
    with pytest.raises(ValueError, match="p95_ms must be a positive number"):
        file_limits(str(slo))


def test_the_rolling_p95_per_shard_comes_from_the_last_window_only() -> None:
    lat = ShardLatency(window_s=10)
    for i in range(100):
        lat.observe("shard1", 0.010 if i < 95 else 0.500, now=1000.0)
    for i in range(10):
        lat.observe("shard2", 0.010, now=1000.0)          # too few for a p95
    p95, n = lat.p95(now=1000.0)["shard1"]
    assert n == 100 and 10.0 <= p95 <= 10.5 and "shard2" not in lat.p95(now=1000.0)
    for i in range(100):
        lat.observe("shard1", 0.300, now=1005.0)
    assert 300 <= lat.p95(now=1005.0)["shard1"][0] <= 315
    assert lat.p95(now=1011.0)["shard1"][1] == 100       # the first second left the window
    assert lat.p95(now=1020.0) == {}


def test_a_hosts_figure_is_its_transactions_p95_plus_its_loop_lag_over_the_long_and_the_recent_window() -> None:
    """What a client waits is the transaction and the wait for the host's event loop: the
    published figure adds the loop lag's p95 to each shard's, over 10 s (the baseline) and
    over the last RECENT_S seconds (what the throttle acts on)."""
    lat, lag = ShardLatency(window_s=10), ShardLatency(window_s=10)
    for sec in range(1000, 1010):                 # 10 s at 10 ms, then 3 s at 40 ms
        for _ in range(50):
            lat.observe("shard1", 0.010 if sec < 1007 else 0.040, now=float(sec))
            lag.observe(LOOP, 0.001 if sec < 1007 else 0.008, now=float(sec))
    assert RECENT_S == 3
    long, recent = host_figures(lat, lag, now=1009.0)
    p95, n = long["shard1"]
    assert n == 500 and 40 + 8 <= p95 <= (40 + 8) * 1.05      # 30% of the window is slow: its p95 is slow
    assert 40 + 8 <= recent["shard1"] <= (40 + 8) * 1.05
    # a burst of 1 s in 10: under the long p95 (95th of 500), the whole recent one
    lat2 = ShardLatency(window_s=10)
    for sec in range(1000, 1010):                 # 450 at 10 ms, then 20 at 40 ms in the last second
        for _ in range(50 if sec < 1009 else 20):
            lat2.observe("shard1", 0.040 if sec == 1009 else 0.010, now=float(sec))
    long, recent = host_figures(lat2, None, now=1009.0)
    assert long["shard1"][0] <= 10.5 and recent["shard1"] >= 40   # the burst shows in the recent figure only
    assert host_figures(ShardLatency(), lag) == ({}, {})          # no transactions: nothing to publish


async def test_the_loop_lag_probe_records_how_late_a_blocked_loop_wakes_it() -> None:
    lag = ShardLatency(window_s=10)
    probe = asyncio.create_task(watch_loop_lag(lag, sample_s=0.005))
    try:
        for i in range(40):                       # 40 probe wakes, 1 in 5 behind a 50 ms callback
            await asyncio.sleep(0.006)
            if i % 5 == 0:
                time.sleep(0.05)
    finally:
        probe.cancel()
    p95, n = lag.p95()[LOOP]
    assert n >= 20 and p95 >= 40                  # 20% of the wakes were 40+ ms late
    quiet = ShardLatency(window_s=10)
    probe = asyncio.create_task(watch_loop_lag(quiet, sample_s=0.005))
    try:
        await asyncio.sleep(0.3)
    finally:
        probe.cancel()
    assert quiet.p95()[LOOP][0] < 40


async def test_the_throttle_acts_on_the_recent_figure_against_a_limit_made_from_the_steady_one(fleet: Fleet) -> None:
    """A drain's burst lasts a few seconds: the 10 s p95 hardly moves while clients wait
    longer. The throttle takes its limit from the 10 s figure at the start and halves on
    the recent one; a host publishing no recent figure counts with its p95."""
    s = fleet.settings.model_copy(update={"slo_throttle_start_rate": 0.0, "slo_throttle_ratio": 1.25,
                                          "redis_namespace": "rc" + uuid.uuid4().hex[:8]})
    redis = aioredis.Redis(**redis_address(s.redis_url))
    lim = ShardLimiter("shard1", s, concurrency=4)
    try:
        await publish_latency(redis, s.redis_namespace, "host-a", {"shard1": (20.0, 500)}, {"shard1": 20.0})
        throttle = SloThrottle(s, lambda: [lim], redis=redis)
        await throttle.tick()
        assert throttle.limit_for("shard1") == 25.0 and lim.allowed == 4
        # the burst: the 10 s figure still under the limit, the last 3 s over it
        await publish_latency(redis, s.redis_namespace, "host-a", {"shard1": (21.0, 500)}, {"shard1": 30.0})
        await throttle.tick()
        assert lim.allowed == 2 and throttle.p95["shard1"] == 30.0 and throttle.limit_for("shard1") == 25.0
        # a second host without a recent figure (an older release): its p95 stands for it
        await publish_latency(redis, s.redis_namespace, "host-b", {"shard1": (40.0, 500)})
        assert await read_shard_figures(redis, s.redis_namespace, ["shard1"]) == {"shard1": (40.0, 40.0)}
        await throttle.tick()
        assert lim.allowed == 1
    finally:
        await redis.aclose()


async def test_slow_start_paces_a_serving_shard_from_the_first_operation_and_speeds_up_while_p95_is_low(
        fleet: Fleet) -> None:
    """A run's shards that serve requests (a published p95) start paced at the start rate
    before any operation; low readings double the rate until pacing ends, a high one halves
    it and leaves the concurrency alone; a shard with no figure is never paced."""
    s = fleet.settings.model_copy(update={"slo_throttle_p95_ms": 100.0, "slo_throttle_start_rate": 10.0,
                                          "redis_namespace": "ss" + uuid.uuid4().hex[:8]})
    redis = aioredis.Redis(**redis_address(s.redis_url))
    lims: dict[str, ShardLimiter] = {}

    def limiter_for(sid: str) -> ShardLimiter:
        return lims.setdefault(sid, ShardLimiter(sid, s, concurrency=4))

    async def publish(p95: float) -> None:
        await publish_latency(redis, s.redis_namespace, "host-a", {"shard1": (p95, 500)})
    try:
        await publish(10.0)
        throttle = SloThrottle(s, lambda: list(lims.values()), redis=redis, shards=["shard1", "shard2"],
                               limiter_for=limiter_for)
        assert await throttle.slow_start()
        one = lims["shard1"]
        assert one.pace_s == pytest.approx(0.1) and one.allowed == 4
        assert one.throttled is not None and "10/s" in one.throttled
        assert "shard2" not in lims or lims["shard2"].pace_s == 0     # no figure: full speed
        # paced: operations start at least 0.1 s apart, whatever the concurrency
        starts: list[float] = []

        async def operation() -> None:
            async with one.slot():
                starts.append(asyncio.get_running_loop().time())
        await asyncio.gather(*(operation() for _ in range(3)))
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(g >= 0.09 for g in gaps), gaps

        await throttle.tick()
        assert one.pace_s == pytest.approx(0.05)                       # low: 20/s
        await publish(88.0)
        await throttle.tick()
        assert one.pace_s == pytest.approx(0.025) and one.allowed == 4  # within 90% of it: still doubles
        await publish(95.0)
        await throttle.tick()
        assert one.pace_s == pytest.approx(0.025) and one.allowed == 4  # near the limit: holds
        await publish(120.0)
        await throttle.tick()
        assert one.pace_s == pytest.approx(0.05) and one.allowed == 4  # past it: halves, same concurrency
        await publish(10.0)
        rates = []
        while one.pace_s > 0:
            await throttle.tick()
            rates.append(round(1 / one.pace_s) if one.pace_s else None)
            assert len(rates) < 10, rates
        assert rates == [40, 80, 160, 320, None] and one.throttled is None and one.allowed == 4
        api = throttle_api(throttle)
        assert api is not None and [c["rate"] for c in api["changes"] if c["shardId"] == "shard1"] == \
            [10.0, 20.0, 40.0, 20.0, 40.0, 80.0, 160.0, 320.0, None]
    finally:
        await redis.aclose()


async def test_slow_start_off_or_without_figures_starts_at_full_speed(fleet: Fleet) -> None:
    s = fleet.settings.model_copy(update={"slo_throttle_start_rate": 0.0})
    lims = {"shard1": ShardLimiter("shard1", s, concurrency=2)}
    throttle = SloThrottle(s, lambda: list(lims.values()), shards=["shard1"], limiter_for=lims.__getitem__)
    assert not await throttle.slow_start() and lims["shard1"].pace_s == 0
    quiet = fleet.settings.model_copy(update={"redis_namespace": "nf" + uuid.uuid4().hex[:8]})  # nobody publishes
    async with SloThrottle(quiet, lambda: list(lims.values()), shards=["shard1"],
                           limiter_for=lims.__getitem__) as throttle:
        assert throttle.enabled and lims["shard1"].pace_s == 0 and lims["shard1"].throttled is None


async def test_an_operation_waiting_for_its_pace_waits_out_a_pause_or_backoff_that_begins_meanwhile(
        fleet: Fleet) -> None:
    """The pace wait is not a slot: a pause (allowed 0) or a backoff that begins while an
    operation waits for its turn holds it, as it holds one that has not reached the pace."""
    for hold in ("pause", "backoff"):
        lim = ShardLimiter("shard1", fleet.settings, concurrency=2)
        await lim.set_pace(1.0)                    # long enough that a loaded machine holds it first
        started: list[int] = []
        release = asyncio.Event()

        async def operation(i: int) -> None:
            async with lim.slot():
                started.append(i)
                await release.wait()
        first = asyncio.create_task(operation(1))
        while started != [1]:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(operation(2))
        await asyncio.sleep(0.05)                  # waiting for its pace (1 s after the first)
        if hold == "pause":
            await lim.set_allowed(0, "paused")
        else:
            lim.backoff_until = time.monotonic() + 3600
        await asyncio.sleep(1.5)                   # past the pace
        assert started == [1] and lim.in_flight == 1, hold
        if hold == "pause":
            await lim.set_allowed(2)
        else:                                      # it sleeps out the hour's backoff: end it here
            second.cancel()
            started.append(2)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 30)
        assert started == [1, 2] and lim.in_flight == 0, hold


async def test_cancelled_waiters_leave_the_next_paced_start_one_pace_after_the_last_real_one(fleet: Fleet) -> None:
    lim = ShardLimiter("shard1", fleet.settings, concurrency=8)
    await lim.set_pace(5.0)
    release = asyncio.Event()
    started: list[float] = []

    async def operation() -> None:
        async with lim.slot():
            started.append(time.monotonic())
            await release.wait()
    first = asyncio.create_task(operation())
    while len(started) != 1:
        await asyncio.sleep(0.01)
    waiting = [asyncio.create_task(operation()) for _ in range(7)]
    await asyncio.sleep(0.05)
    for t in waiting:
        t.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert len(started) == 1
    # the next start is due one pace after the first, not after seven cancelled ones
    assert lim._next_start <= started[0] + 5.0 + 1e-6, lim._next_start - started[0]
    release.set()
    await first


async def test_a_published_p95_of_zero_or_below_is_no_figure_so_it_cannot_become_a_zero_limit(fleet: Fleet) -> None:
    """A baseline of 0 ms (a host that publishes 0, or a negative figure) made the limit 0:
    every later reading is past it and the shard ran one operation per max pause for the
    whole run. Such figures are ignored, as a malformed one is."""
    s = fleet.settings.model_copy(update={"redis_namespace": "zp" + uuid.uuid4().hex[:8]})
    redis = aioredis.Redis(**redis_address(s.redis_url))
    try:
        await publish_latency(redis, s.redis_namespace, "host-a", {"shard1": (0.0, 500), "shard2": (-3.0, 500),
                                                                    "shard3": (12.0, 500)})
        assert await read_shard_figures(redis, s.redis_namespace, ["shard1", "shard2", "shard3"]) == {
            "shard3": (12.0, 12.0)}
        lims = {sid: ShardLimiter(sid, s, concurrency=2) for sid in ("shard1", "shard3")}
        throttle = SloThrottle(s, lambda: list(lims.values()), redis=redis)
        await throttle.tick()
        assert "shard1" not in throttle.baseline and lims["shard1"].allowed == 2
    finally:
        await redis.aclose()


async def test_a_throttle_that_fails_to_start_leaves_no_shard_paced(fleet: Fleet) -> None:
    """Limiters outlive a run (a migrator keeps its ShardLimiters): a slow start that
    raises half way (here: the run's limiter_for; or the run cancelled) must not leave the
    shards it paced paced for the next run."""
    s = fleet.settings.model_copy(update={"slo_throttle_start_rate": 10.0, "redis_namespace": "fs" + uuid.uuid4().hex[:8]})
    redis = aioredis.Redis(**redis_address(s.redis_url))
    lims = {"shard1": ShardLimiter("shard1", s, concurrency=2)}

    def limiter_for(sid: str) -> ShardLimiter:
        if sid not in lims:
            raise RuntimeError(f"no limiter for {sid}")
        return lims[sid]
    try:
        await publish_latency(redis, s.redis_namespace, "host-a", {"shard1": (10.0, 500), "shard2": (10.0, 500)})
        with pytest.raises(RuntimeError, match="no limiter for shard2"):
            async with SloThrottle(s, lambda: list(lims.values()), redis=redis, shards=["shard1", "shard2"],
                                   limiter_for=limiter_for):
                pass
        assert lims["shard1"].pace_s == 0 and lims["shard1"].throttled is None and lims["shard1"].allowed == 2
    finally:
        await redis.aclose()
