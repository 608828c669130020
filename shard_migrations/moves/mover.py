"""Move one tenant to another shard: prepare, copy, (replicate,) verify, cut over, clean up.

Each move is a run (``fleet_runs`` kind ``move``) with a ``tenant_moves`` row whose
``phase`` says how far it got. The steps, and what makes each safe to repeat:

1. *prepare*: the tenant's hold key is taken exclusive on both shards for the whole move
   (no migration runs on it meanwhile; a migration in flight is waited for, at most
   ``move_hold_wait_ms``). Whatever an earlier attempt of this run left on the target
   is dropped; the target gets the tenant's schema, its tables and primary keys
   (`schema_copy`), and the tenant's rows of ``fleet.sys_plugin_migrations``. Online:
   a logical replication slot (made first: a same-server ``CREATE SUBSCRIPTION`` that
   makes its own slot hangs), a publication ``FOR TABLE`` the tenant's tables and this
   move's row of ``fleet.move_markers``, and a disabled subscription on the target. The
   names of these objects derive from the run id, so every exit path (and a resume after
   ``kill -9``) knows what may exist.
2. *copy*: binary ``COPY`` table by table, streamed through a small bounded queue (memory
   stays flat whatever the tenant's size). Offline, under the exclusive fence held for
   the whole copy; online, from a snapshot taken under a brief fence, with the slot
   advanced to the WAL position read under that same fence: the copy holds every write
   before it, the stream every write after it. Then the rest of the schema (indexes,
   constraints, triggers...) and the tenant role's grants.
3. *catch up* (online): the subscription is enabled; caught up once a marker written on
   the source shows on the target.
4. *verify*: row count and a content checksum per table, source against target, read at
   one consistent point (online: from snapshots taken while a brief fence held writes and
   the marker proved the target complete).
5. *cutover*: the exclusive fence on the source (in-flight transactions finish, new ones
   wait), a marker proves the final catch-up, sequences are set on the target, undelivered
   outbox events move, the target's fence gets the next epoch, then the source's fence
   (the commit point: from then on the source refuses the tenant), then the directory,
   and the invalidation is published. If the in-flight transactions don't finish within
   ``cutover_lock_wait_ms``, or the catch-up within ``cutover_timeout_ms``, the fence is
   let go, the target catches up again unfenced, and the cutover is tried again with
   both budgets doubled (``cutover_attempts`` in all; each budget at most a quarter of
   ``fence_wait_ms``, so no attempt holds writes as long as a request waits before it
   answers TENANT_MOVING, `cutover_budget_ms`): a stall of the replication stream
   (seen: ~200 ms now and then) costs writers one short attempt, not the stall.
6. *cleanup*: subscription, publication, slot and markers dropped; the source schema
   renamed out of the way (``r_<hex>_<run>``, dropped by `gc` after the grace period).

A resume starts from what the shards and the directory say, not from the recorded phase
alone: a tenant whose source fence was raised is switched (the directory catches up), any
other tenant is still on the source and the move starts over from *prepare*.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from router.directory import Directory
from router.errors import (
    MoveFailed, MoveRefused, RunNotFound, ShardNotFound, ShardUnreachable, TenantBusy, TenantFleetError,
    TenantNotFound, ValidationFailed,
)
from router.models import TenantRecord
from router.placement import ShardLoad, check_target
from router.pools import CONNECT_ERRORS, AnyConnection, ShardPools, connect
from router.settings import Settings
from shard_migrations.moves import schema_copy
from shard_migrations.runs import owner_tag

log = logging.getLogger("tenantfleet.moves")

Conn = AnyConnection  # a connection of our own, or one a pool lent
Progress = Callable[[str, dict[str, Any]], None]

PHASES = ("planned", "prepared", "copied", "caught_up", "verified", "switched", "cleaned", "done", "aborted")
OPEN = ("planned", "prepared", "copied", "caught_up", "verified", "switched", "cleaned")
COPY_QUEUE_CHUNKS = 16          # chunks in flight between the two COPYs (asyncpg's are ~ 64 KiB)
MARKER_POLL_S = 0.002
SOURCE_PROBE_S = 1.0            # a marker wait checks the source is still there this often
WORKER_START_S = 30.0
SLOT_DROP_S = 10.0
# Settings every mover session uses: the same text for a row on both servers (verify),
# and commits flushed at once (a logical walsender sends only flushed WAL: with the
# server's synchronous_commit off, a marker would wait for the WAL writer, up to
# wal_writer_delay, inside the cutover's pause).
# Sent at connection start-up, so they are also what RESET ALL (a pool's release) returns to.
SESSION_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO, YMD", "IntervalStyle": "postgres",
                    "extra_float_digits": "3", "bytea_output": "hex", "synchronous_commit": "on"}


# The statement that reads every sequence of a schema ($1) with its state (last_value,
# is_called), kept in the sequence relation only; made by the server (format %I/%L) before
# the fence, run under it in one round trip.
_SEQUENCE_STATE_SQL = (
    "SELECT string_agg(format('SELECT %L::text AS name, last_value, is_called FROM %I.%I', sequencename, "
    "schemaname, sequencename), ' UNION ALL ' ORDER BY sequencename) FROM pg_catalog.pg_sequences "
    "WHERE schemaname = $1")

# What a lost or refusing server surfaces as, in the middle of a move's step.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
              asyncio.TimeoutError)


def cutover_budget_ms(settings: Settings, base_ms: int, attempt: int) -> int:
    """A cutover attempt's lock wait or catch-up budget: ``base_ms`` doubled per attempt,
    up to a quarter of the requests' ``fence_wait_ms`` (at least ``base_ms``), so one
    attempt's whole hold (lock wait plus catch-up) stays under what a request waits
    before it answers TENANT_MOVING, and lock_timeout stays in range."""
    cap = min(max(base_ms, settings.fence_wait_ms // 4), 60_000)
    return min(base_ms << min(attempt, 30), cap)


def _noop(_phase: str, _figures: dict[str, Any]) -> None:
    return None


def mover_pools(directory: Directory, settings: Settings) -> ShardPools:
    """Owner-connection pools for a batch of moves (``async with``): a move takes three
    connections per shard pair for its whole run, and a snapshot or two at times. Their
    backends yield the CPU (router.background) when `moves_yield` says so."""
    from router.background import moves_yield

    try:
        load: float | None = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - no load average
        load = None
    yields = load is not None and moves_yield(settings.move_idle, settings.operation_nice, load=load)
    pools = ShardPools(settings, directory.dsn_of, min_size=0, max_size=4 * settings.moves_per_shard + 2,
                       server_settings=SESSION_SETTINGS, background=yields)
    pools.note = {"yielding": pools.yields, "load1": load, "cpus": os.cpu_count(), "moveIdle": settings.move_idle}
    return pools


class FenceBusy(MoveFailed):
    """The tenant's in-flight transactions did not finish within the fence's lock wait."""


@dataclass
class MoveInfo:
    run_id: int
    tenant_id: str
    code: str
    schema: str
    source: str
    target: str
    mode: str
    phase: str
    epoch_before: int
    detail: dict[str, Any] = field(default_factory=dict)
    fenced_at: float | None = None   # offline: when the source's fence was taken (not recorded)
    stepped_at: float | None = None  # offline: when the last step under the fence ended (not recorded)
    sequence_sql: str | None = None  # reads the sequences' state at the switch (`_SEQUENCE_STATE_SQL`)

    @property
    def slot(self) -> str:
        return f"tf_move_{self.run_id}"

    @property
    def publication(self) -> str:
        return f"tf_move_{self.run_id}"

    @property
    def subscription(self) -> str:
        return f"tf_move_{self.run_id}"

    @property
    def retired_schema(self) -> str:
        return f"r{self.schema[1:]}_{self.run_id}"

    def to_api(self) -> dict[str, Any]:
        return {"runId": self.run_id, "tenantId": self.tenant_id, "code": self.code, "schemaName": self.schema,
                "from": self.source, "to": self.target, "mode": self.mode, "phase": self.phase,
                "epochBefore": self.epoch_before, **self.detail}


@dataclass
class _Ends:
    """The move's owner connections: ``src`` and ``dst`` (each holds the tenant's hold key,
    a session lock, for the whole move) and ``mark``, which writes the catch-up markers on
    the source beside the fence ``src`` holds."""
    src: Conn
    dst: Conn
    mark: Conn


class Mover:
    """Runs tenant moves for one process (the CLI, a drain, the tests)."""

    def __init__(self, directory: Directory, settings: Settings, progress: Progress = _noop,
                 pools: ShardPools | None = None) -> None:
        """``pools``: owner-connection pools to share between moves (a drain's; made with
        `mover_pools`); without them each move opens and closes its own connections."""
        self.directory = directory
        self.control = directory.control
        self.settings = settings
        self.progress = progress
        self.pools = pools
        self._lent: dict[int, asyncpg.Pool] = {}

    # --- the public steps ---------------------------------------------------------------
    async def plan(self, tenant: TenantRecord, to: str, mode: str) -> dict[str, Any]:
        """The pre-flight, without changing anything (``move --dry-run``): raises what a
        move would refuse, else returns what it would do."""
        if mode not in ("online", "offline"):
            raise ValidationFailed("mode must be online or offline", field="mode")
        await self._check_target(tenant, to)
        open_run = await self.control.fetchval(
            "SELECT run_id FROM tenant_moves WHERE tenant_id = $1::uuid AND phase <> ALL($2::text[])",
            tenant.tenant_id, ["done", "aborted"])
        if open_run is not None:
            raise TenantBusy(f"tenant {tenant.code} is already moving (run {open_run})", tenantId=tenant.tenant_id,
                             runId=open_run)
        src = await self._connect(tenant.shard_id)
        try:
            dst = await self._connect(to)
            try:
                ts = await schema_copy.read_tenant_schema(src, tenant.schema)
                await self._preflight(src, dst, tenant, ts, mode, to)
                return {"tenantId": tenant.tenant_id, "code": tenant.code, "from": tenant.shard_id, "to": to,
                        "mode": mode, "tables": len(ts.tables), "bytes": sum(t.bytes for t in ts.tables)}
            finally:
                await self._release(dst)
        finally:
            await self._release(src)

    async def start(self, tenant: TenantRecord, to: str, mode: str = "online",
                    on_run: Callable[[int], None] | None = None) -> MoveInfo:
        """Record a move of ``tenant`` to shard ``to`` and run it to the end (``on_run``
        gets the run id as soon as it is recorded: a failed move is resumed by it)."""
        await self.plan(tenant, to, mode)
        async with self.control.acquire() as conn, conn.transaction():
            run_id = await conn.fetchval(
                "INSERT INTO fleet_runs (kind, params, state, owner, heartbeat_at) "
                "VALUES ('move', $1::jsonb, 'running', $2, now()) RETURNING run_id",
                {"tenantId": tenant.tenant_id, "to": to, "mode": mode}, owner_tag())
            try:
                await conn.execute(
                    "INSERT INTO tenant_moves (run_id, tenant_id, source_shard, target_shard, mode, epoch_before) "
                    "VALUES ($1, $2::uuid, $3, $4, $5, $6)", run_id, tenant.tenant_id, tenant.shard_id, to, mode,
                    tenant.epoch)
            except asyncpg.UniqueViolationError as exc:
                raise TenantBusy(f"tenant {tenant.code} is already moving", tenantId=tenant.tenant_id) from exc
        if on_run is not None:
            on_run(run_id)
        return await self.resume(run_id)

    async def resume(self, run_id: int) -> MoveInfo:
        """Run (or finish) a recorded move from wherever it stopped."""
        info = await self.load(run_id)
        if info.phase == "done":
            return info
        if info.phase == "aborted":
            raise ValidationFailed(f"move {run_id} was aborted; start a new one", field="run", runId=run_id)
        await self.control.execute("UPDATE fleet_runs SET state = 'running', owner = $2, heartbeat_at = now(), "
                                   "updated_at = now() WHERE run_id = $1", run_id, owner_tag())
        ends: _Ends | None = None
        try:
            ends = await self._open(info)
            info = await self._drive(info, ends)
        except TenantFleetError as exc:
            await self._failed(info, exc.message)
            if ends is not None:
                await self._release_replication(info, ends)
            raise
        except _DB_ERRORS as exc:
            await self._failed(info, f"{exc.__class__.__name__}: {exc}")
            if ends is not None:
                await self._release_replication(info, ends)
            raise MoveFailed(f"move {run_id} of tenant {info.code} stopped in phase {info.phase}: "
                             f"{exc.__class__.__name__}: {exc}; the tenant is served from "
                             f"{await self._serving(info)}; `move --resume {run_id}` finishes it, "
                             f"`move --abort {run_id}` undoes it", runId=run_id, phase=info.phase) from exc
        finally:
            if ends is not None:
                await self._close(ends)
        return info

    async def _release_replication(self, info: MoveInfo, ends: _Ends) -> None:
        """After a failure before the switch: drop the move's subscription, publication and
        slot (best effort, each side on its own), so a failed move holds no WAL, worker or
        WAL sender while it waits for a resume (which makes them again)."""
        if info.phase in ("switched", "cleaned", "done"):
            return
        try:
            rec = await self.directory.get(id=info.tenant_id)
            if rec.shard_id != info.source:
                return
        except Exception:
            return
        for side, conn in ((self._drop_subscription, ends.dst), (self._drop_source_side, ends.src)):
            try:
                await asyncio.wait_for(side(info, conn), SLOT_DROP_S + 5)
            except Exception:  # a server that is down keeps its side until the resume or abort
                log.warning("move %s: %s not dropped after the failure", info.run_id, side.__name__, exc_info=True)

    async def abort(self, run_id: int) -> MoveInfo:
        """Undo a move that has not switched: the tenant stays on its source shard, and
        everything the target and the replication got is dropped."""
        info = await self.load(run_id)
        if info.phase in ("done", "aborted"):
            raise ValidationFailed(f"move {run_id} is {info.phase}", field="run", runId=run_id)
        rec = await self.directory.get(id=info.tenant_id)
        if rec.shard_id == info.target or info.phase in ("switched", "cleaned"):
            raise ValidationFailed(f"move {run_id} has switched the tenant to {info.target}: it can only be "
                                   f"finished (`move --resume {run_id}`)", field="run", runId=run_id)
        try:
            ends = await self._open(info)
        except ShardUnreachable as exc:
            if exc.details.get("shardId") != info.target:
                raise
            return await self._abort_without_target(info, exc)
        try:
            raised = await ends.src.fetchval("SELECT epoch FROM fleet.tenant_fence WHERE tenant_id = $1::uuid",
                                             info.tenant_id)
            if raised is not None and raised > info.epoch_before:
                # the source's fence went up: the commit point is behind us (the target
                # holds the tenant's undelivered events now); only finishing is safe
                raise ValidationFailed(f"move {run_id} passed its commit point (the source's fence is at epoch "
                                       f"{raised}): it can only be finished (`move --resume {run_id}`)",
                                       field="run", runId=run_id)
            await self._drop_replication(info, ends)
            await self._drop_target_copy(info, ends.dst)
            await self._set_phase(info, "aborted")
            await self._finish_run(info, "cancelled")
        except _DB_ERRORS as exc:
            raise MoveFailed(f"abort of move {run_id} stopped: {exc.__class__.__name__}: {exc}; the tenant is "
                             f"served from {await self._serving(info)}; run `move --abort {run_id}` again",
                             runId=run_id) from exc
        finally:
            await self._close(ends)
        return info

    async def _abort_without_target(self, info: MoveInfo, why: ShardUnreachable) -> MoveInfo:
        """Abort with the target unreachable (a failing shard being drained): what the source
        holds for the move (its slot above all, which would keep WAL for a target that may
        never come back) is dropped now; the target's subscription and copy are left to
        `tenantfleet gc` (and to the next move of the tenant there)."""
        src = await self._connect(info.source)
        try:
            await src.execute("SELECT set_config('lock_timeout', $1, false)", f"{self.settings.move_hold_wait_ms}ms")
            try:
                await src.execute("SELECT pg_advisory_lock(fleet.tenant_hold_key($1::uuid))", info.tenant_id)
            except asyncpg.LockNotAvailableError as exc:
                raise TenantBusy(f"move {info.run_id} is running elsewhere: stop it first", runId=info.run_id) from exc
            raised = await src.fetchval("SELECT epoch FROM fleet.tenant_fence WHERE tenant_id = $1::uuid",
                                        info.tenant_id)
            if raised is not None and raised > info.epoch_before:
                raise ValidationFailed(f"move {info.run_id} passed its commit point: it can only be finished "
                                       f"(`move --resume {info.run_id}` once {info.target} is back)",
                                       field="run", runId=info.run_id)
            await self._drop_source_side(info, src)
            info.detail["targetLeftovers"] = (f"{info.target} was unreachable ({why.message}): its subscription "
                                              f"{info.subscription} and schema copy are dropped by `tenantfleet gc`")
            await self._set_phase(info, "aborted")
            await self._finish_run(info, "cancelled")
        except _DB_ERRORS as exc:
            raise MoveFailed(f"abort of move {info.run_id} stopped: {exc.__class__.__name__}: {exc}",
                             runId=info.run_id) from exc
        finally:
            await self._release(src)
        return info

    async def load(self, run_id: int) -> MoveInfo:
        row = await self.control.fetchrow(
            "SELECT m.run_id, m.tenant_id::text AS tenant_id, t.code, t.schema_name, m.source_shard, m.target_shard, "
            "m.mode, m.phase, m.epoch_before, m.detail FROM tenant_moves m JOIN tenants t USING (tenant_id) "
            "WHERE m.run_id = $1", run_id)
        if row is None:
            raise RunNotFound(f"no move with run id {run_id}", runId=run_id)
        return MoveInfo(row["run_id"], row["tenant_id"], row["code"], row["schema_name"], row["source_shard"],
                        row["target_shard"], row["mode"], row["phase"], row["epoch_before"], dict(row["detail"]))

    async def list(self, limit: int = 20) -> list[MoveInfo]:
        ids = await self.control.fetch("SELECT run_id FROM tenant_moves ORDER BY run_id DESC LIMIT $1", limit)
        return [await self.load(r["run_id"]) for r in ids]

    # --- driving a move -----------------------------------------------------------------
    async def _drive(self, info: MoveInfo, ends: _Ends) -> MoveInfo:
        rec = await self.directory.get(id=info.tenant_id)
        switched = rec.shard_id == info.target
        if not switched:
            raised = await ends.src.fetchval("SELECT epoch FROM fleet.tenant_fence WHERE tenant_id = $1::uuid",
                                             info.tenant_id)
            if raised is not None and raised > info.epoch_before:
                # crashed after the commit point: only the directory is behind
                await self.directory.cutover(info.tenant_id, info.source, info.target, info.epoch_before)
                switched = True
        if switched:
            if info.phase not in ("switched", "cleaned"):
                await self._set_phase(info, "switched")
        else:
            if rec.shard_id != info.source or rec.epoch != info.epoch_before:
                raise MoveFailed(f"tenant {info.code} changed during its move (now on {rec.shard_id} at epoch "
                                 f"{rec.epoch}); abort this move and start a new one", runId=info.run_id)
            ts = await self._copy(info, ends, await self._prepare(info, ends))
            if info.mode == "online":
                await self._catch_up(info, ends)
            await self._verify(info, ends, ts)
            await self._cutover(info, ends, ts)
        await self._cleanup(info, ends)
        info.phase = "done"
        await self._record(info, "done", finished="done")
        self.progress("done", info.detail)
        return info

    async def _prepare(self, info: MoveInfo, ends: _Ends) -> schema_copy.TenantSchema:
        """Source checked, target schema begun; returns the source's definition as read
        under the hold key (which no migration of the tenant passes until the move ends)."""
        self.progress("preparing", {})
        await self._drop_replication(info, ends)
        await self._drop_target_copy(info, ends.dst)
        ts = await schema_copy.read_tenant_schema(ends.src, info.schema)
        rec = await self.directory.get(id=info.tenant_id)
        await self._preflight(ends.src, ends.dst, rec, ts, info.mode, info.target)
        async with ends.dst.transaction():
            await ends.dst.execute("SELECT fleet.create_tenant_schema($1)", info.schema)
        await schema_copy.create_tenant_schema_objects(ends.dst, ts, "pre")
        ledger = await ends.src.fetch(
            "SELECT plugin_id, scope, tenant_id, name, version, checksum, applied_at FROM fleet.sys_plugin_migrations "
            "WHERE tenant_id = $1::uuid ORDER BY id", info.tenant_id)
        async with ends.dst.transaction():
            await ends.dst.execute("DELETE FROM fleet.sys_plugin_migrations WHERE tenant_id = $1::uuid", info.tenant_id)
            await ends.dst.executemany(
                "INSERT INTO fleet.sys_plugin_migrations (plugin_id, scope, tenant_id, name, version, checksum, "
                "applied_at) VALUES ($1, $2, $3, $4, $5, $6, $7)", [tuple(r) for r in ledger])
        if info.mode == "online":
            tables = [t.name for t in ts.tables]
            await ends.src.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", info.slot)
            sql = await ends.src.fetchval(
                "SELECT format('CREATE PUBLICATION %I FOR TABLE %s', $1::text, "
                "(SELECT string_agg(format('%I.%I', $2::text, t), ', ') FROM unnest($3::text[]) t) "
                "|| CASE WHEN cardinality($3::text[]) > 0 THEN ', ' ELSE '' END "
                "|| format('fleet.move_markers WHERE (run_id = %s)', $4::bigint))",
                info.publication, info.schema, tables, info.run_id)
            await ends.src.execute(sql)
            source_dsn = await self.directory.dsn_of(info.source)
            binary = (await ends.src.fetchval("SELECT current_setting('server_version_num')::int") >= 160000
                      and await ends.dst.fetchval("SELECT current_setting('server_version_num')::int") >= 160000)
            sql = await ends.dst.fetchval(
                "SELECT format('CREATE SUBSCRIPTION %I CONNECTION %L PUBLICATION %I WITH (create_slot = false, "
                "slot_name = %L, copy_data = false, enabled = false, binary = %s)', $1::text, $2::text, $3::text, "
                "$4::text, CASE WHEN $5::bool THEN 'true' ELSE 'false' END)", info.subscription, source_dsn, info.publication, info.slot, binary)
            await ends.dst.execute(sql)
        await self._set_phase(info, "prepared")
        return ts

    async def _copy(self, info: MoveInfo, ends: _Ends, ts: schema_copy.TenantSchema) -> schema_copy.TenantSchema:
        """Copy every table; leaves, offline, the source fenced (``ends.src`` in its
        transaction) for verify and cutover. ``ts``: the source's definition, read since
        ``ends`` took the tenant's hold key (so still the source's)."""
        self.progress("copying", {})
        info.sequence_sql = await ends.src.fetchval(_SEQUENCE_STATE_SQL, info.schema)
        started = time.monotonic()
        copied = 0
        # offline, a small tenant's whole schema is built and checked before the fence and
        # its rows copied into it with triggers and foreign-key checks off (as logical
        # replication applies rows): writes wait for the rows only
        schema_first = info.mode == "offline" and await self._schema_first(info, ends, ts)
        info.detail["schemaFirst"] = schema_first
        if schema_first:
            await schema_copy.create_tenant_schema_objects(ends.dst, ts, "post")  # grants the tenant role too
            await self._check_fingerprint(info, ends, ts)
        if info.mode == "offline":
            await self._fence(ends.src, info, self.settings.move_hold_wait_ms)
            info.fenced_at = time.monotonic()
            if schema_first:
                await ends.dst.execute("SELECT set_config('session_replication_role', 'replica', false)")
            try:
                for t in ts.tables:
                    copied += await copy_table(ends.src, ends.dst, info.schema, t.name, t.columns)
                    self.progress("copying", {"table": t.name, "bytesCopied": copied})
            finally:
                if schema_first and not ends.dst.is_closed():
                    await ends.dst.execute("SELECT set_config('session_replication_role', 'origin', false)")
            self._step(info, "copy")
        else:
            snap = await self._connect(info.source)
            try:
                await snap.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                await self._fence_retrying(ends.src, info)
                try:
                    lsn = await snap.fetchval("SELECT pg_current_wal_insert_lsn()::text")
                finally:
                    await ends.src.execute("ROLLBACK")  # the fence held only while the snapshot was taken
                await self._advance_slot(info, ends, lsn)
                for t in ts.tables:
                    copied += await copy_table(snap, ends.dst, info.schema, t.name, t.columns)
                    self.progress("copying", {"table": t.name, "bytesCopied": copied})
                await snap.execute("COMMIT")
            finally:
                await self._release(snap)
        if not schema_first:
            await schema_copy.create_tenant_schema_objects(ends.dst, ts, "post")  # grants the tenant role too
            self._step(info, "postDdl")
            await self._check_fingerprint(info, ends, ts)
            self._step(info, "fingerprint")
        secs = time.monotonic() - started
        info.detail.update({"bytesCopied": copied, "copySeconds": round(secs, 3),
                            "copyMBps": round(copied / 1e6 / secs, 2) if secs > 0 else None})
        await self._set_phase(info, "copied")
        return ts

    async def _schema_first(self, info: MoveInfo, ends: _Ends, ts: schema_copy.TenantSchema) -> bool:
        """Whether an offline move can build the whole schema before copying the rows: a
        small tenant (the rows' index upkeep costs little), no trigger that fires in
        replica mode (``ENABLE ALWAYS``/``REPLICA``), no constraint added ``NOT VALID``
        (checked for the copied rows too, it may refuse older ones the source keeps),
        and a target session allowed to set
        ``session_replication_role`` (a superuser, or granted SET on it)."""
        if sum(t.bytes for t in ts.tables) > self.settings.move_offline_max_bytes:
            return False
        if any(" ENABLE ALWAYS TRIGGER " in q or " ENABLE REPLICA TRIGGER " in q for q in ts.post_copy):
            return False
        # a constraint added NOT VALID holds for new rows only: its table (or domain) may
        # keep older rows that break it, which a copy into the finished schema would refuse
        if any(q.endswith(" NOT VALID") for q in ts.post_copy):
            return False
        try:
            async with ends.dst.transaction():
                await ends.dst.execute("SELECT set_config('session_replication_role', 'replica', true)")
        except asyncpg.InsufficientPrivilegeError:
            return False
        return True

    async def _check_fingerprint(self, info: MoveInfo, ends: _Ends, ts: schema_copy.TenantSchema) -> None:
        """The target's definition of the schema must be the source's (a fingerprint over
        every object's definition, independent of OIDs and creation order)."""
        theirs = await schema_copy.fingerprint(ends.dst, info.schema)
        info.detail.update({"sourceFingerprint": ts.fingerprint, "targetFingerprint": theirs})
        # definitions are read back as the server prints them, and majors print some
        # differently: across majors both are recorded, the rows' checksums still compared
        same_major = ends.src.get_server_version().major == ends.dst.get_server_version().major
        info.detail["fingerprintCompared"] = same_major
        if same_major and theirs != ts.fingerprint:
            raise MoveFailed(f"move {info.run_id}: the schema made on {info.target} differs from the source's "
                             f"(fingerprint {theirs[:12]} vs {ts.fingerprint[:12]})", runId=info.run_id)

    async def _advance_slot(self, info: MoveInfo, ends: _Ends, lsn: str) -> None:
        """Move the slot to ``lsn`` (read under the fence): the stream then holds exactly
        the transactions committed after the copy's snapshot. A slot advances only as far
        as WAL is flushed, so a marker commit (synchronous) flushes past ``lsn`` first; the
        position reached is checked, never assumed."""
        await ends.mark.execute(
            "INSERT INTO fleet.move_markers (run_id, seq) VALUES ($1, 1) ON CONFLICT (run_id) DO UPDATE "
            "SET seq = fleet.move_markers.seq + 1, updated_at = now()", info.run_id)
        deadline = time.monotonic() + WORKER_START_S
        while not await ends.src.fetchval("SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn", lsn):
            if time.monotonic() > deadline:
                raise MoveFailed(f"move {info.run_id}: shard {info.source} did not flush its WAL to {lsn}",
                                 runId=info.run_id)
            await asyncio.sleep(0.005)
        reached = await ends.src.fetchval(
            "SELECT end_lsn >= $2::text::pg_lsn FROM pg_replication_slot_advance($1, $2::text::pg_lsn)",
            info.slot, lsn)
        if not reached:
            raise MoveFailed(f"move {info.run_id}: replication slot {info.slot} did not advance to {lsn}",
                             runId=info.run_id)

    async def _catch_up(self, info: MoveInfo, ends: _Ends) -> None:
        self.progress("catching up", {})
        sql = await ends.dst.fetchval("SELECT format('ALTER SUBSCRIPTION %I ENABLE', $1::text)", info.subscription)
        await ends.dst.execute(sql)
        deadline = time.monotonic() + WORKER_START_S
        while not await ends.dst.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_subscription WHERE subname = $1 AND pid IS NOT NULL)",
                info.subscription):
            if time.monotonic() > deadline:
                raise MoveFailed(f"shard {info.target} started no logical replication worker for move {info.run_id} "
                                 f"within {WORKER_START_S:.0f} s (max_logical_replication_workers reached?)",
                                 runId=info.run_id)
            await asyncio.sleep(0.05)
        if not await self._marker_round(info, ends, self.settings.catchup_timeout_s):
            raise MoveFailed(f"move {info.run_id}: the target did not catch up within "
                             f"{self.settings.catchup_timeout_s:.0f} s", runId=info.run_id)
        await self._set_phase(info, "caught_up")

    async def _verify(self, info: MoveInfo, ends: _Ends, ts: schema_copy.TenantSchema) -> None:
        self.progress("verifying", {})
        if info.mode == "offline":  # the source is fenced since the copy began
            mismatch = await _compare(ends.src, ends.dst, info.schema, ts)
            self._step(info, "verify")
        else:
            s_snap = await self._connect(info.source)
            d_snap = await self._connect(info.target)
            try:
                for attempt in range(self.settings.cutover_attempts):
                    try:
                        await self._fence(ends.src, info, self._lock_wait_ms(attempt))
                    except FenceBusy:
                        await asyncio.sleep(min(2 ** attempt * 0.1, 2))
                        continue
                    try:
                        caught = await self._marker_round(
                            info, ends, self._catch_up_ms(attempt) / 1000)
                        if caught:
                            for c in (s_snap, d_snap):
                                await c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                                await c.fetchval("SELECT 1")
                    finally:
                        await ends.src.execute("ROLLBACK")
                    if caught:
                        break
                    await self._marker_round(info, ends, self.settings.catchup_timeout_s)  # unfenced
                else:
                    raise MoveFailed(f"move {info.run_id}: no consistent point to verify at (the target lags)",
                                     runId=info.run_id)
                mismatch = await _compare(s_snap, d_snap, info.schema, ts)
                for c in (s_snap, d_snap):
                    await c.execute("COMMIT")
            finally:
                await self._release(s_snap)
                await self._release(d_snap)
        if mismatch:
            raise MoveFailed(f"move {info.run_id}: the copy differs from the source: {'; '.join(mismatch)}",
                             runId=info.run_id, tables=mismatch)
        await self._set_phase(info, "verified")

    async def _cutover(self, info: MoveInfo, ends: _Ends, ts: schema_copy.TenantSchema) -> None:
        self.progress("cutover", {})
        pauses: list[float] = []
        for attempt in range(self.settings.cutover_attempts):
            t0 = time.monotonic() if info.mode == "online" or info.fenced_at is None else info.fenced_at
            if info.mode == "online":
                try:
                    await self._fence(ends.src, info, self._lock_wait_ms(attempt))
                    info.detail["fenceWaitMs"] = round((time.monotonic() - t0) * 1000, 2)
                except FenceBusy:
                    pauses.append(time.monotonic() - t0)
                    log.info("move %s: a transaction of the tenant outlasted the fence's %s ms; trying again",
                             info.run_id, self._lock_wait_ms(attempt))
                    await asyncio.sleep(min(2 ** attempt * 0.1, 2))
                    continue
            try:
                if info.mode == "online" and not await self._marker_round(
                        info, ends, self._catch_up_ms(attempt) / 1000):
                    await ends.src.execute("ROLLBACK")
                    pauses.append(time.monotonic() - t0)
                    log.info("move %s: cutover catch-up took longer than %s ms; released, trying again",
                             info.run_id, self._catch_up_ms(attempt))
                    if not await self._marker_round(info, ends, self.settings.catchup_timeout_s):  # unfenced
                        raise MoveFailed(f"move {info.run_id}: the target did not catch up within "
                                         f"{self.settings.catchup_timeout_s:.0f} s", runId=info.run_id)
                    continue
                t_switch = time.monotonic()
                info.detail["catchUpMs"] = round((t_switch - t0) * 1000 - info.detail.get("fenceWaitMs", 0), 2)
                await self._switch(info, ends)
                info.detail["switchMs"] = round((time.monotonic() - t_switch) * 1000, 2)
                self._step(info, "switch")
                pauses.append(time.monotonic() - t0)
                break
            except BaseException:
                if not ends.src.is_closed() and ends.src.is_in_transaction():
                    try:
                        await ends.src.execute("ROLLBACK")
                    except Exception:
                        ends.src.terminate()
                raise
        else:
            raise MoveFailed(f"move {info.run_id}: the cutover's fence or catch-up did not finish within "
                             f"{self.settings.cutover_lock_wait_ms} + {self.settings.cutover_timeout_ms} ms (doubling) in "
                             f"{self.settings.cutover_attempts} attempts; the tenant stays on {info.source} (resume "
                             "to try again)", runId=info.run_id)
        info.detail["pauseMs"] = round(max(pauses) * 1000, 2)  # the longest hold a writer saw
        info.detail["cutoverAttempts"] = len(pauses)
        rec = await self.directory.cutover(info.tenant_id, info.source, info.target, info.epoch_before)
        info.detail["epochAfter"] = rec.epoch
        await self._set_phase(info, "switched")

    async def _switch(self, info: MoveInfo, ends: _Ends) -> None:
        """Under the source's exclusive fence (``ends.src`` in its transaction): sequences,
        outbox and the target's fence, then the source's fence: the commit point."""
        new_epoch = info.epoch_before + 1
        # each sequence's state read from the sequence itself: pg_sequences.last_value is
        # NULL for a sequence restarted (ALTER SEQUENCE ... RESTART, setval(.., false)) and
        # not used since, whose next value is not the target's fresh copy's
        seqs = await ends.src.fetch(info.sequence_sql) if info.sequence_sql else []
        # locked: a delivery settling or claiming one of them finishes first, or waits for
        # the commit point and then finds the row gone (the target's relay delivers it)
        events = await ends.src.fetch(
            "SELECT event_id, tenant_id, source, name, payload, created_at, attempts, next_attempt_at, last_error, "
            "handled_by FROM fleet.event_outbox WHERE tenant_id = $1::uuid AND delivered_at IS NULL FOR UPDATE",
            info.tenant_id)
        # (round trips kept few: every one of them holds the tenant's writes)
        async with ends.dst.transaction():
            if seqs:
                await ends.dst.execute(
                    "SELECT setval(format('%I.%I', $1::text, q.name)::regclass, q.v, q.called) "
                    "FROM unnest($2::text[], $3::bigint[], $4::bool[]) q(name, v, called)",
                    info.schema, [s["name"] for s in seqs], [s["last_value"] for s in seqs],
                    [s["is_called"] for s in seqs])
            if events:
                await ends.dst.executemany(
                    "INSERT INTO fleet.event_outbox (event_id, tenant_id, source, name, payload, created_at, attempts, "
                    "next_attempt_at, last_error, handled_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
                    "ON CONFLICT (event_id) DO NOTHING",
                    [tuple(e) for e in events])
            await ends.dst.execute(
                "INSERT INTO fleet.tenant_fence (tenant_id, schema_name, epoch) VALUES ($1::uuid, $2, $3) "
                "ON CONFLICT (tenant_id) DO UPDATE SET schema_name = EXCLUDED.schema_name, epoch = EXCLUDED.epoch, "
                "updated_at = now()", info.tenant_id, info.schema, new_epoch)
        await ends.src.execute(
            "WITH gone AS (DELETE FROM fleet.event_outbox WHERE tenant_id = $1::uuid AND delivered_at IS NULL) "
            "UPDATE fleet.tenant_fence SET epoch = $2, updated_at = now() WHERE tenant_id = $1::uuid",
            info.tenant_id, new_epoch)
        await ends.src.execute("COMMIT")  # the commit point: the source refuses the tenant from here
        info.detail["eventsMoved"] = len(events)
        self.progress("committed", {})

    async def _cleanup(self, info: MoveInfo, ends: _Ends) -> None:
        self.progress("cleaning up", {})
        await self._drop_replication(info, ends)
        async with ends.src.transaction():
            exists = await ends.src.fetchval("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                                             info.schema)
            if exists:
                sql = await ends.src.fetchval("SELECT format('ALTER SCHEMA %I RENAME TO %I', $1::text, $2::text)",
                                              info.schema, info.retired_schema)
                await ends.src.execute(sql)
                await ends.src.execute(
                    "INSERT INTO fleet.retired_schemas (schema_name, tenant_id, run_id) VALUES ($1, $2::uuid, $3) "
                    "ON CONFLICT (schema_name) DO NOTHING", info.retired_schema, info.tenant_id, info.run_id)
            await ends.src.execute("DELETE FROM fleet.tenant_fence WHERE tenant_id = $1::uuid", info.tenant_id)
            await ends.src.execute("DELETE FROM fleet.sys_plugin_migrations WHERE tenant_id = $1::uuid",
                                   info.tenant_id)
        await self._set_phase(info, "cleaned")

    # --- pieces ---------------------------------------------------------------------------
    async def _marker_round(self, info: MoveInfo, ends: _Ends, timeout_s: float) -> bool:
        """Write this move's marker on the source (in a transaction of its own, beside a
        fence the caller may hold) and wait until the target has it: every change the
        source committed before it is then applied on the target."""
        t0 = time.monotonic()
        seq = await ends.mark.fetchval(
            "INSERT INTO fleet.move_markers (run_id, seq) VALUES ($1, 1) ON CONFLICT (run_id) DO UPDATE "
            "SET seq = fleet.move_markers.seq + 1, updated_at = now() RETURNING seq", info.run_id)
        info.detail["markerCommitMs"] = round((time.monotonic() - t0) * 1000, 2)
        deadline = time.monotonic() + timeout_s
        probe_at = time.monotonic() + SOURCE_PROBE_S
        while True:
            got = await ends.dst.fetchval("SELECT seq FROM fleet.move_markers WHERE run_id = $1", info.run_id)
            if got is not None and got >= seq:
                return True
            if time.monotonic() > deadline:
                return False
            if time.monotonic() > probe_at:
                # a source that went away after the marker's commit never streams it: the
                # wait would last the whole catch-up timeout (minutes); its error ends it
                await ends.mark.fetchval("SELECT 1")
                probe_at = time.monotonic() + SOURCE_PROBE_S
            await asyncio.sleep(MARKER_POLL_S)

    @staticmethod
    def _step(info: MoveInfo, name: str) -> None:
        """Offline: how long each step under the fence took (``detail.stepsMs``)."""
        if info.fenced_at is None:
            return
        now = time.monotonic()
        steps = info.detail.setdefault("stepsMs", {})
        steps[name] = round((now - (info.stepped_at or info.fenced_at)) * 1000, 2)
        info.stepped_at = now

    async def _fence(self, conn: Conn, info: MoveInfo, wait_ms: int) -> None:
        """Open a transaction on ``conn`` holding the tenant's lock exclusive: in-flight
        tenant transactions finish first, new ones wait (at most their fence_wait_ms).
        `FenceBusy` (a MOVE_FAILED) if they don't finish within ``wait_ms``."""
        await conn.execute("BEGIN")
        try:
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{int(wait_ms)}ms")
            await conn.execute("SELECT pg_advisory_xact_lock(fleet.tenant_lock_key($1::uuid))", info.tenant_id)
            await conn.execute("SELECT set_config('lock_timeout', '0', true)")
        except asyncpg.LockNotAvailableError as exc:
            await conn.execute("ROLLBACK")
            raise FenceBusy(f"move {info.run_id}: transactions of tenant {info.code} did not finish within "
                            f"{wait_ms} ms", runId=info.run_id) from exc
        except BaseException:
            if not conn.is_closed() and conn.is_in_transaction():
                await conn.execute("ROLLBACK")
            raise

    def _lock_wait_ms(self, attempt: int) -> int:
        return cutover_budget_ms(self.settings, self.settings.cutover_lock_wait_ms, attempt)

    def _catch_up_ms(self, attempt: int) -> int:
        return cutover_budget_ms(self.settings, self.settings.cutover_timeout_ms, attempt)

    async def _fence_retrying(self, conn: Conn, info: MoveInfo) -> None:
        """`_fence` with the cutover's lock wait (doubling), tried ``cutover_attempts`` times with backoff."""
        for attempt in range(self.settings.cutover_attempts):
            try:
                await self._fence(conn, info, self._lock_wait_ms(attempt))
                return
            except FenceBusy:
                if attempt + 1 == self.settings.cutover_attempts:
                    raise
                await asyncio.sleep(min(2 ** attempt * 0.1, 2))

    async def _drop_replication(self, info: MoveInfo, ends: _Ends) -> None:
        """Drop this move's subscription, publication, slot and markers wherever they exist
        (any phase, any exit path: they are named after the run)."""
        await self._drop_subscription(info, ends.dst)
        await self._drop_source_side(info, ends.src)
        await ends.dst.execute("DELETE FROM fleet.move_markers WHERE run_id = $1", info.run_id)

    async def _drop_subscription(self, info: MoveInfo, dst: Conn) -> None:
        await drop_subscription(dst, info.subscription)

    async def _drop_source_side(self, info: MoveInfo, src: Conn) -> None:
        """The publication, the slot (its WAL sender let go of first) and the markers."""
        if await src.fetchval("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", info.publication):
            sql = await src.fetchval("SELECT format('DROP PUBLICATION %I', $1::text)", info.publication)
            await src.execute(sql)
        deadline = time.monotonic() + SLOT_DROP_S
        while True:
            row = await src.fetchrow("SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = $1",
                                     info.slot)
            if row is None:
                break
            if not row["active"]:
                try:
                    await src.execute("SELECT pg_drop_replication_slot($1)", info.slot)
                    break
                except (asyncpg.ObjectInUseError, asyncpg.UndefinedObjectError):
                    pass
            elif time.monotonic() > deadline:  # a WAL sender of a dropped (or unreachable) subscription
                await src.execute("SELECT pg_terminate_backend($1)", row["active_pid"])
            await asyncio.sleep(0.05)
        await src.execute("DELETE FROM fleet.move_markers WHERE run_id = $1", info.run_id)

    async def _drop_target_copy(self, info: MoveInfo, dst: Conn) -> None:
        """What an earlier attempt of this move left on the target, unless the target
        serves the tenant (its fence row says so only after a switch)."""
        rec = await self.directory.get(id=info.tenant_id)
        if rec.shard_id == info.target:
            raise MoveFailed(f"tenant {info.code} is served by {info.target}: its copy there is not dropped",
                             runId=info.run_id)
        async with dst.transaction():
            await dst.execute("DELETE FROM fleet.tenant_fence WHERE tenant_id = $1::uuid", info.tenant_id)
            await dst.execute("DELETE FROM fleet.sys_plugin_migrations WHERE tenant_id = $1::uuid", info.tenant_id)
            await dst.execute("DELETE FROM fleet.event_outbox WHERE tenant_id = $1::uuid", info.tenant_id)
            await dst.execute("SELECT fleet.drop_tenant_schema($1)", info.schema)  # and its role, if unused

    async def _preflight(self, src: Conn, dst: Conn, tenant: TenantRecord, ts: schema_copy.TenantSchema,
                         mode: str, target: str) -> None:
        if ts.problems:
            raise MoveRefused(f"tenant {tenant.code} can't be moved: {'; '.join(ts.problems)}",
                              tenantId=tenant.tenant_id, problems=list(ts.problems))
        # the target must have every public-scope migration the source has, of the
        # plugins with files applied to this tenant (bring it up through the migrator)
        installed = [r[0] for r in await self.control.fetch(
            "SELECT plugin_id FROM sys_tenant_plugins WHERE tenant_id = $1::uuid", tenant.tenant_id)]
        missing = await _missing_public(src, dst, tenant.tenant_id, installed)
        if missing:
            raise MoveRefused(f"shard {target} is behind the source on public migrations "
                              f"({', '.join(missing[:5])}): run `tenantfleet migrate apply <plugin>` first",
                              missing=missing)
        if mode == "online":
            for conn, which in ((src, "source"), (dst, "target")):
                level = await conn.fetchval("SELECT current_setting('wal_level')")
                if which == "source" and level != "logical":
                    raise MoveRefused(f"the source shard runs wal_level={level}: online moves need "
                                      "wal_level=logical (use --offline, or reconfigure the server)")
            for conn, which in ((src, "source"), (dst, "target")):
                ok = await conn.fetchval("SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user")
                if not ok:
                    raise MoveRefused(f"the {which} shard's owner role may not replicate (needs SUPERUSER or "
                                      "REPLICATION and, for subscriptions, pg_create_subscription): use --offline")

    async def _check_target(self, tenant: TenantRecord, to: str) -> None:
        rows = await self.directory.list_shards()
        loads = {s.shard_id: ShardLoad(s.shard_id, s.state, s.capacity, s.tenants) for s in rows}
        if tenant.shard_id not in loads:
            raise ShardNotFound(f"shard {tenant.shard_id} is not registered", shardId=tenant.shard_id)
        check_target(loads[tenant.shard_id], loads.get(to), to)
        if tenant.state not in ("active", "suspended"):
            raise TenantBusy(f"tenant {tenant.code} is {tenant.state}", tenantId=tenant.tenant_id)

    async def _open(self, info: MoveInfo) -> _Ends:
        conns: list[Conn] = []
        try:
            conns.append(await self._connect(info.source))
            conns.append(await self._connect(info.target))
            conns.append(await self._connect(info.source))
            for c in conns[:2]:
                await c.execute("SELECT set_config('lock_timeout', $1, false)", f"{self.settings.move_hold_wait_ms}ms")
                try:
                    await c.execute("SELECT pg_advisory_lock(fleet.tenant_hold_key($1::uuid))", info.tenant_id)
                except asyncpg.LockNotAvailableError as exc:
                    raise TenantBusy(f"tenant {info.code} has a migration in flight that did not finish within "
                                     f"{self.settings.move_hold_wait_ms} ms: try again", tenantId=info.tenant_id,
                                     runId=info.run_id) from exc
                await c.execute("SELECT set_config('lock_timeout', '0', false)")
            return _Ends(*conns)
        except BaseException:
            for c in conns:
                await self._release(c, broken=True)
            raise

    async def _close(self, ends: _Ends) -> None:
        for c in (ends.src, ends.dst, ends.mark):
            await self._release(c)

    async def _connect(self, shard_id: str) -> Conn:
        """An owner connection to the shard (the pools' when given, else a new one)."""
        if self.pools is None:
            try:
                return await connect(await self._dsn(shard_id), self.settings, server_settings=SESSION_SETTINGS)
            except ShardUnreachable as exc:
                raise ShardUnreachable(f"shard {shard_id}: {exc.message}", shardId=shard_id) from exc
        try:
            pool = await self.pools.get(shard_id)
        except ShardUnreachable as exc:
            raise ShardUnreachable(f"shard {shard_id}: {exc.message}", shardId=shard_id) from exc
        try:
            conn = await pool.acquire(timeout=self.settings.connect_timeout_s)
        except CONNECT_ERRORS as exc:
            raise ShardUnreachable(f"shard {shard_id}: {exc.__class__.__name__}: {exc}", shardId=shard_id) from exc
        self._lent[id(conn)] = pool
        return conn

    async def _release(self, conn: Conn, *, broken: bool = False) -> None:
        """Give a connection back (its session locks go with the pool's reset) or close it;
        one left mid-transaction or mid-operation is terminated."""
        pool = self._lent.pop(id(conn), None)
        bad = not conn.is_closed() and (broken or conn.is_in_transaction())
        if bad:
            conn.terminate()
        try:
            if pool is not None and isinstance(conn, PoolConnectionProxy):
                await pool.release(conn, timeout=5)
            elif not conn.is_closed():
                await asyncio.wait_for(conn.close(), 5)
        except Exception:
            conn.terminate()

    async def _dsn(self, shard_id: str) -> str:
        dsn = await self.directory.dsn_of(shard_id)
        if dsn is None:
            raise ShardNotFound(f"shard {shard_id} is not registered", shardId=shard_id)
        return dsn

    async def _set_phase(self, info: MoveInfo, phase: str) -> None:
        info.phase = phase
        if info.fenced_at is not None and info.mode == "offline" and phase in ("copied", "verified"):
            # offline, under the fence: announced only, not written (two control-plane
            # round trips each, while the tenant's writes wait); a crash here rolls the
            # fence back and a resume starts over, so the record loses nothing
            self.progress(phase, info.detail)
            return
        await self._record(info, phase)
        self.progress(phase, info.detail)

    async def _record(self, info: MoveInfo, phase: str, finished: str | None = None) -> None:
        """The move's phase and detail and its run's summary (and, with ``finished``, the
        run's final state) in one statement: one control-plane round trip, both or neither."""
        await self.control.execute(
            "WITH m AS (UPDATE tenant_moves SET phase = $2, detail = $3::jsonb, updated_at = now() WHERE run_id = $1) "
            "UPDATE fleet_runs SET heartbeat_at = now(), summary = $4::jsonb, updated_at = now(), "
            "state = coalesce($5, state), finished_at = CASE WHEN $5::text IS NULL THEN finished_at ELSE now() END "
            "WHERE run_id = $1", info.run_id, phase, info.detail, info.to_api(), finished)

    async def _finish_run(self, info: MoveInfo, state: str) -> None:
        await self.control.execute("UPDATE fleet_runs SET state = $2, summary = $3::jsonb, finished_at = now(), "
                                   "updated_at = now() WHERE run_id = $1", info.run_id, state, info.to_api())

    async def _failed(self, info: MoveInfo, why: str) -> None:
        info.detail["lastError"] = why
        try:
            await self.control.execute(
                "UPDATE tenant_moves SET detail = $2::jsonb, updated_at = now() WHERE run_id = $1",
                info.run_id, info.detail)
            await self.control.execute("UPDATE fleet_runs SET state = 'failed', summary = $2::jsonb, updated_at = now() "
                                       "WHERE run_id = $1", info.run_id, info.to_api())
        except Exception:
            log.warning("move %s: could not record its failure", info.run_id, exc_info=True)

    async def _serving(self, info: MoveInfo) -> str:
        try:
            return (await self.directory.get(id=info.tenant_id)).shard_id
        except Exception:
            return "the shard the directory names"


async def drop_subscription(conn: Conn, name: str) -> None:
    """Drop a move's subscription if it exists, without touching its slot (the source's
    side drops that): disabled, detached from the slot, dropped."""
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1)", name):
        for stmt in ("ALTER SUBSCRIPTION %I DISABLE", "ALTER SUBSCRIPTION %I SET (slot_name = NONE)",
                     "DROP SUBSCRIPTION %I"):
            await conn.execute(await conn.fetchval("SELECT format($1::text, $2::text)", stmt, name))


async def _missing_public(src: Conn, dst: Conn, tenant_id: str, plugins: Sequence[str]) -> list[str]:
    """Public-scope migrations the source has and the target lacks, of ``plugins`` (those
    the tenant has installed, per the control plane) and of those with files applied to
    the tenant on the source."""
    sql = ("SELECT plugin_id || '/' || name FROM fleet.sys_plugin_migrations WHERE scope = 'public' "
           "AND (plugin_id = ANY($2::text[]) OR plugin_id IN "
           "(SELECT plugin_id FROM fleet.sys_plugin_migrations WHERE tenant_id = $1::uuid))")
    have_src = {r[0] for r in await src.fetch(sql, tenant_id, list(plugins))}
    names = {p.split("/", 1)[0] for p in have_src}
    have_dst = {r[0] for r in await dst.fetch(
        "SELECT plugin_id || '/' || name FROM fleet.sys_plugin_migrations WHERE scope = 'public' "
        "AND plugin_id = ANY($1::text[])", sorted(names))}
    return sorted(have_src - have_dst)


async def _compare(src: Conn, dst: Conn, schema: str, ts: schema_copy.TenantSchema) -> list[str]:
    """Tables whose row count or content checksum differ (an empty list: the same)."""
    out = []
    for t in ts.tables:
        sql = await src.fetchval(
            "SELECT format('SELECT count(*), coalesce(sum(hashtextextended(x::text, 0)::numeric), 0)::text "
            "FROM ONLY %I.%I x', $1::text, $2::text)", schema, t.name)
        ga, gb = await asyncio.gather(src.fetchrow(sql), dst.fetchrow(sql), return_exceptions=True)
        for g in (ga, gb):
            if isinstance(g, BaseException):
                raise g  # after both ended: neither connection is left mid-query
        assert not isinstance(ga, BaseException) and not isinstance(gb, BaseException)
        a, b = tuple(ga or ()), tuple(gb or ())
        if a != b:
            out.append(f"{t.name}: source {a[0]} rows, target {b[0]} rows"
                       + ("" if a[0] != b[0] else " (content differs)"))
    return out


async def copy_table(src: Conn, dst: Conn, schema: str, table: str, columns: Sequence[str]) -> int:
    """Binary COPY of one table from ``src`` into ``dst`` (the target table empty),
    streamed through a bounded queue; returns the bytes copied."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=COPY_QUEUE_CHUNKS)
    copied = 0

    async def sink(chunk: bytes) -> None:
        nonlocal copied
        copied += len(chunk)
        await queue.put(chunk)

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            chunk = await queue.get()
            if chunk is None:
                return
            yield chunk

    async def produce() -> None:
        await src.copy_from_table(table, schema_name=schema, columns=list(columns), format="binary", output=sink)
        await queue.put(None)

    producer = asyncio.ensure_future(produce())
    consumer = asyncio.ensure_future(
        dst.copy_to_table(table, schema_name=schema, columns=list(columns), format="binary", source=chunks()))
    try:
        done, _ = await asyncio.wait({producer, consumer}, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # raises the first failure
        await asyncio.gather(producer, consumer)
    except BaseException:
        for task in (producer, consumer):
            task.cancel()
        await asyncio.gather(producer, consumer, return_exceptions=True)
        raise
    return copied


async def lookup_tenant(directory: Directory, ref: str) -> TenantRecord:
    """A tenant by id, code or domain (as the CLI takes it)."""
    if "." in ref:
        return await directory.get(domain=ref)
    try:
        return await directory.get(id=ref)
    except (ValidationFailed, TenantNotFound):
        return await directory.get(code=ref)
