"""Defects found reviewing tenant moves (issue 9), each pinned by a test against the
suite's real servers: what a move must carry that the first version did not."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from router.errors import MoveFailed, TenantFleetError
from router.models import TenantRecord
from shard_migrations.moves.mover import Mover, cutover_budget_ms
from tests.fleetkit import Fleet
from tests.hostkit import Host, auth, host_settings, running_host, tenant_with_key
from tests.migratekit import run_cli
from tests.test_move_faults import Stoppable, rig  # noqa: F401  (the fixture: a fleet with a stoppable shard4)
from tests.test_moves import _crashed_at_commit, _online_capable_dsn


@pytest_asyncio.fixture(loop_scope="session")
async def host(fleet: Fleet) -> AsyncIterator[Host]:
    async with running_host(host_settings(fleet)) as h:
        for shard_id in fleet.shard_dsns:
            await tenant_with_key(fleet, h, shard_id=shard_id)
        yield h


async def _modes(fleet: Fleet) -> list[str]:
    conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        logical = await conn.fetchval("SELECT current_setting('wal_level') = 'logical'")
    finally:
        await conn.close()
    return ["offline", "online"] if logical else ["offline"]


async def test_a_not_valid_check_constraint_with_old_violating_rows_still_moves_offline(
        fleet: Fleet, host: Host) -> None:
    """A CHECK constraint added NOT VALID (the usual way to add one to a live table)
    leaves older rows that break it; PostgreSQL checks it for new rows only. Building the
    whole schema before the copy ("schema first") made the copied rows new rows: the
    offline move failed on them, every time it was resumed. Such a schema must be moved
    the other way (constraints after the rows), keeping the rows and the constraint."""
    rec, _ = await tenant_with_key(fleet, host, shard_id="shard1")
    s = rec.schema
    conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        await conn.execute(f"""
            CREATE TABLE {s}.prices (id int PRIMARY KEY, amount int NOT NULL);
            INSERT INTO {s}.prices VALUES (1, -5), (2, 10);
            ALTER TABLE {s}.prices ADD CONSTRAINT prices_amount_positive CHECK (amount > 0) NOT VALID;""")
    finally:
        await conn.close()
    info = await Mover(fleet.directory, fleet.settings).start(rec, "shard2", "offline")
    assert info.phase == "done"
    assert (await fleet.directory.get(id=rec.tenant_id)).shard_id == "shard2"
    conn = await asyncpg.connect(fleet.shard_dsns["shard2"])
    try:
        assert await conn.fetchval(f"SELECT sum(amount) FROM {s}.prices") == 5
        assert await conn.fetchval(
            "SELECT NOT convalidated FROM pg_constraint WHERE conname = 'prices_amount_positive' "
            "AND connamespace = $1::regnamespace", s) is True
    finally:
        await conn.close()


async def test_a_restarted_sequence_carries_its_next_value(fleet: Fleet, host: Host) -> None:
    """``ALTER SEQUENCE ... RESTART WITH n`` (or ``setval(seq, n, false)``) leaves a sequence
    whose next value is n but which reports no last value (pg_sequences.last_value is
    NULL until the next nextval). The switch set only sequences with a last value, so the
    target's copy started over at 1: the next insert there reused id 1 (a duplicate key,
    or, without a key, the same id twice). The target must hand out what the source would."""
    for mode in await _modes(fleet):
        rec, _ = await tenant_with_key(fleet, host, shard_id="shard1")
        s = rec.schema
        conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
        try:
            await conn.execute(f"""
                CREATE TABLE {s}.orders (id bigserial PRIMARY KEY, note text);
                CREATE TABLE {s}.tickets (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text);
                INSERT INTO {s}.orders (note) SELECT 'o' FROM generate_series(1, 3);
                INSERT INTO {s}.tickets (note) SELECT 't' FROM generate_series(1, 3);
                ALTER SEQUENCE {s}.orders_id_seq RESTART WITH 100;
                ALTER TABLE {s}.tickets ALTER COLUMN id RESTART WITH 200;""")
        finally:
            await conn.close()
        info = await Mover(fleet.directory, fleet.settings).start(rec, "shard2", mode)
        assert info.phase == "done", mode
        conn = await asyncpg.connect(fleet.shard_dsns["shard2"])
        try:
            assert await conn.fetchval(f"INSERT INTO {s}.orders (note) VALUES ('new') RETURNING id") == 100, mode
            assert await conn.fetchval(f"INSERT INTO {s}.tickets (note) VALUES ('new') RETURNING id") == 200, mode
        finally:
            await conn.close()


async def _stopped_mid_switch_then_aborted_with_the_target_down(fleet: Fleet, host: Host, s4: Stoppable,
                                                                 rec: TenantRecord) -> int:
    """A move to shard4 that stops between the target's side of the switch (committed)
    and the source's commit point, then aborted while shard4 is down: its copy there is
    left to gc. Returns the run id."""
    conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:  # an undelivered event; the source's commit fails where it deletes it (a fault)
        await conn.execute(
            "INSERT INTO fleet.event_outbox (event_id, tenant_id, source, name, payload, next_attempt_at) "
            "VALUES (gen_random_uuid(), $1::uuid, 'inventory', 'review.probe', '{}'::jsonb, "
            "now() + interval '1 hour')", rec.tenant_id)
        await conn.execute(f"""
            CREATE FUNCTION public.review_fail_delete() RETURNS trigger LANGUAGE plpgsql AS $$
              BEGIN RAISE EXCEPTION 'the source is lost at its commit point'; END $$;
            CREATE TRIGGER review_fail_delete BEFORE DELETE ON fleet.event_outbox FOR EACH ROW
              WHEN (OLD.tenant_id = '{rec.tenant_id}'::uuid) EXECUTE FUNCTION public.review_fail_delete();""")
        runs: list[int] = []
        with pytest.raises(MoveFailed):
            await Mover(fleet.directory, fleet.settings).start(rec, "shard4", "offline", on_run=runs.append)
        await conn.execute("DROP TRIGGER review_fail_delete ON fleet.event_outbox; "
                           "DROP FUNCTION public.review_fail_delete()")
    finally:
        await conn.close()
    assert (await fleet.directory.get(id=rec.tenant_id)).shard_id == "shard1"
    await s4.stop()
    try:
        aborted = await Mover(fleet.directory, fleet.settings).abort(runs[0])
        assert aborted.phase == "aborted" and "targetLeftovers" in aborted.detail
    finally:
        await s4.start()
    return runs[0]


async def _on_shard4(fleet: Fleet, rec: TenantRecord) -> dict[str, int]:
    conn = await asyncpg.connect(fleet.shard_dsns["shard4"])
    try:
        left = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM fleet.tenant_fence WHERE tenant_id = $1::uuid) AS fence, "
            "(SELECT count(*) FROM fleet.event_outbox WHERE tenant_id = $1::uuid) AS events, "
            "(SELECT count(*) FROM pg_namespace WHERE nspname = $2) AS schemas", rec.tenant_id, rec.schema)
    finally:
        await conn.close()
    return dict(left)


async def test_gc_drops_an_aborted_copy_whose_target_got_its_side_of_the_switch(
        rig: tuple[Fleet, Host, Stoppable]) -> None:
    """The switch commits the target's side (its fence row, the sequences, the tenant's
    undelivered events) a round trip before the source's commit point. A move that stops
    in between, then aborted while its target is down, leaves that copy to `gc`; gc took
    the target's fence row for "the tenant is served here" and kept the copy (and so the
    copied events, which that shard's relay would deliver a second time). The directory
    says where a tenant is served; the copy must go, fence and events included."""
    fleet, host, s4 = rig
    rec, _ = await tenant_with_key(fleet, host, shard_id="shard1")
    await _stopped_mid_switch_then_aborted_with_the_target_down(fleet, host, s4, rec)
    code, out, err = await run_cli(fleet, "--json", "gc", "--grace", "86400")
    assert code == 0, err
    assert await _on_shard4(fleet, rec) == {"fence": 0, "events": 0, "schemas": 0}
    assert (await fleet.directory.get(id=rec.tenant_id)).shard_id == "shard1"


async def test_gc_keeps_the_target_copy_of_a_later_move_stopped_past_its_commit_point(
        rig: tuple[Fleet, Host, Stoppable]) -> None:
    """The other side of the test above: the aborted move's leftovers wait for gc while a
    later move of the tenant to the same shard passes its commit point and its mover
    stops before the directory follows. The directory still names the source, but the
    copy on shard4 is now the tenant's only writable one: gc must leave it (and come back
    to the old leftovers once that move ended), and the resume must find it whole."""
    fleet, host, s4 = rig
    rec, key = await tenant_with_key(fleet, host, shard_id="shard1")
    await _stopped_mid_switch_then_aborted_with_the_target_down(fleet, host, s4, rec)
    run_id = await _crashed_at_commit(fleet, await fleet.directory.get(id=rec.tenant_id), "shard4", "offline")
    code, out, err = await run_cli(fleet, "--json", "gc", "--grace", "86400")
    assert code == 0, err
    assert await _on_shard4(fleet, rec) == {"fence": 1, "events": 1, "schemas": 1}
    done = await Mover(fleet.directory, fleet.settings).resume(run_id)
    assert done.phase == "done"
    assert (await fleet.directory.get(id=rec.tenant_id)).shard_id == "shard4"
    async with host.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
        assert r.status == 200, await r.text()
    code, out, err = await run_cli(fleet, "--json", "gc", "--grace", "86400")  # the old leftovers: served here
    assert code == 0, err
    assert await _on_shard4(fleet, rec) == {"fence": 1, "events": 1, "schemas": 1}


def test_cutover_budgets_double_but_no_attempt_holds_writes_as_long_as_a_request_waits(fleet: Fleet) -> None:
    """The cutover's lock wait and catch-up budgets double per attempt. Uncapped, with the
    defaults the last attempts held the tenant's writes for up to 3.2 + 3.2 s, longer than
    a request waits on the fence (fence_wait_ms, 5 s), so a cutover designed to retry
    answered requests TENANT_MOVING; with the limits at their maximum the doubled value
    overflowed lock_timeout (a MOVE_FAILED from PostgreSQL, not a retry)."""
    s = fleet.settings.model_copy(update={"cutover_lock_wait_ms": 50, "cutover_timeout_ms": 50,
                                          "cutover_attempts": 7, "fence_wait_ms": 5000})
    budgets = [(cutover_budget_ms(s, s.cutover_lock_wait_ms, a), cutover_budget_ms(s, s.cutover_timeout_ms, a))
               for a in range(s.cutover_attempts)]
    assert budgets[:3] == [(50, 50), (100, 100), (200, 200)]  # still doubling
    assert all(lock + catch < s.fence_wait_ms for lock, catch in budgets)
    big = s.model_copy(update={"cutover_timeout_ms": 60_000, "cutover_attempts": 20, "fence_wait_ms": 10 ** 9})
    assert max(cutover_budget_ms(big, big.cutover_timeout_ms, a) for a in range(20)) <= 60_000
    small = s.model_copy(update={"fence_wait_ms": 100})  # never below the configured budget
    assert cutover_budget_ms(small, 50, 5) == 50


async def test_hosts_finishing_a_committed_move_while_it_is_resumed_agree(fleet: Fleet, host: Host) -> None:
    """Checked, not a defect: a mover stopped right after its commit point; several hosts
    switch the directory (`finish_committed_move`) while an operator's resume does the
    same. Each gets the target at the next epoch (the directory's update is conditional,
    the losers see the winner's row), the resume finishes, and once it has, the call
    finds no open move: None, nothing changed."""
    rec, _ = await tenant_with_key(fleet, host, shard_id="shard1")
    run_id = await _crashed_at_commit(fleet, rec, "shard2", "offline")
    assert (await fleet.directory.get(id=rec.tenant_id)).shard_id == "shard1"
    results = await asyncio.gather(*(fleet.directory.finish_committed_move(rec.tenant_id) for _ in range(3)),
                                   Mover(fleet.directory, fleet.settings).resume(run_id))
    for r in results[:3]:  # None only if the resume had already closed the move
        assert r is None or (r.shard_id, r.epoch) == ("shard2", rec.epoch + 1)
    assert results[3].phase == "done"
    now = await fleet.directory.get(id=rec.tenant_id)
    assert (now.shard_id, now.epoch) == ("shard2", rec.epoch + 1)
    assert await fleet.directory.finish_committed_move(rec.tenant_id) is None
    assert (await fleet.directory.get(id=rec.tenant_id)).epoch == rec.epoch + 1


async def test_a_source_lost_while_its_marker_is_awaited_fails_the_move_at_once(
        rig: tuple[Fleet, Host, Stoppable]) -> None:
    """A marker committed on the source just before the source goes down never reaches
    the target; the wait polled only the target, for the whole catch-up timeout (600 s:
    the mover looked alive and did nothing for ten minutes, and the fault tests hung on a
    loaded machine). The wait checks the source too and fails the move at once. (The
    target's apply is held on a table lock so the marker surely arrives after the stop.)"""
    fleet, host, s4 = rig
    if not await _online_capable_dsn(fleet.shard_dsns["shard4"]):
        pytest.skip("needs a source with wal_level=logical (an external server may not have it)")
    rec, key = await tenant_with_key(fleet, host, shard_id="shard4")
    hold = await asyncpg.connect(fleet.shard_dsns["shard1"])
    tasks: list[asyncio.Future[None]] = []
    runs: list[int] = []

    async def stop_after_the_marker() -> None:
        await hold.execute("BEGIN; LOCK TABLE fleet.move_markers IN EXCLUSIVE MODE")
        src = await asyncpg.connect(fleet.shard_dsns["shard4"])
        try:
            while not await src.fetchval("SELECT EXISTS (SELECT 1 FROM fleet.move_markers WHERE run_id = $1 "
                                         "AND seq >= 2)", runs[0]):
                await asyncio.sleep(0.005)
        finally:
            await src.close()
        await s4.stop()

    def progress(p: str, _figures: dict[str, object]) -> None:
        if p == "catching up" and not tasks:
            tasks.append(asyncio.ensure_future(stop_after_the_marker()))

    try:
        with pytest.raises(TenantFleetError):
            await asyncio.wait_for(Mover(fleet.directory, fleet.settings, progress=progress).start(
                rec, "shard1", "online", on_run=runs.append), 60)  # a hang guard, not a timing claim
        await tasks[0]
    finally:
        await hold.close()  # lets the apply worker go
        await s4.start()
    assert (await fleet.directory.get(id=rec.tenant_id)).shard_id == "shard4"
    done = await asyncio.wait_for(Mover(fleet.directory, fleet.settings).resume(runs[0]), 120)
    assert done.phase == "done"
    assert (await fleet.directory.get(id=rec.tenant_id)).shard_id == "shard1"
