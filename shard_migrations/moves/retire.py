"""`tenantfleet gc`: drop the schemas moves renamed out of the way, after their grace period."""
from __future__ import annotations

from typing import Any

from router.directory import Directory
from router.errors import ShardUnreachable, TenantFleetError
from router.pools import connect
from router.settings import Settings
from shard_migrations.moves.mover import Mover, drop_subscription

# a switched move whose run has not beaten for this long has no mover left: gc finishes it
SWITCHED_STALE_S = 60.0


# r_<32 hex>_<run> -> t_<32 hex>: the live schema's name, whose role the old copy used
_DROP_ROLE_IF_GONE = """
SELECT fleet.drop_tenant_schema(live) FROM (SELECT 't' || substring($1 FROM 2 FOR 33) AS live) n
WHERE NOT EXISTS (SELECT 1 FROM fleet.tenant_fence WHERE tenant_id = $2::uuid)
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = n.live)
"""


async def collect_retired(directory: Directory, settings: Settings, *, grace_s: float,
                          dry_run: bool = False) -> list[dict[str, Any]]:
    """Per shard, the retired schemas older than ``grace_s`` (dropped unless ``dry_run``).
    A shard that can't be reached is reported in its row and skipped."""
    out: list[dict[str, Any]] = await finish_switched_moves(directory, settings, dry_run=dry_run)
    for shard in await directory.list_shards():
        try:
            conn = await connect(shard.dsn, settings)
        except ShardUnreachable as exc:
            out.append({"shardId": shard.shard_id, "schemaName": None, "tenantId": None, "runId": None,
                        "retiredAt": None, "dropped": False, "error": exc.message})
            continue
        try:
            out += await _stale_subscriptions(directory, conn, shard.shard_id, dry_run)
            out += await _aborted_copies(directory, conn, shard.shard_id, dry_run)
            rows = await conn.fetch(
                "SELECT schema_name, tenant_id::text AS tenant_id, run_id, retired_at FROM fleet.retired_schemas "
                "WHERE retired_at < now() - make_interval(secs => $1) ORDER BY retired_at", grace_s)
            for r in rows:
                dropped = False
                if not dry_run:
                    async with conn.transaction():
                        # not while a move or migration of the tenant is at work here (a move
                        # back to this shard could be between its clean-up and its new
                        # schema, whose role the check below would drop): next gc then
                        if await conn.fetchval("SELECT pg_try_advisory_xact_lock(fleet.tenant_hold_key($1::uuid))",
                                               r["tenant_id"]):
                            sql = await conn.fetchval("SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', $1::text)",
                                                      r["schema_name"])
                            await conn.execute(sql)
                            await conn.execute("DELETE FROM fleet.retired_schemas WHERE schema_name = $1",
                                               r["schema_name"])
                            # the tenant's role too, unless the tenant is served here again
                            # (fleet.drop_tenant_schema keeps a role another database uses)
                            await conn.execute(_DROP_ROLE_IF_GONE, r["schema_name"], r["tenant_id"])
                            dropped = True
                out.append({"shardId": shard.shard_id, "schemaName": r["schema_name"], "tenantId": r["tenant_id"],
                            "runId": r["run_id"], "retiredAt": r["retired_at"], "dropped": dropped,
                            **({} if dropped or dry_run else {"error": "the tenant is busy (a move or migration): "
                                                                        "dropped by a later gc"})})
        finally:
            await conn.close()
    return out


async def finish_switched_moves(directory: Directory, settings: Settings, *,
                                dry_run: bool = False) -> list[dict[str, Any]]:
    """Moves the directory already follows (a host switched it after the mover stopped past
    its commit point) whose run shows no life for SWITCHED_STALE_S: resumed, so their slot,
    publication and subscription go (a slot keeps WAL on the source) and the old schema is
    retired. A resume that fails is reported in its row; the next gc tries again."""
    rows = await directory.control.fetch(
        "SELECT m.run_id, m.tenant_id::text AS tenant_id, m.target_shard, t.schema_name FROM tenant_moves m "
        "JOIN fleet_runs r USING (run_id) JOIN tenants t USING (tenant_id) "
        "WHERE m.phase NOT IN ('done', 'aborted') AND t.shard_id = m.target_shard AND t.epoch > m.epoch_before "
        "AND coalesce(r.heartbeat_at, r.created_at) < now() - make_interval(secs => $1) ORDER BY m.run_id",
        SWITCHED_STALE_S)
    out: list[dict[str, Any]] = []
    for r in rows:
        row: dict[str, Any] = {"shardId": r["target_shard"], "schemaName": f"move {r['run_id']} (switched)",
                               "tenantId": r["tenant_id"], "runId": r["run_id"], "retiredAt": None,
                               "dropped": False}
        if not dry_run:
            try:
                info = await Mover(directory, settings).resume(r["run_id"])
                row["dropped"] = info.phase == "done"
            except TenantFleetError as exc:
                row["error"] = exc.message
        out.append(row)
    return out


async def _stale_subscriptions(directory: Directory, conn: Any, shard_id: str, dry_run: bool) -> list[dict[str, Any]]:
    """Subscriptions of moves that ended (an abort while this shard was unreachable leaves
    its side behind): dropped, with the copy of the schema the move had made here unless
    the tenant is served here."""
    subs = [r[0] for r in await conn.fetch(
        "SELECT subname FROM pg_subscription WHERE subname ~ '^tf_move_[0-9]+$' AND subdbid = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())")]
    out: list[dict[str, Any]] = []
    for name in subs:
        row = await directory.control.fetchrow(
            "SELECT m.run_id, m.tenant_id::text AS tenant_id, t.schema_name, m.phase FROM tenant_moves m "
            "JOIN tenants t USING (tenant_id) WHERE m.run_id = $1", int(name.rsplit("_", 1)[1]))
        if row is None or row["phase"] not in ("done", "aborted"):
            continue
        if not dry_run:
            await drop_subscription(conn, name)
            if row["phase"] == "aborted":
                await _drop_copy(directory, conn, shard_id, row["tenant_id"], row["schema_name"])
        out.append({"shardId": shard_id, "schemaName": f"subscription {name}", "tenantId": row["tenant_id"],
                    "runId": row["run_id"], "retiredAt": None, "dropped": not dry_run})
    return out


async def _aborted_copies(directory: Directory, conn: Any, shard_id: str, dry_run: bool) -> list[dict[str, Any]]:
    """The copies of moves aborted while this shard (their target) was unreachable, found
    by the abort's record (an offline move leaves no subscription to find them by)."""
    rows = await directory.control.fetch(
        "SELECT m.run_id, m.tenant_id::text AS tenant_id, t.schema_name FROM tenant_moves m "
        "JOIN tenants t USING (tenant_id) WHERE m.phase = 'aborted' AND m.target_shard = $1 "
        "AND m.detail ? 'targetLeftovers' ORDER BY m.run_id", shard_id)
    out: list[dict[str, Any]] = []
    for r in rows:
        dropped = False
        if not dry_run:
            dropped = await _drop_copy(directory, conn, shard_id, r["tenant_id"], r["schema_name"])
            if dropped:
                await directory.control.execute(
                    "UPDATE tenant_moves SET detail = detail - 'targetLeftovers' || jsonb_build_object("
                    "'targetCleanedAt', now()::text), updated_at = now() WHERE run_id = $1", r["run_id"])
        out.append({"shardId": shard_id, "schemaName": r["schema_name"], "tenantId": r["tenant_id"],
                    "runId": r["run_id"], "retiredAt": None, "dropped": dropped})
    return out


async def _drop_copy(directory: Directory, conn: Any, shard_id: str, tenant_id: str, schema_name: str) -> bool:
    """Drop an aborted move's copy of the tenant here (schema, fence, ledger and outbox
    rows), only while no other move of the tenant is at work here (its hold key) and the
    directory doesn't place the tenant here. True when nothing of it is left (also when
    the tenant is served here now: the move that brought it dropped the old copy first).

    Not a fence row here: a move that stopped between committing the target's side of
    its switch (fence, sequences, the undelivered events) and the source's commit point
    leaves one on a target that never served the tenant; kept, this shard's relay would
    deliver those events a second time."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock(fleet.tenant_hold_key($1::uuid))", tenant_id):
        return False
    try:
        rec = await directory.lookup("id", tenant_id)
        if rec is not None and rec.shard_id == shard_id:
            return True
        # a later move of the tenant still open (a mover stopped past its commit point: the
        # directory names the source until a host or a resume switches it) may own what
        # is here now; gc comes back to it once that move has ended
        if await directory.control.fetchval(
                "SELECT EXISTS (SELECT 1 FROM tenant_moves WHERE tenant_id = $1::uuid "
                "AND phase NOT IN ('done', 'aborted'))", tenant_id):
            return False
        async with conn.transaction():
            await conn.execute("DELETE FROM fleet.tenant_fence WHERE tenant_id = $1::uuid", tenant_id)
            await conn.execute("DELETE FROM fleet.sys_plugin_migrations WHERE tenant_id = $1::uuid", tenant_id)
            await conn.execute("DELETE FROM fleet.event_outbox WHERE tenant_id = $1::uuid", tenant_id)
            await conn.execute("SELECT fleet.drop_tenant_schema($1)", schema_name)
        return True
    finally:
        await conn.execute("SELECT pg_advisory_unlock(fleet.tenant_hold_key($1::uuid))", tenant_id)
