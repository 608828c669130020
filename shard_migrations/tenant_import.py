"""Bulk onboarding: `tenantfleet tenants import FILE` (issue 12).

A file of tenants (CSV with a header, or JSON lines: ``code``, ``domains``, ``plugins``,
optional ``shard``) becomes tenants the way `Directory.create_tenant` and
``plugins enable --tenant`` make them, in batches:

1. Every row is checked first (code, domains, plugins, shard; duplicates within the file
   and against the directory). A bad row is refused with its line number and reason and
   never touched again; a file that is not CSV or JSON lines is refused whole (nothing
   changed).
2. The good rows are placed all at once (least loaded active shard relative to capacity,
   from the shards' tenant counters, filled in turn) and get their tenant ids; the run
   is recorded (``fleet_runs`` kind ``import``, one ``fleet_run_items`` row per line,
   refused lines ``skipped`` with their reason) before anything is created.
3. Per shard, batch by batch: the batch's directory rows (state ``provisioning``), then
   ONE shard transaction with the batch's schemas, tenant roles, fences, each plugin's
   public files (once per shard) and tenant files (through the migrator's engine, so
   each file is recorded in the shard's ledger with its checksum), then one control
   transaction enabling the plugins and marking the batch active and its items done.

A crash at any point leaves each line pending, provisioning or done, never half-made:
``--resume RUN`` (the same file: its sha256 is recorded) redoes what is not done with
the same tenant ids and shards; everything on the shard side is idempotent. Tenants
still provisioning are not served (resolve answers their state).
"""
from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import logging
import re
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import asyncpg
import orjson

from router.errors import MigrationFailed, NoShardAvailable, RunNotFound, ShardUnreachable, ValidationFailed
from router.keys import PLACEMENT_LOCK
from router.models import TenantRecord, check_code, check_domains, check_shard_id
from router.pools import ShardPools
from router.settings import Settings
from shard_migrations.engine import LockBusy, LockTimedOut, Unit, apply_unit
from shard_migrations.import_batch import BatchFallback, NewTenant, create_batch
from shard_migrations.packages import Discovery, PluginPackage
from shard_migrations.limiter import ShardLimiters
from shard_migrations.runs import owner_tag

log = logging.getLogger("tenantfleet.import")

RUN_KIND = "import"
COLUMNS = ("code", "domains", "plugins", "shard")
_LIST_SPLIT = re.compile(r"[;,\s]+")  # domains / plugins in one CSV cell
MAX_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Row:
    line: int
    code: str
    domains: tuple[str, ...]
    plugins: tuple[str, ...]
    shard: str | None


@dataclass(frozen=True)
class Refused:
    line: int
    code: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "reason": self.reason}


@dataclass
class ImportReport:
    run_id: int
    rows: int
    created: int
    refused: list[Refused]
    seconds: float
    shards: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"runId": self.run_id, "rows": self.rows, "created": self.created, "refusedCount": len(self.refused),
                "refused": [r.to_dict() for r in self.refused], "seconds": round(self.seconds, 3),
                "tenantsPerS": round(self.created / self.seconds, 1) if self.seconds > 0 else None,
                "shards": [{"shardId": s, "created": n} for s, n in sorted(self.shards.items())]}


# --- reading the file -------------------------------------------------------------------
def read_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """The file's rows as (line number, fields) and its sha256. VALIDATION_FAILED (field
    ``file``) if it is not a readable CSV-with-header or JSON-lines file of tenants."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationFailed(f"cannot read {path}: {exc.strerror or exc}", field="file") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValidationFailed(f"{path} is larger than {MAX_FILE_BYTES // 2**20} MiB", field="file")
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationFailed(f"{path} is not UTF-8 text (CSV or JSON lines)", field="file") from None
    if "\x00" in text:
        raise ValidationFailed(f"{path} holds NUL bytes: not CSV or JSON lines", field="file")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not first:
        raise ValidationFailed(f"{path} holds no rows", field="file")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson", ".json") or first.startswith("{")
    return (_jsonl_rows(text, path) if jsonl else _csv_rows(text, path)), digest


def _jsonl_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            value = None
        rows.append((n, value if isinstance(value, dict) else {"__bad__": "not a JSON object"}))
    return rows


def _csv_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text), strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip().lower() for c in cells]
                unknown = [h for h in header if h not in COLUMNS]
                if "code" not in header or unknown or len(set(header)) != len(header):
                    raise ValidationFailed(
                        f"{path}: the first row must be a CSV header naming columns among "
                        f"{', '.join(COLUMNS)} (code required, each once); got {','.join(header)[:200]}", field="file")
                continue
            line = reader.line_num
            if len(cells) != len(header):
                rows.append((line, {"__bad__": f"{len(cells)} cells, the header has {len(header)}"}))
                continue
            fields: dict[str, Any] = dict(zip(header, (c.strip() for c in cells)))
            for name in ("domains", "plugins"):
                if name in fields:
                    fields[name] = [v for v in _LIST_SPLIT.split(fields[name]) if v]
            if fields.get("shard") == "":
                fields["shard"] = None
            rows.append((line, fields))
    except csv.Error as exc:
        raise ValidationFailed(f"{path} is not CSV: {exc}", field="file") from None
    return rows


def check_rows(raw: Sequence[tuple[int, Mapping[str, Any]]], plugins: Discovery,
               shard_states: Mapping[str, str]) -> tuple[list[Row], list[Refused]]:
    """Each row checked on its own and against the rows before it in the file."""
    good: list[Row] = []
    refused: list[Refused] = []
    codes: dict[str, int] = {}
    domains: dict[str, int] = {}
    for line, fields in raw:
        code = fields.get("code") if isinstance(fields.get("code"), str) else None
        try:
            row = _check_row(line, fields, plugins, shard_states)
        except ValidationFailed as exc:
            refused.append(Refused(line, code, exc.message))
            continue
        if row.code in codes:
            refused.append(Refused(line, row.code, f"duplicate code {row.code} (line {codes[row.code]})"))
            continue
        clash = next((d for d in row.domains if d in domains), None)
        if clash is not None:
            refused.append(Refused(line, row.code, f"duplicate domain {clash} (line {domains[clash]})"))
            continue
        codes[row.code] = line
        domains.update((d, line) for d in row.domains)
        good.append(row)
    return good, refused


def _check_row(line: int, fields: Mapping[str, Any], plugins: Discovery, shard_states: Mapping[str, str]) -> Row:
    if "__bad__" in fields:
        raise ValidationFailed(str(fields["__bad__"]))
    unknown = sorted(set(fields) - set(COLUMNS))
    if unknown:
        raise ValidationFailed(f"unknown field {unknown[0]} (fields: {', '.join(COLUMNS)})")
    code = check_code(fields.get("code"))
    doms = fields.get("domains") or []
    plugs = fields.get("plugins") or []
    if isinstance(doms, str):
        doms = [doms]
    if isinstance(plugs, str):
        plugs = [plugs]
    domains = tuple(check_domains(doms))
    if not isinstance(plugs, list) or not all(isinstance(p, str) for p in plugs):
        raise ValidationFailed("plugins must be a list of plugin ids")
    for p in plugs:
        if p not in plugins.plugins:
            raise ValidationFailed(f"unknown plugin {p}"[:200])
    shard = fields.get("shard")
    if shard is not None:
        check_shard_id(shard)
        state = shard_states.get(shard)
        if state is None:
            raise ValidationFailed(f"unknown shard {shard}")
        if state != "active":
            raise ValidationFailed(f"shard {shard} is {state}")
    return Row(line, code, domains, tuple(dict.fromkeys(plugs)), shard)


def place(rows: Sequence[Row], shards: Mapping[str, tuple[int, int]]) -> dict[int, str]:
    """line -> shard for the whole batch: a row's own shard, else the active shard with the
    fewest tenants relative to capacity, counting the rows placed so far (``shards``:
    active shard -> (tenant count, capacity))."""
    load = {s: float(n) for s, (n, _) in shards.items()}
    for r in rows:
        if r.shard is not None:
            load[r.shard] = load.get(r.shard, 0.0) + 1
    out: dict[int, str] = {}
    for r in rows:
        if r.shard is not None:
            out[r.line] = r.shard
            continue
        if not shards:
            raise NoShardAvailable("no active shard to place the tenants on")
        target = min(shards, key=lambda s: (load[s] / shards[s][1], s))
        load[target] += 1
        out[r.line] = target
    return out


# --- running ----------------------------------------------------------------------------
Progress = Callable[[int, int], None]  # (rows done, rows to do)


class TenantImporter:
    """Imports a checked file into the fleet, recorded as a run. ``pools`` connect as the
    shards' owner (DDL); ``packages`` are the plugins rows may enable."""

    def __init__(self, control: asyncpg.Pool, pools: ShardPools, settings: Settings, packages: Discovery, *,
                 batch_size: int = 200, progress: Progress | None = None) -> None:
        self.control = control
        self.pools = pools
        self.settings = settings
        self.packages = packages
        self.batch_size = batch_size
        self.progress = progress

    async def start(self, path: Path) -> ImportReport:
        """Check, place and record the file's rows, then import them."""
        raw, digest = read_rows(path)
        states = {r["shard_id"]: r["state"] for r in await self.control.fetch("SELECT shard_id, state FROM shards")}
        good, refused = check_rows(raw, self.packages, states)
        good, taken = await self._not_in_directory(good)
        refused = sorted(refused + taken, key=lambda r: r.line)
        async with self.control.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", PLACEMENT_LOCK)
            shards = {r["shard_id"]: (r["tenant_count"], r["capacity"]) for r in await conn.fetch(
                "SELECT shard_id, tenant_count, capacity FROM shards WHERE state = 'active'")}
            placed = place(good, shards)
            run_id: int = await conn.fetchval(
                "INSERT INTO fleet_runs (kind, params, state, owner, heartbeat_at) "
                "VALUES ($1, $2, 'running', $3, now()) RETURNING run_id",
                RUN_KIND, {"file": str(path.resolve()), "sha256": digest, "rows": len(raw),
                           "batchSize": self.batch_size}, owner_tag())
            items: list[tuple[int, str, str, uuid.UUID | None, str, str, str | None]] = [
                (run_id, f"line:{r.line}", placed[r.line], uuid.uuid4(), "tenant", "pending", None) for r in good]
            items += [(run_id, f"line:{r.line}", "", None, "tenant", "skipped", r.reason) for r in refused]
            await conn.copy_records_to_table(
                "fleet_run_items", columns=["run_id", "item_key", "shard_id", "tenant_id", "scope", "status",
                                            "last_error"], records=items)
        log.info("import run %s: %d rows, %d to create, %d refused", run_id, len(raw), len(good), len(refused))
        return await self._run(run_id, good, refused, len(raw))

    async def resume(self, path: Path, run_id: int) -> ImportReport:
        """Finish run ``run_id`` from the same file (RUN_NOT_FOUND; VALIDATION_FAILED if the
        file changed since)."""
        run = await self.control.fetchrow("SELECT params FROM fleet_runs WHERE run_id = $1 AND kind = $2",
                                          run_id, RUN_KIND)
        if run is None:
            raise RunNotFound(f"no import run {run_id}", runId=run_id)
        raw, digest = read_rows(path)
        if run["params"].get("sha256") != digest:
            raise ValidationFailed(f"{path} is not the file import run {run_id} read (its sha256 differs)",
                                   field="file", runId=run_id)
        await self.control.execute("UPDATE fleet_runs SET state = 'running', owner = $2, heartbeat_at = now(), "
                                   "finished_at = NULL, updated_at = now() WHERE run_id = $1", run_id, owner_tag())
        rows = {r.line: r for r in check_rows(raw, self.packages, _AnyShard())[0]}
        refused = [Refused(int(r["item_key"].split(":")[1]), None, r["last_error"]) for r in await self.control.fetch(
            "SELECT item_key, last_error FROM fleet_run_items WHERE run_id = $1 AND status = 'skipped'", run_id)]
        return await self._run(run_id, list(rows.values()), sorted(refused, key=lambda r: r.line), len(raw))

    async def _not_in_directory(self, rows: list[Row]) -> tuple[list[Row], list[Refused]]:
        codes = {r["code"] for r in await self.control.fetch(
            "SELECT code FROM tenants WHERE code = ANY($1::text[])", [r.code for r in rows])}
        domains = {r["domain"] for r in await self.control.fetch(
            "SELECT domain FROM tenant_domains WHERE domain = ANY($1::text[])", [d for r in rows for d in r.domains])}
        good: list[Row] = []
        taken: list[Refused] = []
        for r in rows:
            clash = next((d for d in r.domains if d in domains), None)
            if r.code in codes:
                taken.append(Refused(r.line, r.code, f"code {r.code} exists in the directory"))
            elif clash is not None:
                taken.append(Refused(r.line, r.code, f"domain {clash} exists in the directory"))
            else:
                good.append(r)
        return good, taken

    async def _run(self, run_id: int, rows: list[Row], refused: list[Refused], total: int) -> ImportReport:
        started = time.perf_counter()
        by_line = {r.line: r for r in rows}
        items = await self.control.fetch(
            "SELECT item_key, shard_id, tenant_id::text AS tenant_id FROM fleet_run_items "
            "WHERE run_id = $1 AND status NOT IN ('done', 'skipped') ORDER BY shard_id, item_key", run_id)
        done_before: int = await self.control.fetchval(
            "SELECT count(*) FROM fleet_run_items WHERE run_id = $1 AND status = 'done'", run_id)
        todo: dict[str, list[tuple[Row, str]]] = defaultdict(list)
        for it in items:
            row = by_line.get(int(it["item_key"].split(":")[1]))
            if row is not None:
                todo[it["shard_id"]].append((row, it["tenant_id"]))
        created: dict[str, int] = defaultdict(int)
        state = {"done": done_before, "total": done_before + sum(len(v) for v in todo.values())}
        if self.progress:
            self.progress(state["done"], state["total"])

        limiters = ShardLimiters(self.settings, concurrency=1)

        async def activate(shard_id: str, batch: list[tuple[Row, str]], made: list[tuple[Row, str]],
                           packages: Sequence[PluginPackage]) -> None:
            if made:
                await self._activate(run_id, made, packages)
            created[shard_id] += len(made)
            state["done"] += len(batch)
            if self.progress:
                self.progress(state["done"], state["total"])

        async def shard_worker(shard_id: str, work: list[tuple[Row, str]]) -> None:
            # A pipeline per shard: while the shard runs batch n, the control plane
            # activates batch n-1 and reserves batch n+1 (each still in that order for its
            # own batch: directory rows, shard transaction, activation), so the shard's
            # connection never waits on the control plane.
            limiter = limiters.get(shard_id)
            batches = [work[i:i + self.batch_size] for i in range(0, len(work), self.batch_size)]
            reserving: asyncio.Task[list[tuple[Row, str]]] | None = None
            activating: asyncio.Task[None] | None = None
            try:
                if batches:
                    reserving = asyncio.create_task(self._reserve(run_id, shard_id, batches[0]))
                for n, batch in enumerate(batches):
                    assert reserving is not None
                    reserved = await reserving
                    reserving = (asyncio.create_task(self._reserve(run_id, shard_id, batches[n + 1]))
                                 if n + 1 < len(batches) else None)
                    # every shard-wide action goes through the shard's limiter: a shard that
                    # fails backs off alone (a batch is idempotent, so it is simply made
                    # again) until it has failed for shard_give_up_s; the other shards go on
                    while True:
                        async with limiter.slot():
                            try:
                                made, packages = await self._make(run_id, shard_id, reserved)
                            except (ShardUnreachable, LockBusy, LockTimedOut) as exc:
                                limiter.failure(exc)
                                if limiter.down:
                                    raise
                                continue
                            limiter.success()
                            break
                    if activating is not None:
                        await activating
                    activating = asyncio.create_task(activate(shard_id, batch, made, packages))
                if activating is not None:
                    await activating
                    activating = None
            finally:
                for task in (reserving, activating):
                    if task is not None and not task.done():
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)

        try:
            async with asyncio.TaskGroup() as tg:
                for shard_id, work in todo.items():
                    tg.create_task(shard_worker(shard_id, work))
        except BaseExceptionGroup as eg:
            await self._finish(run_id, "failed")
            raise eg.exceptions[0] from None
        report = ImportReport(run_id, total, sum(created.values()), refused, time.perf_counter() - started,
                              dict(created))
        refused_now = await self.control.fetch(
            "SELECT item_key, last_error FROM fleet_run_items WHERE run_id = $1 AND status = 'failed'", run_id)
        report.refused += [Refused(int(r["item_key"].split(":")[1]), None, r["last_error"]) for r in refused_now]
        report.refused.sort(key=lambda r: r.line)
        await self._finish(run_id, "done", report.to_dict())
        return report

    async def _finish(self, run_id: int, state: str, summary: dict[str, Any] | None = None) -> None:
        await self.control.execute(
            "UPDATE fleet_runs SET state = $2, summary = coalesce($3, summary), finished_at = now(), "
            "updated_at = now() WHERE run_id = $1", run_id, state, summary)

    async def _make(self, run_id: int, shard_id: str, batch: list[tuple[Row, str]]
                    ) -> tuple[list[tuple[Row, str]], list[PluginPackage]]:
        """One reserved batch on its shard: the shard's transaction (or, if the batch can't
        be made in one, its tenants one by one). Returns the lines made (a line whose plugin
        files fail is refused, recorded as failed with the reason) and the plugins enabled."""
        plugin_ids = sorted({p for row, _ in batch for p in row.plugins})
        packages = [self.packages.get(p) for p in plugin_ids]
        if not batch:
            return batch, packages
        pool = await self.pools.get(shard_id)
        new = [NewTenant(_record(row, tid, "t_" + uuid.UUID(tid).hex, shard_id), row.plugins) for row, tid in batch]
        try:
            try:
                async with pool.acquire(timeout=self.settings.connect_timeout_s) as conn, conn.transaction():
                    await create_batch(conn, shard_id, new, packages, self.settings)
            except BatchFallback as why:
                log.info("import run %s, shard %s: batch of %d made one by one (%s)", run_id, shard_id,
                         len(batch), why)
                batch = await self._one_by_one(run_id, shard_id, batch, packages)
        except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise ShardUnreachable(f"shard {shard_id} is unreachable: {exc.__class__.__name__}",
                                   shardId=shard_id) from exc
        return batch, packages

    async def _one_by_one(self, run_id: int, shard_id: str, batch: list[tuple[Row, str]],
                          packages: Sequence[PluginPackage]) -> list[tuple[Row, str]]:
        """The batch's tenants each in a shard transaction of its own, through the engine
        (a no-transaction file, a busy lock, or a file that failed in the batch's script).
        A tenant whose files fail is refused (its line failed with the engine's message
        naming file, shard and tenant; its directory rows removed) and the others go on.
        Returns the lines made."""
        pool = await self.pools.get(shard_id)
        made: list[tuple[Row, str]] = []
        for row, tid in batch:
            name = "t_" + uuid.UUID(tid).hex
            try:
                async with pool.acquire(timeout=self.settings.connect_timeout_s) as conn, conn.transaction():
                    await conn.execute("SELECT fleet.create_tenant_schema($1)", name)
                    await conn.execute(
                        "INSERT INTO fleet.tenant_fence (tenant_id, schema_name, epoch) VALUES ($1::uuid, $2, 1) "
                        "ON CONFLICT (tenant_id) DO NOTHING", tid, name)
                    for pkg in packages:
                        await apply_unit(conn, pkg.id, Unit(shard_id, "public", None,
                                                            tuple(pkg.files("public", pkg.version))), self.settings)
                        if pkg.id in row.plugins:
                            await apply_unit(conn, pkg.id, Unit(shard_id, "tenant", _record(row, tid, name, shard_id),
                                                                tuple(pkg.files("tenant", pkg.version))), self.settings)
            except MigrationFailed as exc:
                async with self.control.acquire() as conn, conn.transaction():
                    await conn.execute("DELETE FROM tenants WHERE tenant_id = $1::uuid AND state = 'provisioning'",
                                       tid)
                    await conn.execute("UPDATE fleet_run_items SET status = 'failed', last_error = $3, "
                                       "attempts = attempts + 1, updated_at = now() "
                                       "WHERE run_id = $1 AND item_key = $2", run_id, f"line:{row.line}",
                                       exc.message)
                continue
            made.append((row, tid))
        return made

    async def _reserve(self, run_id: int, shard_id: str, batch: list[tuple[Row, str]]) -> list[tuple[Row, str]]:
        """The batch's directory rows (provisioning), idempotently: a row already there with
        our tenant id (a resumed batch) is kept; a code or domain someone else took since the
        check refuses that line. Returns the lines to go on with."""
        keep: list[tuple[Row, str]] = []
        async with self.control.acquire() as conn, conn.transaction():
            # one statement each (the shard counter's trigger runs once per statement)
            await conn.execute(
                "INSERT INTO tenants (tenant_id, code, schema_name, shard_id) "
                "SELECT x.t, x.c, x.s, $4 FROM unnest($1::uuid[], $2::text[], $3::text[]) AS x(t, c, s) "
                "ON CONFLICT DO NOTHING",
                [tid for _, tid in batch], [row.code for row, _ in batch],
                ["t_" + uuid.UUID(tid).hex for _, tid in batch], shard_id)
            ours = {r["tenant_id"] for r in await conn.fetch(
                "SELECT tenant_id::text AS tenant_id FROM tenants WHERE tenant_id = ANY($1::uuid[])",
                [tid for _, tid in batch])}
            mine = [(d, tid) for row, tid in batch if tid in ours for d in row.domains]
            await conn.execute(
                "INSERT INTO tenant_domains (domain, tenant_id) SELECT x.d, x.t FROM unnest($1::text[], $2::uuid[]) "
                "AS x(d, t) ON CONFLICT DO NOTHING", [d for d, _ in mine], [t for _, t in mine])
            owner = {r["domain"]: r["tenant_id"] for r in await conn.fetch(
                "SELECT domain, tenant_id::text AS tenant_id FROM tenant_domains WHERE domain = ANY($1::text[])",
                [d for row, _ in batch for d in row.domains])}
            lost: list[tuple[str, str]] = []
            for row, tid in batch:
                if tid not in ours:
                    lost.append((f"line:{row.line}", f"code {row.code} exists in the directory (created meanwhile)"))
                elif any(owner.get(d) != tid for d in row.domains):
                    clash = next(d for d in row.domains if owner.get(d) != tid)
                    lost.append((f"line:{row.line}", f"domain {clash} exists in the directory (created meanwhile)"))
                    await conn.execute("DELETE FROM tenants WHERE tenant_id = $1::uuid", tid)
                else:
                    keep.append((row, tid))
            if lost:
                await conn.executemany("UPDATE fleet_run_items SET status = 'failed', last_error = $3, "
                                       "updated_at = now() WHERE run_id = $1 AND item_key = $2",
                                       [(run_id, key, why) for key, why in lost])
        return keep

    async def _activate(self, run_id: int, batch: list[tuple[Row, str]], packages: Sequence[PluginPackage]) -> None:
        async with self.control.acquire() as conn, conn.transaction():
            for pkg in packages:
                await conn.execute(
                    "INSERT INTO sys_plugins (plugin_id, api_version, version_installed) VALUES ($1, $2, $3) "
                    "ON CONFLICT (plugin_id) DO NOTHING", pkg.id, pkg.api, str(pkg.version))
                await conn.execute(
                    "INSERT INTO sys_tenant_plugins (tenant_id, plugin_id, enabled, version_installed) "
                    "SELECT t, $2, true, $3 FROM unnest($1::uuid[]) AS t "
                    "ON CONFLICT (tenant_id, plugin_id) DO UPDATE SET enabled = true, "
                    "version_installed = EXCLUDED.version_installed, updated_at = now()",
                    [tid for row, tid in batch if pkg.id in row.plugins], pkg.id, str(pkg.version))
            await conn.execute(
                "UPDATE tenants SET state = 'active', epoch = epoch + 1, updated_at = now() "
                "WHERE tenant_id = ANY($1::uuid[]) AND state = 'provisioning'", [tid for _, tid in batch])
            await conn.execute(
                "UPDATE fleet_run_items SET status = 'done', attempts = attempts + 1, updated_at = now() "
                "WHERE run_id = $1 AND item_key = ANY($2::text[])", run_id, [f"line:{row.line}" for row, _ in batch])
            await conn.execute("UPDATE fleet_runs SET heartbeat_at = now(), updated_at = now() WHERE run_id = $1",
                               run_id)


class _AnyShard(dict[str, str]):
    """On resume, rows were placed already: any shard named passes the check."""

    def get(self, key: str, default: Any = None) -> str:
        return "active"


def _record(row: Row, tenant_id: str, schema: str, shard_id: str) -> TenantRecord:
    return TenantRecord(tenant_id=tenant_id, code=row.code, schema=schema, shard_id=shard_id, state="provisioning",
                        epoch=1, domains=row.domains)
