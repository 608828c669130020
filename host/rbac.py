"""Principals, API keys and permissions.

A principal authenticates with a bearer API key; only the key's sha256 is stored (keys
are 256 random bits, so a plain hash is as good as a slow one and costs microseconds).
A principal belongs to one tenant (or none, for operators) and holds that tenant's
roles by key; roles hold namespaced permissions (``inventory.view``). Authentication
results are cached per host for `AUTH_CACHE_TTL_S` and dropped on every registry change
heard over pub/sub, so a role change or a key revocation made through the admin API or
the CLI takes effect on every host within a pub/sub hop. A change that announces nothing
(Redis down, or a principal row deleted in SQL) is seen within the TTL; the host that
revoked a key refuses it at once.
"""
from __future__ import annotations

import functools
import hashlib
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection, Sequence

import asyncpg
from aiohttp import web

from host.keys import AUTH_CACHE_TTL_S, REQ_CALLER, REQ_TENANT
from host.refresh import RefreshAhead
from host.tenancy import Resolver, request_tenant
from router.errors import Forbidden, NotFound, TenantNotFound, Unauthorized, ValidationFailed
from router.http import bearer, key_matches
from router.models import TenantRecord

NOT_YOUR_TENANT = "this API key does not belong to the requested tenant"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEY_PREFIX = "tfk_"
ROLE_KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,62}$")
PERMISSION_RE = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_.]*$")

_PRINCIPAL_SELECT = """
SELECT p.principal_id::text AS principal_id, p.tenant_id::text AS tenant_id, p.name, p.roles, p.is_admin,
       coalesce((SELECT array_agg(DISTINCT perm) FROM roles r, unnest(r.permissions) AS perm
                 WHERE r.tenant_id = p.tenant_id AND r.role_key = ANY (p.roles)), '{}') AS permissions
FROM principals p
"""
_PRINCIPAL_SQL = _PRINCIPAL_SELECT + "WHERE p.key_hash = $1"
_PRINCIPAL_BY_ID_SQL = _PRINCIPAL_SELECT + "WHERE p.principal_id = $1::uuid"


@dataclass(frozen=True, slots=True)
class Principal:
    principal_id: str
    tenant_id: str | None
    name: str
    roles: tuple[str, ...]
    is_admin: bool
    permissions: frozenset[str]


def _principal(row: asyncpg.Record) -> Principal:
    return Principal(principal_id=row["principal_id"], tenant_id=row["tenant_id"], name=row["name"],
                     roles=tuple(row["roles"]), is_admin=row["is_admin"], permissions=frozenset(row["permissions"]))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class Authenticator:
    """Key → principal, with a short per-host cache."""

    def __init__(self, control: asyncpg.Pool, refresh: RefreshAhead | None = None) -> None:
        self._control = control
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        # The request path's first look: raw Authorization header → principal, sparing the
        # header parse and the sha256 on every request (bench/request_path.py). Only known
        # keys go in, each with the expiry of the `_cache` entry it copies; bounded like
        # `_cache`; `clear` (any registry change heard over pub/sub) empties both.
        self._by_header: dict[str, tuple[Principal, float]] = {}
        # Bumped by `clear`: a read that was in flight when a change was announced may have
        # seen the old row, so its result is returned but not cached.
        self._generation = 0
        # Entries in use are re-read before they expire, off the request path (host.refresh).
        self.refresh = refresh or RefreshAhead("principals")

    def clear(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._by_header.clear()

    async def principal(self, key: str) -> Principal:
        """The key's principal; UNAUTHORIZED for an unknown key."""
        p = (await self._entry(key))[0]
        if p is None:
            raise Unauthorized("unknown API key")
        return p

    async def _entry(self, key: str) -> tuple[Principal | None, float]:
        """(principal or None, expiry) from the cache, or read from the control plane and cached."""
        digest = hash_key(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            if self.refresh.due(hit[1], now, AUTH_CACHE_TTL_S):
                self.refresh.start(("principal", digest), functools.partial(self._read, digest))
            return hit
        return await self._read(digest)

    async def _read(self, digest: str, header: str | None = None) -> tuple[Principal | None, float]:
        """Read the key's principal and cache it (also under ``header``, the Authorization
        header it came in, when given), unless the caches were cleared meanwhile."""
        now = time.monotonic()
        generation = self._generation
        row = await self._control.fetchrow(_PRINCIPAL_SQL, digest)
        p = None if row is None else _principal(row)
        if generation != self._generation:
            return p, now  # already expired, so neither cache serves it again
        if len(self._cache) > 100_000:
            self._cache.clear()  # bounded: unknown keys sprayed at us can't grow it forever
        entry = self._cache[digest] = (p, now + AUTH_CACHE_TTL_S)
        if header is not None:
            if p is None:
                self._by_header.pop(header, None)
            elif header in self._by_header:
                self._by_header[header] = (p, entry[1])
        return entry

    async def by_id(self, principal_id: str) -> Principal | None:
        """The principal ``principal_id`` (a UUID) with its permissions as they are now, read
        from the control plane (not cached): the app shell's session holds the key's
        principal id, never the key. None for a revoked (deleted) one."""
        row = await self._control.fetchrow(_PRINCIPAL_BY_ID_SQL, principal_id)
        return None if row is None else _principal(row)

    async def caller(self, request: web.Request) -> Principal:
        """The caller's principal, whichever tenant it belongs to; UNAUTHORIZED without a
        valid key. Asked before the request's tenant is looked up, so that a caller without
        a key learns nothing about which tenants exist or what state they are in."""
        header = request.headers.get("Authorization")
        hit = None if header is None else self._by_header.get(header)
        if hit is not None:
            now = time.monotonic()
            if hit[1] > now:
                if header is not None and self.refresh.due(hit[1], now, AUTH_CACHE_TTL_S):
                    self._refresh_header(header, hash_key(bearer(request)), hit[1], now)
                return hit[0]
        found, expires = await self._entry(bearer(request))
        if found is None:
            raise Unauthorized("unknown API key")
        if header is not None:
            if len(self._by_header) > 100_000:
                self._by_header.clear()
            self._by_header[header] = (found, expires)
        return found

    def _refresh_header(self, header: str, digest: str, expires: float, now: float) -> None:
        """A `_by_header` entry is due: copy a fresher `_cache` entry of its key (``digest``), or re-read it."""
        fresher = self._cache.get(digest)
        if fresher is not None and fresher[0] is not None and fresher[1] > expires \
                and not self.refresh.due(fresher[1], now, AUTH_CACHE_TTL_S):
            self._by_header[header] = (fresher[0], fresher[1])
        else:
            self.refresh.start(("principal", digest), functools.partial(self._read, digest, header))

    @staticmethod
    def check_tenant(p: Principal, tenant_id: str) -> None:
        """FORBIDDEN unless ``p`` belongs to ``tenant_id``, whatever the request's tenant headers say."""
        if p.tenant_id != tenant_id:
            raise Forbidden(NOT_YOUR_TENANT)

    async def for_named_tenant(self, resolver: Resolver, request: web.Request) -> tuple[Principal, TenantRecord]:
        """The caller and the tenant the request names (`request_tenant`), which the caller
        must belong to. The key is checked first (UNAUTHORIZED says nothing about tenants),
        and a key of one tenant naming another gets the same FORBIDDEN whether that tenant
        exists or not (no TENANT_NOT_FOUND, no tenant id): a tenant's key can't probe for
        other tenants. Sets ``request[REQ_TENANT]`` (the access log's) once it is the caller's."""
        principal = await self.caller(request)
        try:
            rec = await request_tenant(resolver, request)
        except TenantNotFound:
            raise Forbidden(NOT_YOUR_TENANT) from None
        self.check_tenant(principal, rec.tenant_id)
        request[REQ_TENANT] = rec.tenant_id
        return principal, rec

    async def check_admin(self, admin_key: str, request: web.Request) -> None:
        """The admin key is required (the same rule as the router's writes): UNAUTHORIZED
        for a missing, malformed or unknown key, FORBIDDEN for a tenant's API key."""
        token = bearer(request)
        if key_matches(token, admin_key):
            return
        if (await self._entry(token))[0] is not None:
            raise Forbidden("this API key is not the admin key, which /admin needs", permission="admin")
        raise Unauthorized("unknown key: /admin needs the admin key")


def require(permission: str) -> Callable[[Handler], Handler]:
    """Decorator: the caller (set by the host's plugin gate) must hold ``permission``.

    Raises FORBIDDEN with ``{"permission": permission}``.
    """
    if not PERMISSION_RE.match(permission):
        raise ValueError(f"permission must be namespaced like inventory.view: {permission!r}")

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            caller = request.get(REQ_CALLER)
            if caller is None or permission not in caller.permissions:
                raise Forbidden(f"missing permission {permission}", permission=permission)
            return await handler(request)
        guarded.__dict__["required_permission"] = permission
        return guarded
    return wrap


class RbacService:
    """Principals and keys (admin API, CLI, `up`)."""

    def __init__(self, control: asyncpg.Pool) -> None:
        self._control = control

    async def create_principal(self, *, tenant_id: str | None, name: str, roles: Sequence[str] = (),
                               is_admin: bool = False) -> dict[str, Any]:
        """A new principal and its API key (returned once, never stored).

        Raises VALIDATION_FAILED for a bad name or role key, NOT_FOUND for a role the tenant
        doesn't have (``role`` names it), TENANT_NOT_FOUND.
        """
        if not isinstance(name, str) or not 1 <= len(name) <= 200 or "\x00" in name:
            raise ValidationFailed("name must be a string of 1-200 characters (no NUL)", field="name")
        if isinstance(roles, str) or not all(isinstance(r, str) and ROLE_KEY_RE.fullmatch(r) for r in roles):
            raise ValidationFailed("roles must be a list of role keys like INVENTORY_MANAGER", field="roles")
        if tenant_id is not None:
            try:
                tenant_id = str(uuid.UUID(tenant_id))
            except (ValueError, TypeError, AttributeError):
                raise ValidationFailed("tenantId must be a UUID", field="tenantId") from None
            if not await self._control.fetchval("SELECT 1 FROM tenants WHERE tenant_id = $1::uuid", tenant_id):
                raise TenantNotFound(f"no tenant with id {tenant_id}", id=tenant_id)
        if roles:
            # a role the tenant doesn't have would grant nothing, silently: refuse it by name
            known = set() if tenant_id is None else set(await self._control.fetchval(
                "SELECT coalesce(array_agg(role_key), '{}') FROM roles WHERE tenant_id = $1::uuid "
                "AND role_key = ANY ($2::text[])", tenant_id, list(roles)))
            unknown = sorted(set(roles) - known)
            if unknown:  # a reference to something that doesn't exist, as SHARD_NOT_FOUND for a shardId
                raise NotFound(
                    f"unknown role {unknown[0]}: roles are a tenant's (apply a plugin's role template first, "
                    "`tenantfleet plugins roles --apply`)", field="roles", role=unknown[0])
        key = new_key()
        principal_id = str(uuid.uuid4())
        await self._control.execute(
            "INSERT INTO principals (principal_id, tenant_id, name, key_hash, roles, is_admin) "
            "VALUES ($1::uuid, $2::uuid, $3, $4, $5, $6)",
            principal_id, tenant_id, name, hash_key(key), list(roles), is_admin)
        return {"principalId": principal_id, "tenantId": tenant_id, "name": name, "roles": list(roles),
                "isAdmin": is_admin, "apiKey": key}

    async def list_principals(self, tenant_id: str | None) -> list[dict[str, Any]]:
        """One tenant's principals, or with None the fleet-level ones; oldest first. Never a key."""
        # two texts, not IS NOT DISTINCT FROM: that can't use principals_tenant_idx
        select = ("SELECT principal_id::text, tenant_id::text, name, roles, is_admin, created_at FROM principals ")
        order = " ORDER BY created_at, principal_id"
        if tenant_id is None:
            rows = await self._control.fetch(select + "WHERE tenant_id IS NULL" + order)
        else:
            rows = await self._control.fetch(select + "WHERE tenant_id = $1::uuid" + order, tenant_id)
        return [{"principalId": r["principal_id"], "tenantId": r["tenant_id"], "name": r["name"],
                 "roles": list(r["roles"]), "isAdmin": r["is_admin"], "createdAt": r["created_at"].isoformat()}
                for r in rows]

    async def revoke_principal(self, principal_id: str) -> dict[str, Any]:
        """Delete a principal, and with it its key. Hosts that cached it refuse it once the
        change is announced (`Registry.announce`, best-effort; the admin API and the CLI
        do), and within `AUTH_CACHE_TTL_S` if the announcement can't go out.

        Raises VALIDATION_FAILED for a malformed id, NOT_FOUND for an unknown one.
        """
        try:
            pid = str(uuid.UUID(principal_id))
        except (ValueError, TypeError, AttributeError):
            raise ValidationFailed("principalId must be a UUID", field="principalId") from None
        row = await self._control.fetchrow(
            "DELETE FROM principals WHERE principal_id = $1::uuid RETURNING tenant_id::text, name", pid)
        if row is None:
            raise NotFound(f"no principal {pid}", principalId=pid)
        return {"principalId": pid, "tenantId": row["tenant_id"], "name": row["name"], "revoked": True}

    async def upsert_role(self, tenant_id: str, role_key: str, display_name: str,
                          permissions: Sequence[str], *, namespaces: Collection[str]) -> dict[str, Any]:
        """Create or replace one of a tenant's roles. VALIDATION_FAILED for bad keys or
        permissions, and for a permission outside ``namespaces`` (the plugin ids there are)."""
        if not ROLE_KEY_RE.fullmatch(role_key):
            raise ValidationFailed("role key must look like INVENTORY_MANAGER", field="roleKey")
        if not isinstance(display_name, str) or not 1 <= len(display_name) <= 200 or "\x00" in display_name:
            raise ValidationFailed("displayName must be a string of 1-200 characters (no NUL)", field="displayName")
        if isinstance(permissions, str) or not isinstance(permissions, (list, tuple)) or len(permissions) > 1000 \
                or not all(isinstance(p, str) and len(p) <= 200 and PERMISSION_RE.fullmatch(p) for p in permissions):
            raise ValidationFailed("permissions must be a list of namespaced names like inventory.view",
                                   field="permissions")
        outside = sorted(p for p in permissions if p.split(".", 1)[0] not in namespaces)
        if outside:
            raise ValidationFailed(f"permission {outside[0]} is outside every plugin's namespace "
                                   f"(known: {', '.join(sorted(namespaces)) or 'none'})", field="permissions",
                                   permission=outside[0])
        await self._control.execute(
            "INSERT INTO roles (tenant_id, role_key, display_name, permissions) VALUES ($1::uuid, $2, $3, $4) "
            "ON CONFLICT (tenant_id, role_key) DO UPDATE SET display_name = EXCLUDED.display_name, "
            "permissions = EXCLUDED.permissions, updated_at = now()",
            tenant_id, role_key, display_name, sorted(set(permissions)))
        return {"tenantId": tenant_id, "roleKey": role_key, "displayName": display_name,
                "permissions": sorted(set(permissions))}
