"""Tenant moves with a server stopped under them: the source or the target, mid-copy and
mid-catch-up. The move fails cleanly (the tenant served from exactly one shard, nothing
lost), and `resume` finishes it once the server is back."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio

from host.fleet.embedded import PgServer, _RunAs, free_port
from router.errors import MoveFailed, ShardUnreachable, TenantFleetError
from shard_migrations.moves.mover import Mover
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.hostkit import Host, auth, host_settings, running_host, tenant_with_key
from tests.test_moves import _leftovers, _schemas_with, _seed


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
