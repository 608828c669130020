"""The tenant directory on the control plane: shards, tenants, domains, placement.

Every change to a tenant bumps its epoch and is announced through ``on_change`` (the
resolve cache publishes it as an invalidation). Schema names are generated here
(``t_<32 hex>``) and created on the shard by a server-side function that quotes them.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import uuid
from typing import Awaitable, Callable, Sequence
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg

from router import schema
from router.errors import (
    FenceStale, NoShardAvailable, TenantBusy, ShardExists, ShardNotFound, ShardUnreachable, TenantExists, TenantNotFound, ValidationFailed,
)
from router.keys import PLACEMENT_LOCK, SHARD_STATES, TENANT_STATES
from router.models import ShardRecord, TenantRecord, check_code, check_domain, check_domains, check_shard_id, parse_tenant_id
from router.pools import ShardPools, connect, redact
from router.settings import Settings

log = logging.getLogger("tenantfleet.directory")

OnChange = Callable[[TenantRecord], Awaitable[None]]

# One query text per lookup kind: the resolve client's miss path.
# What a pool's acquire or first statement raises when the shard's server is down or
# restarting (not what a statement's own failure raises).
_SERVER_GONE = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                asyncpg.CannotConnectNowError)

_SELECT = """
SELECT t.tenant_id::text AS tenant_id, t.code, t.schema_name, t.shard_id, t.state, t.epoch,
       coalesce((SELECT array_agg(d.domain ORDER BY d.domain) FROM tenant_domains d WHERE d.tenant_id = t.tenant_id),
                '{}') AS domains
FROM tenants t
"""
LOOKUP_SQL = {
    "id": _SELECT + "WHERE t.tenant_id = $1::uuid",
    "code": _SELECT + "WHERE t.code = $1",
    "domain": _SELECT + "WHERE t.tenant_id = (SELECT tenant_id FROM tenant_domains WHERE domain = $1)",
}

# Placement and the shard list read the per-shard counter (`shards.tenant_count`, kept by
# triggers on `tenants` in the same transaction), never count the tenants.
_PLACE = """
SELECT s.shard_id
FROM shards s
WHERE s.state = 'active'
ORDER BY s.tenant_count::float8 / s.capacity, s.shard_id
LIMIT 1
"""

_SHARDS = """
SELECT s.shard_id, s.dsn, s.state, s.capacity, s.weight, s.tenant_count AS tenants
FROM shards s
"""

# Tenant pages by keyset: ORDER BY code after the last code of the previous page ('' for
# the first: every code is longer), each filter combination its own constant text so
# that every one has an index to walk (tables.tenants: code, (shard_id, code),
# (state, code)). OFFSET stays for old clients (0 costs nothing).
_PAGE = "t.code > $1 ORDER BY t.code LIMIT $2 OFFSET $3"
_LIST_SQL = {
    (False, False): _SELECT + "WHERE " + _PAGE,
    (True, False): _SELECT + "WHERE t.shard_id = $4 AND " + _PAGE,
    (False, True): _SELECT + "WHERE t.state = $4 AND " + _PAGE,
    (True, True): _SELECT + "WHERE t.shard_id = $4 AND t.state = $5 AND " + _PAGE,
}


def record_from_row(row: asyncpg.Record) -> TenantRecord:
    # shard ids and states are a few values shared by every tenant: one string each, not
    # one per cached record (the resolve cache holds up to 100k of them)
    return TenantRecord(tenant_id=row["tenant_id"], code=row["code"], schema=row["schema_name"],
                        shard_id=sys.intern(row["shard_id"]), state=sys.intern(row["state"]), epoch=row["epoch"],
                        domains=tuple(row["domains"]))


def _shard(row: asyncpg.Record) -> ShardRecord:
    return ShardRecord(shard_id=row["shard_id"], dsn=row["dsn"], state=row["state"], capacity=row["capacity"],
                       weight=row["weight"], tenants=row["tenants"])


async def _no_change(_: TenantRecord) -> None:
    return None


class Directory:
    """Service functions over the control plane. Raises `TenantFleetError` subclasses only."""

    def __init__(self, control: asyncpg.Pool, shard_pools: ShardPools, settings: Settings,
                 on_change: OnChange = _no_change) -> None:
        self.control = control
        self.shard_pools = shard_pools
        self.settings = settings
        self.on_change = on_change

    @classmethod
    async def bootstrap(cls, control: asyncpg.Pool) -> None:
        async with control.acquire() as conn:
            await schema.ensure_control(conn)

    async def dsn_of(self, shard_id: str) -> str | None:
        dsn: str | None = await self.control.fetchval("SELECT dsn FROM shards WHERE shard_id = $1", shard_id)
        return dsn

    async def login_dsn_of(self, shard_id: str) -> str | None:
        """The DSN the host's request path connects with: the shard's, with the user and
        password of the shard's login role (README "Database roles") instead of the
        owner's. None for an unregistered shard; SHARD_UNREACHABLE for one not prepared by
        this version yet (no login role: the owner's DSN is never handed out instead)."""
        row = await self.control.fetchrow("SELECT dsn, login_role, login_password FROM shards WHERE shard_id = $1",
                                          shard_id)
        if row is None:
            return None
        if row["login_role"] is None or row["login_password"] is None:
            raise ShardUnreachable(f"shard {shard_id} has no login role for the request path yet: prepare it with "
                                   "this version of tenantfleet (`tenantfleet up`, or Directory.prepare_shards)",
                                   shardId=shard_id)
        return with_login(row["dsn"], row["login_role"], row["login_password"])

    # --- shards -------------------------------------------------------------------------
    async def add_shard(self, shard_id: str, dsn: str, *, capacity: int = 1000, weight: int = 100) -> ShardRecord:
        """Register a shard after checking its DSN answers and preparing its ``fleet`` schema.

        Raises VALIDATION_FAILED, SHARD_EXISTS, or SHARD_UNREACHABLE (nothing registered).
        """
        check_shard_id(shard_id)
        if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
            raise ValidationFailed("dsn must be a postgresql:// URL", field="dsn")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValidationFailed("capacity must be a positive integer", field="capacity")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise ValidationFailed("weight must be a non-negative integer", field="weight")
        if await self.control.fetchval("SELECT 1 FROM shards WHERE shard_id = $1", shard_id):
            raise ShardExists(f"shard {shard_id} is already registered", shardId=shard_id)
        password = new_login_password()
        # The row (and its login password) is inserted first and committed only once the
        # shard is prepared: a second add of the same id waits on the row, then fails
        # with SHARD_EXISTS before touching the shard (so it never resets the password).
        async with self.control.acquire() as cconn, cconn.transaction():
            try:
                row = await cconn.fetchrow(
                    "INSERT INTO shards (shard_id, dsn, capacity, weight, login_password) VALUES ($1, $2, $3, $4, $5) "
                    "RETURNING shard_id, dsn, state, capacity, weight, 0 AS tenants",
                    shard_id, dsn, capacity, weight, password)
                assert row is not None
            except asyncpg.UniqueViolationError as exc:
                raise ShardExists(f"shard {shard_id} is already registered", shardId=shard_id) from exc
            conn = await connect(dsn, self.settings)
            try:
                await schema.ensure_shard(conn, login_verifier=schema.scram_verifier(password))
                login = await schema.login_role(conn)
            except asyncpg.PostgresError as exc:
                raise ShardUnreachable(f"cannot prepare shard {shard_id} at {redact(dsn)}: {exc}",
                                       shardId=shard_id) from exc
            finally:
                await conn.close()
            await cconn.execute("UPDATE shards SET login_role = $2 WHERE shard_id = $1", shard_id, login)
        log.info("shard registered", extra={"shardId": shard_id, "dsn": redact(dsn)})
        return _shard(row)

    async def prepare_shards(self) -> list[str]:
        """Re-run the idempotent ``fleet`` schema set-up on every registered shard (an upgrade
        of tenantfleet may add shard functions, roles, or the tenant roles of schemas made
        before them, the request path's login role). A shard without a login password
        yet is given one. ``shard_pools`` must connect as the shards' owner role.
        Returns the shards that could not be reached."""
        unreachable: list[str] = []
        for shard in await self.list_shards():
            try:
                caught_up = await self._prepare(shard.shard_id)
            except ShardUnreachable as exc:
                log.warning("shard %s not prepared: %s", shard.shard_id, exc.message, extra={"shardId": shard.shard_id})
                unreachable.append(shard.shard_id)
                continue
            if caught_up:
                log.info("shard %s: %d tenant schemas given their roles", shard.shard_id, caught_up,
                         extra={"shardId": shard.shard_id})
        return unreachable

    async def _prepare(self, shard_id: str, *, rotate: bool = False) -> int:
        """Prepare one registered shard and set its login role's password: the stored one,
        or (none stored yet, or ``rotate``) a new one. The shard's row stays locked until
        both the shard and the control plane have the same password (two processes
        preparing or rotating one shard take turns, and agree)."""
        async with self.control.acquire() as cconn, cconn.transaction():
            stored = await cconn.fetchval("SELECT login_password FROM shards WHERE shard_id = $1 FOR UPDATE", shard_id)
            password = new_login_password() if rotate or stored is None else stored
            pool = await self.shard_pools.get(shard_id)
            try:
                async with pool.acquire() as conn:
                    caught_up = await schema.ensure_shard(conn, login_verifier=schema.scram_verifier(password))
                    login = await schema.login_role(conn)
            except _SERVER_GONE as exc:
                raise ShardUnreachable(f"shard {shard_id} is unreachable: {exc.__class__.__name__}",
                                       shardId=shard_id) from exc
            await cconn.execute("UPDATE shards SET login_role = $2, login_password = $3 WHERE shard_id = $1",
                                shard_id, login, password)
        return caught_up

    async def rotate_login_password(self, shard_id: str) -> None:
        """Give the shard's login role a new generated password, on the shard and in the
        control plane. Connections already open stay open; new ones use the new password
        (hosts read it for every connection they open). Raises SHARD_NOT_FOUND,
        SHARD_UNREACHABLE (nothing changed)."""
        await self.get_shard(shard_id)  # SHARD_NOT_FOUND, VALIDATION_FAILED
        await self._prepare(shard_id, rotate=True)
        log.info("shard %s: login password rotated", shard_id, extra={"shardId": shard_id})

    async def list_shards(self) -> list[ShardRecord]:
        return [_shard(r) for r in await self.control.fetch(_SHARDS + " ORDER BY s.shard_id")]

    async def get_shard(self, shard_id: str) -> ShardRecord:
        check_shard_id(shard_id)
        row = await self.control.fetchrow(_SHARDS + " WHERE s.shard_id = $1", shard_id)
        if row is None:
            raise ShardNotFound(f"shard {shard_id} is not registered", shardId=shard_id)
        return _shard(row)

    async def set_shard_state(self, shard_id: str, state: str) -> ShardRecord:
        check_shard_id(shard_id)
        if state not in SHARD_STATES:
            raise ValidationFailed(f"state must be one of {', '.join(SHARD_STATES)}", field="state")
        done = await self.control.fetchval("UPDATE shards SET state = $2 WHERE shard_id = $1 RETURNING 1", shard_id, state)
        if not done:
            raise ShardNotFound(f"shard {shard_id} is not registered", shardId=shard_id)
        return await self.get_shard(shard_id)

    async def replace_shard_password(self, shard_id: str, dsn: str) -> None:
        """Store ``dsn`` for a shard whose DSN differs from it only in the password (the same
        server, user and database: anything else would be a move, not a credential change).
        The new DSN must connect. Raises VALIDATION_FAILED, SHARD_NOT_FOUND, SHARD_UNREACHABLE."""
        current = await self.get_shard(shard_id)
        if redact(current.dsn) != redact(dsn):
            raise ValidationFailed("only the password of a shard's DSN may change", field="dsn", shardId=shard_id)
        conn = await connect(dsn, self.settings)
        await conn.close()
        await self.control.execute("UPDATE shards SET dsn = $2 WHERE shard_id = $1", shard_id, dsn)

    # --- tenants ------------------------------------------------------------------------
    async def lookup(self, kind: str, value: str) -> TenantRecord | None:
        """The control-plane read behind every cache miss; None if there is no such tenant."""
        row = await self.control.fetchrow(LOOKUP_SQL[kind], value)
        return None if row is None else record_from_row(row)

    async def get(self, *, id: str | None = None, code: str | None = None, domain: str | None = None) -> TenantRecord:
        kind, value = normalise_query(id=id, code=code, domain=domain)
        rec = await self.lookup(kind, value)
        if rec is None:
            raise TenantNotFound(f"no tenant with {kind} {value}", lookup=kind, value=value)
        return rec

    async def list_tenants(self, *, shard_id: str | None = None, state: str | None = None, limit: int = 100,
                           after: str | None = None, offset: int = 0) -> list[TenantRecord]:
        """Up to ``limit`` tenants in code order, from the one after code ``after`` (the
        last code of the previous page; None: from the start): a keyset page, as cheap at
        the 100,000th tenant as at the first. ``offset`` (deprecated) skips that many more
        rows, at a cost that grows with it. Raises VALIDATION_FAILED."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10_000:
            raise ValidationFailed("limit must be 1..10000", field="limit")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValidationFailed("offset must be >= 0", field="offset")
        if after is not None:
            try:
                check_code(after)
            except ValidationFailed:
                raise ValidationFailed("after must be a tenant code (the last code of the previous page)",
                                       field="after") from None
        if shard_id is not None:
            check_shard_id(shard_id)
        if state is not None and state not in TENANT_STATES:
            raise ValidationFailed(f"state must be one of {', '.join(TENANT_STATES)}", field="state")
        filters = [v for v in (shard_id, state) if v is not None]
        sql = _LIST_SQL[(shard_id is not None, state is not None)]
        rows = await self.control.fetch(sql, after or "", limit, offset, *filters)
        return [record_from_row(r) for r in rows]

    async def create_tenant(self, code: str, domains: Sequence[str] = (), *, shard_id: str | None = None) -> TenantRecord:
        """Place a new tenant, create its schema (with the schema's own role, see README
        "Database roles") and fence on the shard, and mark it active.

        Placement picks the active shard with the fewest tenants relative to capacity.
        Raises VALIDATION_FAILED, TENANT_EXISTS, NO_SHARD_AVAILABLE, SHARD_UNREACHABLE;
        on failure nothing is left behind.
        """
        check_code(code)
        doms = check_domains(domains)
        if shard_id is not None:
            check_shard_id(shard_id)
        tenant_id = uuid.uuid4()
        schema_name = "t_" + tenant_id.hex
        async with self.control.acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", PLACEMENT_LOCK)
                    if shard_id is None:
                        target = await conn.fetchval(_PLACE)
                        if target is None:
                            raise NoShardAvailable("no active shard to place the tenant on")
                    else:
                        state = await conn.fetchval("SELECT state FROM shards WHERE shard_id = $1", shard_id)
                        if state is None:
                            raise ShardNotFound(f"shard {shard_id} is not registered", shardId=shard_id)
                        if state != "active":
                            raise NoShardAvailable(f"shard {shard_id} is {state}", shardId=shard_id)
                        target = shard_id
                    await conn.execute(
                        "INSERT INTO tenants (tenant_id, code, schema_name, shard_id) VALUES ($1, $2, $3, $4)",
                        tenant_id, code, schema_name, target)
                    if doms:
                        await conn.executemany("INSERT INTO tenant_domains (domain, tenant_id) VALUES ($1, $2)",
                                               [(d, tenant_id) for d in doms])
            except asyncpg.UniqueViolationError as exc:
                what = "domain" if exc.table_name == "tenant_domains" else "code"
                raise TenantExists(f"a tenant with this {what} already exists", field=what) from exc
        try:
            pool = await self.shard_pools.get(target)
            try:
                async with pool.acquire() as sconn, sconn.transaction():
                    await sconn.execute("SELECT fleet.create_tenant_schema($1)", schema_name)
                    await sconn.execute(
                        "INSERT INTO fleet.tenant_fence (tenant_id, schema_name, epoch) VALUES ($1, $2, 1) "
                        "ON CONFLICT (tenant_id) DO UPDATE SET epoch = EXCLUDED.epoch, updated_at = now()",
                        tenant_id, schema_name)
            except _SERVER_GONE as exc:  # an open pool whose server went away since
                raise ShardUnreachable(f"shard {target} is unreachable: {exc.__class__.__name__}",
                                       shardId=target) from exc
        except BaseException:
            await self.control.execute("DELETE FROM tenants WHERE tenant_id = $1", tenant_id)
            raise
        return await self._transition(str(tenant_id), "provisioning", "active")

    async def suspend(self, tenant_id: str) -> TenantRecord:
        return await self._transition(parse_tenant_id(tenant_id), "active", "suspended")

    async def resume(self, tenant_id: str) -> TenantRecord:
        return await self._transition(parse_tenant_id(tenant_id), "suspended", "active")

    async def _transition(self, tenant_id: str, from_state: str, to_state: str) -> TenantRecord:
        row = await self.control.fetchrow(
            "UPDATE tenants SET state = $3, epoch = epoch + 1, updated_at = now() "
            "WHERE tenant_id = $1::uuid AND state = $2 AND NOT EXISTS (SELECT 1 FROM tenant_moves m "
            "WHERE m.tenant_id = $1::uuid AND m.phase NOT IN ('done', 'aborted')) RETURNING state",
            tenant_id, from_state, to_state)
        if row is None:
            moving = await self.control.fetchval(
                "SELECT run_id FROM tenant_moves WHERE tenant_id = $1::uuid AND phase NOT IN ('done', 'aborted')",
                tenant_id)
            if moving is not None:
                raise TenantBusy(f"tenant {tenant_id} is being moved (run {moving}): finish or abort the move first",
                                 tenantId=tenant_id, runId=moving)
            current = await self.lookup("id", tenant_id)
            if current is None:
                raise TenantNotFound(f"no tenant with id {tenant_id}", id=tenant_id)
            raise ValidationFailed(f"tenant {current.code} is {current.state}, not {from_state}",
                                   field="state", state=current.state)
        rec = await self.lookup("id", tenant_id)
        assert rec is not None
        await self.announce(rec)
        return rec

    async def cutover(self, tenant_id: str, source: str, target: str, epoch_before: int,
                      conn: asyncpg.Connection | None = None) -> TenantRecord:
        """Point the tenant at ``target`` with the next epoch, if it is still on ``source``
        at ``epoch_before`` (the move's commit point; idempotent for a resumed move: a
        tenant already on ``target`` at ``epoch_before + 1`` is returned as it is).
        Announced to every resolve cache. FENCE_STALE if the tenant changed otherwise."""
        sql = ("UPDATE tenants SET shard_id = $3, epoch = $4 + 1, updated_at = now() "
               "WHERE tenant_id = $1::uuid AND shard_id = $2 AND epoch = $4 RETURNING 1")
        if conn is None:
            done = await self.control.fetchval(sql, tenant_id, source, target, epoch_before)
        else:
            done = await conn.fetchval(sql, tenant_id, source, target, epoch_before)
        rec = await self.lookup("id", tenant_id)
        if rec is None:
            raise TenantNotFound(f"no tenant with id {tenant_id}", id=tenant_id)
        if not done and not (rec.shard_id == target and rec.epoch == epoch_before + 1):
            raise FenceStale(f"tenant {rec.code} changed during its move (now on {rec.shard_id} at epoch "
                             f"{rec.epoch}, expected {source} at {epoch_before})", tenantId=tenant_id)
        await self.announce(rec)
        return rec

    async def finish_committed_move(self, tenant_id: str) -> TenantRecord | None:
        """Switch the directory for a move whose mover stopped after its commit point.

        The commit point is the source's fence raised past the move's ``epoch_before``
        (the target's fence and schema were committed before it); from there the only
        right placement is the target, whether the mover is alive or not, and `cutover`
        is idempotent. A host calls this when a tenant's fence stays ahead of the
        directory for longer than a cutover takes, so a mover killed in that window
        leaves no tenant unserved. Returns the new record, or None when there is no such
        move (no open move, the directory already moved on, or the fence not raised)."""
        row = await self.control.fetchrow(
            "SELECT source_shard, target_shard, epoch_before FROM tenant_moves "
            "WHERE tenant_id = $1::uuid AND phase NOT IN ('done', 'aborted')", tenant_id)
        if row is None:
            return None
        rec = await self.lookup("id", tenant_id)
        if rec is None or rec.shard_id != row["source_shard"] or rec.epoch != row["epoch_before"]:
            return None
        pool = await self.shard_pools.get(row["source_shard"])  # SHARD_UNREACHABLE
        try:
            fence = await pool.fetchval("SELECT epoch FROM fleet.tenant_fence WHERE tenant_id = $1::uuid", tenant_id)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise ShardUnreachable(f"shard {row['source_shard']} is unreachable",
                                   shardId=row["source_shard"]) from exc
        if fence is None or fence <= row["epoch_before"]:
            return None
        log.warning("tenant %s: its move's commit point passed without the directory following (mover "
                    "stopped?); switching it to %s", rec.code, row["target_shard"])
        return await self.cutover(tenant_id, row["source_shard"], row["target_shard"], row["epoch_before"])

    async def bump_epoch(self, tenant_id: str, at_least: int) -> TenantRecord:
        """Raise the tenant's epoch past ``at_least`` where it is (an aborted move whose
        source fence had already been raised: the directory catches up with it)."""
        await self.control.execute(
            "UPDATE tenants SET epoch = greatest(epoch + 1, $2), updated_at = now() WHERE tenant_id = $1::uuid",
            tenant_id, at_least)
        rec = await self.lookup("id", tenant_id)
        if rec is None:
            raise TenantNotFound(f"no tenant with id {tenant_id}", id=tenant_id)
        await self.announce(rec)
        return rec

    async def announce(self, rec: TenantRecord) -> None:
        """Tell every resolve cache about a change; never fails the change itself."""
        try:
            await self.on_change(rec)
        except Exception:  # the change is committed; caches fall back to their TTL
            log.warning("invalidation for tenant %s (epoch %s) was not published", rec.tenant_id, rec.epoch,
                        exc_info=True)


def new_login_password() -> str:
    """A generated password for a shard's login role (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def with_login(dsn: str, user: str, password: str) -> str:
    """``dsn`` connecting as ``user`` with ``password``: the same servers, database and
    options, and no other user or password (neither in the user info nor as a query
    parameter)."""
    parts = urlsplit(dsn)
    hosts = parts.netloc.rpartition("@")[2]
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in ("user", "password")]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hosts}"
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))


def normalise_query(*, id: str | None = None, code: str | None = None, domain: str | None = None) -> tuple[str, str]:
    """Exactly one of id, code, domain, validated: (kind, canonical value)."""
    given = [(k, v) for k, v in (("id", id), ("code", code), ("domain", domain)) if v is not None]
    if len(given) != 1:
        raise ValidationFailed("give exactly one of id, code or domain", field="query")
    kind, value = given[0]
    if kind == "id":
        return kind, parse_tenant_id(value)
    if kind == "code":
        return kind, check_code(value)
    return kind, check_domain(value)
