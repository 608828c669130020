"""Test-side helpers for the fleet migrator tests (tests/test_migrate_*.py)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import asyncpg

from router.models import TenantRecord
from router.settings import Settings
from shard_migrations.fleet import FleetMigrator, migration_pools
from shard_migrations.metrics import MigrateMetrics
from shard_migrations.packages import PluginPackage, discover, load_package
from tests.fleetkit import Fleet

ROOT = Path(__file__).resolve().parents[1]


def shipped(plugin_id: str) -> PluginPackage:
    return discover().get(plugin_id)


@asynccontextmanager
async def migrator(fleet: Fleet, package: PluginPackage, metrics: MigrateMetrics | None = None,
                   **overrides: Any) -> AsyncIterator[FleetMigrator]:
    """A FleetMigrator on the fleet with its own `migration_pools`, as the CLI opens them."""
    settings = fleet.settings.model_copy(update=overrides) if overrides else fleet.settings
    async with migration_pools(settings, fleet.directory.dsn_of) as pools:
        yield FleetMigrator(fleet.control, pools, settings, package, metrics=metrics)


async def make_tenants(fleet: Fleet, n: int, prefix: str | None = None, shard_id: str | None = None,
                       parallel: int = 16) -> list[TenantRecord]:
    prefix = prefix or "m" + uuid.uuid4().hex[:6]
    sem = asyncio.Semaphore(parallel)

    async def one(i: int) -> TenantRecord:
        async with sem:
            return await fleet.directory.create_tenant(f"{prefix}-{i:04d}", shard_id=shard_id)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def ledger_rows(fleet: Fleet, plugin_id: str) -> list[dict[str, Any]]:
    """Every ledger row of the plugin on every shard, with its shard id."""
    out: list[dict[str, Any]] = []
    for shard_id, dsn in fleet.shard_dsns.items():
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT scope, tenant_id::text AS tenant_id, name, checksum "
                                    "FROM fleet.sys_plugin_migrations WHERE plugin_id = $1", plugin_id)
        finally:
            await conn.close()
        out.extend({"shard_id": shard_id, **dict(r)} for r in rows)
    return out


async def tenant_objects(dsn: str) -> dict[str, dict[str, set[str]]]:
    """{schema: {"tables": .., "columns": {table.column}, "indexes": ..}} for every tenant schema."""
    conn = await asyncpg.connect(dsn)
    try:
        cols = await conn.fetch("SELECT table_schema, table_name, column_name FROM information_schema.columns "
                                "WHERE table_schema LIKE 't\\_%'")
        idx = await conn.fetch("SELECT schemaname, indexname FROM pg_indexes WHERE schemaname LIKE 't\\_%'")
        schemas = await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 't\\_%'")
    finally:
        await conn.close()
    out: dict[str, dict[str, set[str]]] = {r["nspname"]: {"tables": set(), "columns": set(), "indexes": set()}
                                           for r in schemas}
    for r in cols:
        o = out[r["table_schema"]]
        o["tables"].add(r["table_name"])
        o["columns"].add(f"{r['table_name']}.{r['column_name']}")
    for r in idx:
        out[r["schemaname"]]["indexes"].add(r["indexname"])
    return out


def cli_env(fleet: Fleet, **extra: str) -> dict[str, str]:
    """Environment for a `python -m host.cli` subprocess aimed at this fleet."""
    # a minimal environment: no TENANTFLEET_* of the caller's leaks in, and no os.environ read here
    env = {"PATH": os.defpath, "LANG": "C.UTF-8"}
    env.update(TENANTFLEET_CONTROL_DSN=fleet.control_dsn, TENANTFLEET_REDIS_URL=fleet.settings.redis_url,
               TENANTFLEET_REDIS_NAMESPACE=fleet.settings.redis_namespace, PYTHONPATH=str(ROOT))
    env.update({f"TENANTFLEET_{k.upper()}": v for k, v in extra.items()})
    return env


async def run_cli(fleet: Fleet, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "host.cli", *args, cwd=str(ROOT), env=env or cli_env(fleet),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def snake_keys(data: Any, path: str = "$") -> list[str]:
    """Every key in ``data`` (recursively, through objects and lists) that has an underscore:
    JSON output keys are camelCase, so this list should be empty."""
    found: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if "_" in str(k):
                found.append(f"{path}.{k}")
            found.extend(snake_keys(v, f"{path}.{k}"))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found.extend(snake_keys(v, f"{path}[{i}]"))
    return found


def camel_json(out: str) -> Any:
    """Parse a command's ``--json`` output and assert that no key in it has an underscore."""
    data = json.loads(out)
    assert not snake_keys(data), f"snake_case keys in --json output: {snake_keys(data)}"
    return data


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float = 30, what: str = "condition") -> None:
    """Poll ``cond`` until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def temp_plugin(root: Path, plugin_id: str, files: dict[str, str], version: str = "1.0.0") -> PluginPackage:
    """Write a plugin package of the test's own under ``root`` and load it (never the shipped ones)."""
    pkg = root / plugin_id
    for rel, sql in files.items():
        path = pkg / "migrations" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sql)
    (pkg / "__init__.py").write_text(f'meta = {{"id": "{plugin_id}", "version": "{version}", "api": "1.x"}}\n')
    return reload_plugin(root, plugin_id)


def reload_plugin(root: Path, plugin_id: str) -> PluginPackage:
    spec = importlib.util.spec_from_file_location(f"tfplug_{plugin_id}_{uuid.uuid4().hex[:6]}",
                                                  root / plugin_id / "__init__.py",
                                                  submodule_search_locations=[str(root / plugin_id)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return load_package(module)
