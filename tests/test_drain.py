"""Drain and rebalance (shard_migrations.moves.batch) on a fleet of the test's own, under
read and write load; and the CLI's refusals."""
from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from router.client import redis_address
from router.errors import NoShardAvailable, ShardNotFound
from router.shard_latency import publish_latency
from shard_migrations.moves.batch import MoveBatch, MoveMetrics, drain, rebalance
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.hostkit import Host, auth, host_settings, running_host, tenant_with_key
from tests.migratekit import run_cli
from tests.test_moves import _online_capable

DRAIN_TENANTS = 300
LOADED_TENANTS = 24          # the tenants the readers and writers use (spread over the lot)


class Load:
    """Writers and readers over some tenants; every answer recorded."""

    def __init__(self, host: Host, tenants: list[tuple[Any, str]]) -> None:
        self.host, self.tenants = host, tenants
        self.acked: dict[str, list[str]] = {rec.tenant_id: [] for rec, _ in tenants}
        self.statuses: dict[int, int] = {}
        self.stop = asyncio.Event()
        self.n = 0

    async def writer(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.is_set():
            rec, key = rnd.choice(self.tenants)
            self.n += 1
            sku = f"L-{seed}-{self.n:07d}"
            async with self.host.http.post("/api/plugins/inventory/items", json={"sku": sku, "qty": 1},
                                           headers=auth(key, rec.code)) as r:
                await r.read()
                self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                if r.status == 201:
                    self.acked[rec.tenant_id].append(sku)

    async def reader(self, seed: int) -> None:
        rnd = random.Random(seed)
        while not self.stop.is_set():
            rec, key = rnd.choice(self.tenants)
            async with self.host.http.get("/api/plugins/inventory/items?limit=5", headers=auth(key, rec.code)) as r:
                await r.read()
                self.statuses[r.status] = self.statuses.get(r.status, 0) + 1


async def _skus(fleet: Fleet, shard_id: str, schema: str) -> list[str]:
    conn = await asyncpg.connect(fleet.shard_dsns[shard_id])
    try:
        quoted = await conn.fetchval("SELECT quote_ident($1)", schema)
        return [r[0] for r in await conn.fetch(f"SELECT sku FROM {quoted}.items")]
    finally:
        await conn.close()


async def _placed(fleet: Fleet, shard_id: str) -> int:
    return int(await fleet.control.fetchval("SELECT count(*) FROM tenants WHERE shard_id = $1", shard_id))


@pytest.mark.timeout(900)  # ~1 min on a quiet 2-core machine; many more when it is shared
async def test_drain_of_a_shard_with_300_tenants_under_load_loses_nothing(fresh_fleet: FleetFactory) -> None:
    fleet = await fresh_fleet()
    async with running_host(host_settings(fleet)) as host:
        for shard_id in ("shard2", "shard3"):  # the targets get the plugin's public migrations
            await tenant_with_key(fleet, host, shard_id=shard_id)
        tenants = [await tenant_with_key(fleet, host, shard_id="shard1") for _ in range(DRAIN_TENANTS)]
        loaded = tenants[:: max(1, DRAIN_TENANTS // LOADED_TENANTS)]
        load = Load(host, loaded)
        tasks = [asyncio.ensure_future(load.writer(i)) for i in range(3)]
        tasks += [asyncio.ensure_future(load.reader(100 + i)) for i in range(2)]
        batches: list[MoveBatch] = []

        class View:
            def __init__(self, batch: MoveBatch) -> None:
                batches.append(batch)

            async def __aenter__(self) -> None:
                return None

            async def __aexit__(self, *exc: object) -> None:
                return None
        try:
            while sum(map(len, load.acked.values())) < 50:
                await asyncio.sleep(0.01)
            report = await drain(fleet.directory, fleet.settings, "shard1", batch_view=View)
        finally:
            load.stop.set()
            await asyncio.gather(*tasks)
        assert report.remaining == 0 and await _placed(fleet, "shard1") == 0
        assert (await fleet.directory.get_shard("shard1")).state == "draining"
        data = report.to_api()
        assert data["done"] == DRAIN_TENANTS and data["failed"] == 0, data
        cpu = data["cpuPriority"]   # whether the moves yielded the CPU, and the load that decided it
        assert set(cpu) == {"yielding", "load1", "cpus", "moveIdle"} and cpu["yielding"] is (
            fleet.settings.move_idle and fleet.settings.operation_nice > 0 and cpu["load1"] < cpu["cpus"])
        assert {o.move.target for o in report.outcomes} == {"shard2", "shard3"}
        # the limits held: never more moves at once on a shard than allowed; one progress row
        assert 1 <= batches[0].peak_in_flight <= fleet.settings.moves_per_shard
        assert [r["shardId"] for r in batches[0].snapshot()] == ["shard1"]
        assert set(load.statuses) <= {200, 201}, load.statuses  # no request failed
        for rec, _ in loaded:
            now = await fleet.directory.get(id=rec.tenant_id)
            skus = await _skus(fleet, now.shard_id, now.schema)
            assert len(skus) == len(set(skus))
            assert set(load.acked[rec.tenant_id]) <= set(skus), f"{rec.code}: acknowledged writes lost"
        # a drained shard takes no new tenant
        with pytest.raises(NoShardAvailable):
            await fleet.directory.create_tenant("drainedx", shard_id="shard1")
        # running it again is a no-op that reports an empty shard
        again = await drain(fleet.directory, fleet.settings, "shard1")
        assert again.to_api()["planned"] == 0 and again.remaining == 0


async def test_rebalance_plans_then_applies_the_fewest_moves(fresh_fleet: FleetFactory) -> None:
    fleet = await fresh_fleet()
    async with running_host(host_settings(fleet)) as host:
        for shard_id in ("shard2", "shard3"):
            await tenant_with_key(fleet, host, shard_id=shard_id)
        for _ in range(10):
            await tenant_with_key(fleet, host, shard_id="shard1")
        before = {s: await _placed(fleet, s) for s in ("shard1", "shard2", "shard3")}
        assert before == {"shard1": 10, "shard2": 1, "shard3": 1}
        plan = await rebalance(fleet.directory, fleet.settings, tolerance=0.1)
        assert plan.run_id is None and {s: await _placed(fleet, s) for s in before} == before  # --plan changes nothing
        assert len(plan.planned) == 6 and all(m.source == "shard1" for m in plan.planned)
        registry = CollectorRegistry()
        mode = "online" if await _online_capable(fleet) else "offline"  # an external PG may lack logical WAL
        # the shards serve requests (a host publishes a low p95 for each): the moves slow-start at
        # the moves' own rate (1/s: a move costs ~10x a tenant's migration), not the migrations' 10/s
        redis = aioredis.Redis(**redis_address(fleet.settings.redis_url))

        async def serving() -> None:
            while True:
                await publish_latency(redis, fleet.settings.redis_namespace, "host-t",
                                      {s: (10.0, 500) for s in before}, {s: 10.0 for s in before})
                await asyncio.sleep(0.5)
        publisher = asyncio.create_task(serving())
        try:
            await asyncio.sleep(0.1)
            done = await rebalance(fleet.directory, fleet.settings, tolerance=0.1, apply=True, mode=mode,
                                   metrics=MoveMetrics(registry))
        finally:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
            await redis.aclose()
        assert done.to_api()["done"] == 6
        rates = [c["rate"] for c in done.throttle["changes"] if c["shardId"] == "shard1"]
        assert fleet.settings.slo_throttle_move_start_rate == 1.0 and rates[:2] == [1.0, 2.0], done.throttle
        moved = sum(registry.get_sample_value("tenantfleet_moves_total", {"source": "shard1", "target": t,
                                                                           "outcome": "done"}) or 0
                    for t in ("shard2", "shard3"))
        pauses = sum(registry.get_sample_value("tenantfleet_move_cutover_pause_seconds_count", {"target": t}) or 0
                     for t in ("shard2", "shard3"))
        assert moved == 6 and pauses == 6
        assert sum(registry.get_sample_value("tenantfleet_move_bytes_copied_total", {"source": "shard1", "target": t})
                   or 0 for t in ("shard2", "shard3")) > 0
        assert {s: await _placed(fleet, s) for s in before} == {"shard1": 4, "shard2": 4, "shard3": 4}
        state = await fleet.control.fetchval("SELECT state FROM fleet_runs WHERE run_id = $1", done.run_id)
        assert state == "done"


async def test_drain_and_rebalance_refuse_bad_input_and_change_nothing(fleet: Fleet) -> None:
    with pytest.raises(ShardNotFound):
        await drain(fleet.directory, fleet.settings, "shard9")
    code, out, err = await run_cli(fleet, "drain", "shard9")
    assert code != 0 and "SHARD_NOT_FOUND" in err + out
    code, out, err = await run_cli(fleet, "rebalance", "--tolerance", "1.5")
    assert code == 2 and "tolerance" in err.lower()
    code, out, err = await run_cli(fleet, "rebalance", "--by", "rows")
    assert code == 2 and "rows" in err
    code, out, err = await run_cli(fleet, "--json", "drain", "shard1", "--plan")
    assert code == 0, err
    assert (await fleet.directory.get_shard("shard1")).state == "active"  # --plan changed nothing
    code, out, err = await run_cli(fleet, "--json", "rebalance")
    assert code == 0, err
    assert '"runId": null' in out
