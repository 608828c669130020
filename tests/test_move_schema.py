"""A tenant schema's DDL and fingerprint from the catalog (shard_migrations.moves.schema_copy):
read on one shard, recreated on another, compared, and the objects it can't move named."""
from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

import asyncpg
import pytest

from router.models import TenantRecord
from shard_migrations.fleet import RunOptions
from shard_migrations.moves import schema_copy
from shard_migrations.moves.schema_copy import (
    TenantSchema, create_tenant_schema_objects, fingerprint, read_tenant_schema,
)
from tests.conftest import FleetFactory
from tests.fleetkit import Fleet
from tests.migratekit import migrator, shipped

# Everything the brief asks a tenant schema to hold, in the tenant's own names (run with
# search_path = <tenant schema>, public, as the migrator runs tenant files).
TENANT_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN code3 AS text COLLATE "C" NOT NULL DEFAULT 'abc' CHECK (length(VALUE) = 3);
CREATE TYPE pair AS (a posint, b mood[]);
CREATE FUNCTION make_code() RETURNS text LANGUAGE sql AS $$ SELECT 'c-' || md5(random()::text) $$;
CREATE TABLE items (
  id bigserial PRIMARY KEY,
  sku text NOT NULL COLLATE "C" UNIQUE,
  code text NOT NULL DEFAULT make_code(),
  qty posint NOT NULL DEFAULT 1,
  price numeric(10,2) NOT NULL CHECK (price >= 0),
  total numeric GENERATED ALWAYS AS (qty * price) STORED,
  feel mood DEFAULT 'ok',
  country text REFERENCES public.ms_countries (code),
  dropped int,
  created_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 90);
ALTER TABLE items DROP COLUMN dropped;
CREATE TABLE orders (
  n int GENERATED ALWAYS AS IDENTITY (START WITH 100 INCREMENT BY 5) PRIMARY KEY,
  item_id bigint NOT NULL REFERENCES items (id) ON DELETE CASCADE,
  note text,
  p pair
);
CREATE INDEX orders_noted_idx ON orders (item_id) WHERE note IS NOT NULL;
CREATE INDEX items_lower_sku_idx ON items (lower(sku));
CREATE TABLE audit (at timestamptz NOT NULL DEFAULT now(), what text);
ALTER TABLE audit REPLICA IDENTITY FULL;
CREATE TABLE tags (name code3 NOT NULL, note text);
CREATE UNIQUE INDEX tags_name_idx ON tags (name);
ALTER TABLE tags REPLICA IDENTITY USING INDEX tags_name_idx;
CREATE VIEW item_orders AS SELECT i.sku, count(o.n) AS orders FROM items i LEFT JOIN orders o ON o.item_id = i.id GROUP BY i.sku;
CREATE FUNCTION log_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit (what) VALUES ('order ' || NEW.n); RETURN NEW; END $$;
CREATE TRIGGER orders_log AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION log_order();
COMMENT ON TABLE items IS 'what the tenant stocks';
COMMENT ON COLUMN items.sku IS 'stock keeping unit';
COMMENT ON TYPE mood IS 'how it feels';
COMMENT ON CONSTRAINT items_sku_key ON items IS 'one row per sku';
COMMENT ON TRIGGER orders_log ON orders IS 'every order is audited';
COMMENT ON VIEW item_orders IS 'orders per sku';
COMMENT ON DOMAIN code3 IS 'three letters';
"""

PUBLIC_DDL = """
CREATE TABLE IF NOT EXISTS public.ms_countries (code text PRIMARY KEY);
INSERT INTO public.ms_countries VALUES ('fr'), ('de') ON CONFLICT DO NOTHING;
"""


async def _connect(fleet: Fleet, shard_id: str) -> asyncpg.Connection:
    return await asyncpg.connect(fleet.shard_dsns[shard_id])


async def _in_schema(conn: asyncpg.Connection, schema: str, sql: str) -> None:
    """Run ``sql`` (several statements) as the owner with the tenant's search_path."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('search_path', quote_ident($1) || ', public', true)", schema)
        await conn.execute(sql)


async def _as_tenant(conn: asyncpg.Connection, schema: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """One statement as the tenant's own role (what the fence switches to), in its schema."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('search_path', quote_ident($1) || ', public', true), "
                           "set_config('role', fleet.tenant_role($1)::text, true)", schema)
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows


async def _copy_rows(src: asyncpg.Connection, dst: asyncpg.Connection, ts: TenantSchema) -> None:
    """What the mover does between the phases: every table's rows, the columns TableInfo
    names (generated columns are computed by the target)."""
    for t in ts.tables:
        records = await src.fetch("SELECT * FROM " + t.qualified)  # server-quoted regclass text
        rows = [tuple(r[c] for c in t.columns) for r in records]
        await dst.copy_records_to_table(t.name, schema_name=ts.schema_name, columns=list(t.columns), records=rows)


async def _sync_sequences(src: asyncpg.Connection, dst: asyncpg.Connection, ts: TenantSchema) -> None:
    for seq in ts.sequences:
        last = await src.fetchval("SELECT pg_sequence_last_value($1::regclass)", seq)
        if last is not None:
            await dst.execute("SELECT setval($1::regclass, $2)", seq, last)


async def _recreate(src: asyncpg.Connection, dst: asyncpg.Connection, schema: str) -> TenantSchema:
    ts = await read_tenant_schema(src, schema)
    assert ts.problems == []
    await dst.execute("SELECT fleet.create_tenant_schema($1)", schema)
    await create_tenant_schema_objects(dst, ts, "pre")
    await _copy_rows(src, dst, ts)
    await create_tenant_schema_objects(dst, ts, "post")
    await _sync_sequences(src, dst, ts)
    return ts


@pytest.fixture
async def two_shards(fresh_fleet: FleetFactory) -> AsyncIterator[tuple[Fleet, TenantRecord, asyncpg.Connection,
                                                                        asyncpg.Connection]]:
    f = await fresh_fleet(shards=2)
    rec = await f.directory.create_tenant("ms-" + uuid.uuid4().hex[:8], shard_id="shard1")
    src, dst = await _connect(f, "shard1"), await _connect(f, "shard2")
    try:
        yield f, rec, src, dst
    finally:
        await src.close()
        await dst.close()


async def test_a_tenant_schema_recreated_on_another_shard_has_the_same_fingerprint_and_its_objects_work(
        two_shards: tuple[Fleet, TenantRecord, asyncpg.Connection, asyncpg.Connection]) -> None:
    _f, rec, src, dst = two_shards
    schema = rec.schema
    for conn in (src, dst):
        await conn.execute(PUBLIC_DDL)
    await _in_schema(src, schema, TENANT_DDL)
    if await src.fetchval("SELECT current_setting('server_version_num')::int") >= 180000:
        await _in_schema(src, schema, "ALTER TABLE items ADD COLUMN doubled numeric GENERATED ALWAYS AS (price * 2) VIRTUAL;")
    await _in_schema(src, schema, """
        INSERT INTO tags VALUES ('xyz', 'first');
        INSERT INTO items (sku, price, country) VALUES ('a', 2.50, 'fr'), ('b', 1, NULL);
        INSERT INTO orders (item_id, note, p) VALUES (1, 'first', ROW(3, '{ok,happy}')), (2, NULL, NULL);
    """)

    ts = await _recreate(src, dst, schema)

    assert [(t.name, t.columns, t.primary_key, t.replica_identity) for t in ts.tables] == [
        ("audit", ("at", "what"), (), "full"),
        ("items", ("id", "sku", "code", "qty", "price", "feel", "country", "created_at"), ("id",), "default"),
        ("orders", ("n", "item_id", "note", "p"), ("n",), "default"),
        ("tags", ("name", "note"), (), "index"),
    ]
    assert all(t.bytes > 0 for t in ts.tables)
    assert sorted(ts.sequences) == [f"{schema}.items_id_seq", f"{schema}.orders_n_seq"]
    assert not any("CREATE TRIGGER" in s or "FOREIGN KEY" in s or "CREATE INDEX" in s for s in ts.pre_copy)
    assert await fingerprint(dst, schema) == ts.fingerprint == await fingerprint(src, schema)
    assert (await read_tenant_schema(dst, schema)).post_copy == ts.post_copy

    # the copy works, as the tenant's own role (granted on every copied table and sequence)
    rows = await _as_tenant(dst, schema, "INSERT INTO orders (item_id, note) VALUES (1, 'moved') RETURNING n")
    assert rows[0]["n"] == 110  # identity continues after setval: 100, 105, then 110
    rows = await _as_tenant(dst, schema, "INSERT INTO items (sku, qty, price) VALUES ('c', 3, 2) "
                                         "RETURNING id, total, code, feel")
    assert (rows[0]["id"], rows[0]["total"], rows[0]["feel"]) == (3, 6, "ok") and rows[0]["code"].startswith("c-")
    audit = await _as_tenant(dst, schema, "SELECT what FROM audit ORDER BY at, what")
    assert [r["what"] for r in audit] == ["order 100", "order 105", "order 110"]  # copied rows, then the trigger
    view = await _as_tenant(dst, schema, "SELECT sku, orders FROM item_orders ORDER BY sku")
    assert [(r["sku"], r["orders"]) for r in view] == [("a", 2), ("b", 1), ("c", 0)]
    assert (await _as_tenant(dst, schema, "SELECT (p).b FROM orders WHERE n = 100"))[0]["b"] == ["ok", "happy"]
    assert (await _as_tenant(dst, schema, "SELECT name FROM tags"))[0]["name"] == "xyz"
    await _as_tenant(dst, schema, "INSERT INTO tags (note) VALUES ('domain default')")
    await _as_tenant(dst, schema, "UPDATE audit SET what = 'x' WHERE what = 'order 110'")
    await _as_tenant(dst, schema, "DELETE FROM audit WHERE what = 'x'")
    with pytest.raises(asyncpg.CheckViolationError):
        await _as_tenant(dst, schema, "INSERT INTO items (sku, price) VALUES ('d', -1)")
    with pytest.raises(asyncpg.UniqueViolationError):
        await _as_tenant(dst, schema, "INSERT INTO items (sku, price) VALUES ('a', 1)")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await _as_tenant(dst, schema, "INSERT INTO items (sku, price, country) VALUES ('e', 1, 'xx')")
    comments = await dst.fetchval("SELECT obj_description($1::regclass, 'pg_class')", f"{schema}.items")
    assert comments == "what the tenant stocks"


async def test_a_changed_column_type_on_the_target_changes_the_fingerprint(
        two_shards: tuple[Fleet, TenantRecord, asyncpg.Connection, asyncpg.Connection]) -> None:
    _f, rec, src, dst = two_shards
    await _in_schema(src, rec.schema, "CREATE TABLE things (id bigint PRIMARY KEY, label varchar(20));")
    ts = await _recreate(src, dst, rec.schema)
    assert await fingerprint(dst, rec.schema) == ts.fingerprint
    await _in_schema(dst, rec.schema, "ALTER TABLE things ALTER COLUMN label TYPE varchar(30);")
    assert await fingerprint(dst, rec.schema) != ts.fingerprint


async def test_the_fingerprint_ignores_oids_creation_order_dropped_columns_and_rows(
        two_shards: tuple[Fleet, TenantRecord, asyncpg.Connection, asyncpg.Connection]) -> None:
    _f, rec, src, dst = two_shards
    await _in_schema(src, rec.schema, """
        CREATE TABLE a (id int PRIMARY KEY, gone text, v text);
        CREATE TABLE b (id int PRIMARY KEY, a_id int REFERENCES a (id));
        CREATE INDEX b_a_idx ON b (a_id);
        ALTER TABLE a DROP COLUMN gone;
        INSERT INTO a VALUES (1, 'x');
    """)
    await dst.execute("SELECT fleet.create_tenant_schema($1)", rec.schema)
    await _in_schema(dst, rec.schema, """
        CREATE TABLE filler (x int);  -- other OIDs
        CREATE TABLE b (id int PRIMARY KEY, a_id int);
        CREATE TABLE a (id int PRIMARY KEY, v text);
        CREATE INDEX b_a_idx ON b (a_id);
        ALTER TABLE b ADD CONSTRAINT b_a_id_fkey FOREIGN KEY (a_id) REFERENCES a (id);
        DROP TABLE filler;
    """)
    assert await fingerprint(src, rec.schema) == await fingerprint(dst, rec.schema)


async def test_the_plugins_tenant_schemas_recreate_on_another_shard_with_equal_fingerprints(
        two_shards: tuple[Fleet, TenantRecord, asyncpg.Connection, asyncpg.Connection]) -> None:
    f, rec, src, dst = two_shards
    for plugin in ("inventory", "restock"):
        async with migrator(f, shipped(plugin)) as m:
            report = await m.apply(RunOptions())
        assert report.state == "done", plugin
    await _in_schema(src, rec.schema, """
        INSERT INTO items (sku, name, qty, location) VALUES ('s1', 'bolt', 5, 'A1'), ('s2', 'nut', 0, NULL);
        INSERT INTO restock_requests (sku, qty) VALUES ('s2', 10);
    """)
    ts = await _recreate(src, dst, rec.schema)
    assert {t.name for t in ts.tables} == {"items", "restock_requests", "restock_events_seen"}
    assert await fingerprint(dst, rec.schema) == ts.fingerprint
    rows = await _as_tenant(dst, rec.schema, "INSERT INTO restock_requests (sku, qty) VALUES ('s1', 1) RETURNING id")
    assert rows[0]["id"] == 2
    assert len(await _as_tenant(dst, rec.schema, "SELECT * FROM items WHERE location = 'A1'")) == 1


async def test_a_table_without_a_primary_key_or_replica_identity_is_a_problem_naming_it(fleet: Fleet) -> None:
    rec = await fleet.directory.create_tenant("ms-" + uuid.uuid4().hex[:8])
    conn = await _connect(fleet, rec.shard_id)
    try:
        await _in_schema(conn, rec.schema, """
            CREATE TABLE keyed (id int PRIMARY KEY);
            CREATE TABLE full_ident (v text);
            ALTER TABLE full_ident REPLICA IDENTITY FULL;
            CREATE TABLE loose (v text);
            CREATE TABLE nothing_ident (id int PRIMARY KEY);
            ALTER TABLE nothing_ident REPLICA IDENTITY NOTHING;
        """)
        ts = await read_tenant_schema(conn, rec.schema)
        assert len(ts.problems) == 2, ts.problems
        assert any(f"{rec.schema}.loose has no primary key or replica identity" in p for p in ts.problems)
        assert any(f"{rec.schema}.nothing_ident has REPLICA IDENTITY NOTHING" in p for p in ts.problems)
        with pytest.raises(ValueError, match="can't be moved"):
            await create_tenant_schema_objects(conn, ts, "pre")
    finally:
        await conn.close()


async def test_unsupported_objects_are_problems_naming_each(fleet: Fleet) -> None:
    rec = await fleet.directory.create_tenant("ms-" + uuid.uuid4().hex[:8])
    outside = "ms_ref_" + uuid.uuid4().hex[:8]  # a public table pointing into the schema
    conn = await _connect(fleet, rec.shard_id)
    try:
        await _in_schema(conn, rec.schema, """
            CREATE TABLE base (id int PRIMARY KEY, v int);
            CREATE MATERIALIZED VIEW totals AS SELECT sum(v) AS s FROM base;
            CREATE TABLE parted (id int, PRIMARY KEY (id)) PARTITION BY RANGE (id);
            CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10);
            CREATE TABLE child (extra int) INHERITS (base);
            CREATE RULE no_delete AS ON DELETE TO base DO INSTEAD NOTHING;
            CREATE TABLE secret (id int PRIMARY KEY);
            ALTER TABLE secret ENABLE ROW LEVEL SECURITY;
            CREATE POLICY mine ON secret USING (id > 0);
            CREATE AGGREGATE total (int) (SFUNC = int4pl, STYPE = int);
            CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
            CREATE COLLATION my_coll FROM "C";
            CREATE TYPE span AS RANGE (subtype = int);
        """)
        await conn.execute(f"CREATE TABLE public.{outside} (id int REFERENCES {rec.schema}.base (id))")  # test-made names
        problems = (await read_tenant_schema(conn, rec.schema)).problems
        s = rec.schema
        for expected in (f"{s}.totals is a materialized view", f"{s}.parted is a partitioned table",
                         f"table {s}.parted_1 is a partition", f"table {s}.child inherits from",
                         f"rule no_delete on {s}.base", f"policy mine on {s}.secret",
                         f"table {s}.secret has row-level security", f"{s}.total(integer) is an aggregate",
                         f"table {s}.scratch is UNLOGGED", f"collation {s}.my_coll is in the schema",
                         f"type {s}.span is a range type", f"on table public.{outside} depends on table {s}.base"):
            assert any(expected in p for p in problems), (expected, problems)
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS public.{outside}")
        await conn.close()


async def test_bad_names_a_missing_schema_and_a_non_empty_target_are_refused(fleet: Fleet) -> None:
    rec = await fleet.directory.create_tenant("ms-" + uuid.uuid4().hex[:8])
    conn = await _connect(fleet, rec.shard_id)
    try:
        for bad in ("public", "t_123", 't_0123456789abcdef0123456789abcdeF', "t_x; DROP SCHEMA public"):
            with pytest.raises(ValueError, match="not a tenant schema name"):
                await read_tenant_schema(conn, bad)
        with pytest.raises(LookupError, match="does not exist"):
            await fingerprint(conn, "t_" + uuid.uuid4().hex)
        await _in_schema(conn, rec.schema, "CREATE TABLE t (id int PRIMARY KEY);")
        ts = await read_tenant_schema(conn, rec.schema)
        with pytest.raises(ValueError, match="not empty"):
            await create_tenant_schema_objects(conn, ts, "pre")
        with pytest.raises(LookupError, match="does not exist on the target"):
            await create_tenant_schema_objects(conn, TenantSchema(schema_name="t_" + uuid.uuid4().hex), "pre")
        assert await fingerprint(conn, rec.schema) == ts.fingerprint  # refusals changed nothing
    finally:
        await conn.close()


async def test_quoted_names_disabled_triggers_not_valid_checks_and_procedures_round_trip(
        two_shards: tuple[Fleet, TenantRecord, asyncpg.Connection, asyncpg.Connection]) -> None:
    _f, rec, src, dst = two_shards
    await _in_schema(src, rec.schema, """
        CREATE TYPE "Odd Kind" AS ENUM ('it''s', 'plain');
        CREATE DOMAIN small AS int;
        CREATE TABLE "Odd Table" ("Weird ""col"" name" int PRIMARY KEY, kind "Odd Kind", n small);
        INSERT INTO "Odd Table" VALUES (1, 'it''s', -5);
        ALTER DOMAIN small ADD CONSTRAINT small_positive CHECK (VALUE > 0) NOT VALID;
        ALTER TABLE "Odd Table" ADD CONSTRAINT n_small CHECK (n < 100) NOT VALID;
        CREATE TABLE refs (id int PRIMARY KEY, odd int REFERENCES "Odd Table" DEFERRABLE INITIALLY DEFERRED);
        CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.id := NEW.id + 1000; RETURN NEW; END $$;
        CREATE TRIGGER refs_bump BEFORE INSERT ON refs FOR EACH ROW EXECUTE FUNCTION bump();
        ALTER TABLE refs DISABLE TRIGGER refs_bump;
        CREATE VIEW odd_view AS SELECT "Weird ""col"" name" AS w FROM "Odd Table";
        CREATE FUNCTION odd_insert() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN INSERT INTO "Odd Table" ("Weird ""col"" name") VALUES (NEW.w); RETURN NEW; END $$;
        CREATE TRIGGER odd_view_insert INSTEAD OF INSERT ON odd_view FOR EACH ROW EXECUTE FUNCTION odd_insert();
        CREATE FUNCTION odd_count() RETURNS bigint LANGUAGE sql BEGIN ATOMIC SELECT count(*) FROM "Odd Table"; END;
        CREATE PROCEDURE add_ref(i int) LANGUAGE sql AS $$ INSERT INTO refs (id) VALUES (i) $$;
        COMMENT ON COLUMN "Odd Table"."Weird ""col"" name" IS 'it''s odd';
        COMMENT ON CONSTRAINT small_positive ON DOMAIN small IS 'checked later';
    """)
    ts = await _recreate(src, dst, rec.schema)
    assert [t.columns for t in ts.tables] == [('Weird "col" name', "kind", "n"), ("id", "odd")]
    assert await fingerprint(dst, rec.schema) == ts.fingerprint
    await _as_tenant(dst, rec.schema, "INSERT INTO odd_view (w) VALUES (2)")  # the INSTEAD OF trigger
    await _as_tenant(dst, rec.schema, "CALL add_ref(7)")
    assert [r["id"] for r in await _as_tenant(dst, rec.schema, "SELECT id FROM refs")] == [7]  # trigger disabled
    assert (await _as_tenant(dst, rec.schema, "SELECT odd_count() AS c"))[0]["c"] == 2
    with pytest.raises(asyncpg.CheckViolationError):  # NOT VALID: the copied -5 stays, new rows are checked
        await _as_tenant(dst, rec.schema, "INSERT INTO \"Odd Table\" VALUES (3, 'plain', -1)")


async def test_reads_plan_their_catalog_queries_once_per_connection_with_the_same_result(
        two_shards: tuple[Fleet, TenantRecord, asyncpg.Connection, asyncpg.Connection],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A move reads its tenant's schema three times; planned anew at each call the catalog
    queries were half of a read's server CPU: a read's statements run on generic plans
    (made once per connection), and read what custom plans read."""
    _f, rec, src, _dst = two_shards
    await src.execute(PUBLIC_DDL)
    await _in_schema(src, rec.schema, TENANT_DDL)
    first = await read_tenant_schema(src, rec.schema)
    for _ in range(6):  # past the 5 custom plans PostgreSQL makes before it may choose a generic one
        assert await read_tenant_schema(src, rec.schema) == first
    plans = await src.fetchrow("SELECT count(*) AS statements, sum(generic_plans) AS generic, "
                               "sum(custom_plans) AS custom FROM pg_prepared_statements "
                               "WHERE statement NOT LIKE '%quote_ident($1)%'")  # but _in_schema's
    assert plans["statements"] >= 10 and plans["custom"] == 0 and plans["generic"] >= 7 * 10

    # the same read planned per call (the session as it was before): the same definition
    monkeypatch.setattr(schema_copy, "_SESSION_FOR_READ", "SELECT pg_catalog.set_config('search_path', '', true)")
    other = await _connect(_f, "shard1")
    try:
        assert await read_tenant_schema(other, rec.schema) == first
        custom = await other.fetchval("SELECT sum(custom_plans) FROM pg_prepared_statements")
        assert custom > 0  # the comparison did use custom plans
    finally:
        await other.close()
