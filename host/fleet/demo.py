"""The demo data `tenantfleet up` ensures: shards registered, two tenants, the admin and read keys."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from router.errors import TenantNotFound
from router.models import TenantRecord
from router.pools import redact
from router.runtime import ADMIN_KEY_FILE, READ_KEY_FILE, RouterRuntime, fleet_key

DEMO_TENANTS = (("acme", "acme.example.com"), ("globex", "globex.example.com"))


@dataclass
class DemoInfo:
    admin_key: str
    read_key: str
    tenants: list[TenantRecord] = field(default_factory=list)
    api_keys: dict[str, str] = field(default_factory=dict)   # tenant code -> bearer key


def admin_key_for(fleet_dir: Path, configured: str) -> str:
    """The configured admin key, else one generated once and kept in <fleet_dir>/admin.key (0600)."""
    return fleet_key(fleet_dir, ADMIN_KEY_FILE, configured, create=True)


def read_key_for(fleet_dir: Path, configured: str) -> str:
    """The configured read key (the router's reads), else one generated once and kept in
    <fleet_dir>/read.key (0600)."""
    return fleet_key(fleet_dir, READ_KEY_FILE, configured, create=True)


def load_demo_keys(fleet_dir: Path) -> dict[str, str]:
    """The demo tenants' API keys `up` created before ({code: key}); keys are stored hashed
    in the control plane, so this dev-only file (0600) is the one place they can be shown."""
    path = fleet_dir / "demo-keys.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {str(k): str(v) for k, v in data.items()}


def save_demo_keys(fleet_dir: Path, keys: dict[str, str]) -> None:
    path = fleet_dir / "demo-keys.json"
    fleet_dir.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(keys, indent=2) + "\n")


async def ensure_shards(rt: RouterRuntime, shard_dsns: dict[str, str]) -> None:
    """Register every shard not registered yet (idempotent).

    A shard registered with the same server, user and database but another password (an
    embedded fleet made before its servers had passwords) gets the new DSN first."""
    known = {s.shard_id: s.dsn for s in await rt.directory.list_shards()}
    for shard_id, dsn in shard_dsns.items():
        stored = known.get(shard_id)
        if stored is not None and stored != dsn and redact(stored) == redact(dsn):
            await rt.directory.replace_shard_password(shard_id, dsn)
    await rt.directory.prepare_shards()
    for shard_id, dsn in shard_dsns.items():
        if shard_id not in known:
            await rt.directory.add_shard(shard_id, dsn)


async def ensure_demo_tenants(rt: RouterRuntime) -> list[TenantRecord]:
    out: list[TenantRecord] = []
    for code, domain in DEMO_TENANTS:
        try:
            out.append(await rt.directory.get(code=code))
        except TenantNotFound:
            out.append(await rt.directory.create_tenant(code, [domain]))
    return out
