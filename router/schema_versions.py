"""Where tenantfleet's own databases stand against this code's Alembic revisions, and
upgrading them all: the service functions of `tenantfleet db current|upgrade`
(`router.revisions` holds the revisions and runs them on one database)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.revisions import current, head, history

if TYPE_CHECKING:
    from router.directory import Directory


@dataclass(frozen=True)
class DatabaseRevision:
    """Where one of tenantfleet's databases stands: ``revision`` None and ``reachable``
    True means not versioned by Alembic yet (made before revisions; `upgrade` stamps it)."""
    database: str          # "control" or a shard id
    component: str
    revision: str | None
    head: str
    reachable: bool = True

    @property
    def state(self) -> str:
        if not self.reachable:
            return "unreachable"
        if self.revision is None:
            return "not versioned"
        if self.revision == self.head:
            return "up to date"
        known = {r.revision for r in history(self.component)}
        return "behind" if self.revision in known else "newer than this tenantfleet"

    def to_dict(self) -> dict[str, Any]:
        return {"database": self.database, "component": self.component, "revision": self.revision,
                "head": self.head, "state": self.state}


async def database_revisions(directory: Directory) -> list[DatabaseRevision]:
    """The control plane's revision, then each registered shard's (read only; a shard that
    can't be reached is reported as such)."""
    import asyncpg

    from router.errors import ShardUnreachable

    async with directory.control.acquire() as conn:
        out = [DatabaseRevision("control", "control", await current(conn, "control"), head("control"))]
    shard_head = head("shard")
    for shard in await directory.list_shards():
        try:
            pool = await directory.shard_pools.get(shard.shard_id)
            async with pool.acquire() as conn:
                out.append(DatabaseRevision(shard.shard_id, "shard", await current(conn, "shard"), shard_head))
        except (ShardUnreachable, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            out.append(DatabaseRevision(shard.shard_id, "shard", None, shard_head, reachable=False))
    return out


async def upgrade_databases(directory: Directory) -> list[dict[str, Any]]:
    """Upgrade the control plane, then every registered shard, to the head (the baseline
    set-up, then the revisions: `router.schema`); per database its revision before and
    after and its state. SCHEMA_TOO_NEW (nothing changed on that database) for one a
    newer tenantfleet upgraded; an unreachable shard is reported and the rest go on."""
    from router import schema

    before = {r.database: r for r in await database_revisions(directory)}
    async with directory.control.acquire() as conn:
        await schema.ensure_control(conn)
    await directory.prepare_shards()
    out = []
    for after in await database_revisions(directory):
        was = before.get(after.database)
        out.append({**after.to_dict(), "from": was.revision if was is not None else None})
    return out
