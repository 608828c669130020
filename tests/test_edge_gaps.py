"""The edge's last gaps (issue 8): keys that must differ, what a tenant's key may learn about
other tenants, HEAD on plugin routes, integers JSON can't keep, media types, and malformed
HTTP that aiohttp's parser refuses before any middleware."""
from __future__ import annotations

import asyncio
import logging
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
from tests.hostkit import ADMIN_KEY, Host, auth, code, exchange, raw_request, tenant_with_key
from tests.test_edge import RADMIN, ROUTER_ADMIN, host, http, router  # noqa: F401  (module fixtures: one router, one host)

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

async def test_head_on_a_plugin_get_route_answers_like_get_without_a_body(host: Host, fleet: Fleet) -> None:
    rec, key = await tenant_with_key(fleet, host)
    async with host.http.post("/api/plugins/inventory/items", json={"sku": "head-1", "qty": 2},
                              headers=auth(key, rec.code)) as r:
        assert r.status == 201
    who = (f"Authorization: Bearer {key}", f"X-Tenant: {rec.code}")
    status, headers, body = await exchange(host.url, raw_request("GET", "/api/plugins/inventory/items", *who))
    assert status == 200 and b"head-1" in body
    h_status, h_headers, h_body = await exchange(host.url, raw_request("HEAD", "/api/plugins/inventory/items", *who))
    assert (h_status, h_body) == (200, b"")
    assert h_headers["content-type"] == headers["content-type"] and "x-request-id" in h_headers
    # the gate runs for HEAD as for GET: no key, no answer but 401 (and still no body)
    status, headers, body = await exchange(host.url, raw_request("HEAD", "/api/plugins/inventory/items",
                                                               f"X-Tenant: {rec.code}"))
    assert (status, body) == (401, b"") and headers["www-authenticate"].startswith("Bearer")
    # a method the route doesn't serve: 405 whose Allow names HEAD with GET
    async with host.http.delete("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
        assert r.status == 405 and {"GET", "HEAD", "POST"} <= set(r.headers["Allow"].split(", "))


# --- integers JSON can't keep -------------------------------------------------------------------

@pytest.mark.parametrize(("body", "field"), [
    (b'{"k": 9223372036854775808}', "k"), (b'{"k": {"x": [1, -9223372036854775809]}}', "k.x[1]"),
    (b'{"a": 1, "k": 18446744073709551616}', "k"), (b'{"k": ' + b"9" * 400 + b"}", "k")])
async def test_an_integer_outside_int64_in_a_stored_body_is_400_naming_the_field_and_changes_nothing(
        host: Host, fleet: Fleet, body: bytes, field: str) -> None:
    rec, _ = await tenant_with_key(fleet, host)
    path = f"/admin/tenants/{rec.code}/plugins/inventory/config"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    async with host.http.put(path, data=body, headers=admin) as r:
        err = (await r.json())["error"]
        assert (r.status, err["code"], err["field"]) == (400, "VALIDATION_FAILED", field), err
    assert await host.admin("GET", path) == {}
    # the edges of the range and long digits in a string are kept exactly
    exact = (b'{"max": 9223372036854775807, "min": -9223372036854775808, "f": 0.5,'
             b' "s": "123456789012345678901234567890"}')
    async with host.http.put(path, data=exact, headers=admin) as r:
        assert r.status == 200
    assert await host.admin("GET", path) == {"max": 2**63 - 1, "min": -(2**63), "f": 0.5,
                                             "s": "123456789012345678901234567890"}


async def test_an_integer_outside_int64_is_refused_by_the_router_and_plugin_routes_too(
        router: str, host: Host, fleet: Fleet, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{router}/v1/shards", data=b'{"shardId": "s9", "dsn": "x", "capacity": 1' + b"0" * 20 + b"}",
                         headers={**RADMIN, "Content-Type": "application/json"}) as r:
        assert (r.status, (await r.json())["error"]["field"]) == (400, "capacity")
    rec, key = await tenant_with_key(fleet, host)
    async with host.http.post("/api/plugins/inventory/items", data=b'{"sku": "big", "qty": 99999999999999999999}',
                              headers={**auth(key, rec.code), "Content-Type": "application/json"}) as r:
        assert (r.status, (await r.json())["error"]["field"]) == (400, "qty")


# --- media types --------------------------------------------------------------------------------

@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain", "application/xml",
                                   "multipart/form-data; boundary=x", "application/octet-stream"])
async def test_a_body_that_is_not_json_by_its_content_type_is_415_on_both_services(
        router: str, host: Host, fleet: Fleet, http: aiohttp.ClientSession, ctype: str) -> None:
    c = code()
    rec, key = await tenant_with_key(fleet, host)
    for url, headers in ((f"{router}/v1/tenants", RADMIN),
                         (f"{host.url}/admin/principals", {"Authorization": f"Bearer {ADMIN_KEY}"}),
                         (f"{host.url}/api/plugins/inventory/items", auth(key, rec.code))):
        body = orjson.dumps({"code": c, "tenant": rec.code, "name": c, "sku": c, "qty": 1})
        async with http.post(url, data=body, headers={**headers, "Content-Type": ctype}) as r:
            err = (await r.json())["error"]
            assert (r.status, err["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE"), (url, err)
            assert "application/json" in err["message"] and r.headers["X-Request-Id"] == err["requestId"]
    assert await fleet.control.fetchval("SELECT count(*) FROM tenants WHERE code = $1", c) == 0
    async with host.http.get("/api/plugins/inventory/items", headers=auth(key, rec.code)) as r:
        assert (await r.json())["items"] == []


@pytest.mark.parametrize("ctype", ["application/json", "Application/JSON; charset=utf-8",
                                   "application/merge-patch+json", None])
async def test_json_and_plus_json_media_types_and_none_at_all_are_read(
        router: str, http: aiohttp.ClientSession, ctype: str | None) -> None:
    headers = RADMIN if ctype is None else {**RADMIN, "Content-Type": ctype}
    c = code()
    # a body without Content-Type: aiohttp's client would add one for bytes, so over a raw socket
    body = orjson.dumps({"code": c})
    status, _, rest = await exchange(router, (
        f"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + body)
    assert status == 201, rest


# --- what aiohttp's HTTP parser refuses ---------------------------------------------------------

MALFORMED = {
    "unknown method": b"FOO /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "raw non-ASCII in the path": b"GET /caf\xc3\xa9\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    "broken chunked encoding": (b"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    "no Host on HTTP/1.1": b"GET /healthz HTTP/1.1\r\n\r\n",
    "request line over the parser's limit": b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header over the parser's limit": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
    "Content-Length with chunked": (b"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "TLS on the HTTP port": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_what_the_http_parser_refuses_gets_the_envelope_and_an_info_line_without_a_traceback_on_both_services(
        router: str, host: Host, caplog: pytest.LogCaptureFixture, case: str) -> None:
    for url in (router, host.url):
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            status, headers, rest = await exchange(url, MALFORMED[case])
        err = orjson.loads(rest)["error"]
        assert (status, err["code"]) == (400, "BAD_REQUEST"), (url, err)
        assert headers["content-type"].startswith("application/json") and headers["x-request-id"] == err["requestId"]
        assert err["message"].startswith("malformed HTTP request: ") and "\\x" not in err["message"]
        lines = [r for r in caplog.records if r.name == "tenantfleet.http" and "malformed" in r.getMessage()]
        assert [(r.levelno, r.exc_info) for r in lines] == [(logging.INFO, None)], caplog.text
        assert getattr(lines[0], "requestId") == err["requestId"]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text


async def test_a_broken_chunk_after_the_headers_gets_the_envelope_too(router: str) -> None:
    """Sent after the headers, the parser's error for a broken chunk is queued behind the
    request it belongs to (aiohttp does not fail that request's body), so the handler's
    body read ends it: 408 at the body deadline, in the envelope (README, Status). If both
    writes reach the server as one segment, the parser refuses the whole request: 400."""
    u = urlsplit(router)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(f"POST /v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ROUTER_ADMIN}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n".encode())
        await writer.drain()
        writer.write(b"zz\r\n{}\r\n0\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    first = rest[:rest.index(b"}}") + 2]  # the first answer (a 408 may be followed by the queued 400)
    assert (status, orjson.loads(first)["error"]["code"]) in ((408, "REQUEST_TIMEOUT"), (400, "BAD_REQUEST")), data
