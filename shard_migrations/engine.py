"""Applying migration files to one unit: a shard's public scope, or one tenant's schema.

A unit is guarded by an advisory lock on (plugin, scope[, tenant]), taken with
``pg_try_advisory_xact_lock`` inside the unit's transaction (or, when the unit has a
no-transaction file, with a session-level ``pg_try_advisory_lock`` released in ``finally``);
a busy lock raises `LockBusy` at once (the caller retries later, never waits). Under the
lock the unit's ledger is read again, so a unit another migrator finished in the meantime
is a no-op. Consecutive transactional files run in ONE transaction together with their
ledger rows, with ``lock_timeout`` / ``statement_timeout`` set locally and the
search_path set locally to the tenant schema (quoted server-side), then ``public``: a
crash leaves a tenant either before or after the whole group, never in between. A
``-- fleet:no-transaction`` file runs on its own outside a transaction and is recorded
after it succeeds; such a file must be idempotent (``IF NOT EXISTS``), since a crash
between the file and its ledger row makes a resume run it again.

A tenant unit also takes the tenant's *hold key* (``fleet.tenant_hold_key``) shared, with
the same kind of try-lock (transaction-level, or session-level beside a no-transaction
file): a move holds it exclusive on source and target for the whole move, so a tenant is
never migrated and moved at once. A held tenant raises `TenantHeld` (a `LockBusy`: the
unit is retried later, never failed for it). Under the hold the unit checks that its
shard still serves the tenant at the epoch it was planned with (``fleet.tenant_fence``,
tested as the request path does): if the row is gone (moved away and cleaned up) or has
a newer epoch (a cutover raised it), `TenantMovedAway`
is raised before anything is applied, and the caller re-resolves the tenant through the
directory (`current_placement`) and applies the unit where it lives now: never to a
copy that was renamed away, never lost.

Errors are sorted by SQLSTATE / exception class (`classify`), never by message text.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Sequence

import asyncpg
import semver
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from router.errors import MigrationFailed, ShardUnreachable, TenantBusy, TenantMoving, TenantNotFound
from router.models import TenantRecord
from router.pools import ShardPools
from router.settings import Settings
from shard_migrations import ledger
from shard_migrations.keys import (
    APPLY_TENANT_BUDGET_S,
    LOCK_SQLSTATES,
    SHARD_SQLSTATE_PREFIXES,
    STATEMENT_TIMEOUT_SQLSTATE,
    TENANT_STATES_TARGETED,
    UNIT_BACKOFF_INITIAL_S,
    UNIT_BACKOFF_MAX_S,
    advisory_key,
)
from shard_migrations.ledger import Conn
from shard_migrations.packages import MigrationFile, PluginPackage


class LockBusy(Exception):
    """Another migrator holds this unit's advisory lock: retry the unit later."""


class TenantHeld(LockBusy):
    """A move holds the unit's tenant (its hold key is taken exclusive on this shard):
    retry the unit later, as for any busy lock."""


class TenantMovedAway(Exception):
    """The unit's shard does not serve its tenant at the planned epoch any more: the
    fence row is gone (``fence_epoch`` None) or has a newer epoch. Nothing was applied;
    re-resolve the tenant (`current_placement`) and apply the unit where it lives."""

    def __init__(self, unit: "Unit", fence_epoch: int | None) -> None:
        self.unit = unit
        self.fence_epoch = fence_epoch
        super().__init__(f"{unit.where()}: the shard's fence for the tenant is "
                         + ("gone" if fence_epoch is None else f"at epoch {fence_epoch}")
                         + f", planned at epoch {unit.tenant.epoch if unit.tenant else '-'}")


class LockTimedOut(Exception):
    """A table lock was not granted within lock_timeout (or a deadlock/serialization failure):
    this unit backs off and is retried; its shard goes on."""


@dataclass(frozen=True)
class Unit:
    """One thing a migrator applies files to under one advisory lock."""
    shard_id: str
    scope: str                          # "public" | "tenant"
    tenant: TenantRecord | None         # None for the public scope
    files: tuple[MigrationFile, ...]    # the files the unit should have (the ledger decides what is pending)

    @property
    def key(self) -> str:
        return public_key(self.shard_id) if self.tenant is None else tenant_key(self.tenant.tenant_id)

    @property
    def tenant_id(self) -> str | None:
        return None if self.tenant is None else self.tenant.tenant_id

    @property
    def schema(self) -> str | None:
        """The tenant's schema, or None for the public scope (search_path is then ``public``)."""
        return None if self.tenant is None else self.tenant.schema

    def where(self) -> str:
        return f"shard {self.shard_id}" + (f", tenant {self.tenant.code} ({self.tenant.tenant_id})"
                                           if self.tenant else ", public scope")


def public_key(shard_id: str) -> str:
    return f"public:{shard_id}"


def tenant_key(tenant_id: str) -> str:
    return f"tenant:{tenant_id}"


def classify(exc: BaseException) -> str:
    """``"lock"`` (retry this unit later), ``"moved"`` (re-resolve the tenant and apply the
    unit where it lives now), ``"shard"`` (the shard is down, slow or refusing: back off
    the shard) or ``"fatal"`` (the SQL itself fails: stop the run)."""
    if isinstance(exc, TenantMovedAway):
        return "moved"
    if isinstance(exc, (LockBusy, LockTimedOut)):
        return "lock"
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state in LOCK_SQLSTATES:
            return "lock"
        if state == STATEMENT_TIMEOUT_SQLSTATE or state.startswith(SHARD_SQLSTATE_PREFIXES):
            return "shard"
        return "fatal"
    # InternalClientError: the protocol is in an unknown state after the server went away mid-query
    if isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                        ShardUnreachable)):
        return "shard"
    return "fatal"


# what the session cleanup in ``finally`` may hit; the connection is then terminated
_CLEANUP_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)


def _timeouts(settings: Settings) -> tuple[str, str]:
    return f"{settings.lock_timeout_ms}ms", f"{settings.statement_timeout_ms}ms"


_SET_LOCAL = ("SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true), "
              "set_config('search_path', CASE WHEN $3::text IS NULL THEN 'public' "
              "ELSE quote_ident($3::text) || ', public' END, true)")
_SET_SESSION = _SET_LOCAL.replace(", true)", ", false)")


async def apply_unit(conn: Conn, plugin_id: str, unit: Unit, settings: Settings, *,
                     allow_drift: bool = False) -> list[MigrationFile]:
    """Apply the unit's pending files; returns the files applied (empty if none were pending).

    Raises LockBusy (another migrator has the unit), LockTimedOut (a table lock was not
    granted in time), MigrationDrift (a recorded file changed, unless ``allow_drift``),
    MigrationFailed (a file's SQL fails: names file, shard and tenant; nothing of that
    transaction is recorded), or the driver's connection errors (see `classify`).
    """
    key = advisory_key(plugin_id, unit.scope, unit.tenant_id)
    if not any(f.no_transaction for f in unit.files):
        return await _apply_in_one_transaction(conn, plugin_id, unit, settings, key, allow_drift)
    # a no-transaction file needs the locks across transactions: session-level locks
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
        raise LockBusy(unit.key)
    held = False
    try:
        if unit.tenant is not None:
            held = await conn.fetchval(_TRY_HOLD_SESSION, unit.tenant.tenant_id)
            if not held:
                raise TenantHeld(unit.key)
            await _check_served(conn, unit)
        recorded = await ledger.read_unit(conn, plugin_id, unit.scope, unit.tenant_id)
        pending, drift = ledger.split(unit.files, recorded, shard_id=unit.shard_id, tenant_id=unit.tenant_id)
        if drift and not allow_drift:
            raise ledger.drift_error(drift)
        applied: list[MigrationFile] = []
        for group in _groups(pending):
            await _apply_group(conn, plugin_id, unit, group, settings)
            applied.extend(group)
        return applied
    finally:
        if not conn.is_closed():
            try:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)
                if held:
                    await conn.execute(_UNHOLD_SESSION, unit.tenant_id)
            except _CLEANUP_ERRORS:
                conn.terminate()  # the locks must not outlive the unit: they end with the session


_TRY_HOLD_SESSION = "SELECT pg_try_advisory_lock_shared(fleet.tenant_hold_key($1::uuid))"
_UNHOLD_SESSION = "SELECT pg_advisory_unlock_shared(fleet.tenant_hold_key($1::uuid))"
# the unit's lock, and for a tenant unit the tenant's hold key shared (a move holds it
# exclusive), in the statement that sets the local timeouts and search_path
_LOCK_AND_SET_LOCAL = ("SELECT pg_try_advisory_xact_lock($1), "
                       "$5::uuid IS NULL OR pg_try_advisory_xact_lock_shared(fleet.tenant_hold_key($5::uuid)), "
                       "set_config('lock_timeout', $2, true), "
                       "set_config('statement_timeout', $3, true), set_config('search_path', "
                       "CASE WHEN $4::text IS NULL THEN 'public' ELSE quote_ident($4::text) || ', public' END, true)")


async def _check_served(conn: Conn, unit: Unit) -> None:
    """Under the tenant's hold: TenantMovedAway unless this shard's fence names the tenant at
    an epoch no newer than the unit was planned with (as the request path's fence). A
    statement after the lock's: a new snapshot, which sees whatever a move committed
    before letting go of the hold."""
    assert unit.tenant is not None
    epoch = await conn.fetchval("SELECT epoch FROM fleet.tenant_fence WHERE tenant_id = $1::uuid",
                                unit.tenant.tenant_id)
    if epoch is None or epoch > unit.tenant.epoch:  # the host's fence test: a newer epoch means moved on
        raise TenantMovedAway(unit, epoch)


async def _apply_in_one_transaction(conn: Conn, plugin_id: str, unit: Unit, settings: Settings, key: int,
                                    allow_drift: bool) -> list[MigrationFile]:
    """The common case (no no-transaction file): the locks are transaction-level and taken in
    the same statement that sets the local timeouts and search_path, so a unit costs
    BEGIN, locks, (a tenant unit: fence check,) ledger read, the files, the ledger rows, COMMIT."""
    lock_timeout, statement_timeout = _timeouts(settings)
    async with conn.transaction():
        row = await conn.fetchrow(_LOCK_AND_SET_LOCAL, key, lock_timeout, statement_timeout, unit.schema,
                                  unit.tenant_id)
        if row is None or not row[0]:
            raise LockBusy(unit.key)
        if not row[1]:
            raise TenantHeld(unit.key)
        if unit.tenant is not None:
            await _check_served(conn, unit)
        # a new statement, so a new snapshot: it sees whatever the lock's previous holder committed
        recorded = await ledger.read_unit(conn, plugin_id, unit.scope, unit.tenant_id)
        pending, drift = ledger.split(unit.files, recorded, shard_id=unit.shard_id, tenant_id=unit.tenant_id)
        if drift and not allow_drift:
            raise ledger.drift_error(drift)
        for f in pending:
            await _run_file(conn, f, unit)
        if pending:
            await ledger.record(conn, plugin_id, unit.scope, unit.tenant_id, pending)
    return pending


def _groups(files: Sequence[MigrationFile]) -> list[list[MigrationFile]]:
    """Consecutive transactional files together; each no-transaction file alone."""
    out: list[list[MigrationFile]] = []
    for f in files:
        if f.no_transaction or not out or out[-1][0].no_transaction:
            out.append([f])
        else:
            out[-1].append(f)
    return out


async def _apply_group(conn: Conn, plugin_id: str, unit: Unit, group: list[MigrationFile],
                       settings: Settings) -> None:
    lock_timeout, statement_timeout = _timeouts(settings)
    if group[0].no_transaction:
        f = group[0]
        await conn.execute(_SET_SESSION, lock_timeout, statement_timeout, unit.schema)
        try:
            await _run_file(conn, f, unit)
        finally:
            if not conn.is_closed():
                try:
                    await conn.execute("RESET lock_timeout; RESET statement_timeout; RESET search_path")
                except _CLEANUP_ERRORS:
                    conn.terminate()  # never hand a connection with a tenant's search_path back to the pool
        await ledger.record(conn, plugin_id, unit.scope, unit.tenant_id, [f])
        return
    async with conn.transaction():
        await conn.execute(_SET_LOCAL, lock_timeout, statement_timeout, unit.schema)
        for f in group:
            await _run_file(conn, f, unit)
        await ledger.record(conn, plugin_id, unit.scope, unit.tenant_id, group)


async def _run_file(conn: Conn, f: MigrationFile, unit: Unit) -> None:
    try:
        # no arguments: the simple query protocol, so a file may hold several statements and
        # nothing is prepared (and cached) against tables the file is changing
        await conn.execute(f.sql)
    except asyncpg.PostgresError as exc:
        kind = classify(exc)
        if kind == "lock":
            raise LockTimedOut(f"{f.scope}/{f.name} on {unit.where()}: {exc.sqlstate} {exc}") from exc
        if kind == "shard":
            raise
        raise file_failed(f, unit, exc) from exc


def file_failed(f: MigrationFile, unit: Unit, exc: asyncpg.PostgresError) -> MigrationFailed:
    pos = getattr(exc, "position", None)
    at = f" at character {pos}" if pos else ""
    return MigrationFailed(f"{f.plugin_id} {f.scope}/{f.name} failed on {unit.where()}{at}: "
                           f"{exc.sqlstate} {exc.__class__.__name__}: {exc}",
                           file=f"{f.scope}/{f.name}", path=str(f.path), shardId=unit.shard_id,
                           tenantId=unit.tenant_id, sqlstate=exc.sqlstate)


async def try_in_rollback(conn: Conn, units: Sequence[Unit], settings: Settings) -> list[str]:
    """Dry-run: run the units' transactional files in ONE transaction that is always rolled
    back. Returns the names tried; no-transaction files are not tried (they can't be
    rolled back). Raises MigrationFailed for the first failing file; LockTimedOut likewise."""
    lock_timeout, statement_timeout = _timeouts(settings)
    tried: list[str] = []
    tx = conn.transaction()
    await tx.start()
    try:
        for unit in units:
            await conn.execute(_SET_LOCAL, lock_timeout, statement_timeout, unit.schema)
            for f in unit.files:
                if not f.no_transaction:
                    await _run_file(conn, f, unit)
                    tried.append(f"{f.scope}/{f.name}")
    finally:
        if not conn.is_closed():
            await tx.rollback()
    return tried


async def current_placement(control: asyncpg.Pool, tenant_id: str) -> TenantRecord | None:
    """The directory's record of a tenant the migrator targets (active or suspended), read
    from the control plane itself (no cache: a unit re-routed after a move must not follow
    a stale answer); None if it is no longer targeted (deleted, being deleted...)."""
    row = await control.fetchrow(
        "SELECT tenant_id::text AS tenant_id, code, schema_name, shard_id, state, epoch FROM tenants "
        "WHERE tenant_id = $1::uuid AND state = ANY($2::text[])", tenant_id, list(TENANT_STATES_TARGETED))
    if row is None:
        return None
    return TenantRecord(tenant_id=row["tenant_id"], code=row["code"], schema=row["schema_name"],
                        shard_id=row["shard_id"], state=row["state"], epoch=row["epoch"])


async def apply_tenant(pools: ShardPools, settings: Settings, package: PluginPackage, tenant: TenantRecord, *,
                       to: semver.Version | None = None, allow_drift: bool = False,
                       control: asyncpg.Pool | None = None) -> list[str]:
    """Bring ONE tenant up to ``package`` (or version ``to``) through the fleet engine.

    For the host's "enable plugin for a tenant": applies the plugin's pending public-scope
    files on the tenant's shard first (a tenant's files may use them), then its pending
    tenant-scope files, each unit under its advisory lock, in transactions with the
    configured ``lock_timeout``, each file recorded in the shard's ledger. A busy lock, a
    lock timeout or a move holding the tenant is retried with exponential backoff and
    jitter for up to 30 s. Safe to call concurrently with a fleet run, with a move and
    with itself: nothing is applied twice. If ``tenant`` is stale (the tenant was moved
    to another shard), the tenant is re-read from ``control`` and both units are applied
    on the shard that serves it now; without ``control`` that raises TENANT_MOVING.

    Returns the files applied, as ``"public/001_x.sql"`` / ``"tenant/002_y.sql"`` (empty
    when the tenant was up to date). Does not touch the control plane: the caller records
    ``version_installed`` / ``enabled`` in ``sys_tenant_plugins``.

    Raises MIGRATION_FAILED (a file's SQL fails, or the locks stayed busy past the
    budget; names file, shard, tenant), TENANT_BUSY (a move held the tenant past the
    budget), TENANT_MOVING (see above), TENANT_NOT_FOUND (the tenant was deleted
    meanwhile), MIGRATION_DRIFT (unless ``allow_drift``), SHARD_NOT_FOUND /
    SHARD_UNREACHABLE (the tenant's shard is unknown or down).

    ``pools`` must connect as the shard's owner role (the host passes its owner pools, not
    the request path's, whose app role can't run DDL); migration SQL runs without arguments (simple
    protocol, nothing prepared); the ledger statements only touch ``fleet`` tables. Other
    connections that cached statements on a table this changes may see
    asyncpg.InvalidCachedStatementError once (asyncpg re-prepares outside transactions).
    """
    version = package.version if to is None else to
    deadline = time.monotonic() + APPLY_TENANT_BUDGET_S
    applied: list[str] = []
    while True:
        try:
            applied += await _apply_tenant_here(pools, settings, package, tenant, version, allow_drift, deadline)
            return applied
        except TenantMovedAway as exc:
            if control is None:
                raise TenantMoving(f"tenant {tenant.code} moved off shard {tenant.shard_id}: re-resolve it and "
                                   "try again", tenantId=tenant.tenant_id, retryAfter=1) from exc
            now = await current_placement(control, tenant.tenant_id)
            if now is None:
                raise TenantNotFound(f"tenant {tenant.code} is no longer active or suspended",
                                     tenantId=tenant.tenant_id) from exc
            if now.shard_id == tenant.shard_id and now.epoch == tenant.epoch:
                # the directory has not caught up with the shard's fence (a move's cutover
                # mid-way, or one killed after its commit point): wait for it like a held tenant
                if time.monotonic() > deadline:
                    raise TenantBusy(f"tenant {tenant.code} is mid-move on shard {tenant.shard_id}: finish the "
                                     "move (`move --resume`) and try again", tenantId=tenant.tenant_id) from exc
                await asyncio.sleep(UNIT_BACKOFF_MAX_S)
            tenant = now


async def _apply_tenant_here(pools: ShardPools, settings: Settings, package: PluginPackage, tenant: TenantRecord,
                             version: semver.Version, allow_drift: bool, deadline: float) -> list[str]:
    units = [Unit(tenant.shard_id, "public", None, tuple(package.files("public", version))),
             Unit(tenant.shard_id, "tenant", tenant, tuple(package.files("tenant", version)))]
    pool = await pools.get(tenant.shard_id)
    applied: list[str] = []
    for unit in units:
        if not unit.files:
            continue
        try:
            async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type((LockBusy, LockTimedOut)), reraise=True,
                    wait=wait_random_exponential(multiplier=UNIT_BACKOFF_INITIAL_S, max=UNIT_BACKOFF_MAX_S),
                    stop=stop_after_delay(max(0.0, deadline - time.monotonic()))):
                with attempt:
                    async with pool.acquire(timeout=settings.connect_timeout_s) as conn:
                        done = await apply_unit(conn, package.id, unit, settings, allow_drift=allow_drift)
        except TenantHeld as exc:
            raise TenantBusy(f"tenant {tenant.code} stayed held by a move for {APPLY_TENANT_BUDGET_S:.0f} s: "
                             "try again once the move is done", tenantId=tenant.tenant_id) from exc
        except (LockBusy, LockTimedOut) as exc:
            raise MigrationFailed(f"{package.id}: {unit.where()} stayed locked for {APPLY_TENANT_BUDGET_S:.0f} s "
                                  f"({exc.__class__.__name__}: {exc})", shardId=unit.shard_id,
                                  tenantId=unit.tenant_id) from exc
        except TenantMovedAway:
            raise
        except Exception as exc:
            if classify(exc) != "shard":
                raise
            raise ShardUnreachable(f"shard {unit.shard_id} failed while migrating {unit.where()}: "
                                   f"{exc.__class__.__name__}: {exc}", shardId=unit.shard_id) from exc
        applied.extend(f"{f.scope}/{f.name}" for f in done)
    return applied
