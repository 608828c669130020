"""Finding the calling tenant: the resolver the host uses and the request's tenant name.

The host resolves through the router's `ResolveClient` (in-process cache → Redis →
control plane, invalidated over pub/sub). A stale entry is harmless for data: the
fence in `host.tx` catches it and calls `drop`.
"""
from __future__ import annotations

import uuid
from contextvars import ContextVar
from typing import Protocol

from aiohttp import web

from host.keys import TENANT_HEADER
from router.errors import TenantNotFound, TenantNotReady, TenantSuspended, ValidationFailed
from router.models import TenantRecord


# The tenant the current request was resolved to (set by the plugin gate): `host.tx` uses
# it instead of resolving the same tenant again. Per task, so requests never see each other's.
REQUEST_TENANT: ContextVar[TenantRecord | None] = ContextVar("tenantfleet_request_tenant", default=None)


class Resolver(Protocol):
    """What the host needs from a resolve client."""

    async def resolve(self, *, id: str | None = None, code: str | None = None,
                      domain: str | None = None) -> TenantRecord:
        """The tenant's record; TENANT_NOT_FOUND or VALIDATION_FAILED."""
        ...

    def drop(self, tenant_id: str, *, stale_epoch: int | None = None) -> bool:
        """Forget the cached entry; ``stale_epoch``: the epoch the fence found stale."""
        ...


def tenant_name(request: web.Request) -> tuple[str, str]:
    """Which tenant a request names: ``X-Tenant`` (a UUID or a code) or else the Host domain.

    Returns (kind, value) for `Resolver.resolve`; VALIDATION_FAILED if neither is usable.
    """
    header = request.headers.get(TENANT_HEADER)
    if header is not None:
        value = header.strip()
        if len(value) in (32, 36):  # only these can be UUIDs: spare codes the exception path
            try:
                return "id", str(uuid.UUID(value))
            except ValueError:
                pass
        return "code", value.lower()
    host = request.host.rsplit(":", 1)[0].strip().lower() if request.host else ""
    if not host or host.replace(".", "").isdigit() or host == "localhost":
        raise ValidationFailed(f"name the tenant with the {TENANT_HEADER} header or a tenant domain as Host",
                               field=TENANT_HEADER)
    return "domain", host


async def request_tenant(resolver: Resolver, request: web.Request) -> TenantRecord:
    """The tenant a request names, in whatever state; TENANT_NOT_FOUND, VALIDATION_FAILED."""
    kind, value = tenant_name(request)
    if kind == "code":  # spelled out: no kwargs dict per request (bench/request_path.py)
        rec = await resolver.resolve(code=value)
    elif kind == "id":
        rec = await resolver.resolve(id=value)
    else:
        rec = await resolver.resolve(domain=value)
    return rec


async def resolve_id_or_code(resolver: Resolver, name: str) -> TenantRecord:
    """The tenant named by a UUID or a code (admin API paths, CLI arguments); TENANT_NOT_FOUND."""
    try:
        tenant_id = str(uuid.UUID(name))
    except ValueError:
        return await resolver.resolve(code=name)
    return await resolver.resolve(id=tenant_id)


def check_servable(rec: TenantRecord) -> None:
    """Active and moving tenants are served (the fence guards a move); others are refused."""
    if rec.state in ("active", "moving"):
        return
    if rec.state == "suspended":
        raise TenantSuspended(f"tenant {rec.code} is suspended", tenantId=rec.tenant_id)
    raise TenantNotReady(f"tenant {rec.code} is {rec.state}", tenantId=rec.tenant_id, state=rec.state)
