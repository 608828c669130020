"""Directory records passed between the directory, the caches and the services."""
from __future__ import annotations

import re
import sys
import uuid
from dataclasses import FrozenInstanceError, dataclass
from typing import Annotated, Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from router.errors import ValidationFailed
from router.keys import CODE_RE, DOMAIN_RE, SHARD_ID_RE, SHARD_STATES, TENANT_STATES


# (shard_id, state) pairs shared by every record with that pair: a few distinct values
# (shards x states), so one tuple each instead of one per record; at most this many.
_PLACES: dict[tuple[str, ...], tuple[str, ...]] = {}
MAX_SHARED_PLACES = 10_000


def _interned(value: str) -> str:
    return sys.intern(value) if type(value) is str else value


class TenantRecord:
    """Where a tenant lives, as of ``epoch``. Every directory change bumps the epoch.

    Immutable; read like the frozen dataclass it was: ``tenant_id, code, schema,
    shard_id, state, epoch, domains`` (made with those arguments, positional or named),
    compared and hashed by them; `replace` makes a changed copy. Stored smaller, because
    the resolve cache holds up to 100k of them (issue 12), in six slots (80 bytes):

    - ``schema`` is the directory's name for every tenant's schema (``t_`` + the id's 32
      hex digits) unless the record was made with another (``other_schema``): the usual
      name is computed when read, not stored.
    - ``shard_id`` and ``state`` (and another schema name, if any) are one tuple, the
      same object for every record on that shard in that state.
    - ``domains`` reads as a tuple; a single domain is stored as its string (a one-item
      tuple is 48 bytes more), several as a tuple.
    - ``_stamp`` belongs to `router.cache.TenantCache`: the expiry time and used bit of
      the cache entry the record is (None until a cache holds it). It takes no part in
      equality, hashing, repr or copies.

    Use `to_dict` / `to_api` for its fields as data.
    """
    __slots__ = ("tenant_id", "code", "epoch", "_place", "_domains", "_stamp")
    tenant_id: str
    code: str
    epoch: int
    _place: tuple[str, ...]  # (shard_id, state) or (shard_id, state, other schema)
    _domains: str | tuple[str, ...]  # one domain: its string
    _stamp: Any

    def __init__(self, tenant_id: str, code: str, schema: str, shard_id: str, state: str, epoch: int,
                 domains: Iterable[str] = ()) -> None:
        init = object.__setattr__
        init(self, "tenant_id", tenant_id)
        init(self, "code", code)
        init(self, "epoch", epoch)
        if schema == "t_" + str(tenant_id).replace("-", ""):
            place: tuple[str, ...] = (shard_id, state)
            shared = _PLACES.get(place)
            if shared is not None:
                place = shared
            elif len(_PLACES) < MAX_SHARED_PLACES:
                # interned strings, held here: later sys.intern calls (decoding) find them
                place = _PLACES[place] = (_interned(shard_id), _interned(state))
        else:
            place = (shard_id, state, schema)
        init(self, "_place", place)
        doms = domains if isinstance(domains, tuple) else tuple(domains)
        if len(doms) == 1 and isinstance(doms[0], str):
            one = doms[0]
            # a plain str (a subclass's value): the slot's readers tell one domain from a
            # tuple by ``type(d) is str``; a subclass was taken for a tuple of its characters
            init(self, "_domains", one if type(one) is str else str.__str__(one))
        else:
            init(self, "_domains", doms)
        init(self, "_stamp", None)

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    @property
    def shard_id(self) -> str:
        return self._place[0]

    @property
    def state(self) -> str:
        return self._place[1]

    @property
    def schema(self) -> str:
        place = self._place
        return place[2] if len(place) == 3 else "t_" + str(self.tenant_id).replace("-", "")

    @property
    def other_schema(self) -> str | None:
        """The schema's name if it is not the directory's usual one, else None."""
        place = self._place
        return place[2] if len(place) == 3 else None

    @property
    def domains(self) -> tuple[str, ...]:
        d = self._domains
        return (d,) if isinstance(d, str) else d

    def answers_domain(self, domain: str) -> bool:
        """True if ``domain`` is one of the tenant's domains (without building the tuple)."""
        d = self._domains
        return d == domain if type(d) is str else domain in d

    def _key(self) -> tuple[Any, ...]:
        return (self.tenant_id, self.code, self.epoch, self._place, self._domains)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, TenantRecord)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"TenantRecord(tenant_id={self.tenant_id!r}, code={self.code!r}, schema={self.schema!r}, "
                f"shard_id={self.shard_id!r}, state={self.state!r}, epoch={self.epoch!r}, domains={self.domains!r})")

    def __reduce__(self) -> tuple[Any, ...]:  # copy and pickle: a new record, no cache state
        return (TenantRecord, (self.tenant_id, self.code, self.schema, self.shard_id, self.state, self.epoch,
                               self.domains))

    def replace(self, **changes: Any) -> "TenantRecord":
        """A copy with ``changes`` (any of the constructor's arguments), like ``dataclasses.replace``."""
        fields: dict[str, Any] = {"tenant_id": self.tenant_id, "code": self.code, "schema": self.schema,
                                  "shard_id": self.shard_id, "state": self.state, "epoch": self.epoch,
                                  "domains": self.domains}
        unknown = changes.keys() - fields.keys()
        if unknown:
            raise TypeError(f"TenantRecord has no field {sorted(unknown)[0]!r}")
        fields.update(changes)
        return TenantRecord(**fields)

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
