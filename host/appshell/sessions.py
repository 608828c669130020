"""App shell sessions: a tenant staff member's API key exchanged for a session cookie.

A session lives in the control plane (``app_sessions``, revision 0007), so every host
knows it and a restart signs nobody out. It remembers the tenant and the key's principal
id, never the key: only the cookie's sha256 is stored (256 random bits: a plain hash is
as good as a slow one), and the cookie holds nothing but that random value. Every
request reads the principal back by id with its permissions as they are now, so a role
change shows at once, and a revoked key (its principal deleted) ends the session (the
row goes with it, ON DELETE CASCADE). The cookie is HttpOnly, SameSite=Strict, scoped to
``/app`` and expires with the session (``settings.app_session_s``). Each session has its
own CSRF token (the shell's forms send it as ``csrf``, the bridge's calls as
``X-CSRF-Token``); `host.console.sessions.csrf_ok` compares it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

import asyncpg

from host.rbac import Authenticator, Principal
from host.tenancy import Resolver, check_servable
from router.errors import TenantNotFound, Unauthorized, ValidationFailed
from router.keys import CODE_RE, DOMAIN_RE
from router.models import TenantRecord

MAX_TOKEN = 200
REFUSED = "unknown tenant or API key (or the key is not one of this tenant's)"


@dataclass(frozen=True, slots=True)
class AppSession:
    session_id: str       # the first 12 hex of the cookie's hash: for logs, not a secret
    tenant_id: str
    principal: Principal
    csrf: str
    expires_at: dt.datetime


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def find_tenant(resolver: Resolver, name: str) -> TenantRecord:
    """The tenant a sign-in names: a code (``acme``) or one of its domains (``acme.example.com``).
    UNAUTHORIZED for anything else, unknown or malformed (the same answer as a wrong key:
    the sign-in form says nothing about which tenants exist)."""
    name = name.strip().lower()
    try:
        if CODE_RE.fullmatch(name):
            return await resolver.resolve(code=name)
        if DOMAIN_RE.fullmatch(name):
            return await resolver.resolve(domain=name)
    except (TenantNotFound, ValidationFailed):
        pass
    raise Unauthorized(REFUSED)


async def sign_in(control: asyncpg.Pool, auth: Authenticator, resolver: Resolver, *, tenant: str, key: str,
                  remote: str | None, ttl_s: float) -> tuple[str, AppSession, TenantRecord]:
    """A new session for the holder of one of ``tenant``'s API keys: (cookie value, session, tenant).

    UNAUTHORIZED for an unknown key, an unknown tenant or a key of another tenant (one
    answer for all three: the key is checked first); VALIDATION_FAILED for an oversized
    field; TENANT_SUSPENDED for a suspended tenant. Sessions past their expiry are deleted
    on the way.
    """
    key = key.strip()
    if len(key) > MAX_TOKEN or len(tenant) > 253:
        raise ValidationFailed("tenant or key too long", field="key")
    if not key:
        raise Unauthorized(REFUSED)
    try:
        principal = await auth.principal(key)
    except Unauthorized:
        raise Unauthorized(REFUSED) from None
    rec = await find_tenant(resolver, tenant)
    if principal.tenant_id != rec.tenant_id:
        raise Unauthorized(REFUSED)
    check_servable(rec)
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    digest = _hash(token)
    async with control.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM app_sessions WHERE expires_at < now()")
        expires = await conn.fetchval(
            "INSERT INTO app_sessions (session_hash, csrf_token, tenant_id, principal_id, remote, expires_at) "
            "VALUES ($1, $2, $3::uuid, $4::uuid, $5, now() + make_interval(secs => $6)) RETURNING expires_at",
            digest, csrf, rec.tenant_id, principal.principal_id, remote, float(ttl_s))
    return token, AppSession(digest[:12], rec.tenant_id, principal, csrf, expires), rec


async def load(control: asyncpg.Pool, auth: Authenticator, token: str | None) -> AppSession | None:
    """The live session of a cookie value, with its principal as it is now; None if there is
    none (unknown, signed out, expired, its key revoked or moved to another tenant)."""
    if not token or len(token) > MAX_TOKEN:
        return None
    digest = _hash(token)
    row = await control.fetchrow(
        "SELECT csrf_token, tenant_id::text AS tenant_id, principal_id::text AS principal_id, expires_at "
        "FROM app_sessions WHERE session_hash = $1 AND expires_at > now()", digest)
    if row is None:
        return None
    principal = await auth.by_id(row["principal_id"])
    if principal is None or principal.tenant_id != row["tenant_id"]:
        return None
    return AppSession(digest[:12], row["tenant_id"], principal, row["csrf_token"], row["expires_at"])


async def sign_out(control: asyncpg.Pool, token: str | None) -> None:
    if token and len(token) <= MAX_TOKEN:
        await control.execute("DELETE FROM app_sessions WHERE session_hash = $1", _hash(token))
