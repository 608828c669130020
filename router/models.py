"""Directory records passed between the directory, the caches and the services."""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from router.errors import ValidationFailed
from router.keys import CODE_RE, DOMAIN_RE, SHARD_ID_RE


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """Where a tenant lives, as of ``epoch``. Every directory change bumps the epoch."""
    tenant_id: str
    code: str
    schema: str
    shard_id: str
    state: str
    epoch: int
    domains: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["domains"] = list(self.domains)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TenantRecord":
        return cls(tenant_id=str(d["tenant_id"]), code=d["code"], schema=d["schema"], shard_id=d["shard_id"],
                   state=d["state"], epoch=int(d["epoch"]), domains=tuple(d.get("domains") or ()))


@dataclass(frozen=True, slots=True)
class ShardRecord:
    shard_id: str
    dsn: str
    state: str
    capacity: int
    weight: int
    tenants: int = 0

    def to_dict(self, *, with_dsn: bool = False) -> dict[str, Any]:
        from router.pools import redact

        d = asdict(self)
        d["dsn"] = self.dsn if with_dsn else redact(self.dsn)
        return d


def parse_tenant_id(value: str) -> str:
    """A canonical UUID string, or VALIDATION_FAILED."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValidationFailed("tenant id must be a UUID", field="id") from exc


def check_code(value: object) -> str:
    if not isinstance(value, str) or not CODE_RE.match(value):
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
    if not isinstance(value, str) or not DOMAIN_RE.match(value.lower()):
        raise ValidationFailed("domain must be a lower-case DNS name like acme.example.com", field="domain")
    return value.lower()


def check_shard_id(value: object) -> str:
    if not isinstance(value, str) or not SHARD_ID_RE.match(value):
        raise ValidationFailed("shard id must be 1-40 characters of a-z, 0-9, '_' and '-', starting with a letter",
                               field="shard_id")
    return value
