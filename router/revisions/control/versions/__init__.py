"""Alembic revisions (see router/revisions)."""
