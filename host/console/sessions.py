"""Console sessions: the admin key exchanged for a session cookie, and its CSRF token.

A session lives in the control plane (``console_sessions``, revision 0006), so every host
knows every session and a host restart signs nobody out; only an HMAC of the cookie keyed
by the admin key is stored, so a session is bound to the admin key it was opened with: a
host whose admin key has been changed (rotated after a leak) finds none of the sessions
opened with the old key, and those are signed out. The cookie is HttpOnly, SameSite=Strict, scoped to ``/console`` and expires with
the session (``settings.console_session_s``). Each session has its own CSRF token, sent
in every form (``csrf``) and in htmx requests (``X-CSRF-Token``): a POST without the
session's token is refused (403) before anything is read or changed.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import asyncpg

from router.errors import Unauthorized, ValidationFailed
from router.http import key_matches

MAX_OPERATOR = 80


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str        # the first 12 hex of the cookie's hash: for the audit log, not a secret
    operator: str
    csrf: str
    expires_at: dt.datetime

    @property
    def actor(self) -> str:
        """Who, as the audit log writes it."""
        return f"{self.operator} (session {self.session_id})"


def _hash(token: str, admin_key: str) -> str:
    """What is stored for a cookie: HMAC-SHA256 keyed by the admin key (bound to that key)."""
    return hmac.new(admin_key.encode(), token.encode(), hashlib.sha256).hexdigest()


def check_operator(name: str) -> str:
    """The operator's name as given at sign-in (optional: "admin"); VALIDATION_FAILED."""
    name = " ".join(name.split())
    if len(name) > MAX_OPERATOR or any(ord(c) < 32 for c in name):
        raise ValidationFailed(f"your name must be at most {MAX_OPERATOR} printable characters", field="operator")
    return name or "admin"


async def sign_in(control: asyncpg.Pool, *, admin_key: str, key: str, operator: str, remote: str | None,
                  ttl_s: float) -> tuple[str, Session]:
    """A new session for the holder of the admin key: (cookie value, session).

    UNAUTHORIZED for any other key (nothing is stored); VALIDATION_FAILED for a bad name.
    Sessions past their expiry are deleted on the way.
    """
    who = check_operator(operator)
    if not key_matches(key.strip(), admin_key):
        raise Unauthorized("that is not the admin key")
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    digest = _hash(token, admin_key)
    async with control.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM console_sessions WHERE expires_at < now()")
        expires = await conn.fetchval(
            "INSERT INTO console_sessions (session_hash, csrf_token, operator, remote, expires_at) "
            "VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING expires_at",
            digest, csrf, who, remote, float(ttl_s))
    return token, Session(digest[:12], who, csrf, expires)


async def load(control: asyncpg.Pool, token: str | None, *, admin_key: str) -> Session | None:
    """The live session of a cookie value; None if there is none (unknown, signed out, expired,
    opened with another admin key, or no admin key configured)."""
    if not token or len(token) > 200 or not admin_key:
        return None
    digest = _hash(token, admin_key)
    row = await control.fetchrow(
        "SELECT csrf_token, operator, expires_at FROM console_sessions WHERE session_hash = $1 AND expires_at > now()",
        digest)
    return None if row is None else Session(digest[:12], row["operator"], row["csrf_token"], row["expires_at"])


async def sign_out(control: asyncpg.Pool, token: str | None, *, admin_key: str) -> None:
    if token and len(token) <= 200:
        await control.execute("DELETE FROM console_sessions WHERE session_hash = $1", _hash(token, admin_key))


def csrf_ok(expected: str, given: str | None) -> bool:
    """Constant-time comparison of the session's CSRF token with the one a request sent."""
    return bool(given) and bool(expected) and hmac.compare_digest(expected.encode(), (given or "").encode())
