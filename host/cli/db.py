"""`tenantfleet db upgrade|current|history`: tenantfleet's own tables, versioned by Alembic
revisions (`router.revisions`) on the control plane and on every shard's ``fleet`` schema."""
from __future__ import annotations

from typing import Any

import click

from host.cli.base import CliState, cli, emit, pass_state, run

COLUMNS = ["database", "component", "revision", "head", "state"]


@cli.group("db")
def db_group() -> None:
    """tenantfleet's own tables (control plane and each shard's `fleet` schema), versioned
    by Alembic revisions: see where each database stands, list the revisions, upgrade.

    `up` and `shards add` upgrade the databases they find; `db upgrade` does it alone,
    e.g. after installing a new tenantfleet. A database made before revisions existed is
    stamped at the baseline (0005) and upgraded from there, its data kept."""


@db_group.command("current")
@pass_state
def db_current(state: CliState) -> None:
    """Each database's recorded revision against this tenantfleet's head (read only).

    States: up to date, behind (`db upgrade`), not versioned (made before revisions;
    `db upgrade` stamps it), newer than this tenantfleet (upgrade tenantfleet first),
    unreachable (a shard)."""
    async def go() -> list[dict[str, Any]]:
        from router.schema_versions import database_revisions
        from router.runtime import open_runtime

        async with open_runtime(state.settings, bootstrap=False) as rt:
            return [r.to_dict() for r in await database_revisions(rt.directory)]
    emit(state, run(go()), columns=COLUMNS)


@db_group.command("history")
@pass_state
def db_history(state: CliState) -> None:
    """This tenantfleet's revisions for the control plane and for shards, newest first
    (reads no database)."""
    from router.revisions import COMPONENTS, history

    emit(state, [{"component": c, **r.to_dict()} for c in COMPONENTS for r in history(c)],
         columns=["component", "revision", "downRevision", "doc"])


@db_group.command("upgrade")
@pass_state
def db_upgrade(state: CliState) -> None:
    """Upgrade the control plane, then every registered shard, to this tenantfleet's head.

    Each database is upgraded in one transaction under the bootstrap lock (two processes
    take turns); a shard that can't be reached is reported (exit 1) and the rest go on;
    one upgraded by a newer tenantfleet is refused (SCHEMA_TOO_NEW), nothing changed."""
    async def go() -> list[dict[str, Any]]:
        from router.schema_versions import upgrade_databases
        from router.runtime import open_runtime

        async with open_runtime(state.settings, bootstrap=False) as rt:
            return await upgrade_databases(rt.directory)
    from router.errors import ShardUnreachable

    rows = run(go())
    emit(state, rows, columns=["database", "component", "from", "revision", "state"])
    missed = [r["database"] for r in rows if r["state"] != "up to date"]
    if missed:  # only unreachable shards get here: anything else raised before
        raise ShardUnreachable(f"not upgraded (unreachable): {', '.join(missed)}", shardIds=missed)
