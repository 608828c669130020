"""Router constants: Redis keys and channels, advisory lock ids, validation patterns."""
from __future__ import annotations

import re
import uuid
from typing import Final

# The version of tenantfleet's own tables (router/tables.py declares them): bumped with
# every change there and in `router.schema`'s shard preparation; `tenantfleet_schema` on
# the control plane and `fleet.tenantfleet_schema` on a shard record what each has, and code
# refuses to prepare a database whose recorded version is newer than this (4: the floor).
# Here, not in router.tables, so that checking it doesn't load SQLAlchemy.
SCHEMA_VERSION: Final = 7  # 7: app shell sessions (Alembic revision 0007); 6: console sessions and audit log (Alembic revision 0006); 5: tenant moves (tenant_moves, fleet.move_markers, fleet.retired_schemas), shards.tenant_count + hot-path indexes

# Redis keys live under the configured namespace (TENANTFLEET_REDIS_NAMESPACE, default "tf"),
# so several fleets can share one Redis. The layout is compact (issue 12: at most 300
# bytes of Redis per cached tenant at 100k tenants): the record under the tenant id's 16
# raw bytes, each alias holding those 16 bytes, the record itself `router.redis_format`.
def redis_tenant_key(ns: str, tenant_id: str) -> bytes:
    """<ns>:r:<the tenant id's 16 bytes> -> `router.redis_format.encode_record`"""
    return redis_tenant_prefix(ns) + uuid.UUID(tenant_id).bytes


def redis_tenant_prefix(ns: str) -> bytes:
    """What every record key starts with (the alias script appends the id it finds)."""
    return f"{ns}:r:".encode()


def redis_alias_key(ns: str, kind: str, value: str) -> str:
    """<ns>:c:<code> or <ns>:d:<domain> -> the tenant id's 16 bytes"""
    return f"{ns}:{_ALIAS_TAG[kind]}:{value}"


_ALIAS_TAG: Final = {"code": "c", "domain": "d"}


def invalidation_channel(ns: str) -> str:
    return f"{ns}:invalidate"


# pg_advisory_xact_lock key that serialises placement decisions on the control plane
PLACEMENT_LOCK: Final = 0x7466_706C_6163_6501  # "tfplace\x01"

CODE_RE: Final = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
DOMAIN_RE: Final = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
SHARD_ID_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
SCHEMA_RE: Final = re.compile(r"^t_[0-9a-f]{32}$")

# Serialises the set-up of one shard database's fleet schema and roles (two processes
# preparing a shard at once, a tenant schema made while a shard catches up).
BOOTSTRAP_LOCK: Final = 0x7466_626F_6F74_0001  # "tfboot\x00\x01"

# The NOLOGIN role the host's request path switches to once per connection on every
# shard (least privilege, CVE-2018-1058): it runs the fence and holds no right on any
# tenant schema or on public; inside each tenant transaction the fence switches on to
# that tenant's own role (`tenant_role`), a member of the group `tenant_group_role`
# (read on public). No CREATE anywhere. Roles are cluster-wide, so fleets sharing a
# server share these names; that grants nothing across databases (privileges are per
# object, and a NOLOGIN role can't open a connection). Created by
# `router.schema.ensure_shard`; at most 28 characters (a tenant role adds 35).
APP_ROLE: Final = "tenantfleet_app"


def tenant_group_role(app_role: str = APP_ROLE) -> str:
    """The NOLOGIN group role every tenant role of ``app_role``'s family is a member of
    (mirrors ``fleet.tenant_group_role()``)."""
    return f"{app_role}_tenants"


def tenant_role(schema_name: str, app_role: str = APP_ROLE) -> str:
    """The role a tenant's transactions run as: ``<app_role>_t_<32 hex>`` from the
    system-made schema name, never from user text (mirrors ``fleet.tenant_role(schema)``)."""
    if not SCHEMA_RE.match(schema_name):
        raise ValueError(f"not a tenant schema name: {schema_name!r}")
    return f"{app_role}_{schema_name}"


TENANT_STATES: Final = ("provisioning", "active", "moving", "suspended", "deleting")
SHARD_STATES: Final = ("active", "draining", "readonly", "offline")


# --- resolve client (router/client.py) -------------------------------------------------
# Redis is a cache: a call that can't finish quickly is worth less than going straight to
# the control plane, so timeouts are short and a failure opens a breaker for a while.
REDIS_SOCKET_TIMEOUT_S: Final = 0.25
REDIS_CONNECT_TIMEOUT_S: Final = 0.25
REDIS_MAX_CONNECTIONS: Final = 64          # per client: Redis calls in flight (and sockets) at most
REDIS_BREAKER_S: Final = 1.0               # after a Redis failure, skip Redis this long, then probe once
LISTENER_POLL_S: Final = 1.0               # pub/sub read timeout; the loop just reads again
LISTENER_RETRY_S: Final = 0.1              # first reconnect delay of the invalidation listener ...
LISTENER_RETRY_MAX_S: Final = 2.0          # ... doubling up to this
LISTENER_READY_S: Final = 1.0              # how long opening a client waits for its first subscribe

# Write a record (KEYS[1]) and its alias keys (KEYS[2..]) unless Redis already holds a
# newer epoch for that tenant. ARGV: epoch, the encoded record (it starts with its epoch
# and a space), ttl seconds, the tenant id's 16 bytes. Returns 1 if written, 0 if
# refused. A value Redis can't read an epoch from is overwritten.
SET_IF_NEWER_LUA: Final = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local held = tonumber(string.match(cur, '^(%d+) '))
  if held ~= nil and held > tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[4], 'EX', ARGV[3])
end
return 1
"""

# Follow an alias (KEYS[1] -> the tenant id's 16 bytes) to its record in one round trip:
# returns {id, record} ({id, false} if the record is gone), or false. ARGV[1] is the
# record key prefix (redis_tenant_prefix(ns)). The record key is derived inside the
# script, which a single Redis/Valkey server allows (Redis Cluster would not).
GET_BY_ALIAS_LUA: Final = """
local id = redis.call('GET', KEYS[1])
if not id then return false end
return {id, redis.call('GET', ARGV[1] .. id)}
"""
