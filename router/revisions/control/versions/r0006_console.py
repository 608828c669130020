"""Console: operator sessions and the audit log (schema version 6).

Revision ID: 0006
Revises: 0005

``console_sessions``: one row per signed-in console session (the cookie's sha256, never
the cookie), with its CSRF token and expiry; in the control plane so that every host
knows every session and a host restart signs nobody out. ``console_audit``: every
console action, who took it, when, on what, and how it ended.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision: str | None = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("session_hash", sa.Text(), primary_key=True),
        sa.Column("csrf_token", sa.Text(), nullable=False),
        sa.Column("operator", sa.Text(), nullable=False),
        sa.Column("remote", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("console_sessions_expires_idx", "console_sessions", ["expires_at"])
    op.create_table(
        "console_audit",
        sa.Column("audit_id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("details", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("remote", sa.Text(), nullable=True),
    )
    op.create_index("console_audit_at_idx", "console_audit", ["at"])


def downgrade() -> None:
    raise NotImplementedError("tenantfleet's tables are not downgraded")
