"""Test-side fleet plumbing: servers started once per session, isolated fleets per test.

A "fleet" here is one control-plane database plus one database per shard server, all
created fresh on the session's servers (embedded by default; the servers named by
TENANTFLEET_TEST_EXTERNAL_PG / _REDIS for `make test-external`) and dropped afterwards.
"""
from __future__ import annotations

import asyncio
import re
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from host.fleet.embedded import EmbeddedFleet
from router.client import redis_address
from router.directory import Directory
from router.pools import ShardPools
from router.runtime import open_runtime
from router.settings import Settings

_DBNAME = re.compile(r"^tf_[0-9a-f]{12}_[a-z0-9]+$")


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@dataclass
class Servers:
    """The PostgreSQL servers and Redis the session runs against."""
    control_admin_dsn: str
    shard_admin_dsns: dict[str, str]      # shard_id -> admin DSN of the server that hosts it
    redis_host: str
    redis_port: int
    redis_db: int = 0
    embedded: EmbeddedFleet | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"


def start_servers(external_pg: str | None, external_redis: str | None) -> Servers:
    if external_pg:
        r = redis_address(external_redis or "redis://127.0.0.1:6379/15")
        return Servers(control_admin_dsn=external_pg,
                       shard_admin_dsns={f"shard{i}": external_pg for i in (1, 2, 3)},
                       redis_host=r["host"], redis_port=r["port"], redis_db=r["db"])
    root = Path(tempfile.mkdtemp(prefix="tenantfleet-test-"))
    root.chmod(0o755)
    fleet = EmbeddedFleet(root, shards=3, tuned_for_tests=True)
    info = fleet.start()
    return Servers(control_admin_dsn=info.control_dsn, shard_admin_dsns=dict(info.shard_dsns),
                   redis_host=info.redis_host, redis_port=info.redis_port, embedded=fleet)


async def create_database(admin_dsn: str, name: str) -> str:
    # Test-only: the name is generated here (tf_<hex>_<role>), checked, and CREATE DATABASE
    # takes no parameters, so it is quoted with the server's quote_ident.
    assert _DBNAME.match(name), name
    conn = await asyncpg.connect(admin_dsn)
    try:
        quoted = await conn.fetchval("SELECT quote_ident($1)", name)
        await conn.execute(f"CREATE DATABASE {quoted}")
    finally:
        await conn.close()
    return with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str) -> None:
    """Drop a test database, the tenant roles its schemas had and its login role (roles
    are cluster-wide and outlive databases); a role another database still grants rights
    to is kept."""
    assert _DBNAME.match(name), name
    conn = await asyncpg.connect(admin_dsn)
    try:
        quoted = await conn.fetchval("SELECT quote_ident($1)", name)
        roles = [*await conn.fetch(_TENANT_ROLES_OF_DB, name), *await conn.fetch(_LOGIN_ROLES_OF_DB, name)]
        await conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        for row in roles:
            try:
                await conn.execute(f"DROP ROLE IF EXISTS {row['quoted']}")
            except asyncpg.DependentObjectsStillExistError:
                pass  # another database (a fleet of its own) still uses it
    finally:
        await conn.close()


# tenant roles (<app role>_t_<32 hex>) holding rights in database $1 (pg_shdepend
# records every ACL entry naming a role, per database)
_TENANT_ROLES_OF_DB = """
SELECT DISTINCT quote_ident(a.rolname) AS quoted
FROM pg_shdepend d JOIN pg_database db ON db.oid = d.dbid JOIN pg_roles a ON a.oid = d.refobjid
WHERE db.datname = $1 AND d.refclassid = 'pg_authid'::regclass AND a.rolname ~ '_t_[0-9a-f]{32}$'
"""

# the request path's login role of database $1 (<app role>_login_<12 hex of md5(name)>);
# its memberships go with it
_LOGIN_ROLES_OF_DB = """
SELECT quote_ident(rolname) AS quoted FROM pg_roles WHERE rolname ~ ('_login_' || left(md5($1), 12) || '$')
"""


@dataclass
class Fleet:
    """An isolated fleet: its own control DB, one DB per shard server, its own Redis namespace."""
    servers: Servers
    settings: Settings
    control_dsn: str
    shard_dsns: dict[str, str]
    control: asyncpg.Pool
    shard_pools: ShardPools
    directory: Directory
    stack: AsyncExitStack = field(repr=False)

    def redis(self) -> aioredis.Redis:
        return aioredis.Redis(host=self.servers.redis_host, port=self.servers.redis_port, db=self.servers.redis_db)


async def open_fleet(servers: Servers, stack: AsyncExitStack, *, shards: int = 3, **overrides: Any) -> Fleet:
    """Create and bootstrap a fresh fleet (through `open_runtime`, as the CLI and services
    do); everything it opens is closed by ``stack``."""
    tag = uuid.uuid4().hex[:12]
    control_name = f"tf_{tag}_control"
    control_dsn = await create_database(servers.control_admin_dsn, control_name)
    stack.push_async_callback(drop_database, servers.control_admin_dsn, control_name)
    shard_dsns: dict[str, str] = {}
    for i, (shard_id, admin) in enumerate(list(servers.shard_admin_dsns.items())[:shards], start=1):
        name = f"tf_{tag}_s{i}"
        shard_dsns[shard_id] = await create_database(admin, name)
        stack.push_async_callback(drop_database, admin, name)
    settings = Settings.load(environ={}, control_dsn=control_dsn, redis_url=servers.redis_url,
                             redis_namespace=f"tf{tag}", **overrides)
    rt = await stack.enter_async_context(open_runtime(settings))
    for shard_id, dsn in shard_dsns.items():
        await rt.directory.add_shard(shard_id, dsn)
    return Fleet(servers, settings, control_dsn, shard_dsns, rt.control, rt.shard_pools, rt.directory, stack)


async def until(predicate: Callable[[], bool], *, timeout: float = 5.0, what: str = "the condition") -> None:
    """Wait until ``predicate()`` holds, polling; fail the test if it doesn't within ``timeout`` s.

    Tests wait for a state, never for a fixed time: a fixed sleep is too short on a loaded
    machine and too long everywhere else."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout} s"
        await asyncio.sleep(0.005)


async def serve_router(settings: Settings, stack: AsyncExitStack) -> str:
    """Run the router service on a free loopback port until ``stack`` closes; its base URL."""
    from router.service import listen, open_service

    app = await open_service(settings, stack)
    return f"http://127.0.0.1:{await listen(app, stack, '127.0.0.1', 0)}"


async def owner_fetchval(fleet: Fleet, shard_id: str, sql: str, *args: Any) -> Any:
    """One value read on a shard as its owner (the shard DSN), on a connection of its own."""
    owner = await asyncpg.connect(fleet.shard_dsns[shard_id])
    try:
        return await owner.fetchval(sql, *args)
    finally:
        await owner.close()
