"""The console's audit log (``console_audit``, revision 0006): who did what, when, to what,
and how it ended. Written by the console for every action it takes (and for refused
sign-ins and CSRF failures), after the action, whatever its outcome; shown on its Audit page."""
from __future__ import annotations

from typing import Any, Mapping

import asyncpg

MAX_TEXT = 500


_CONTROL = {c: "\ufffd" for c in range(32) if c not in (9, 10)}  # NUL above all: PostgreSQL can't store it


def _clip(text: str | None) -> str | None:
    """At most MAX_TEXT characters, control characters replaced (what a refused form held)."""
    return None if text is None else text[:MAX_TEXT].translate(_CONTROL)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _clip(value)
    if isinstance(value, Mapping):
        return {str(_clip(str(k))): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value[:100]]
    return value


async def record(control: asyncpg.Pool, *, actor: str, action: str, target: str | None, outcome: str,
                 details: Mapping[str, Any] | None = None, remote: str | None = None) -> None:
    """One entry. ``outcome``: ``ok`` or the error code (``VALIDATION_FAILED`` ...)."""
    await control.execute(
        "INSERT INTO console_audit (actor, action, target, details, outcome, remote) VALUES ($1, $2, $3, $4, $5, $6)",
        _clip(actor), action, _clip(target), _clean(dict(details or {})), outcome, _clip(remote))


async def recent(control: asyncpg.Pool, limit: int, *, before: int | None = None,
                 hide_refused_sign_ins: bool = False) -> list[dict[str, Any]]:
    """The latest entries (older than entry ``before``), newest first; without the refused
    sign-ins when asked (anyone who can reach the host can write those: a flood of them must
    not push the operators' own entries out of reach)."""
    rows = await control.fetch(
        "SELECT audit_id, at, actor, action, target, details, outcome, remote FROM console_audit "
        "WHERE ($2::bigint IS NULL OR audit_id < $2) "
        "AND NOT ($3 AND action = 'console.sign-in' AND outcome <> 'ok') "
        "ORDER BY audit_id DESC LIMIT $1", limit, before, hide_refused_sign_ins)
    return [{"id": r["audit_id"], "at": r["at"], "actor": r["actor"], "action": r["action"], "target": r["target"],
             "details": r["details"], "outcome": r["outcome"], "remote": r["remote"]} for r in rows]
