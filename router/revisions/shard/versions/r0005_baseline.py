"""Baseline: the shard tables of tenantfleet schema version 5, as router.schema builds them.

Revision ID: 0005
Revises: (none)
"""
from __future__ import annotations

revision = "0005"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing: `router.schema` builds this state idempotently (from nothing or from any
    earlier version) before the revisions run, in the same transaction."""


def downgrade() -> None:
    raise NotImplementedError("tenantfleet's tables are not downgraded")
