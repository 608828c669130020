"""One batch of new tenants made on one shard in one transaction (`tenants import`, issue 12).

`create_batch` runs, inside the caller's shard transaction, in a handful of round trips
whatever the batch's size:

1. the local ``lock_timeout``/``statement_timeout``, every tenant unit's advisory lock and
   every tenant's hold key (shared) in ONE statement, as the migrator's engine takes them
   one unit at a time (a busy one: `BatchFallback`);
2. the schemas (one script), their roles and grants (``fleet.create_tenant_roles`` over
   the array of names, one statement per grantee for the grants the roles share; a
   resumed batch's schemas: ``fleet.ensure_tenant_roles``, which checks each role and
   grants on the tables there) and the fences (one INSERT over arrays);
3. each plugin's public files (the engine's `apply_unit`, once per shard: a no-op once
   the shard has them);
4. the ledger of the batch's tenants, read in one query: drift stops the batch as the
   engine does; what is recorded already (a resumed batch) is not run again;
5. every pending tenant file of every tenant as ONE multi-statement script (simple query
   protocol: one round trip, nothing prepared), each tenant's files after a
   ``SET LOCAL search_path`` to its schema, then ``public``;
6. their ledger rows in one INSERT over arrays.

The scripts are the places SQL text carries a name: the tenant schemas are generated
by the system (``t_<32 hex>``, never user text) and checked against that pattern right
before, so quoting them as identifiers is exact; every value still goes as a parameter.
A file the script can't run (its SQL fails) raises `BatchFallback`: the caller rolls the
batch back and makes its tenants one by one through the engine, which names the file
and tenant that fail. A no-transaction file also takes that path (it can't share a
transaction).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import asyncpg

from router.models import TenantRecord
from router.settings import Settings
from shard_migrations import ledger
from shard_migrations.engine import LockTimedOut, Unit, apply_unit, classify
from shard_migrations.keys import advisory_key
from shard_migrations.ledger import Conn
from shard_migrations.packages import MigrationFile, PluginPackage

TENANT_SCHEMA_RE = re.compile(r"t_[0-9a-f]{32}")


class BatchFallback(Exception):
    """The batch can't be made in one script (a busy lock, a no-transaction file, a file
    whose SQL fails): roll it back and make its tenants one at a time."""


@dataclass(frozen=True)
class NewTenant:
    record: TenantRecord
    plugins: tuple[str, ...]


_LOCKS = ("SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true), "
          "(SELECT coalesce(bool_and(pg_try_advisory_xact_lock(k)), true) FROM unnest($3::bigint[]) k), "
          "(SELECT coalesce(bool_and(pg_try_advisory_xact_lock_shared(fleet.tenant_hold_key(t))), true) "
          "FROM unnest($4::uuid[]) t)")
_LEDGER = ("SELECT tenant_id::text AS tenant_id, name, checksum FROM fleet.sys_plugin_migrations "
           "WHERE plugin_id = $1 AND scope = 'tenant' AND tenant_id = ANY($2::uuid[])")
_RECORD = ("INSERT INTO fleet.sys_plugin_migrations (plugin_id, scope, tenant_id, name, version, checksum) "
           "SELECT x.p, 'tenant', x.t, x.n, x.v, x.c "
           "FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[]) AS x(p, t, n, v, c)")


async def create_batch(conn: Conn, shard_id: str, tenants: Sequence[NewTenant], packages: Sequence[PluginPackage],
                       settings: Settings) -> int:
    """Make ``tenants`` (schemas, roles, fences, their plugins' files with ledger rows) on
    this shard inside the caller's open transaction. Idempotent: a batch that committed
    before is found done. Returns how many tenant files ran.

    Raises BatchFallback (see the module), LockTimedOut (a table lock was not granted in
    time), MigrationDrift, or the driver's connection errors.
    """
    for t in tenants:
        if not TENANT_SCHEMA_RE.fullmatch(t.record.schema):
            raise ValueError(f"not a tenant schema name: {t.record.schema!r}")
    files = {p.id: tuple(p.files("tenant", p.version)) for p in packages}
    if any(f.no_transaction for fs in files.values() for f in fs):
        raise BatchFallback("a tenant file runs outside a transaction")
    ids = [t.record.tenant_id for t in tenants]
    keys = [advisory_key(p, "tenant", t.record.tenant_id) for t in tenants for p in t.plugins]
    row = await conn.fetchrow(_LOCKS, f"{settings.lock_timeout_ms}ms", f"{settings.statement_timeout_ms}ms",
                              keys, ids)
    if row is None or not row[2] or not row[3]:
        raise BatchFallback("a tenant unit's lock is busy")
    # A new tenant is provisioning: no fleet run targets it and no move holds it, so the
    # engine's check that this shard serves it (the fence) is the INSERT below.
    names = [t.record.schema for t in tenants]
    # a schema that exists already is a resumed batch's: its tables get their grants too
    existed = await conn.fetchval("SELECT count(*) FROM pg_catalog.pg_namespace WHERE nspname = ANY($1::text[])",
                                  names)
    # the names matched TENANT_SCHEMA_RE above: no character of them needs escaping
    await conn.execute("".join(f'CREATE SCHEMA IF NOT EXISTS "{n}";' for n in names))
    if existed:
        # the roles, their grants and ONE grant of them all to the login role, each role
        # checked (it may exist already) and its tables given their grants
        await conn.execute("SELECT fleet.ensure_tenant_roles($1::text[], true)", names)
    else:
        # fresh tenants: their roles can't exist yet, so they are made without a check
        # each (fleet.create_tenant_roles; if one does exist, the batch is made one by one)
        try:
            await conn.execute("SELECT fleet.create_tenant_roles($1::text[])", names)
        except asyncpg.PostgresError as exc:
            kind = classify(exc)
            if kind == "lock":
                raise LockTimedOut(f"tenant roles on shard {shard_id}: {exc.sqlstate} {exc}") from exc
            if kind == "shard":
                raise
            raise BatchFallback(f"the batch's roles: {exc.sqlstate} {exc}") from exc
    await conn.execute(
        "INSERT INTO fleet.tenant_fence (tenant_id, schema_name, epoch) "
        "SELECT t, n, 1 FROM unnest($1::uuid[], $2::text[]) AS x(t, n) ON CONFLICT (tenant_id) DO NOTHING",
        ids, [t.record.schema for t in tenants])
    for pkg in packages:
        public = tuple(pkg.files("public", pkg.version))
        if public:
            await apply_unit(conn, pkg.id, Unit(shard_id, "public", None, public), settings)
    script: list[str] = []
    done: list[tuple[str, str, MigrationFile]] = []  # (plugin, tenant, file)
    for pkg in packages:
        recorded: dict[str, dict[str, str]] = {}
        for r in await conn.fetch(_LEDGER, pkg.id, [t.record.tenant_id for t in tenants if pkg.id in t.plugins]):
            recorded.setdefault(r["tenant_id"], {})[r["name"]] = r["checksum"]
        for t in tenants:
            if pkg.id not in t.plugins:
                continue
            pending, drift = ledger.split(files[pkg.id], recorded.get(t.record.tenant_id, {}), shard_id=shard_id,
                                          tenant_id=t.record.tenant_id)
            if drift:
                raise ledger.drift_error(drift)
            if not pending:
                continue
            # the schema matched TENANT_SCHEMA_RE above: no character of it needs escaping
            script.append(f'SET LOCAL search_path = "{t.record.schema}", public;')
            # a file may end in a comment or without its last semicolon
            script.extend(f"{f.sql}\n;" for f in pending)
            done.extend((pkg.id, t.record.tenant_id, f) for f in pending)
    if not script:
        return 0
    try:
        await conn.execute("\n".join(script))
    except asyncpg.PostgresError as exc:
        kind = classify(exc)
        if kind == "lock":
            raise LockTimedOut(f"tenant files on shard {shard_id}: {exc.sqlstate} {exc}") from exc
        if kind == "shard":
            raise
        raise BatchFallback(f"a tenant file failed: {exc.sqlstate} {exc}") from exc
    await conn.execute(_RECORD, [p for p, _, _ in done], [t for _, t, _ in done], [f.name for _, _, f in done],
                       [str(f.since) for _, _, f in done], [f.checksum for _, _, f in done])
    return len(done)
