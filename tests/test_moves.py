"""Tenant moves (shard_migrations/moves): online and offline, under writes, killed and
resumed, aborted, and refused for bad input — against the suite's real servers."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from router.errors import (
    MoveRefused, NoShardAvailable, ShardNotFound, TenantBusy, TenantNotFound, ValidationFailed,
)
from router.models import TenantRecord
from shard_migrations.moves.mover import Mover
from tests.fleetkit import Fleet
from tests.hostkit import Host, auth, host_settings, running_host, runtime, tenant_with_key
from tests.migratekit import ROOT, cli_env, run_cli


@pytest_asyncio.fixture(loop_scope="session")
async def host(fleet: Fleet) -> AsyncIterator[Host]:
    """A host on the fleet; every shard has the inventory plugin's public migrations (a move
    refuses a target behind its source: that pre-flight has a test of its own)."""
    async with running_host(host_settings(fleet)) as h:
        for shard_id in fleet.shard_dsns:
            await tenant_with_key(fleet, h, shard_id=shard_id)
        yield h


async def _online_capable(fleet: Fleet) -> bool:
    return await _online_capable_dsn(fleet.shard_dsns["shard1"])


async def _online_capable_dsn(dsn: str) -> bool:
    """Whether the server can be an online move's source (the embedded fleet can; an
    external server may run without wal_level=logical)."""
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT current_setting('wal_level') = 'logical'"))
    finally:
        await conn.close()


async def _items(fleet: Fleet, shard_id: str, schema: str) -> list[str]:
    conn = await asyncpg.connect(fleet.shard_dsns[shard_id])
    try:
        rows = await conn.fetch(f"SELECT sku FROM {schema}.items")  # schema: t_<hex> from the directory
        return [r["sku"] for r in rows]
    finally:
        await conn.close()


async def _leftovers(fleet: Fleet) -> list[str]:
    """Replication objects of moves on any shard database of this fleet."""
    out: list[str] = []
    for shard_id, dsn in fleet.shard_dsns.items():
        conn = await asyncpg.connect(dsn)
        try:
            out += [f"{shard_id}: slot {r[0]}" for r in await conn.fetch(
                "SELECT slot_name FROM pg_replication_slots WHERE database = current_database() "
                "AND slot_name LIKE 'tf_move_%'")]
            out += [f"{shard_id}: publication {r[0]}" for r in await conn.fetch(
                "SELECT pubname FROM pg_publication WHERE pubname LIKE 'tf_move_%'")]
            out += [f"{shard_id}: subscription {r[0]}" for r in await conn.fetch(
                "SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database "
                "WHERE datname = current_database()) AND subname LIKE 'tf_move_%'")]
        finally:
            await conn.close()
    return out


async def _schemas_with(fleet: Fleet, schema: str) -> list[str]:
    """The shards holding a schema of that name."""
    out = []
    for shard_id, dsn in fleet.shard_dsns.items():
        conn = await asyncpg.connect(dsn)
        try:
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema):
                out.append(shard_id)
        finally:
            await conn.close()
    return out


class Writer:
    """Posts items to one tenant as fast as the host takes them; records what was acknowledged."""

    def __init__(self, host: Host, rec: TenantRecord, key: str) -> None:
        self.host, self.rec, self.key = host, rec, key
        self.acked: list[str] = []
        self.refused: dict[int, int] = {}
        self.stop = asyncio.Event()
        self.n = 0

    async def run(self) -> None:
        h = auth(self.key, self.rec.code)
        while not self.stop.is_set():
            self.n += 1
            sku = f"W-{self.n:06d}"
            async with self.host.http.post("/api/plugins/inventory/items", json={"sku": sku, "qty": 1},
                                           headers=h) as r:
                await r.read()
                if r.status == 201:
                    self.acked.append(sku)
                else:
                    self.refused[r.status] = self.refused.get(r.status, 0) + 1
                    await asyncio.sleep(0.01)


async def test_moved_back_and_forth_under_writes_nothing_lost(fleet: Fleet, host: Host) -> None:
    """20 moves between shard1 and shard2 (online and offline alternating where the
    servers replicate) while a writer commits: every acknowledged write is on the shard
    the directory names, exactly once; the old copies hold nothing the final one lacks."""
    rec, key = await tenant_with_key(fleet, host, shard_id="shard1")
    online = await _online_capable(fleet)
    mover = Mover(fleet.directory, fleet.settings)
    writer = Writer(host, rec, key)
    task = asyncio.ensure_future(writer.run())
    modes = []
    try:
        for i in range(20):
            current = await fleet.directory.get(id=rec.tenant_id)
            target = "shard2" if current.shard_id == "shard1" else "shard1"
            mode = "online" if online and i % 2 == 0 else "offline"
            info = await mover.start(current, target, mode)
            assert info.phase == "done"
            assert info.detail["sourceFingerprint"] == info.detail["targetFingerprint"]
            modes.append(mode)
            while len(writer.acked) < 3 * (i + 1):  # some writes between moves, whatever the machine's speed
                await asyncio.sleep(0.01)
    finally:
        writer.stop.set()
        await task
    final = await fleet.directory.get(id=rec.tenant_id)
    assert final.epoch == rec.epoch + 20
    skus = await _items(fleet, final.shard_id, final.schema)
    assert len(skus) == len(set(skus))
    missing = set(writer.acked) - set(skus)
    assert not missing, f"{len(missing)} acknowledged writes lost"
    assert set(writer.refused) <= {503}, writer.refused
    # every old copy was renamed away; none holds a row the final copy lacks
    for shard_id, dsn in fleet.shard_dsns.items():
        conn = await asyncpg.connect(dsn)
        try:
            retired = [r[0] for r in await conn.fetch(
                "SELECT schema_name FROM fleet.retired_schemas WHERE tenant_id = $1::uuid", rec.tenant_id)]
            for name in retired:
                quoted = await conn.fetchval("SELECT quote_ident($1)", name)
                old = {r[0] for r in await conn.fetch(f"SELECT sku FROM {quoted}.items")}
                assert old <= set(skus), f"{shard_id}.{name} has writes the final copy lacks"
        finally:
            await conn.close()
    assert await _schemas_with(fleet, final.schema) == [final.shard_id]
    assert await _leftovers(fleet) == []
    # and the host serves it from there
    async with host.http.get("/api/plugins/inventory/items?limit=1", headers=auth(key, rec.code)) as r:
        assert r.status == 200


async def test_bad_moves_are_refused_and_change_nothing(fleet: Fleet, host: Host) -> None:
    rec, _ = await tenant_with_key(fleet, host, shard_id="shard1")
    mover = Mover(fleet.directory, fleet.settings)
    with pytest.raises(ValidationFailed, match="already on shard shard1"):
        await mover.start(rec, "shard1", "offline")
    with pytest.raises(ShardNotFound):
        await mover.start(rec, "shard9", "offline")
    with pytest.raises(TenantNotFound):
        await fleet.directory.get(id="00000000-0000-4000-8000-000000000000")
    with pytest.raises(ValidationFailed, match="mode"):
        await mover.start(rec, "shard2", "sideways")
    await fleet.directory.set_shard_state("shard3", "draining")
    try:
        with pytest.raises(NoShardAvailable, match="draining"):
            await mover.start(rec, "shard3", "offline")
    finally:
        await fleet.directory.set_shard_state("shard3", "active")
    # a table without a primary key or replica identity can't be moved
    conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        await conn.execute(f"CREATE TABLE {rec.schema}.nokey (a int)")
        with pytest.raises(MoveRefused, match="nokey"):
            await mover.start(rec, "shard2", "offline")
        await conn.execute(f"DROP TABLE {rec.schema}.nokey")
    finally:
        await conn.close()
    # a tenant already moving: an open move row (as a killed move leaves it)
    run_id = await fleet.control.fetchval(
        "INSERT INTO fleet_runs (kind, state) VALUES ('move', 'failed') RETURNING run_id")
    await fleet.control.execute(
        "INSERT INTO tenant_moves (run_id, tenant_id, source_shard, target_shard, mode, phase, epoch_before) "
        "VALUES ($1, $2::uuid, 'shard1', 'shard2', 'offline', 'prepared', $3)", run_id, rec.tenant_id, rec.epoch)
    with pytest.raises(TenantBusy, match="already moving"):
        await mover.start(rec, "shard3", "offline")
    with pytest.raises(TenantBusy):  # and suspend waits for the move
        await fleet.directory.suspend(rec.tenant_id)
    await fleet.control.execute("UPDATE tenant_moves SET phase = 'aborted' WHERE run_id = $1", run_id)
    after = await fleet.directory.get(id=rec.tenant_id)
    assert (after.shard_id, after.epoch, after.state) == ("shard1", rec.epoch, "active")
    assert await _schemas_with(fleet, rec.schema) == ["shard1"]


# the phases the CLI announces on stderr, in order; a kill lands right after each
KILL_AFTER = ["preparing", "prepared", "copying", "copied", "caught_up", "verified", "cutover", "committed",
              "switched", "cleaned"]


async def _move_killed_after(fleet: Fleet, rec: TenantRecord, to: str, mode: str, phase: str) -> int | None:
    """Start `tenantfleet move` in a subprocess and SIGKILL it once it announces ``phase``;
    returns the run id (None if it finished first)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "host.cli", "move", rec.tenant_id, "--to", to, f"--{mode}", cwd=str(ROOT),
        env=cli_env(fleet), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), 120)
            if not line:
                break
            if line.decode().split()[:1] == [phase]:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        await proc.wait()
    return await fleet.control.fetchval(
        "SELECT run_id FROM tenant_moves WHERE tenant_id = $1::uuid ORDER BY run_id DESC LIMIT 1", rec.tenant_id)


async def _served_once(fleet: Fleet, host: Host, rec: TenantRecord, key: str, expected: set[str]) -> str:
    """The tenant is served (its rows all there) from the one shard the directory names."""
    async with host.http.get("/api/plugins/inventory/items?limit=500", headers=auth(key, rec.code)) as r:
        body = await r.json()
        assert r.status == 200, body
    assert {i["sku"] for i in body["items"]} == expected
    now = await fleet.directory.get(id=rec.tenant_id)  # after: the request may have finished a cutover
    return now.shard_id


async def _seed(host: Host, rec: TenantRecord, key: str, n: int) -> set[str]:
    skus = set()
    for i in range(n):
        async with host.http.post("/api/plugins/inventory/items", json={"sku": f"S-{i}", "qty": i},
                                  headers=auth(key, rec.code)) as r:
            assert r.status == 201, await r.text()
            skus.add(f"S-{i}")
    return skus


class _Crash(BaseException):
    """Stands for the mover's process dying right after the commit point (a SIGKILL can
    land a moment later, after the directory switched too)."""


async def _crashed_at_commit(fleet: Fleet, rec: TenantRecord, to: str, mode: str) -> int:
    """Start a move of ``rec`` to ``to`` in-process and crash it right after the source's
    commit point, before the directory follows; returns its run id."""
    def crash_at_commit(phase: str, _figures: dict[str, Any]) -> None:
        if phase == "committed":
            raise _Crash()

    runs: list[int] = []
    with pytest.raises(_Crash):
        await Mover(fleet.directory, fleet.settings, progress=crash_at_commit).start(rec, to, mode,
                                                                                on_run=runs.append)
    return runs[0]


@pytest.mark.parametrize("phase", KILL_AFTER)
async def test_kill_9_at_each_step_then_resume(fleet: Fleet, host: Host, phase: str) -> None:
    mode = "online" if await _online_capable(fleet) else "offline"
    rec, key = await tenant_with_key(fleet, host, shard_id="shard1")
    skus = await _seed(host, rec, key, 5)
    run_id = await _move_killed_after(fleet, rec, "shard2", mode, phase)
    assert run_id is not None
    # killed between the source's commit point and the directory (or just after it): the
    # host, finding the fence ahead of the directory for longer than a cutover takes,
    # switches the directory itself; the tenant is served from the target before resume
    served = await _served_once(fleet, host, rec, key, skus)
    if phase in ("committed", "switched", "cleaned"):
        assert served == "shard2"
    if phase == "committed":
        # nobody resumes it: once its run has shown no life for a while (made so here),
        # `gc` finishes the switched move (its slot would keep WAL on the source)
        await fleet.control.execute("UPDATE fleet_runs SET heartbeat_at = now() - interval '1 hour' "
                                    "WHERE run_id = $1", run_id)
        code, out, err = await run_cli(fleet, "--json", "gc", "--grace", "86400")
        assert code == 0, err
        assert (await Mover(fleet.directory, fleet.settings).load(run_id)).phase == "done"
    else:
        code, out, err = await run_cli(fleet, "--json", "move", "--resume", str(run_id))
    assert code == 0, err
    assert await _served_once(fleet, host, rec, key, skus) == "shard2"
    assert await _schemas_with(fleet, rec.schema) == ["shard2"]
    assert await _leftovers(fleet) == []


async def test_abort_after_copy_leaves_the_tenant_where_it_was(fleet: Fleet, host: Host) -> None:
    mode = "online" if await _online_capable(fleet) else "offline"
    rec, key = await tenant_with_key(fleet, host, shard_id="shard1")
    skus = await _seed(host, rec, key, 3)
    run_id = await _move_killed_after(fleet, rec, "shard2", mode, "copied")
    assert run_id is not None
    code, out, err = await run_cli(fleet, "--json", "move", "--abort", str(run_id))
    assert code == 0, err
    assert await _served_once(fleet, host, rec, key, skus) == "shard1"
    assert await _schemas_with(fleet, rec.schema) == ["shard1"]
    assert await _leftovers(fleet) == []
    code, out, err = await run_cli(fleet, "--json", "move", "--resume", str(run_id))
    assert code == 2 and "aborted" in err


async def test_abort_after_the_commit_point_is_refused_and_resume_finishes(fleet: Fleet, host: Host) -> None:
    """Killed between the source's fence commit and the directory: the tenant's undelivered
    events already live on the target, so abort must refuse (it would drop them) and
    resume must finish the move."""
    mode = "online" if await _online_capable(fleet) else "offline"
    rec, key = await tenant_with_key(fleet, host, shard_id="shard1")
    skus = await _seed(host, rec, key, 3)
    conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:  # an undelivered event, already handled by one plugin, leased for an hour
        await conn.execute(
            "INSERT INTO fleet.event_outbox (event_id, tenant_id, source, name, payload, attempts, next_attempt_at, "
            "handled_by) VALUES (gen_random_uuid(), $1::uuid, 'inventory', 'review.probe', '{}'::jsonb, 3, "
            "now() + interval '1 hour', '{inventory}')", rec.tenant_id)
    finally:
        await conn.close()
    run_id = await _crashed_at_commit(fleet, await fleet.directory.get(id=rec.tenant_id), "shard2", mode)
    assert (await fleet.directory.get(id=rec.tenant_id)).shard_id == "shard1"  # the directory never followed
    code, out, err = await run_cli(fleet, "--json", "move", "--abort", str(run_id))
    assert code == 2 and "commit point" in err, err
    finished = runtime(host).metrics.moves_finished._value.get()
    # a request finds the source's fence ahead of the directory: after move_finish_after_ms
    # the host switches the directory itself and serves the tenant from the target
    assert await _served_once(fleet, host, rec, key, skus) == "shard2"
    assert runtime(host).metrics.moves_finished._value.get() == finished + 1
    code, out, err = await run_cli(fleet, "--json", "move", "--resume", str(run_id))
    assert code == 0, err
    assert await _served_once(fleet, host, rec, key, skus) == "shard2"
    conn = await asyncpg.connect(fleet.shard_dsns["shard2"])
    try:
        row = await conn.fetchrow("SELECT attempts, handled_by, next_attempt_at > now() + interval '50 minutes' AS "
                                  "leased FROM fleet.event_outbox WHERE tenant_id = $1::uuid AND name = 'review.probe'",
                                  rec.tenant_id)
    finally:
        await conn.close()
    assert row is not None and (row["attempts"], row["handled_by"], row["leased"]) == (3, ["inventory"], True)
    conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM fleet.event_outbox WHERE tenant_id = $1::uuid "
                                   "AND delivered_at IS NULL", rec.tenant_id) == 0
    finally:
        await conn.close()
    assert await _leftovers(fleet) == []


async def test_a_small_tenant_moved_offline_gets_its_schema_first_and_no_trigger_fires_twice(
        fleet: Fleet, host: Host) -> None:
    """Offline, a small tenant's whole schema (indexes, foreign keys, triggers) is built and
    checked before the fence; its rows are copied in with triggers and foreign-key checks
    off, as logical replication applies rows: an insert trigger must not run again for the
    copied rows, and the target's constraints and triggers work for new writes."""
    rec, _ = await tenant_with_key(fleet, host, shard_id="shard1")
    s = rec.schema
    conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        await conn.execute(f"""
            CREATE TABLE {s}.parent (id int PRIMARY KEY);
            CREATE TABLE {s}.child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES {s}.parent (id));
            CREATE TABLE {s}.audit (id bigserial PRIMARY KEY, child_id int NOT NULL);
            CREATE FUNCTION {s}.audit_child() RETURNS trigger LANGUAGE plpgsql AS $$
              BEGIN INSERT INTO {s}.audit (child_id) VALUES (NEW.id); RETURN NEW; END $$;
            CREATE TRIGGER child_audit AFTER INSERT ON {s}.child FOR EACH ROW EXECUTE FUNCTION {s}.audit_child();
            INSERT INTO {s}.parent SELECT generate_series(1, 3);
            -- children copied before their parents would fail a foreign-key check
            INSERT INTO {s}.child SELECT g, 1 + g % 3 FROM generate_series(1, 5) g;""")
    finally:
        await conn.close()
    info = await Mover(fleet.directory, fleet.settings).start(rec, "shard2", "offline")
    assert info.detail["schemaFirst"] is True and info.phase == "done"
    assert set(info.detail["stepsMs"]) >= {"copy", "verify", "switch"}
    assert "postDdl" not in info.detail["stepsMs"]  # built before the fence
    conn = await asyncpg.connect(fleet.shard_dsns["shard2"])
    try:
        assert await conn.fetchval(f"SELECT count(*) FROM {s}.audit") == 5  # not 10: the copy fired nothing
        assert await conn.fetchval(f"SELECT count(*) FROM {s}.child") == 5
        await conn.execute(f"INSERT INTO {s}.child VALUES (6, 2)")  # the trigger works for new writes
        assert await conn.fetchval(f"SELECT count(*) FROM {s}.audit") == 6
        assert await conn.fetchval(f"SELECT max(id) FROM {s}.audit") == 6  # the sequence followed
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(f"INSERT INTO {s}.child VALUES (7, 99)")
        assert await conn.fetchval("SHOW session_replication_role") == "origin"
    finally:
        await conn.close()
