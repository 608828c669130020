"""tenantfleet's own tables under Alembic revisions (router/revisions, issue 12): databases
made by the previous release (no revision recorded) are stamped at the baseline and
upgraded in place with their data; a revision after the baseline runs once; an older
tenantfleet refuses a database a newer one upgraded; `tenantfleet db ...`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest

from router import revisions, schema
from router.errors import SchemaTooNew
from router.keys import BOOTSTRAP_LOCK
from router.tables import SCHEMA_VERSION
from tests.fleetkit import Fleet, Servers, create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
# the control plane's head: the app shell's sessions (router/revisions/control/versions/r0007_app_sessions.py)
CONTROL_HEAD = "0007"

REVISION_0008 = '''"""Shards get a note.

Revision ID: 0008
Revises: 0007
"""
from alembic import op
import sqlalchemy as sa

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("shards", sa.Column("note", sa.Text(), nullable=True))
    op.execute("UPDATE shards SET note = 'from 0008'")
'''


async def _previous_release_control(conn: asyncpg.Connection) -> None:
    """Turn a fresh control plane into what the release before revisions (schema version 4)
    left: no Alembic version table, no per-shard tenant counter, version 4 recorded."""
    await conn.execute("DROP TABLE alembic_version")
    await conn.execute("DROP TABLE app_sessions, console_sessions, console_audit")  # revisions 0006-0007, after that release
    await conn.execute("DROP TRIGGER tenants_count_insert ON tenants; DROP TRIGGER tenants_count_delete ON tenants; "
                       "DROP TRIGGER tenants_count_move ON tenants")
    await conn.execute("ALTER TABLE shards DROP COLUMN tenant_count CASCADE")
    await conn.execute("UPDATE tenantfleet_schema SET version = 4 WHERE component = 'control'")


async def test_a_control_plane_of_the_previous_release_is_upgraded_in_place_with_its_data(servers: Servers) -> None:
    name = f"tf_{uuid.uuid4().hex[:12]}_rev"
    dsn = await create_database(servers.control_admin_dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await schema.ensure_control(conn)
            await _previous_release_control(conn)
            await conn.execute("INSERT INTO shards (shard_id, dsn) VALUES ('s1', 'postgresql://db.invalid/s1')")
            tenants = [(uuid.uuid4(), f"old{i}") for i in range(3)]
            await conn.executemany(
                "INSERT INTO tenants (tenant_id, code, schema_name, shard_id, state) VALUES ($1, $2, $3, 's1', 'active')",
                [(tid, c, "t_" + tid.hex) for tid, c in tenants])
            assert await revisions.current(conn, "control") is None

            await schema.ensure_control(conn)

            assert await revisions.current(conn, "control") == revisions.head("control") == CONTROL_HEAD
            assert await conn.fetchval("SELECT version FROM tenantfleet_schema WHERE component = 'control'") \
                == SCHEMA_VERSION
            rows = await conn.fetch("SELECT tenant_id, code FROM tenants ORDER BY code")
            assert [(r["tenant_id"], r["code"]) for r in rows] == tenants
            assert await conn.fetchval("SELECT dsn FROM shards WHERE shard_id = 's1'") == "postgresql://db.invalid/s1"
            assert await conn.fetchval("SELECT tenant_count FROM shards WHERE shard_id = 's1'") == len(tenants)
            await schema.ensure_control(conn)  # again: nothing to do, nothing recorded twice
            assert await conn.fetchval("SELECT count(*) FROM alembic_version") == 1
        finally:
            await conn.close()
    finally:
        await drop_database(servers.control_admin_dsn, name)


async def test_a_shard_of_the_previous_release_is_stamped_with_its_ledger_kept(servers: Servers) -> None:
    admin_dsn = next(iter(servers.shard_admin_dsns.values()))
    name = f"tf_{uuid.uuid4().hex[:12]}_rev"
    dsn = await create_database(admin_dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await schema.ensure_shard(conn)
            await conn.execute("DROP TABLE fleet.alembic_version")
            await conn.execute(
                "INSERT INTO fleet.sys_plugin_migrations (plugin_id, scope, tenant_id, name, version, checksum) "
                "VALUES ('inventory', 'public', NULL, '001_init.sql', '1.0.0', 'abc')")
            await schema.ensure_shard(conn)
            assert await revisions.current(conn, "shard") == revisions.head("shard")
            assert await conn.fetchval("SELECT count(*) FROM fleet.sys_plugin_migrations") == 1
        finally:
            await conn.close()
    finally:
        await drop_database(admin_dsn, name)


async def test_a_revision_after_the_baseline_runs_once_and_an_older_tenantfleet_then_refuses(
        servers: Servers, tmp_path: Path) -> None:
    shutil.copytree(revisions.HERE / "control", tmp_path / "control", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "control" / "versions" / "r0008_note.py").write_text(REVISION_0008)
    name = f"tf_{uuid.uuid4().hex[:12]}_rev"
    dsn = await create_database(servers.control_admin_dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await schema.ensure_control(conn)
            await conn.execute("INSERT INTO shards (shard_id, dsn) VALUES ('s1', 'postgresql://db.invalid/s1')")
            async with conn.transaction():  # as router.schema runs it: under the bootstrap lock
                await conn.execute("SELECT pg_advisory_xact_lock($1)", BOOTSTRAP_LOCK)
                recorded = await revisions.check_known(conn, "control", root=tmp_path)
                assert await revisions.upgrade(conn, "control", recorded, root=tmp_path) == ["0008"]
            assert await conn.fetchval("SELECT note FROM shards") == "from 0008"
            assert await revisions.current(conn, "control") == "0008"
            assert await revisions.upgrade(conn, "control", "0008", root=tmp_path) == []
            # this tenantfleet knows up to 0007: it changes nothing on a database at 0008
            await conn.execute("DROP INDEX tenants_state_code_idx")
            with pytest.raises(SchemaTooNew, match="revision 0008"):
                await schema.ensure_control(conn)
            assert await conn.fetchval("SELECT to_regclass('tenants_state_code_idx')") is None
            assert await revisions.current(conn, "control") == "0008"
        finally:
            await conn.close()
    finally:
        await drop_database(servers.control_admin_dsn, name)


def test_the_heads_known_without_alembic_are_the_script_directories_heads() -> None:
    assert revisions.HEADS == {c: revisions.head(c) for c in revisions.COMPONENTS}


# Runs ensure_control in a fresh interpreter, then prints whether SQLAlchemy or Alembic got loaded.
ENSURE_PROBE = """
import asyncio, json, sys
import asyncpg
from router import schema

async def main():
    conn = await asyncpg.connect(sys.argv[1])
    try:
        await schema.ensure_control(conn)
    finally:
        await conn.close()

asyncio.run(main())
print(json.dumps([m for m in ("sqlalchemy", "alembic") if m in sys.modules]))
"""


async def test_a_control_plane_at_this_version_is_checked_without_loading_sqlalchemy_or_alembic(
        servers: Servers) -> None:
    """Every command checks the control plane at start: one at this version and head is one
    read; one a revision behind still gets the locked set-up and its upgrade."""
    name = f"tf_{uuid.uuid4().hex[:12]}_rev"
    dsn = await create_database(servers.control_admin_dsn, name)

    def probe() -> list[str]:
        proc = subprocess.run([sys.executable, "-c", ENSURE_PROBE, dsn], cwd=str(ROOT), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        loaded: list[str] = orjson.loads(proc.stdout.strip().splitlines()[-1])
        return loaded

    try:
        assert probe() == ["sqlalchemy", "alembic"]  # nothing there yet: built
        assert probe() == []
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("DROP TABLE app_sessions")  # as revision 0006 left it
            await conn.execute("UPDATE alembic_version SET version_num = '0006'")
            assert probe() == ["sqlalchemy", "alembic"]
            assert await revisions.current(conn, "control") == CONTROL_HEAD
            assert await conn.fetchval("SELECT to_regclass('app_sessions')") is not None
            await conn.execute("UPDATE tenantfleet_schema SET version = version - 1")  # an older set-up
            assert probe() == ["sqlalchemy", "alembic"]
            assert await conn.fetchval("SELECT version FROM tenantfleet_schema") == SCHEMA_VERSION
            assert probe() == []
        finally:
            await conn.close()
    finally:
        await drop_database(servers.control_admin_dsn, name)


def _tf(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLEET_")}
    env["TENANTFLEET_CONTROL_DSN"] = fleet.settings.control_dsn
    return subprocess.run([sys.executable, "-m", "host.cli", *args], env=env, capture_output=True, text=True,
                          cwd=str(ROOT), timeout=120)


def test_db_current_upgrade_and_history_on_the_cli(fleet: Fleet) -> None:
    current = _tf(fleet, "--json", "db", "current")
    assert current.returncode == 0, current.stderr
    rows = orjson.loads(current.stdout)
    assert rows[0]["database"] == "control" and {r["component"] for r in rows} == {"control", "shard"}
    assert len(rows) == 1 + len(fleet.shard_dsns)
    assert all(r["revision"] == r["head"] == (CONTROL_HEAD if r["component"] == "control" else "0005")
               and r["state"] == "up to date" for r in rows), rows
    upgraded = _tf(fleet, "--json", "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert all(r["from"] == r["revision"] == r["head"] for r in orjson.loads(upgraded.stdout))
    history = _tf(fleet, "--json", "db", "history")
    assert history.returncode == 0, history.stderr
    assert [(r["component"], r["revision"]) for r in orjson.loads(history.stdout)] == [
        ("control", CONTROL_HEAD), ("control", "0006"), ("control", "0005"), ("shard", "0005")]
