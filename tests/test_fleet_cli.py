"""`tenantfleet up`/`down` and the CLI against a real embedded fleet; restarts keep data."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import asyncpg
import orjson
import pytest

from host.fleet.embedded import EmbeddedFleet
from router.runtime import open_runtime
from router.settings import Settings


@pytest.fixture
def fleet_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="tenantfleet-cli-"))
    root.chmod(0o755)
    try:
        yield root / "fleet"
    finally:
        if (root / "fleet" / "fleet.json").exists():
            EmbeddedFleet(root / "fleet").reset()


def tf(fleet_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLEET_")}
    env["TENANTFLEET_FLEET_DIR"] = str(fleet_dir)
    return subprocess.run([sys.executable, "-m", "host.cli", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def test_up_prepares_demo_tenants_and_cli_commands_use_that_fleet(fleet_dir: Path) -> None:
    up = tf(fleet_dir, "up", "--no-serve", "--shards", "2")
    assert up.returncode == 0, up.stderr
    admin_key, read_key = ((fleet_dir / name).read_text().strip() for name in ("admin.key", "read.key"))
    assert admin_key and read_key and admin_key != read_key
    assert all((fleet_dir / name).stat().st_mode & 0o777 == 0o600 for name in ("admin.key", "read.key"))
    assert (f"curl -s 'http://127.0.0.1:8300/v1/tenants/resolve?code=acme' -H 'Authorization: Bearer {read_key}'"
            in up.stdout)
    listed = tf(fleet_dir, "--json", "tenants", "list")
    assert listed.returncode == 0, listed.stderr
    codes = {t["code"] for t in orjson.loads(listed.stdout)}
    assert codes == {"acme", "globex"}
    after = tf(fleet_dir, "tenants", "list", "--json")  # --json where people type it, after the command
    assert after.returncode == 0 and orjson.loads(after.stdout) == orjson.loads(listed.stdout), after.stderr
    table = tf(fleet_dir, "shards", "list")
    assert table.returncode == 0 and "Shard" in table.stdout and "shard_id" not in table.stdout
    shards = orjson.loads(tf(fleet_dir, "--json", "shards", "list").stdout)
    assert [s["shardId"] for s in shards] == ["shard1", "shard2"]
    keys = orjson.loads((fleet_dir / "demo-keys.json").read_bytes())
    assert set(keys) == {"acme", "globex"} and keys["acme"] in up.stdout
    again = tf(fleet_dir, "up", "--no-serve")  # idempotent: same fleet, same tenants, same keys
    assert again.returncode == 0, again.stderr
    assert len(orjson.loads(tf(fleet_dir, "--json", "tenants", "list").stdout)) == 2
    assert orjson.loads((fleet_dir / "demo-keys.json").read_bytes()) == keys
    listed_keys = tf(fleet_dir, "--json", "keys", "list", "--tenant", "acme")
    assert listed_keys.returncode == 0, listed_keys.stderr
    principals = orjson.loads(listed_keys.stdout)
    assert len(principals) == 1 and keys["acme"] not in listed_keys.stdout  # hashed: never shown again
    revoked = tf(fleet_dir, "--json", "keys", "revoke", principals[0]["principalId"])
    assert revoked.returncode == 0 and orjson.loads(revoked.stdout)["revoked"] is True, revoked.stderr
    assert orjson.loads(tf(fleet_dir, "--json", "keys", "list", "--tenant", "acme").stdout) == []
    again_revoked = tf(fleet_dir, "keys", "revoke", principals[0]["principalId"])
    assert again_revoked.returncode != 0 and again_revoked.stderr.startswith("error: NOT_FOUND")
    down = tf(fleet_dir, "down")
    assert down.returncode == 0 and "stopped" in down.stdout


def test_cli_failure_is_one_line_and_non_zero(fleet_dir: Path) -> None:
    assert tf(fleet_dir, "up", "--no-serve", "--shards", "1").returncode == 0
    missing = tf(fleet_dir, "tenants", "show", "nobody")
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == ["error: TENANT_NOT_FOUND: no tenant with code nobody"]
    bad = tf(fleet_dir, "tenants", "create", 'x"; DROP SCHEMA public; --')
    assert bad.returncode == 2 and bad.stderr.startswith("error: VALIDATION_FAILED")


def test_cli_without_a_fleet_says_how_to_get_one(fleet_dir: Path) -> None:
    res = tf(fleet_dir, "tenants", "list")
    assert res.returncode != 0 and "make up" in res.stderr


async def test_fleet_restart_keeps_every_tenant(fleet_dir: Path) -> None:
    fleet = EmbeddedFleet(fleet_dir, shards=2, tuned_for_tests=True)
    info = fleet.start()
    settings = Settings.load(environ={}, control_dsn=info.control_dsn, redis_url=info.redis_url)
    async with open_runtime(settings) as rt:
        for shard_id, dsn in info.shard_dsns.items():
            await rt.directory.add_shard(shard_id, dsn)
        before = [await rt.directory.create_tenant(f"keep-{i}") for i in range(20)]
    fleet.stop()
    again = EmbeddedFleet(fleet_dir)
    info2 = again.start()
    assert info2.control_dsn == info.control_dsn  # same ports after a restart
    async with open_runtime(settings) as rt:
        after = await rt.directory.list_tenants(limit=100)
        assert {t.tenant_id for t in after} == {t.tenant_id for t in before}
        for t in before:
            pool = await rt.shard_pools.get(t.shard_id)
            assert await pool.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", t.schema) == 1


async def test_embedded_servers_refuse_a_connection_without_the_password(fleet_dir: Path) -> None:
    fleet = EmbeddedFleet(fleet_dir, shards=1, tuned_for_tests=True)
    info = fleet.start()
    for path in (fleet_dir / "pg.password", fleet_dir / "fleet.json"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    password = (fleet_dir / "pg.password").read_text().strip()
    assert len(password) >= 24 and f":{password}@" in info.control_dsn
    for dsn in (info.control_dsn, *info.shard_dsns.values()):
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):  # what another local user would try
            await asyncpg.connect(dsn.replace(f":{password}@", "@"))
        socket_dir = fleet.control.sockdir if dsn == info.control_dsn else fleet.shard_servers[0].sockdir
        port = int(dsn.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(asyncpg.InvalidPasswordError):  # the Unix socket doesn't trust either
            await asyncpg.connect(host=str(socket_dir), port=port, user="postgres", database="postgres")


async def test_a_fleet_made_before_passwords_gets_one_on_its_next_start(fleet_dir: Path) -> None:
    fleet = EmbeddedFleet(fleet_dir, shards=1, tuned_for_tests=True)
    info = fleet.start()
    for server in fleet.pg_servers:  # turn it into what older versions made: trust, no password
        conn = await asyncpg.connect(server.dsn())
        await conn.execute("ALTER ROLE postgres PASSWORD NULL")
        await conn.close()
        server.hba.write_text(server.hba.read_text().replace("scram-sha-256", "trust"))
    fleet.stop()
    (fleet_dir / "pg.password").unlink()
    old_dsn = info.control_dsn.replace(f":{fleet.password}@", "@")
    again = EmbeddedFleet(fleet_dir)
    info2 = again.start()
    assert again.password != fleet.password and f":{again.password}@" in info2.control_dsn
    conn = await asyncpg.connect(info2.control_dsn)
    await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(old_dsn)


def test_up_refuses_to_shrink_a_fleet_and_changes_nothing(fleet_dir: Path) -> None:
    """`up --shards 2` on a 3-shard fleet used to forget shard3's port (its tenants unreachable)."""
    fleet_dir.mkdir(parents=True)
    state = {"ports": {"control": 1, "shard1": 2, "shard2": 3, "shard3": 4, "valkey": 5}, "info": {}}
    (fleet_dir / "fleet.json").write_bytes(orjson.dumps(state))
    res = tf(fleet_dir, "up", "--no-serve", "--shards", "2")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: FLEET_ERROR: ") and "--shards 3" in lines[0], res.stderr
    assert orjson.loads((fleet_dir / "fleet.json").read_bytes()) == state
    (fleet_dir / "fleet.json").unlink()  # nothing was started: nothing for the fixture to stop


def test_up_grows_the_fleet_and_drain_moves_every_tenant_off_a_shard(fleet_dir: Path) -> None:
    """The tour's "add a shard, then even out": `up --shards 3` on a 2-shard fleet starts and
    registers a third server; once the plugins' public migrations reach it, `drain shard1`
    moves the demo tenants off shard1 and they keep resolving."""
    assert tf(fleet_dir, "up", "--no-serve", "--shards", "2").returncode == 0
    grown = tf(fleet_dir, "up", "--no-serve", "--shards", "3")
    assert grown.returncode == 0, grown.stderr
    shards = orjson.loads(tf(fleet_dir, "--json", "shards", "list").stdout)
    assert [s["shardId"] for s in shards] == ["shard1", "shard2", "shard3"]
    behind = tf(fleet_dir, "drain", "shard1", "--plan")
    assert behind.returncode == 0, behind.stderr  # a plan changes nothing
    for plugin in ("inventory", "restock"):
        applied = tf(fleet_dir, "migrate", "apply", plugin)
        assert applied.returncode == 0, applied.stderr
    drained = tf(fleet_dir, "--json", "drain", "shard1")
    assert drained.returncode == 0, drained.stderr
    report = orjson.loads(drained.stdout)
    assert report["remaining"] == 0 and report["failed"] == 0
    tenants = orjson.loads(tf(fleet_dir, "--json", "tenants", "list").stdout)
    assert {t["code"] for t in tenants} == {"acme", "globex"}
    assert all(t["shardId"] != "shard1" for t in tenants)
    states = {s["shardId"]: s["state"] for s in orjson.loads(tf(fleet_dir, "--json", "shards", "list").stdout)}
    assert states["shard1"] == "draining"
    shown = tf(fleet_dir, "--json", "move", "status")
    assert shown.returncode == 0 and all(m["phase"] == "done" for m in orjson.loads(shown.stdout))
    assert tf(fleet_dir, "down").returncode == 0
