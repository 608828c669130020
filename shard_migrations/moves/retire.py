"""`tenantfleet gc`: drop the schemas moves renamed out of the way, after their grace period."""
from __future__ import annotations

from typing import Any

from router.directory import Directory
from router.errors import ShardUnreachable
from router.pools import connect
from router.settings import Settings


async def collect_retired(directory: Directory, settings: Settings, *, grace_s: float,
                          dry_run: bool = False) -> list[dict[str, Any]]:
    """Per shard, the retired schemas older than ``grace_s`` (dropped unless ``dry_run``).
    A shard that can't be reached is reported in its row and skipped."""
    out: list[dict[str, Any]] = []
    for shard in await directory.list_shards():
        try:
            conn = await connect(shard.dsn, settings)
        except ShardUnreachable as exc:
            out.append({"shardId": shard.shard_id, "schemaName": None, "tenantId": None, "runId": None,
                        "retiredAt": None, "dropped": False, "error": exc.message})
            continue
        try:
            rows = await conn.fetch(
                "SELECT schema_name, tenant_id::text AS tenant_id, run_id, retired_at FROM fleet.retired_schemas "
                "WHERE retired_at < now() - make_interval(secs => $1) ORDER BY retired_at", grace_s)
            for r in rows:
                if not dry_run:
                    async with conn.transaction():
                        sql = await conn.fetchval("SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', $1::text)",
                                                  r["schema_name"])
                        await conn.execute(sql)
                        await conn.execute("DELETE FROM fleet.retired_schemas WHERE schema_name = $1", r["schema_name"])
                out.append({"shardId": shard.shard_id, "schemaName": r["schema_name"], "tenantId": r["tenant_id"],
                            "runId": r["run_id"], "retiredAt": r["retired_at"], "dropped": not dry_run})
        finally:
            await conn.close()
    return out
