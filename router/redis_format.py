"""How a tenant record is stored at the Redis level of the resolve cache.

One line of ASCII fields separated by single spaces (issue 12: Redis holds every tenant of
a 100k-tenant fleet, so each byte counts; this and the 16-byte keys of `router.keys`
took MEMORY USAGE from ~500 to under 300 bytes per tenant):

    <epoch> <state> <shard_id> <schema or -> <code> [<domain> ...]

The tenant id is the record key's (and each alias's) 16 bytes, so it is not repeated;
the schema is ``-`` when it is the one the directory names every tenant's (``t_`` + the
id's hex). The epoch comes first so the write script (`SET_IF_NEWER_LUA`) reads it with
one pattern. No field can hold a space: states are constants, shard ids, codes,
domains and schema names are validated before they reach a record.

The shard id and state are interned when a record is decoded: a few distinct values
shared by every cached tenant instead of one copy each (the in-process level holds
those records).
"""
from __future__ import annotations

import sys

from router.models import TenantRecord


def encode_record(rec: TenantRecord) -> bytes:
    """The Redis value of ``rec``."""
    schema = "-" if rec.schema == derived_schema(rec.tenant_id) else rec.schema
    return " ".join((str(rec.epoch), rec.state, rec.shard_id, schema, rec.code, *rec.domains)).encode()


def decode_record(tenant_id: str | bytes, raw: bytes) -> TenantRecord:
    """The record ``encode_record`` wrote for ``tenant_id`` (its text or its 16 bytes).

    Raises ValueError for a value that is not one."""
    if isinstance(tenant_id, bytes):
        if len(tenant_id) != 16:
            raise ValueError("a tenant id is 16 bytes")
        h = tenant_id.hex()
        tid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"  # str(uuid.UUID(bytes=...)), 5x faster
    else:
        tid = tenant_id
    epoch, state, shard_id, schema, code, *domains = raw.decode("ascii").split(" ")
    return TenantRecord(tenant_id=tid, code=code, schema=derived_schema(tid) if schema == "-" else schema,
                        shard_id=sys.intern(shard_id), state=sys.intern(state), epoch=int(epoch),
                        domains=tuple(domains))


def derived_schema(tenant_id: str) -> str:
    """The schema the directory names a tenant's: ``t_`` + the id's 32 hex digits (ids are
    canonical here: lower case, 8-4-4-4-12)."""
    return "t_" + tenant_id.replace("-", "")
