"""Directory records passed between the directory, the caches and the services."""
from __future__ import annotations

import re
import uuid
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Mapping

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from router.errors import ValidationFailed
from router.keys import CODE_RE, DOMAIN_RE, SHARD_ID_RE, SHARD_STATES, TENANT_STATES


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """Where a tenant lives, as of ``epoch``. Every directory change bumps the epoch.

    ``schema`` is the directory's name for every tenant's schema (``t_`` + the id's 32 hex
    digits) unless the record was made with another: then that one is kept. The usual name
    is computed when read, not stored (issue 12: the resolve cache holds 100k records, and
    that string was 83 of their bytes). So ``dataclasses.replace`` needs ``schema=``.
    """
    tenant_id: str
    code: str
    if TYPE_CHECKING:
        schema: str  # readable like a field: the property set below the class
    else:
        schema: InitVar[str]
    shard_id: str
    state: str
    epoch: int
    domains: tuple[str, ...] = ()
    other_schema: str | None = field(default=None, init=False, repr=False)  # None: the usual name

    def __post_init__(self, schema: str = "") -> None:
        if schema != "t_" + str(self.tenant_id).replace("-", ""):
            object.__setattr__(self, "other_schema", schema)

    def to_dict(self) -> dict[str, Any]:
        """The cache format (Redis entries): field names as they are, read back by `from_dict`."""
        return {"tenant_id": self.tenant_id, "code": self.code, "schema": self.schema, "shard_id": self.shard_id,
                "state": self.state, "epoch": self.epoch, "domains": list(self.domains)}

    def to_api(self) -> dict[str, Any]:
        """What the APIs and ``--json`` show (camelCase, as `TenantOut` documents)."""
        return {"tenantId": self.tenant_id, "code": self.code, "schemaName": self.schema, "shardId": self.shard_id,
                "state": self.state, "epoch": self.epoch, "domains": list(self.domains)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TenantRecord":
        return cls(tenant_id=str(d["tenant_id"]), code=d["code"], schema=d["schema"], shard_id=d["shard_id"],
                   state=d["state"], epoch=int(d["epoch"]), domains=tuple(d.get("domains") or ()))


def _schema_of(rec: TenantRecord) -> str:
    other = rec.other_schema
    return "t_" + str(rec.tenant_id).replace("-", "") if other is None else other


# Set after the class is made: a property in the class body would be taken as the InitVar's default.
setattr(TenantRecord, "schema", property(_schema_of))


@dataclass(frozen=True, slots=True)
class ShardRecord:
    shard_id: str
    dsn: str
    state: str
    capacity: int
    weight: int
    tenants: int = 0

    def to_api(self, *, with_dsn: bool = False) -> dict[str, Any]:
        """What the APIs and ``--json`` show (camelCase, as `ShardOut` documents); the DSN's
        password is redacted unless ``with_dsn``."""
        from router.pools import redact

        return {"shardId": self.shard_id, "dsn": self.dsn if with_dsn else redact(self.dsn), "state": self.state,
                "capacity": self.capacity, "weight": self.weight, "tenants": self.tenants}


UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_UUID_RE = re.compile(UUID_PATTERN)


def parse_tenant_id(value: str) -> str:
    """The canonical (lower-case) form of a UUID written 8-4-4-4-12, or VALIDATION_FAILED
    (no braces, ``urn:uuid:`` or bare hex: what the OpenAPI document's format says)."""
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise ValidationFailed("tenant id must be a UUID like 0f8fad5b-d9cb-469f-a165-70867728950e", field="id")
    return str(uuid.UUID(value))


def check_code(value: object) -> str:
    if not isinstance(value, str) or not CODE_RE.fullmatch(value):
        raise ValidationFailed(
            "tenant code must be 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit",
            field="code")
    return value


# A tenant's domains: enough for every real set-up (custom domains, aliases), few enough
# that one tenant can't bloat the directory, its cache entries and every resolve reply.
MAX_DOMAINS = 100


def check_domains(value: object) -> list[str]:
    """A list of at most `MAX_DOMAINS` DNS names, lower-cased, de-duplicated and sorted."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValidationFailed("domains must be a list of DNS names", field="domains")
    if len(value) > MAX_DOMAINS:
        raise ValidationFailed(f"a tenant may have at most {MAX_DOMAINS} domains; got {len(value)}", field="domains")
    return sorted({check_domain(d) for d in value})


def check_domain(value: object) -> str:
    if not isinstance(value, str) or not DOMAIN_RE.fullmatch(value.lower()):
        raise ValidationFailed("domain must be a lower-case DNS name like acme.example.com", field="domain")
    return value.lower()


def check_shard_id(value: object) -> str:
    if not isinstance(value, str) or not SHARD_ID_RE.fullmatch(value):
        raise ValidationFailed("shard id must be 1-40 characters of a-z, 0-9, '_' and '-', starting with a letter",
                               field="shardId")
    return value


# --- the router API's bodies: these models validate requests and generate the OpenAPI document

class ApiModel(BaseModel):
    """JSON field names are camelCase; unknown fields (the old snake_case names too) are
    refused; values are taken as they are (no "5" for 5, no true for 1)."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=False, extra="forbid", strict=True,
                              frozen=True, regex_engine="python-re")


Code = Annotated[str, Field(pattern=CODE_RE.pattern, min_length=1, max_length=63,
                            description="1-63 of a-z, 0-9 and '-', starting and ending with a letter or digit")]
Domain = Annotated[str, Field(pattern=DOMAIN_RE.pattern.replace("[a-z", "[A-Za-z"), max_length=253,
                              description="a DNS name (stored lower-case)")]
ShardId = Annotated[str, Field(pattern=SHARD_ID_RE.pattern, min_length=1, max_length=40,
                               description="1-40 of a-z, 0-9, '_' and '-', starting with a letter")]


class NewTenant(ApiModel):
    """POST /v1/tenants."""
    code: Code
    domains: list[Domain] = Field(default_factory=list, max_length=MAX_DOMAINS)
    shard_id: ShardId | None = Field(None, description="place on this shard (default: the least-loaded active one)")


class NewShard(ApiModel):
    """POST /v1/shards."""
    shard_id: ShardId
    dsn: str = Field(pattern=r"^postgres(?:ql)?://", max_length=2000, description="postgresql:// URL of the shard")
    capacity: int = Field(1000, ge=1, le=1_000_000_000)
    weight: int = Field(100, ge=0, le=1_000_000_000)


class TenantOut(ApiModel):
    """A tenant as the router answers it."""
    tenant_id: uuid.UUID
    code: Code
    schema_name: str = Field(pattern=r"^t_[0-9a-f]{32}$")
    shard_id: ShardId
    state: Annotated[str, Field(json_schema_extra={"enum": list(TENANT_STATES)})]
    epoch: int = Field(ge=0)
    domains: list[str]


class ShardOut(ApiModel):
    """A shard as the router answers it (the DSN's password redacted)."""
    shard_id: ShardId
    dsn: str
    state: Annotated[str, Field(json_schema_extra={"enum": list(SHARD_STATES)})]
    capacity: int
    weight: int
    tenants: int = Field(ge=0)
