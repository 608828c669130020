"""Host test plumbing: a running host on 127.0.0.1:0, an HTTP session, tenant provisioning."""
from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web

from host.app import serving
from router.models import TenantRecord
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
