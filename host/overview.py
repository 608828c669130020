"""What the console's pages show, read from the control plane and the shards: counts per
state, the shards' figures, tenant search, a tenant's plugins, runs and their progress.

Reads only: every change goes through the registry, RBAC, directory and run services
(`host.operations`, `host.runner`), which the admin API calls too. Run progress is read
from ``fleet_runs``/``fleet_run_items``/``tenant_moves``, so a run is shown the same
wherever it runs (this host, another host, the CLI).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg

from host.runtime import HostRuntime
from router.errors import RunNotFound, TenantFleetError, ValidationFailed
from router.keys import TENANT_STATES

RUN_STATES = ("planned", "running", "done", "failed", "cancelled")
PROBE_TIMEOUT_S = 2.0
SEARCH_LIMIT = 50
RUNS_LIMIT = 50
FAILED_LIMIT = 20
# A move's recorded phases in order: how far along it is (`shard_migrations.moves.mover`).
MOVE_PHASES = ("planned", "prepared", "copied", "caught_up", "verified", "switched", "cleaned", "done")

_TENANT_SELECT = """
SELECT t.tenant_id::text AS tenant_id, t.code, t.schema_name, t.shard_id, t.state, t.epoch,
       coalesce((SELECT array_agg(d.domain ORDER BY d.domain) FROM tenant_domains d WHERE d.tenant_id = t.tenant_id),
                '{}') AS domains
FROM tenants t
"""


async def state_counts(control: asyncpg.Pool) -> dict[str, dict[str, int]]:
    """Tenants and runs per state (every state listed, zeros included), for the top of each page."""
    tenants = {r["state"]: r["n"] for r in await control.fetch(
        "SELECT state, count(*)::int AS n FROM tenants GROUP BY state")}
    runs = {r["state"]: r["n"] for r in await control.fetch(
        "SELECT state, count(*)::int AS n FROM fleet_runs GROUP BY state")}
    return {"tenants": {s: tenants.get(s, 0) for s in TENANT_STATES},
            "runs": {s: runs.get(s, 0) for s in RUN_STATES}}


async def shards(rt: HostRuntime) -> list[dict[str, Any]]:
    """Every shard: state, tenants, capacity, database bytes, readiness (``SELECT 1`` now, on
    the request path's connections) and this host's p95 of plugin requests over the last
    minute. A shard that doesn't answer is shown as such, never raised."""
    records = await rt.directory.list_shards()

    async def probe(shard_id: str) -> tuple[str, float | None, int | None]:
        started = time.perf_counter()
        try:
            async with rt.tx.connection(shard_id) as conn:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), PROBE_TIMEOUT_S)
            ms = (time.perf_counter() - started) * 1000
            pool = await rt.owner_pools.get(shard_id)
            size = await asyncio.wait_for(pool.fetchval("SELECT pg_database_size(current_database())"),
                                          PROBE_TIMEOUT_S)
            return "ready", ms, int(size)
        except (TenantFleetError, OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return f"unreachable ({exc.__class__.__name__})", None, None

    probes = await asyncio.gather(*(probe(s.shard_id) for s in records))
    out = []
    for s, (ready, ms, size) in zip(records, probes):
        p95, n = rt.metrics.shard_latency.p95(s.shard_id)
        out.append({"shardId": s.shard_id, "state": s.state, "tenants": s.tenants, "capacity": s.capacity,
                    "bytes": size, "ready": ready, "probeMs": None if ms is None else round(ms, 1),
                    "p95Ms": None if p95 is None else round(p95 * 1000, 1), "requests": n})
    return out


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _tenant(r: asyncpg.Record) -> dict[str, Any]:
    return {"tenantId": r["tenant_id"], "code": r["code"], "schemaName": r["schema_name"], "shardId": r["shard_id"],
            "state": r["state"], "epoch": r["epoch"], "domains": list(r["domains"])}


async def search_tenants(control: asyncpg.Pool, query: str = "", state: str | None = None,
                         limit: int = SEARCH_LIMIT) -> list[dict[str, Any]]:
    """Tenants whose code or one of whose domains starts with ``query`` (a tenant id finds
    that tenant), optionally in one state, in code order. VALIDATION_FAILED for a bad state
    or a query over 255 characters."""
    query = query.strip().lower()
    if len(query) > 255 or "\x00" in query:
        raise ValidationFailed("search for at most 255 characters of a code or domain", field="q")
    if state is not None and state not in TENANT_STATES:
        raise ValidationFailed(f"state must be one of {', '.join(TENANT_STATES)}", field="state")
    try:
        tenant_id = str(uuid.UUID(query)) if len(query) in (32, 36) else None
    except ValueError:
        tenant_id = None
    if tenant_id is not None:
        rows = await control.fetch(_TENANT_SELECT + "WHERE t.tenant_id = $1::uuid AND ($2::text IS NULL OR t.state = $2)",
                                   tenant_id, state)
    else:
        rows = await control.fetch(
            _TENANT_SELECT + "WHERE ($1 = '%' OR t.code LIKE $1 OR t.tenant_id IN "
            "(SELECT d.tenant_id FROM tenant_domains d WHERE d.domain LIKE $1)) "
            "AND ($2::text IS NULL OR t.state = $2) ORDER BY t.code LIMIT $3", _like_prefix(query), state, limit)
    return [_tenant(r) for r in rows]


async def tenant_plugins(rt: HostRuntime, tenant_id: str) -> list[dict[str, Any]]:
    """Every shipped plugin for one tenant: shipped and installed versions, enabled here and
    globally, killed, and the tenant's config."""
    rows = {r["plugin_id"]: r for r in await rt.control.fetch(
        "SELECT plugin_id, enabled, version_installed, config FROM sys_tenant_plugins WHERE tenant_id = $1::uuid",
        tenant_id)}
    listed = await rt.registry.list_plugins()
    out = []
    for p in listed["plugins"]:
        row = rows.get(p["pluginId"])
        out.append({**p, "enabled": bool(row and row["enabled"]),
                    "tenantVersion": None if row is None else row["version_installed"],
                    "config": None if row is None else dict(row["config"] or {})})
    return out


async def tenant_roles(control: asyncpg.Pool, tenant_id: str) -> list[dict[str, Any]]:
    rows = await control.fetch("SELECT role_key, display_name, permissions FROM roles WHERE tenant_id = $1::uuid "
                               "ORDER BY role_key", tenant_id)
    return [{"roleKey": r["role_key"], "displayName": r["display_name"], "permissions": list(r["permissions"])}
            for r in rows]


async def plugin_versions(control: asyncpg.Pool) -> dict[str, dict[str, int]]:
    """Per plugin: how many tenants have each installed version."""
    out: dict[str, dict[str, int]] = {}
    for r in await control.fetch("SELECT plugin_id, version_installed, count(*)::int AS n FROM sys_tenant_plugins "
                                 "GROUP BY plugin_id, version_installed ORDER BY plugin_id, version_installed"):
        out.setdefault(r["plugin_id"], {})[r["version_installed"]] = r["n"]
    return out


_RUNS = """
SELECT r.run_id, r.kind, r.plugin_id, r.target_version, r.params, r.state, r.owner, r.summary, r.created_at,
       r.finished_at, extract(epoch FROM now() - r.heartbeat_at)::float8 AS heartbeat_age_s,
       (SELECT count(*) FROM fleet_run_items i WHERE i.run_id = r.run_id)::int AS items,
       (SELECT count(*) FROM fleet_run_items i WHERE i.run_id = r.run_id
          AND i.status IN ('done', 'failed', 'skipped'))::int AS settled,
       (SELECT count(*) FROM fleet_run_items i WHERE i.run_id = r.run_id AND i.status = 'failed')::int AS failed,
       m.phase AS move_phase, m.source_shard, m.target_shard, m.detail AS move_detail, t.code AS move_code
FROM fleet_runs r LEFT JOIN tenant_moves m ON m.run_id = r.run_id LEFT JOIN tenants t ON t.tenant_id = m.tenant_id
"""


def _percent(r: asyncpg.Record) -> int:
    if r["kind"] == "move":
        phase = r["move_phase"]
        if phase in ("done", "aborted") or r["state"] in ("done", "cancelled"):
            return 100
        return int(100 * MOVE_PHASES.index(phase) / (len(MOVE_PHASES) - 1)) if phase in MOVE_PHASES else 0
    if r["items"]:
        return int(100 * r["settled"] / r["items"])
    return 100 if r["state"] in ("done", "failed", "cancelled") else 0


def _run(r: asyncpg.Record) -> dict[str, Any]:
    from shard_migrations.keys import HEARTBEAT_S

    age = r["heartbeat_age_s"]
    out: dict[str, Any] = {
        "runId": r["run_id"], "kind": r["kind"], "plugin": r["plugin_id"], "version": r["target_version"],
        "params": r["params"], "state": r["state"], "owner": r["owner"], "createdAt": r["created_at"],
        "finishedAt": r["finished_at"], "heartbeatAgeS": None if age is None else round(age, 1),
        "alive": r["state"] == "running" and age is not None and age < 3 * HEARTBEAT_S,
        "itemsTotal": r["items"], "settled": r["settled"], "failed": r["failed"], "percent": _percent(r),
        "summary": r["summary"] or {}, "move": None,
    }
    if r["kind"] == "move":
        detail = dict(r["move_detail"] or {})
        out["move"] = {"code": r["move_code"], "from": r["source_shard"], "to": r["target_shard"],
                       "phase": r["move_phase"], "lastError": detail.get("lastError"), "detail": detail}
    error = (r["summary"] or {}).get("error") if isinstance(r["summary"], dict) else None
    out["error"] = error or (out.get("move") or {}).get("lastError")
    return out


async def list_runs(control: asyncpg.Pool, kind: str | None = None, limit: int = RUNS_LIMIT) -> list[dict[str, Any]]:
    """The latest runs of every kind (or one), newest first, each with its progress."""
    rows = await control.fetch(_RUNS + "WHERE ($1::text IS NULL OR r.kind = $1) ORDER BY r.run_id DESC LIMIT $2",
                               kind, limit)
    return [_run(r) for r in rows]


async def run_progress(control: asyncpg.Pool, run_id: int) -> dict[str, Any]:
    """One run: its state and progress, its items per shard and phase (scope), and its
    latest failures with their errors. RUN_NOT_FOUND."""
    row = await control.fetchrow(_RUNS + "WHERE r.run_id = $1", run_id)
    if row is None:
        raise RunNotFound(f"no run {run_id}", runId=run_id)
    out = _run(row)
    counts = await control.fetch(
        "SELECT shard_id, scope, status, count(*)::int AS n FROM fleet_run_items WHERE run_id = $1 "
        "GROUP BY shard_id, scope, status ORDER BY shard_id, scope", run_id)
    phases: dict[tuple[str, str], dict[str, int]] = {}
    for r in counts:
        row_counts = phases.setdefault((r["shard_id"], r["scope"]), {"pending": 0, "running": 0, "done": 0,
                                                                    "failed": 0, "skipped": 0})
        row_counts[r["status"]] = r["n"]
    out["shards"] = []
    for (shard_id, scope), c in phases.items():
        total = sum(c.values())
        settled = c["done"] + c["failed"] + c["skipped"]
        out["shards"].append({"shardId": shard_id, "phase": scope, **c, "total": total,
                              "percent": int(100 * settled / total) if total else 100})
    failed = await control.fetch(
        "SELECT item_key, shard_id, attempts, last_error FROM fleet_run_items WHERE run_id = $1 AND status = 'failed' "
        "ORDER BY updated_at DESC LIMIT $2", run_id, FAILED_LIMIT)
    out["failedItems"] = [{"itemKey": f["item_key"], "shardId": f["shard_id"], "attempts": f["attempts"],
                           "lastError": f["last_error"]} for f in failed]
    return out
