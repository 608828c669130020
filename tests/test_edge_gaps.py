"""The edge's last gaps (issue 8): keys that must differ, what a tenant's key may learn about
other tenants, HEAD on plugin routes, integers JSON can't keep, media types, and malformed
HTTP that aiohttp's parser refuses before any middleware."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import uuid

import aiohttp
import orjson
import pytest

from router.errors import ConfigInvalid
from router.runtime import ADMIN_KEY_FILE, READ_KEY_FILE, effective_settings, fleet_key
from router.settings import Settings
from tests.fleetkit import Fleet
from tests.hostkit import Host, auth, tenant_with_key
from tests.test_edge import host, http, router  # noqa: F401  (module fixtures: one router, one host)

ROOT = Path(__file__).resolve().parent.parent


# --- the read key is not the admin key ----------------------------------------------------------

def test_a_read_key_equal_to_the_admin_key_is_refused_when_settings_are_loaded(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid, match="READ_KEY is the admin key"):
        Settings.load(environ={"TENANTFLEET_ADMIN_KEY": "same-key", "TENANTFLEET_READ_KEY": "same-key"})
    Settings.load(environ={"TENANTFLEET_ADMIN_KEY": "one-key", "TENANTFLEET_READ_KEY": "another-key"})
    # the embedded fleet's read.key file, equal to a configured admin key: refused when filled in
    fleet_dir = tmp_path / "fleet"
    read = fleet_key(fleet_dir, READ_KEY_FILE, "", create=True)
    fleet_key(fleet_dir, ADMIN_KEY_FILE, "", create=True)
    (fleet_dir / "fleet.json").write_text(orjson.dumps({"info": {"control_dsn": "postgresql://x@127.0.0.1:1/x",
                                                                 "redis_url": "redis://127.0.0.1:1"}}).decode())
    with pytest.raises(ConfigInvalid, match="READ_KEY is the admin key"):
        effective_settings(Settings.load(environ={}, fleet_dir=fleet_dir, admin_key=read))
    with pytest.raises(ConfigInvalid, match="READ_KEY is the admin key"):  # external servers too
        effective_settings(Settings.load(environ={}, control_dsn="postgresql://x@127.0.0.1:1/x").model_copy(
            update={"admin_key": "k", "read_key": "k"}))


@pytest.mark.parametrize("command", [["router", "serve", "--port", "0"], ["serve", "--port", "0"]])
def test_a_service_started_with_the_read_key_equal_to_the_admin_key_says_so_in_one_line(
        tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLEET_")}
    env.update(TENANTFLEET_FLEET_DIR=str(tmp_path / "fleet"), TENANTFLEET_ADMIN_KEY="same-key",
               TENANTFLEET_READ_KEY="same-key")
    proc = subprocess.run([sys.executable, "-m", "host.cli", *command], env=env, cwd=str(ROOT),
                          capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: CONFIG_INVALID: "), err
    assert "READ_KEY is the admin key" in err


# --- a tenant's key learns nothing about other tenants ------------------------------------------

async def test_a_tenant_key_naming_another_tenant_gets_the_same_403_whether_it_exists_or_not(
        host: Host, fleet: Fleet) -> None:
    mine, key = await tenant_with_key(fleet, host)
    other, _ = await tenant_with_key(fleet, host)
    answers = []
    for path in ("/api/plugins/inventory/items", "/api/manifest"):
        for name in (other.code, other.tenant_id, "no-such-tenant", str(uuid.uuid4())):
            async with host.http.get(path, headers=auth(key, name)) as r:
                body = await r.json()
                answers.append((r.status, body["error"]["code"], body["error"]["message"], sorted(body["error"])))
        async with host.http.get(path, headers={"Authorization": f"Bearer {key}", "Host": "nowhere.example.com"}) as r:
            assert r.status == 403, path  # an unknown domain too
        async with host.http.get(path, headers=auth(key, mine.code)) as r:
            assert r.status == 200, path
    assert {a[:2] for a in answers} == {(403, "FORBIDDEN")}, answers
    assert len(set(map(str, answers))) == 1, answers  # word for word: no tenant id, nothing to tell them apart

