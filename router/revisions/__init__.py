"""tenantfleet's own tables, versioned by Alembic revisions: one script directory for the
control plane (``control/``) and one for each shard's ``fleet`` schema (``shard/``).

Revision 0005 is the baseline: the tables, functions and roles `router.schema`'s
idempotent set-up (`ensure_control`, `ensure_shard`) builds for `tables.SCHEMA_VERSION`
5, from nothing or from any earlier version. Every later change to these tables is a
revision after it (``down_revision = "0005"``, and so on).

How a database is upgraded (`upgrade`, called by `router.schema` in the transaction that
holds the bootstrap lock, after the baseline set-up and before its commit): the revision
recorded in Alembic's version table (``alembic_version`` on the control plane,
``fleet.alembic_version`` on a shard; none yet: the baseline is stamped) is upgraded to
the head. Alembic writes the revisions' SQL in its offline (``--sql``) mode and each
statement runs on the same asyncpg connection, so the set-up, the revisions and the
version row commit together or not at all, and two processes upgrading at once take
turns on the bootstrap lock. What that asks of a revision: operations that need no answer
from the database (``op.add_column``, ``op.create_index``, ``op.execute`` ...), never
``op.get_bind()`` or reflection.

A database whose recorded revision this code doesn't know was upgraded by a newer
tenantfleet: SCHEMA_TOO_NEW, nothing changed.

Alembic is imported when one of these functions runs (the CLI starts without it).
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.errors import SchemaTooNew
from router.pools import AnyConnection

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

HERE = Path(__file__).resolve().parent
BASELINE = "0005"
COMPONENTS = ("control", "shard")
# Where each component's Alembic version table lives (a constant, never user text).
_VERSION_SCHEMA: dict[str, str | None] = {"control": None, "shard": "fleet"}
_VERSION_TABLE = {"control": "alembic_version", "shard": "fleet.alembic_version"}
# Each component's head revision, known without loading Alembic: every command checks the
# control plane at start (`router.schema.up_to_date`), and one already at the head (and at
# SCHEMA_VERSION) needs nothing else. A new revision updates this too (tests/test_db_revisions.py checks it
# against the script directory's head).
HEADS: dict[str, str] = {"control": "0007", "shard": "0005"}


@dataclass(frozen=True)
class Revision:
    revision: str
    down_revision: str | None
    doc: str

    def to_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "downRevision": self.down_revision, "doc": self.doc}


# ``root`` below: where the script directories are; tenantfleet's own unless a test
# brings a directory with a revision of its own.
@functools.lru_cache(maxsize=8)  # read once per process: every service start and shard set-up asks
def script_directory(component: str, root: Path = HERE) -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    if component not in COMPONENTS:
        raise ValueError(f"unknown component: {component!r}")
    return ScriptDirectory(str(root / component))


def head(component: str, root: Path = HERE) -> str:
    rev = script_directory(component, root).get_current_head()
    assert rev is not None
    return rev


def history(component: str, root: Path = HERE) -> list[Revision]:
    """The component's revisions, newest first."""
    return [Revision(s.revision, s.down_revision if isinstance(s.down_revision, str) or s.down_revision is None
                     else ",".join(s.down_revision), (s.doc or "").strip().splitlines()[0] if s.doc else "")
            for s in script_directory(component, root).walk_revisions()]


def version_table(component: str) -> str:
    """Where ``component`` records its Alembic revision (a constant name)."""
    return _VERSION_TABLE[component]


async def current(conn: AnyConnection, component: str) -> str | None:
    """The revision the database records, or None (no version table or row yet)."""
    table = _VERSION_TABLE[component]
    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
        return None
    rev: str | None = await conn.fetchval(f"SELECT max(version_num) FROM {table}")  # constant table name
    return rev


async def check_known(conn: AnyConnection, component: str, root: Path = HERE) -> str | None:
    """`current`, after making sure this code knows it (SCHEMA_TOO_NEW if not)."""
    rev = await current(conn, component)
    if rev is not None and rev not in {r.revision for r in history(component, root)}:
        raise SchemaTooNew(f"this {component} database is at revision {rev}, which this tenantfleet does not "
                           f"know (it knows up to {head(component, root)}): upgrade tenantfleet before preparing it",
                           component=component, version=rev)
    return rev


async def upgrade(conn: AnyConnection, component: str, recorded: str | None, root: Path = HERE) -> list[str]:
    """Run the revisions after ``recorded`` (None: stamp the baseline first) up to the head
    on ``conn``, inside the caller's transaction (which must hold the bootstrap lock);
    returns the revisions applied."""
    target = head(component, root)
    if recorded == target:
        return []
    statements, applied = upgrade_sql(component, recorded, root)
    for stmt in statements:
        await conn.execute(stmt)
    return applied


class _Statements(io.StringIO):
    """Alembic's offline output buffer: each ``write`` is one statement (or a comment),
    kept apart so that each runs as it is (a function body may hold semicolons)."""

    def __init__(self) -> None:
        super().__init__()
        self.statements: list[str] = []

    def write(self, text: str) -> int:
        stmt = text.strip()
        if stmt and not stmt.startswith("--"):
            self.statements.append(stmt)
        return len(text)


def upgrade_sql(component: str, start: str | None, root: Path = HERE) -> tuple[list[str], list[str]]:
    """(statements, revisions) taking a database at revision ``start`` (None: no version
    table yet; the baseline's own upgrade adds nothing, `router.schema` built it) to the
    head, as Alembic writes them in offline mode."""
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext

    script = script_directory(component, root)
    out = _Statements()
    applied: list[str] = []

    def fn(rev: Any, context: Any) -> Any:
        steps = script._upgrade_revs("head", rev)
        applied.extend(step.revision.revision for step in steps)
        return steps

    config = Config()
    config.set_main_option("script_location", str(root / component))
    with EnvironmentContext(config, script, fn=fn, as_sql=True, starting_rev=start, destination_rev="head") as env:
        env.configure(dialect_name="postgresql", output_buffer=out, transactional_ddl=False,
                      version_table_schema=_VERSION_SCHEMA[component])
        env.run_migrations()
    return out.statements, applied

