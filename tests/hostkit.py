"""Host test plumbing: a running host on 127.0.0.1:0, an HTTP session, tenant provisioning,
raw HTTP exchanges (bytes no client library re-encodes)."""
from __future__ import annotations

import asyncio
import importlib
import sys
import textwrap
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from host.app import serving
from host.metrics import HostMetrics
from host.runtime import RUNTIME, HostRuntime
from host.tx import TenantTx, keep_connection
from router.client import ResolveClient
from router.keys import APP_ROLE, SCHEMA_RE
from router.models import TenantRecord
from router.pools import ShardPools
from router.settings import Settings
from shard_migrations.packages import Discovery, discover, load_package
from tests.fleetkit import Fleet

ADMIN_KEY = "test-admin-key-" + "x" * 16


def host_settings(fleet: Fleet, **overrides: Any) -> Settings:
    return fleet.settings.model_copy(update={"admin_key": ADMIN_KEY, "shard_pool_max": 4, **overrides})


@dataclass
class Host:
    app: web.Application
    url: str
    http: aiohttp.ClientSession

    async def admin(self, method: str, path: str, json: Any = None) -> Any:
        async with self.http.request(method, path, json=json,
                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
            body = await resp.json()
            assert resp.status < 300, (resp.status, body)
            return body


@asynccontextmanager
async def running_host(settings: Settings, discovery: Discovery | None = None) -> AsyncIterator[Host]:
    async with serving(settings, host="127.0.0.1", port=0, discovery=discovery) as (app, url):
        async with aiohttp.ClientSession(base_url=url) as http:
            yield Host(app, url, http)


def code() -> str:
    return "h-" + uuid.uuid4().hex[:10]


async def tenant_with_key(fleet: Fleet, host: Host, *, roles: tuple[str, ...] = ("INVENTORY_MANAGER",),
                          plugins: tuple[str, ...] = ("inventory",), shard_id: str | None = None,
                          enable_global: bool = True) -> tuple[TenantRecord, str]:
    """A new tenant with ``plugins`` enabled, roles from the templates, and a key holding ``roles``."""
    c = code()
    rec = await fleet.directory.create_tenant(c, [f"{c}.example.com"], shard_id=shard_id)
    for pid in plugins:
        if enable_global:
            await host.admin("POST", f"/admin/plugins/{pid}/enable")
        await host.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/{pid}/enable")
    for role in roles:
        pid = "inventory" if role.startswith("INVENTORY") else "restock"
        await host.admin("POST", f"/admin/tenants/{rec.tenant_id}/plugins/{pid}/role-templates/{role}/apply")
    created = await host.admin("POST", "/admin/principals", {"tenant": rec.code, "name": "tester", "roles": list(roles)})
    return rec, created["apiKey"]


def auth(key: str, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-Tenant": tenant}


def plugin_package(tmp_path: Path, source: str, *, api: str = "1.x", version: str = "1.0.0",
                   extra_files: dict[str, str] | None = None) -> tuple[str, Any]:
    """Write a plugin package of the test's own under tmp_path and load it; (id, PluginPackage)."""
    pid = "tp_" + uuid.uuid4().hex[:8]
    pkg_dir = tmp_path / pid
    pkg_dir.mkdir()
    (pkg_dir / "__init__.py").write_text(
        f'meta = {{"id": "{pid}", "version": "{version}", "api": "{api}"}}\n' + textwrap.dedent(source))
    for name, text in (extra_files or {}).items():
        (pkg_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg_dir / name).write_text(text)
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.invalidate_caches()
        return pid, load_package(importlib.import_module(pid))  # unique name: never collides in sys.modules
    finally:
        sys.path.remove(str(tmp_path))


def discovery_with(*packages: Any) -> Discovery:
    """The built-in plugins plus the test's own packages."""
    d = discover()
    for pkg in packages:
        d.plugins[pkg.id] = pkg
    return d


def raw_request(method: str, path: str, *headers: bytes | str) -> bytes:
    """An HTTP/1.1 request head (``Connection: close``, no body) with ``headers`` as given."""
    lines = b"".join((h if isinstance(h, bytes) else h.encode()) + b"\r\n" for h in headers)
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + lines + b"\r\n"


async def exchange(url: str, request: bytes, *, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` bytes as they are (Connection: close); status, headers (lower-case
    names), and every byte after the head."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


def runtime(host: Host) -> HostRuntime:
    return host.app[RUNTIME]


def qualified(rec: TenantRecord, table: str) -> str:
    """``"t_<hex>".<table>``: test-only SQL naming a tenant's table on purpose; the schema
    name is the system's own (checked), the table a constant of the test."""
    assert SCHEMA_RE.match(rec.schema)
    return f'"{rec.schema}".{table}'


async def request_path_tx(fleet: Fleet, stack: AsyncExitStack, *, owner: bool = False,
                          settings: Settings | None = None) -> TenantTx:
    """A `TenantTx` of the test's own, built as the host builds its own: connections switched
    once to the app role, no reset between transactions, logged in as the shard's login role
    (with ``owner``, as the shard's owner instead). One connection per shard unless
    ``settings`` say otherwise. Closed with ``stack``."""
    settings = settings or fleet.settings.model_copy(update={"shard_pool_min": 1, "shard_pool_max": 1})
    dsn_of = fleet.directory.dsn_of if owner else fleet.directory.login_dsn_of
    pools = await stack.enter_async_context(ShardPools(settings, dsn_of, role=APP_ROLE, reset=keep_connection))
    resolver = await stack.enter_async_context(ResolveClient(settings, fleet.directory.lookup))
    return await stack.enter_async_context(TenantTx(settings, resolver, pools, HostMetrics()))
