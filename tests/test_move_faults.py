"""Tenant moves with a server stopped under them: the source or the target, mid-copy and
mid-catch-up. The move fails cleanly (the tenant served from exactly one shard, nothing
lost), and `resume` finishes it once the server is back."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from host.fleet.embedded import PgServer, _RunAs, free_port
from router.errors import MoveFailed, ShardUnreachable, TenantFleetError
from shard_migrations.moves.mover import Mover
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.hostkit import Host, auth, host_settings, running_host, tenant_with_key
from tests.migratekit import run_cli
from tests.test_moves import _leftovers, _online_capable_dsn, _schemas_with, _seed


async def _replication_objects(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch(
            "SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE slot_name LIKE 'tf_move_%' "
            "AND database = current_database() UNION ALL SELECT 'publication ' || pubname FROM pg_publication "
            "WHERE pubname LIKE 'tf_move_%' UNION ALL SELECT 'subscription ' || subname FROM pg_subscription "
            "WHERE subname LIKE 'tf_move_%' AND subdbid = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())")]
    finally:
        await conn.close()


class Stoppable:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tenantfleet-shard4-"))
        self.root.chmod(0o755)
        self.runas = _RunAs.for_postgres()
        self.server = PgServer("shard4", self.root, free_port(), tuned_for_tests=True)

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start, self.runas)

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop, self.runas, "fast")


@pytest_asyncio.fixture(loop_scope="session")
async def rig(fresh_fleet: FleetFactory) -> AsyncIterator[tuple[Fleet, Host, Stoppable]]:
    s = Stoppable()
    try:
        await asyncio.to_thread(s.server.init, s.runas)
        await s.start()
        fleet = await fresh_fleet(connect_timeout_s=2.0)
        await fleet.directory.add_shard("shard4", s.server.dsn())
        fleet.shard_dsns["shard4"] = s.server.dsn()
        async with running_host(host_settings(fleet)) as host:
            for shard_id in ("shard1", "shard4"):  # both get the plugin's public migrations
                await tenant_with_key(fleet, host, shard_id=shard_id)
            yield fleet, host, s
    finally:
        await asyncio.to_thread(s.server.stop, s.runas, "immediate")
        shutil.rmtree(s.root, ignore_errors=True)


async def _items(host: Host, rec: Any, key: str) -> tuple[int, set[str]]:
    async with host.http.get("/api/plugins/inventory/items?limit=500", headers=auth(key, rec.code)) as r:
        body = await r.json()
        return r.status, {i["sku"] for i in body.get("items", [])}


@pytest.mark.parametrize("stopped, phase, mode", [
    ("target", "copying", "offline"), ("target", "catching up", "online"),
    ("source", "copying", "offline"), ("source", "catching up", "online")])
async def test_a_server_stopped_mid_move_fails_cleanly_and_resume_finishes(
        rig: tuple[Fleet, Host, Stoppable], stopped: str, phase: str, mode: str) -> None:
    fleet, host, s4 = rig
    source, target = ("shard1", "shard4") if stopped == "target" else ("shard4", "shard1")
    if mode == "online" and not await _online_capable_dsn(fleet.shard_dsns[source]):
        # an external source without wal_level=logical (make test-external) can only move
        # offline: the stop then lands mid-copy instead
        mode, phase = "offline", "copying"
    rec, key = await tenant_with_key(fleet, host, shard_id=source)
    skus = await _seed(host, rec, key, 30)
    stopping: list[asyncio.Future[None]] = []

    def progress(p: str, _figures: dict[str, Any]) -> None:
        if p == phase and not stopping:
            stopping.append(asyncio.ensure_future(s4.stop()))

    mover = Mover(fleet.directory, fleet.settings, progress=progress)
    run_ids: list[int] = []
    with pytest.raises(TenantFleetError) as caught:
        await mover.start(rec, target, mode, on_run=run_ids.append)
    assert isinstance(caught.value, (MoveFailed, ShardUnreachable)), caught.value
    await stopping[0]
    run_id = run_ids[0]
    info = await mover.load(run_id)
    assert info.phase not in ("switched", "cleaned", "done")
    assert (await fleet.directory.get(id=rec.tenant_id)).shard_id == source  # never switched
    # the failed move let go of what it held on the side still up (no slot holding WAL,
    # no worker or WAL sender): the resume makes them again
    up = source if stopped == "target" else target
    assert await _replication_objects(fleet.shard_dsns[up]) == []
    if stopped == "target":  # the tenant keeps working on its source meanwhile, honestly
        status, seen = await _items(host, rec, key)
        assert status == 200 and seen == skus
        async with host.http.post("/api/plugins/inventory/items", json={"sku": "during", "qty": 1},
                                  headers=auth(key, rec.code)) as r:
            assert r.status == 201
        skus.add("during")
    else:  # its only shard is down: an honest 503, never a success or a wrong answer
        status, _ = await _items(host, rec, key)
        assert status == 503
    await s4.start()
    done = await asyncio.wait_for(Mover(fleet.directory, fleet.settings).resume(run_id), 120)
    assert done.phase == "done"
    now = await fleet.directory.get(id=rec.tenant_id)
    assert now.shard_id == target and now.epoch == rec.epoch + 1
    status, seen = await _items(host, rec, key)
    assert status == 200 and seen == skus
    assert await _schemas_with(fleet, rec.schema) == [target]
    assert await _leftovers(fleet) == []


async def test_abort_with_the_target_down_frees_the_source_and_gc_cleans_the_target_later(
        rig: tuple[Fleet, Host, Stoppable]) -> None:
    """A drain of a failing shard: the target dies mid-catch-up. `--abort` can't reach it,
    but drops the source's slot and publication at once (no WAL kept for a shard that may
    never come back); once the target is back, `gc` drops its subscription and copy."""
    fleet, host, s4 = rig
    rec, key = await tenant_with_key(fleet, host, shard_id="shard1")
    skus = await _seed(host, rec, key, 5)
    stopping: list[asyncio.Future[None]] = []
    online = await _online_capable_dsn(fleet.shard_dsns["shard1"])  # not on an external PG without logical WAL
    mode, phase = ("online", "catching up") if online else ("offline", "copying")

    def progress(p: str, _figures: dict[str, Any]) -> None:
        if p == phase and not stopping:
            stopping.append(asyncio.ensure_future(s4.stop()))

    run_ids: list[int] = []
    with pytest.raises(TenantFleetError):
        await Mover(fleet.directory, fleet.settings, progress=progress).start(rec, "shard4", mode,
                                                                           on_run=run_ids.append)
    await stopping[0]
    try:
        aborted = await Mover(fleet.directory, fleet.settings).abort(run_ids[0])
        assert aborted.phase == "aborted" and "gc" in aborted.detail["targetLeftovers"]
        assert await _replication_objects(fleet.shard_dsns["shard1"]) == []
        status, seen = await _items(host, rec, key)
        assert status == 200 and seen == skus
    finally:
        await s4.start()
    code, out, err = await run_cli(fleet, "--json", "gc", "--grace", "86400")
    assert code == 0, err
    assert await _replication_objects(fleet.shard_dsns["shard4"]) == []
    assert "shard4" not in await _schemas_with(fleet, rec.schema)
