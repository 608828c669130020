"""Run records on the control plane: ``fleet_runs`` and ``fleet_run_items``.

A run is created with its planned items (``public:<shard>`` and ``tenant:<uuid>``), all
``pending``. Items move pending → running → done | failed (or ``skipped``: the tenant is
gone) with ``attempts`` and ``last_error``. Status changes are buffered and written in
batches (`RunRecorder`), and the run's heartbeat and summary are refreshed while it is
alive, so `status` can show it from another process. The records say what a run
thinks; the shard ledger says what is true, and a resumed item re-reads it.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Callable, Iterable, Sequence

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from router.errors import RunNotFound
from shard_migrations.keys import FLUSH_S, HEARTBEAT_S, RUN_KIND, TENANT_STATES_TARGETED
from shard_migrations.ledger import Conn
from shard_migrations.packages import PluginPackage

log = logging.getLogger("tenantfleet.migrate")

ItemRow = tuple[str, str, str | None, str]  # item_key, shard_id, tenant_id, scope
DB_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def owner_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class RunInfo:
    run_id: int
    plugin_id: str
    target_version: str
    params: dict[str, Any]
    state: str
    owner: str | None
    heartbeat_at: dt.datetime | None
    summary: dict[str, Any]
    created_at: dt.datetime
    finished_at: dt.datetime | None

    def to_dict(self) -> dict[str, Any]:
        """The run as `migrate status` prints it (camelCase keys, as every JSON output)."""
        return {"runId": self.run_id, "plugin": self.plugin_id, "version": self.target_version,
                "params": self.params, "state": self.state, "owner": self.owner,
                "heartbeatAt": self.heartbeat_at, "createdAt": self.created_at, "finishedAt": self.finished_at,
                "summary": self.summary}


_SELECT_RUNS = ("SELECT run_id, plugin_id, target_version, params, state, owner, heartbeat_at, summary, created_at, "
                "finished_at, extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s FROM fleet_runs ")


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def stored_summary(summary: Any) -> dict[str, Any]:
    """A run's stored summary in today's form, also one written before the JSON keys became
    camelCase (``applied_files``, ``shards[].shard_id``/``eta_s``/``backoff_s``, and
    ``unreachable`` as a ``{shard: why}`` object rather than a list of ``{shardId, error}``):
    runs recorded by older code still show in `status` and still resume."""
    if not isinstance(summary, dict):
        return {}
    out = {_camel(k): v for k, v in summary.items()}
    if isinstance(out.get("shards"), list):
        out["shards"] = [{_camel(k): v for k, v in row.items()} if isinstance(row, dict) else row
                         for row in out["shards"]]
    if isinstance(out.get("unreachable"), dict):  # shard ids are data, not keys: they may hold "_"
        out["unreachable"] = unreachable_list(out["unreachable"])
    return out


def unreachable_list(unreachable: dict[str, str]) -> list[dict[str, str]]:
    """``{shard: why}`` as JSON: a list of ``{shardId, error}`` (no data in keys)."""
    return [{"shardId": sid, "error": why} for sid, why in unreachable.items()]


def _info(r: asyncpg.Record) -> RunInfo:
    return RunInfo(r["run_id"], r["plugin_id"], r["target_version"], r["params"], r["state"], r["owner"],
                   r["heartbeat_at"], stored_summary(r["summary"]), r["created_at"], r["finished_at"])


async def ensure_registry(control: asyncpg.Pool, package: PluginPackage) -> None:
    """The plugin's ``sys_plugins`` row, so tenant rows can refer to it. A new row says
    0.0.0 installed until a run has brought every tenant to a version."""
    await control.execute(
        "INSERT INTO sys_plugins (plugin_id, api_version, version_installed) VALUES ($1, $2, '0.0.0') "
        "ON CONFLICT (plugin_id) DO NOTHING", package.id, package.api)


async def flip_plugin(control: asyncpg.Pool, package: PluginPackage, version: str) -> None:
    """Every targeted tenant is at ``version``: record it globally."""
    await control.execute(
        "INSERT INTO sys_plugins (plugin_id, api_version, version_installed) VALUES ($1, $2, $3) "
        "ON CONFLICT (plugin_id) DO UPDATE SET version_installed = EXCLUDED.version_installed, "
        "api_version = EXCLUDED.api_version, updated_at = now()", package.id, package.api, version)


_FLIP_TENANTS = """
INSERT INTO sys_tenant_plugins (tenant_id, plugin_id, version_installed)
SELECT u.t, $2, $3 FROM (SELECT DISTINCT unnest($1::uuid[]) AS t) AS u WHERE EXISTS (SELECT 1 FROM tenants WHERE tenant_id = u.t)
-- rows already at the version never reach ON CONFLICT, which would lock each one (a no-op run
-- over 100,000 up-to-date tenants locked and dirtied 100,000 rows); a row changed meanwhile
-- still goes through ON CONFLICT's check
AND NOT EXISTS (SELECT 1 FROM sys_tenant_plugins p WHERE p.tenant_id = u.t AND p.plugin_id = $2
                AND p.version_installed = $3)
ORDER BY u.t  -- one row-lock order for every writer: two migrators flipping the same tenants can't deadlock
ON CONFLICT (tenant_id, plugin_id) DO UPDATE SET version_installed = EXCLUDED.version_installed, updated_at = now()
WHERE sys_tenant_plugins.version_installed IS DISTINCT FROM EXCLUDED.version_installed
"""


async def flip_tenants(control: asyncpg.Pool | Conn, plugin_id: str, version: str,
                       tenant_ids: Sequence[str]) -> None:
    """Record ``version`` as installed for these tenants (``enabled`` is left as it is)."""
    if tenant_ids:
        await control.execute(_FLIP_TENANTS, list(tenant_ids), plugin_id, version)


# A join on the registry's key rather than NOT EXISTS (.. AND version_installed = $2): without
# column statistics (a table filled since the last ANALYZE) the planner took the NOT EXISTS
# form's inner side for one row and ran a nested loop over both tables (8 minutes at
# 100,000 tenants); this form stays a hash join (40 ms) with or without them.
_NOT_AT_VERSION = """
SELECT t.tenant_id::text AS tenant_id FROM tenants t
LEFT JOIN sys_tenant_plugins p ON p.tenant_id = t.tenant_id AND p.plugin_id = $1
WHERE t.state = ANY($3::text[]) AND p.version_installed IS DISTINCT FROM $2
"""


async def not_at_version(control: asyncpg.Pool, plugin_id: str, version: str) -> set[str]:
    """Ids of the targeted tenants whose registry row for ``plugin_id`` is missing or not at
    ``version``: the only ones a flip to ``version`` would change. One anti-join on the
    control plane; an up-to-date fleet returns no row, so a no-op run flips nothing and
    sends no list of every tenant."""
    rows = await control.fetch(_NOT_AT_VERSION, plugin_id, version, list(TENANT_STATES_TARGETED))
    return {r["tenant_id"] for r in rows}


async def create_run(control: asyncpg.Pool, plugin_id: str, version: str, params: dict[str, Any],
                     items: Sequence[ItemRow]) -> int:
    """Insert a run in state ``running`` with its items ``pending``; returns its id."""
    async with control.acquire() as conn, conn.transaction():
        run_id: int = await conn.fetchval(
            "INSERT INTO fleet_runs (kind, plugin_id, target_version, params, state, owner, heartbeat_at) "
            "VALUES ($1, $2, $3, $4, 'running', $5, now()) RETURNING run_id",
            RUN_KIND, plugin_id, version, params, owner_tag())
        if items:
            await conn.copy_records_to_table(
                "fleet_run_items", columns=["run_id", "item_key", "shard_id", "tenant_id", "scope"],
                records=[(run_id, k, s, t, sc) for k, s, t, sc in items])
    return run_id


async def _run_row(control: asyncpg.Pool, run_id: int) -> asyncpg.Record:
    row = await control.fetchrow(_SELECT_RUNS + "WHERE run_id = $1 AND kind = $2",
                                 run_id, RUN_KIND)
    if row is None:
        raise RunNotFound(f"no migration run {run_id}", runId=run_id)
    return row


async def load_run(control: asyncpg.Pool, run_id: int) -> RunInfo:
    """The run, or RUN_NOT_FOUND."""
    return _info(await _run_row(control, run_id))


async def claim(control: asyncpg.Pool, run_id: int) -> None:
    """Take over a run for resuming: state running, owner this process."""
    await control.execute(
        "UPDATE fleet_runs SET state = 'running', owner = $2, heartbeat_at = now(), finished_at = NULL, "
        "updated_at = now() WHERE run_id = $1", run_id, owner_tag())


@dataclass(frozen=True)
class OpenItem:
    key: str
    shard_id: str
    tenant_id: str | None
    scope: str
    attempts: int


async def open_items(control: asyncpg.Pool, run_id: int) -> list[OpenItem]:
    """Items of the run that are not done or skipped (what a resume has to finish)."""
    rows = await control.fetch(
        "SELECT item_key, shard_id, tenant_id::text AS tenant_id, scope, attempts FROM fleet_run_items "
        "WHERE run_id = $1 AND status NOT IN ('done', 'skipped') ORDER BY item_key", run_id)
    return [OpenItem(r["item_key"], r["shard_id"], r["tenant_id"], r["scope"], r["attempts"]) for r in rows]


async def finish(control: asyncpg.Pool, run_id: int, state: str, summary: dict[str, Any]) -> None:
    await control.execute(
        "UPDATE fleet_runs SET state = $2, summary = $3, heartbeat_at = now(), updated_at = now(), "
        "finished_at = now() WHERE run_id = $1", run_id, state, summary)


async def run_status(control: asyncpg.Pool, run_id: int, *, failed_limit: int = 20) -> dict[str, Any]:
    """A run with its item counts per shard and status, and its latest failures. Reads the
    control plane only, so it works while another process runs the run."""
    row = await _run_row(control, run_id)
    info, age = _info(row), row["heartbeat_age_s"]
    counts = await control.fetch(
        "SELECT shard_id, status, count(*)::int AS n, sum(attempts)::int AS attempts FROM fleet_run_items "
        "WHERE run_id = $1 GROUP BY shard_id, status ORDER BY shard_id, status", run_id)
    failed = await control.fetch(
        "SELECT item_key, shard_id, attempts, last_error FROM fleet_run_items WHERE run_id = $1 "
        "AND status = 'failed' ORDER BY updated_at DESC LIMIT $2", run_id, failed_limit)
    shards: dict[str, dict[str, int]] = {}
    for r in counts:
        s = shards.setdefault(r["shard_id"], {"pending": 0, "running": 0, "done": 0, "failed": 0, "skipped": 0,
                                              "attempts": 0})
        s[r["status"]] = r["n"]
        s["attempts"] += r["attempts"] or 0
    out = info.to_dict()
    out["heartbeatAgeS"] = None if age is None else round(age, 1)
    out["alive"] = info.state == "running" and age is not None and age < 3 * HEARTBEAT_S
    live = {s.get("shardId"): s for s in info.summary.get("shards", []) if isinstance(s, dict)}
    out["shards"] = [{"shardId": sid, **c, "state": live.get(sid, {}).get("state"), "rate": live.get(sid, {}).get("rate"),
                      "etaS": live.get(sid, {}).get("etaS")} for sid, c in sorted(shards.items())]
    out["failedItems"] = [{"itemKey": r["item_key"], "shardId": r["shard_id"], "attempts": r["attempts"],
                           "lastError": r["last_error"]} for r in failed]
    return out


async def list_runs(control: asyncpg.Pool, plugin_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    rows = await control.fetch(
        _SELECT_RUNS + "WHERE kind = $1 AND ($2::text IS NULL OR plugin_id = $2) "
        "ORDER BY run_id DESC LIMIT $3", RUN_KIND, plugin_id, limit)
    return [_info(r).to_dict() for r in rows]


@dataclass
class _Change:
    status: str
    attempts: int
    error: str | None


@dataclass
class RunRecorder:
    """Buffers item status changes and tenant version flips; a task it owns writes them every
    FLUSH_S (or sooner when ``batch_size`` are waiting) and refreshes the heartbeat.

    Use as ``async with RunRecorder(...) as rec``; leaving it writes what is left.
    """
    control: asyncpg.Pool
    run_id: int
    plugin_id: str
    version: str
    batch_size: int
    summary: Callable[[], dict[str, Any]] = dict
    _changes: dict[str, _Change] = field(default_factory=dict)
    _flips: list[str] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _closing: bool = False

    async def __aenter__(self) -> "RunRecorder":
        self._task = asyncio.create_task(self._loop(), name=f"run-{self.run_id}-recorder")
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            # let a flush in progress finish rather than cancel it halfway
            self._closing = True
            self._wake.set()
            await self._task
        async for attempt in AsyncRetrying(retry=retry_if_exception_type(DB_ERRORS), stop=stop_after_attempt(4),
                                           wait=wait_random_exponential(multiplier=0.1, max=2), reraise=True):
            with attempt:
                await self.flush()

    def _note(self, key: str, status: str, attempts: int, error: str | None) -> None:
        self._changes[key] = _Change(status, attempts, error)
        if len(self._changes) + len(self._flips) >= self.batch_size:
            self._wake.set()

    def running(self, keys: Iterable[tuple[str, int]]) -> None:
        for key, attempts in keys:
            self._note(key, "running", attempts, None)

    def attempt(self, key: str, attempts: int, error: str) -> None:
        self._note(key, "running", attempts, error)

    def done(self, key: str, attempts: int, tenant_id: str | None) -> None:
        self._note(key, "done", attempts, None)
        if tenant_id is not None:
            self._flips.append(tenant_id)

    def failed(self, key: str, attempts: int, error: str) -> None:
        self._note(key, "failed", attempts, error)

    def skipped(self, key: str, reason: str) -> None:
        self._note(key, "skipped", 0, reason)

    def flip(self, tenant_ids: Iterable[str]) -> None:
        self._flips.extend(tenant_ids)

    async def flush(self) -> None:
        async with self._lock:
            changes, self._changes = self._changes, {}
            flips, self._flips = self._flips, []
            if not changes and not flips:
                return
            try:
                async with self.control.acquire() as conn, conn.transaction():
                    if changes:
                        await conn.execute(
                            "UPDATE fleet_run_items AS i SET status = v.status, "
                            "attempts = greatest(i.attempts, v.attempts), last_error = v.err, updated_at = now() "
                            "FROM unnest($2::text[], $3::text[], $4::int[], $5::text[]) AS v(key, status, attempts, err) "
                            "WHERE i.run_id = $1 AND i.item_key = v.key",
                            self.run_id, list(changes), [c.status for c in changes.values()],
                            [c.attempts for c in changes.values()], [c.error for c in changes.values()])
                    await flip_tenants(conn, self.plugin_id, self.version, flips)
            except BaseException as exc:
                # keep them for the next flush (also when cancelled): the control plane may be back by then
                if isinstance(exc, DB_ERRORS):
                    log.warning("run %s: recording %d item changes failed", self.run_id, len(changes), exc_info=True)
                for k, c in changes.items():
                    self._changes.setdefault(k, c)
                self._flips.extend(flips)
                raise

    async def heartbeat(self) -> None:
        await self.control.execute(
            "UPDATE fleet_runs SET heartbeat_at = now(), summary = $2, updated_at = now() WHERE run_id = $1",
            self.run_id, self.summary())

    async def _loop(self) -> None:
        last_beat = 0.0
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._closing:
                return
            try:
                await self.flush()
            except DB_ERRORS:
                continue  # logged by flush; tried again on the next tick
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                try:
                    await self.heartbeat()
                except DB_ERRORS:  # tried again on the next tick; `status` shows the run's age meanwhile
                    log.warning("run %s: heartbeat failed", self.run_id, exc_info=True)
                else:
                    last_beat = time.monotonic()
