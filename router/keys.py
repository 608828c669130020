"""Router constants: Redis keys and channels, advisory lock ids, validation patterns."""
from __future__ import annotations

import re
from typing import Final

# Redis keys live under the configured namespace (TENANTFLEET_REDIS_NAMESPACE, default "tf"),
# so several fleets can share one Redis.
def redis_tenant_key(ns: str, tenant_id: str) -> str:
    """<ns>:t:<tenant_id> -> orjson TenantRecord"""
    return f"{ns}:t:{tenant_id}"


def redis_alias_key(ns: str, kind: str, value: str) -> str:
    """<ns>:a:<code|domain>:<value> -> tenant_id"""
    return f"{ns}:a:{kind}:{value}"


def invalidation_channel(ns: str) -> str:
    return f"{ns}:invalidate"


# pg_advisory_xact_lock key that serialises placement decisions on the control plane
PLACEMENT_LOCK: Final = 0x7466_706C_6163_6501  # "tfplace\x01"

CODE_RE: Final = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
DOMAIN_RE: Final = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
SHARD_ID_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
SCHEMA_RE: Final = re.compile(r"^t_[0-9a-f]{32}$")

TENANT_STATES: Final = ("provisioning", "active", "moving", "suspended", "deleting")
SHARD_STATES: Final = ("active", "draining", "readonly", "offline")
