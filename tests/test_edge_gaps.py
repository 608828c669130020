"""The edge's last gaps (issue 8): keys that must differ, what a tenant's key may learn about
other tenants, HEAD on plugin routes, integers JSON can't keep, media types, and malformed
HTTP that aiohttp's parser refuses before any middleware."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

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


# --- HEAD on plugin routes ----------------------------------------------------------------------

async def _exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """``request`` as raw bytes (Connection: close); status, headers, and every byte after the head."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


def _request(method: str, path: str, *headers: str) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + "".join(h + "\r\n" for h in headers)
            + "\r\n").encode()


async def test_head_on_a_plugin_get_route_answers_like_get_without_a_body(host: Host, fleet: Fleet) -> None:
    rec, key = await tenant_with_key(fleet, host)
    async with host.http.post("/api/plugins/inventory/items", json={"sku": "head-1", "qty": 2},
                              headers=auth(key, rec.code)) as r:
        assert r.status == 201
    who = (f"Authorization: Bearer {key}", f"X-Tenant: {rec.code}")
    status, headers, body = await _exchange(host.url, _request("GET", "/api/plugins/inventory/items", *who))
    assert status == 200 and b"head-1" in body
    h_status, h_headers, h_body = await _exchange(host.url, _request("HEAD", "/api/plugins/inventory/items", *who))
    assert (h_status, h_body) == (200, b"")
    assert h_headers["content-type"] == headers["content-type"] and "x-request-id" in h_headers
    # the gate runs for HEAD as for GET: no key, no answer but 401 (and still no body)
    status, headers, body = await _exchange(host.url, _request("HEAD", "/api/plugins/inventory/items",
                                                               f"X-Tenant: {rec.code}"))
    assert (status, body) == (401, b"") and headers["www-authenticate"].startswith("Bearer")
    # a method the route doesn't serve: 405 whose Allow names HEAD with GET
    async with host.http.delete("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
        assert r.status == 405 and {"GET", "HEAD", "POST"} <= set(r.headers["Allow"].split(", "))
