"""The tenant app shell's sessions (schema version 7).

Revision ID: 0007
Revises: 0006

``app_sessions``: one row per signed-in ``/app`` session of a tenant's staff member: the
cookie's sha256 (never the cookie, never the API key), its CSRF token and expiry, and
which tenant and principal (key) it stands for. A revoked key (its principal deleted)
takes its sessions with it (ON DELETE CASCADE), and so does a deleted tenant.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0007"
down_revision: str | None = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "app_sessions",
        sa.Column("session_hash", sa.Text(), primary_key=True),
        sa.Column("csrf_token", sa.Text(), nullable=False),
        sa.Column("tenant_id", UUID(as_uuid=False), sa.ForeignKey("tenants.tenant_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("principal_id", UUID(as_uuid=False), sa.ForeignKey("principals.principal_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("remote", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("app_sessions_expires_idx", "app_sessions", ["expires_at"])
    op.create_index("app_sessions_principal_idx", "app_sessions", ["principal_id"])


def downgrade() -> None:
    raise NotImplementedError("tenantfleet's tables are not downgraded")
