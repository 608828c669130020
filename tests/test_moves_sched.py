"""One scheduler for migrations and moves (issue 9): a tenant is never migrated and moved
at once. A migration run skips a tenant a move holds and comes back to it, and follows a
tenant that moved to the shard that serves it now; a move waits for a migration in flight
on its tenant. Real Mover, real FleetMigrator, real servers."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from router.errors import TenantMoving
from router.models import TenantRecord
from shard_migrations.engine import apply_tenant
from shard_migrations.fleet import FleetMigrator, RunOptions, RunReport
from shard_migrations.moves.mover import Mover
from shard_migrations.packages import PluginPackage
from tests.fleetkit import Fleet
from tests.migratekit import ledger_rows, make_tenants, migrator, temp_plugin, tenant_objects, wait_for
from tests.test_moves import _schemas_with

NOTES = "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);\n"
TAG = "ALTER TABLE notes ADD COLUMN tag text;\n"


def notes_plugin(tmp_path: Path, gate: int | None = None) -> PluginPackage:
    """A plugin of the test's own with two tenant-scope files (no public scope: a move
    needs nothing of it on the target). With ``gate``, the second file first waits for the
    advisory lock ``gate`` (the test holds it to keep a unit mid-transaction)."""
    second = (f"SELECT pg_advisory_xact_lock({int(gate)});\n" if gate is not None else "") + TAG
    return temp_plugin(tmp_path, "np_" + uuid.uuid4().hex[:8],
                       {"tenant/001_notes.sql": NOTES, "tenant/002_tag.sql": second})


async def _ledger_by_tenant(fleet: Fleet, plugin_id: str) -> dict[str, set[tuple[str, str]]]:
    """{tenant_id: {(shard_id, file name)}} of the plugin's tenant-scope ledger rows."""
    out: dict[str, set[tuple[str, str]]] = {}
    for r in await ledger_rows(fleet, plugin_id):
        if r["scope"] == "tenant":
            out.setdefault(r["tenant_id"], set()).add((r["shard_id"], r["name"]))
    return out


async def _has_tag_column(fleet: Fleet, shard_id: str, schema: str) -> bool:
    objs = await tenant_objects(fleet.shard_dsns[shard_id])
    return "notes.tag" in objs.get(schema, {}).get("columns", set())


async def _assert_migrated_where_served(fleet: Fleet, plugin_id: str, tenants: list[TenantRecord]) -> None:
    """Each tenant's ledger rows (both files, once each) and its migrated table are on the
    shard the directory names, and on no other shard."""
    ledger = await _ledger_by_tenant(fleet, plugin_id)
    for t in tenants:
        now = await fleet.directory.get(id=t.tenant_id)
        assert ledger.get(t.tenant_id) == {(now.shard_id, "001_notes.sql"), (now.shard_id, "002_tag.sql")}, t.code
        assert await _has_tag_column(fleet, now.shard_id, now.schema), t.code
        assert await _schemas_with(fleet, now.schema) == [now.shard_id]


async def _item(fleet: Fleet, run_id: int | None, tenant_id: str) -> Any:
    return await fleet.control.fetchrow(
        "SELECT status, attempts, last_error FROM fleet_run_items WHERE run_id = $1 AND tenant_id = $2::uuid",
        run_id, tenant_id)


async def _held_seen(fleet: Fleet, m: FleetMigrator, tenant_id: str) -> bool:
    row = await _item(fleet, m.run_id, tenant_id)
    return row is not None and (row["last_error"] or "").startswith("TenantHeld")


async def test_a_run_skips_a_tenant_held_by_a_move_finishes_the_others_and_comes_back_to_it(
        fleet: Fleet, tmp_path: Path) -> None:
    pkg = notes_plugin(tmp_path)
    tenants = await make_tenants(fleet, 3, shard_id="shard1")
    held = tenants[0]
    hold = await asyncpg.connect(fleet.shard_dsns["shard1"])  # what a move holds for its whole length
    try:
        await hold.execute("SELECT pg_advisory_lock(fleet.tenant_hold_key($1::uuid))", held.tenant_id)
        async with migrator(fleet, pkg) as m:
            run = asyncio.ensure_future(m.apply(RunOptions(tenant_ids=tuple(t.tenant_id for t in tenants))))
            try:
                await wait_for(lambda: _held_seen(fleet, m, held.tenant_id), what="the held tenant skipped")

                async def others_done() -> bool:
                    ledger = await _ledger_by_tenant(fleet, pkg.id)
                    return all(len(ledger.get(t.tenant_id, ())) == 2 for t in tenants[1:])
                await wait_for(others_done, what="the other tenants migrated")
                assert held.tenant_id not in await _ledger_by_tenant(fleet, pkg.id)
                assert not run.done()
                await hold.execute("SELECT pg_advisory_unlock_all()")
                report: RunReport = await asyncio.wait_for(run, 60)
            finally:
                if not run.done():
                    run.cancel()
                    await asyncio.gather(run, return_exceptions=True)
    finally:
        await hold.close()
    assert report.state == "done" and not report.failed_items
    assert (await _item(fleet, report.run_id, held.tenant_id))["status"] == "done"
    await _assert_migrated_where_served(fleet, pkg.id, tenants)


async def test_a_migration_started_on_a_tenant_under_a_move_follows_it_to_its_new_shard(
        fleet: Fleet, tmp_path: Path) -> None:
    """A real Mover holds the tenant (kept mid-copy by a transaction of the tenant's that
    holds its fence); a run started meanwhile finishes the other tenants, comes back to the
    moved one and applies its files on the shard it moved to."""
    pkg = notes_plugin(tmp_path)
    tenants = await make_tenants(fleet, 3, shard_id="shard1")
    moving = tenants[0]
    settings = fleet.settings.model_copy(update={"move_hold_wait_ms": 120_000})
    prepared = asyncio.Event()
    mover = Mover(fleet.directory, settings,
                  progress=lambda phase, _fig: prepared.set() if phase == "prepared" else None)
    # an open tenant transaction (as the host's fence takes it): the offline copy waits for it
    writer = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        await writer.execute("SELECT pg_advisory_lock_shared(fleet.tenant_lock_key($1::uuid))", moving.tenant_id)
        move = asyncio.ensure_future(mover.start(moving, "shard2", "offline"))
        try:
            await asyncio.wait_for(prepared.wait(), 60)
            async with migrator(fleet, pkg) as m:
                run = asyncio.ensure_future(m.apply(RunOptions(tenant_ids=tuple(t.tenant_id for t in tenants))))
                try:
                    await wait_for(lambda: _held_seen(fleet, m, moving.tenant_id), what="the moving tenant skipped")
                    assert not move.done()
                    await writer.execute("SELECT pg_advisory_unlock_all()")  # the move goes on
                    info = await asyncio.wait_for(move, 120)
                    report: RunReport = await asyncio.wait_for(run, 120)
                finally:
                    for task in (run,):
                        if not task.done():
                            task.cancel()
                            await asyncio.gather(task, return_exceptions=True)
                assert m.rerouted == 1
        finally:
            if not move.done():
                move.cancel()
                await asyncio.gather(move, return_exceptions=True)
    finally:
        await writer.close()
    assert info.phase == "done"
    assert report.state == "done" and not report.failed_items
    assert (await fleet.directory.get(id=moving.tenant_id)).shard_id == "shard2"
    await _assert_migrated_where_served(fleet, pkg.id, tenants)


async def test_a_move_started_mid_migration_waits_for_the_unit_and_takes_the_migrated_tenant_along(
        fleet: Fleet, tmp_path: Path) -> None:
    gate = int.from_bytes(uuid.uuid4().bytes[:4], "big")
    pkg = notes_plugin(tmp_path, gate=gate)
    (t,) = await make_tenants(fleet, 1, shard_id="shard1")
    gatekeeper = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        await gatekeeper.execute("SELECT pg_advisory_lock($1::bigint)", gate)
        async with migrator(fleet, pkg, lock_timeout_ms=120_000) as m:
            run = asyncio.ensure_future(m.apply(RunOptions(tenant_ids=(t.tenant_id,))))
            move: asyncio.Future[Any] | None = None
            try:
                async def unit_in_flight() -> bool:  # the unit's transaction waits at the gate
                    return bool(await gatekeeper.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                        "AND objid = ($1::bigint & 4294967295)::oid", gate))
                await wait_for(unit_in_flight, what="the migration's unit at the gate")
                mover = Mover(fleet.directory, fleet.settings.model_copy(update={"move_hold_wait_ms": 120_000}))
                move = asyncio.ensure_future(mover.start(t, "shard2", "offline"))

                async def mover_waits() -> bool:  # for the hold key the unit holds shared
                    return bool(await gatekeeper.fetchval(
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE "
                        "l.locktype = 'advisory' AND NOT l.granted AND l.mode = 'ExclusiveLock' "
                        "AND a.query LIKE '%tenant_hold_key%'"))
                await wait_for(mover_waits, what="the mover waiting for the migration")
                assert not run.done()
                await gatekeeper.execute("SELECT pg_advisory_unlock_all()")
                report: RunReport = await asyncio.wait_for(run, 120)
                info = await asyncio.wait_for(move, 120)
            finally:
                for task in (run, move):
                    if task is not None and not task.done():
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
    finally:
        await gatekeeper.close()
    assert report.state == "done" and not report.failed_items
    assert info.phase == "done"
    assert (await fleet.directory.get(id=t.tenant_id)).shard_id == "shard2"
    await _assert_migrated_where_served(fleet, pkg.id, [t])


async def test_apply_tenant_with_a_stale_placement_applies_on_the_shard_the_tenant_moved_to(
        fleet: Fleet, tmp_path: Path) -> None:
    pkg = notes_plugin(tmp_path)
    (t,) = await make_tenants(fleet, 1, shard_id="shard1")
    info = await Mover(fleet.directory, fleet.settings).start(t, "shard3", "offline")
    assert info.phase == "done"
    with pytest.raises(TenantMoving):  # no directory to re-resolve through: nothing applied
        await apply_tenant(fleet.shard_pools, fleet.settings, pkg, t)
    assert t.tenant_id not in await _ledger_by_tenant(fleet, pkg.id)
    applied = await apply_tenant(fleet.shard_pools, fleet.settings, pkg, t, control=fleet.control)
    assert applied == ["tenant/001_notes.sql", "tenant/002_tag.sql"]
    await _assert_migrated_where_served(fleet, pkg.id, [t])
