"""The catalog queries behind `shard_migrations.moves.schema_copy`, one per kind of object.

Each returns statements the server itself formatted (``format('%I')``, ``regclass`` and
``regtype`` output, ``pg_get_*def``); they run with an empty search_path (pg_catalog
only), so every name in the text is schema-qualified. Relations, types and functions are
reached by oid (`Q_MEMBERS` finds them through pg_depend, which is indexed by what an
entry references), never by scanning a catalog for the schema. The f-strings below only
join the constant fragments defined here: no value ever enters the text.
"""
from __future__ import annotations

Q_NAMESPACE = "SELECT oid FROM pg_namespace WHERE nspname = $1"

# Objects in a schema: those that depend on it (deptype 'n'; the schema's default
# privileges depend on it too, as 'a'). Relations, types, functions, and every other
# kind of schema object; not indexes, TOAST tables, a composite type's pg_class row,
# nor the array and row types made along with another object (they depend on that).
Q_MEMBERS = """
SELECT d.classid::regclass::text AS catalog, d.objid AS oid, pg_describe_object(d.classid, d.objid, 0) AS what
FROM pg_depend d
WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = $1 AND d.deptype = 'n'
"""

Q_TARGET_STATE = """
SELECT n.oid,
       (SELECT count(*) FROM pg_depend d WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = n.oid
          AND d.deptype = 'n') AS objects
FROM pg_namespace n WHERE n.nspname = $1
"""

# $1: the relations that depend on the schema, $2: its types. Their indexes and the
# composite types' pg_class rows are in the schema too.
Q_CLASSES = """
SELECT c.oid, c.relkind::text AS relkind, c.oid::regclass::text AS q, c.relpersistence::text AS persistence,
       c.relispartition, c.relrowsecurity OR c.relforcerowsecurity AS rls, c.reloftype <> 0 AS typed,
       coalesce(am.amname::text, '') AS am
FROM pg_class c LEFT JOIN pg_am am ON am.oid = c.relam
WHERE c.oid IN (SELECT unnest($1::oid[])
                UNION SELECT i.indexrelid FROM pg_index i WHERE i.indrelid = ANY($1::oid[])
                UNION SELECT t.typrelid FROM pg_type t WHERE t.oid = ANY($2::oid[]) AND t.typrelid <> 0)
ORDER BY c.relname
"""

# sequence options as CREATE SEQUENCE / identity columns spell them (s: pg_sequence)
SEQ_OPTIONS = ("format('INCREMENT BY %s MINVALUE %s MAXVALUE %s START WITH %s CACHE %s %s', s.seqincrement, "
                "s.seqmin, s.seqmax, s.seqstart, s.seqcache, CASE WHEN s.seqcycle THEN 'CYCLE' ELSE 'NO CYCLE' END)")

# reloptions, each value quoted as a literal (c: pg_class)
RELOPTIONS = ("(SELECT string_agg(format('%s=%L', split_part(o, '=', 1), substr(o, strpos(o, '=') + 1)), ', ') "
               "FROM unnest(c.reloptions) o)")

# One column's definition (a: pg_attribute, d: pg_attrdef, t: its type, s/idseq: its
# identity sequence, nn: its NOT NULL constraint's name on PostgreSQL 18+, where NOT
# NULL constraints are named; no row before 18).
COLUMN_DEF = f"""
format('%I %s%s%s%s%s', a.attname, format_type(a.atttypid, a.atttypmod),
       CASE WHEN a.attcollation <> t.typcollation THEN ' COLLATE ' || a.attcollation::regcollation::text ELSE '' END,
       CASE WHEN a.attgenerated = 's' THEN format(' GENERATED ALWAYS AS (%s) STORED', pg_get_expr(d.adbin, d.adrelid))
            WHEN a.attgenerated = 'v' THEN format(' GENERATED ALWAYS AS (%s) VIRTUAL', pg_get_expr(d.adbin, d.adrelid))
            WHEN d.adbin IS NOT NULL THEN ' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid) ELSE '' END,
       CASE WHEN a.attidentity IN ('a', 'd') THEN
              format(' GENERATED %s AS IDENTITY (SEQUENCE NAME %s %s)',
                     CASE a.attidentity WHEN 'a' THEN 'ALWAYS' ELSE 'BY DEFAULT' END, idseq.seq::regclass,
                     {SEQ_OPTIONS})
            ELSE '' END,
       CASE WHEN nn.conname IS NOT NULL THEN format(' CONSTRAINT %I NOT NULL', nn.conname)
            WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END)
"""

COLUMNS_OF = f"""
SELECT a.attnum, a.attname, a.attgenerated, {COLUMN_DEF} AS def
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN LATERAL (SELECT dep.objid AS seq FROM pg_depend dep
                   WHERE dep.refclassid = 'pg_class'::regclass AND dep.refobjid = a.attrelid
                     AND dep.refobjsubid = a.attnum AND dep.classid = 'pg_class'::regclass
                     AND dep.deptype = 'i' LIMIT 1) idseq ON true
LEFT JOIN pg_sequence s ON s.seqrelid = idseq.seq
LEFT JOIN LATERAL (SELECT con.conname FROM pg_constraint con
                   WHERE con.conrelid = a.attrelid AND con.contype = 'n' AND con.conkey = ARRAY[a.attnum]
                   LIMIT 1) nn ON true
WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
"""

Q_TABLES = f"""
SELECT c.relname AS name, c.oid::regclass::text AS q, c.relreplident::text AS replident,
       format('CREATE TABLE %s (%s)%s', c.oid::regclass, coalesce(cols.defs, ''),
              coalesce(' WITH (' || {RELOPTIONS} || ')', '')) AS create,
       cols.names AS columns,
       ARRAY(SELECT a.attname::text FROM pg_constraint con CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY k(num, i)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num
             WHERE con.conrelid = c.oid AND con.contype = 'p' ORDER BY k.i) AS primary_key,
       CASE WHEN c.relreplident = 'f' THEN format('ALTER TABLE %s REPLICA IDENTITY FULL', c.oid::regclass)
            WHEN c.relreplident = 'i' THEN
              (SELECT format('ALTER TABLE %s REPLICA IDENTITY USING INDEX %I', c.oid::regclass, ic.relname)
               FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
               WHERE i.indrelid = c.oid AND i.indisreplident) END AS replident_stmt,
       CASE WHEN $2 THEN pg_total_relation_size(c.oid) ELSE 0 END AS bytes
FROM pg_class c
CROSS JOIN LATERAL (SELECT string_agg(x.def, ', ' ORDER BY x.attnum) AS defs,
                           array_agg(x.attname::text ORDER BY x.attnum) FILTER (WHERE x.attgenerated = '') AS names
                    FROM ({COLUMNS_OF}) x) cols
WHERE c.oid = ANY($1::oid[]) AND c.relkind = 'r'
ORDER BY c.relname
"""

Q_SEQUENCES = f"""
SELECT c.oid::regclass::text AS q, dep.deptype::text AS deptype,
       format('CREATE SEQUENCE %s AS %s %s', c.oid::regclass, format_type(s.seqtypid, NULL), {SEQ_OPTIONS}) AS create,
       CASE WHEN dep.deptype = 'a' THEN format('ALTER SEQUENCE %s OWNED BY %s.%I', c.oid::regclass,
                                              dep.refobjid::regclass, a.attname) END AS owned_by,
       dep.deptype = 'a' AND NOT dep.refobjid = ANY($1::oid[]) AS owner_outside
FROM pg_class c JOIN pg_sequence s ON s.seqrelid = c.oid
LEFT JOIN pg_depend dep ON dep.classid = 'pg_class'::regclass AND dep.objid = c.oid AND dep.objsubid = 0
     AND dep.refclassid = 'pg_class'::regclass AND dep.deptype IN ('a', 'i')
LEFT JOIN pg_attribute a ON a.attrelid = dep.refobjid AND a.attnum = dep.refobjsubid
WHERE c.oid = ANY($1::oid[]) AND c.relkind = 'S'
ORDER BY c.relname
"""

# Constraints of the schema's tables (NOT NULL ones are part of their column). ``replident``:
# the constraint whose index is the table's replica identity (needed before the copy).
Q_CONSTRAINTS = """
SELECT con.oid, con.contype::text AS kind, quote_ident(con.conname) AS q, con.conrelid::regclass::text AS rel_q,
       format('ALTER TABLE %s ADD CONSTRAINT %I %s', con.conrelid::regclass, con.conname,
              pg_get_constraintdef(con.oid)) AS stmt,
       coalesce(ri.indisreplident, false) AS replident,
       con.confrelid::regclass::text AS ref_q,
       con.contype = 'f' AND fc.relnamespace <> $2 AND fc.relnamespace <> 'public'::regnamespace AS ref_outside
FROM pg_constraint con
LEFT JOIN pg_index ri ON ri.indexrelid = con.conindid AND ri.indrelid = con.conrelid AND con.contype IN ('u', 'x')
LEFT JOIN pg_class fc ON fc.oid = con.confrelid
WHERE con.conrelid = ANY($1::oid[]) AND con.contype IN ('p', 'u', 'x', 'c', 'f')
ORDER BY con.conrelid::regclass::text, con.conname
"""

# Indexes that no constraint made (those come with their constraint).
Q_INDEXES = """
SELECT i.indexrelid::regclass::text AS q, pg_get_indexdef(i.indexrelid) AS stmt, i.indisreplident AS replident,
       i.indisvalid AS valid
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = ANY($1::oid[])
  AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conrelid = i.indrelid AND con.conindid = i.indexrelid
                  AND con.contype IN ('p', 'u', 'x'))
ORDER BY ic.relname
"""

# Types made by CREATE TYPE / CREATE DOMAIN (not a table's row type, nor an array or
# multirange type made along with another). ``deps``: the types a domain or composite
# type is built on (an array's element type). A domain's NOT VALID checks can't be
# part of CREATE DOMAIN: ``late_checks``, after the copy.
Q_TYPES = """
WITH ty AS (
  SELECT t.*, c.relkind AS crelkind FROM pg_type t LEFT JOIN pg_class c ON c.oid = t.typrelid
  WHERE t.oid = ANY($1::oid[])
    AND NOT EXISTS (SELECT 1 FROM pg_type e WHERE e.oid = t.typelem AND e.typarray = t.oid)
    AND NOT EXISTS (SELECT 1 FROM pg_range r WHERE r.rngmultitypid = t.oid)
    AND (t.typrelid = 0 OR c.relkind = 'c')
)
SELECT ty.oid, ty.typtype::text AS kind, ty.oid::regtype::text AS q,
       CASE ty.typtype
         WHEN 'e' THEN format('CREATE TYPE %s AS ENUM (%s)', ty.oid::regtype,
                              (SELECT coalesce(string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder), '')
                               FROM pg_enum e WHERE e.enumtypid = ty.oid))
         WHEN 'c' THEN format('CREATE TYPE %s AS (%s)', ty.oid::regtype,
                              (SELECT coalesce(string_agg(format('%I %s%s', a.attname, format_type(a.atttypid, a.atttypmod),
                                        CASE WHEN a.attcollation <> at.typcollation
                                             THEN ' COLLATE ' || a.attcollation::regcollation::text ELSE '' END),
                                        ', ' ORDER BY a.attnum), '')
                               FROM pg_attribute a JOIN pg_type at ON at.oid = a.atttypid
                               WHERE a.attrelid = ty.typrelid AND a.attnum > 0 AND NOT a.attisdropped))
         WHEN 'd' THEN format('CREATE DOMAIN %s AS %s%s%s%s%s', ty.oid::regtype, format_type(ty.typbasetype, ty.typtypmod),
                              CASE WHEN ty.typcollation <> bt.typcollation
                                   THEN ' COLLATE ' || ty.typcollation::regcollation::text ELSE '' END,
                              coalesce(' DEFAULT ' || pg_get_expr(ty.typdefaultbin, 0), ''),
                              CASE WHEN ty.typnotnull AND NOT EXISTS (SELECT 1 FROM pg_constraint n
                                     WHERE n.contypid = ty.oid AND n.contype = 'n') THEN ' NOT NULL' ELSE '' END,
                              (SELECT coalesce(string_agg(format(' CONSTRAINT %I %s', k.conname, pg_get_constraintdef(k.oid)),
                                                          '' ORDER BY k.conname), '')
                               FROM pg_constraint k WHERE k.contypid = ty.oid AND k.convalidated))
       END AS stmt,
       ARRAY(SELECT format('ALTER DOMAIN %s ADD CONSTRAINT %I %s', ty.oid::regtype, k.conname, pg_get_constraintdef(k.oid))
             FROM pg_constraint k WHERE k.contypid = ty.oid AND NOT k.convalidated ORDER BY k.conname) AS late_checks,
       CASE ty.typtype WHEN 'b' THEN 'base type' WHEN 'r' THEN 'range type' WHEN 'm' THEN 'multirange type'
                       WHEN 'p' THEN 'pseudo-type' END AS problem,
       ARRAY(SELECT CASE WHEN e.oid IS NOT NULL THEN e.oid ELSE x.oid END
             FROM pg_type x LEFT JOIN pg_type e ON e.oid = x.typelem AND e.typarray = x.oid
             WHERE x.oid = ty.typbasetype
                OR x.oid IN (SELECT a.atttypid FROM pg_attribute a
                             WHERE a.attrelid = ty.typrelid AND ty.typrelid <> 0 AND a.attnum > 0)) AS deps
FROM ty LEFT JOIN pg_type bt ON bt.oid = ty.typbasetype
ORDER BY ty.typname
"""

# ``early``: a column default, generated column or type uses it, so it must exist
# before the tables.
Q_FUNCTIONS = """
SELECT p.oid, p.oid::regprocedure::text AS q, p.prokind::text AS kind, l.lanname::text AS language,
       CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) END AS stmt,
       EXISTS (SELECT 1 FROM pg_depend d WHERE d.refclassid = 'pg_proc'::regclass AND d.refobjid = p.oid
               AND d.classid IN ('pg_attrdef'::regclass, 'pg_type'::regclass, 'pg_constraint'::regclass)) AS early
FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
WHERE p.oid = ANY($1::oid[])
ORDER BY p.oid::regprocedure::text
"""

Q_VIEWS = f"""
SELECT c.oid,
       format('CREATE VIEW %s%s AS %s', c.oid::regclass, coalesce(' WITH (' || {RELOPTIONS} || ')', ''),
              pg_get_viewdef(c.oid)) AS stmt,
       ARRAY(SELECT d.refobjid FROM pg_rewrite r JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass
             AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass
             WHERE r.ev_class = c.oid AND d.refobjid <> c.oid) AS deps
FROM pg_class c WHERE c.oid = ANY($1::oid[]) AND c.relkind = 'v'
ORDER BY c.relname
"""

Q_TRIGGERS = """
SELECT t.oid, pg_get_triggerdef(t.oid) AS stmt,
       CASE t.tgenabled WHEN 'D' THEN format('ALTER TABLE %s DISABLE TRIGGER %I', t.tgrelid::regclass, t.tgname)
                        WHEN 'R' THEN format('ALTER TABLE %s ENABLE REPLICA TRIGGER %I', t.tgrelid::regclass, t.tgname)
                        WHEN 'A' THEN format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', t.tgrelid::regclass, t.tgname)
       END AS enable_stmt
FROM pg_trigger t WHERE t.tgrelid = ANY($1::oid[]) AND NOT t.tgisinternal
ORDER BY t.tgrelid::regclass::text, t.tgname
"""

# $1 the schema's relations, $2 its types, $3 its functions.
Q_PROBLEMS = """
SELECT format('rule %I on %s: rules are not supported by moves', r.rulename, r.ev_class::regclass) AS problem
FROM pg_rewrite r WHERE r.ev_class = ANY($1::oid[]) AND r.rulename <> '_RETURN'
UNION ALL
SELECT format('table %s inherits from %s: table inheritance is not supported by moves', i.inhrelid::regclass,
              i.inhparent::regclass)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE (i.inhrelid = ANY($1::oid[]) OR i.inhparent = ANY($1::oid[])) AND NOT c.relispartition
UNION ALL
SELECT format('policy %I on %s: row-level security policies are not supported by moves', p.polname, p.polrelid::regclass)
FROM pg_policy p WHERE p.polrelid = ANY($1::oid[])
UNION ALL
SELECT format('%s belongs to an extension: not supported by moves', pg_describe_object(d.classid, d.objid, 0))
FROM pg_depend d WHERE d.deptype = 'e'
  AND ((d.classid = 'pg_class'::regclass AND d.objid = ANY($1::oid[]))
    OR (d.classid = 'pg_type'::regclass AND d.objid = ANY($2::oid[]))
    OR (d.classid = 'pg_proc'::regclass AND d.objid = ANY($3::oid[])))
UNION ALL
SELECT DISTINCT format('%s depends on %s, which is in the schema: a move would break it',
              pg_describe_object(d.classid, d.objid, 0), pg_describe_object(d.refclassid, d.refobjid, 0))
FROM pg_depend d
LEFT JOIN pg_constraint con ON d.classid = 'pg_constraint'::regclass AND con.oid = d.objid
LEFT JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = ANY($1::oid[]) AND d.deptype = 'n'
  AND ((con.oid IS NOT NULL AND con.contype = 'f' AND NOT con.conrelid = ANY($1::oid[]))
    OR (r.oid IS NOT NULL AND NOT r.ev_class = ANY($1::oid[])))
"""

# COMMENT statements for the schema and everything in it. pg_identify_object names the
# object as COMMENT ON expects it; a domain's constraint needs ON DOMAIN spelled out.
Q_COMMENTS = """
SELECT CASE WHEN o.type = 'domain constraint'
            THEN format('COMMENT ON CONSTRAINT %I ON DOMAIN %s IS %L', con.conname, con.contypid::regtype, d.description)
            ELSE format('COMMENT ON %s %s IS %L',
                        CASE WHEN o.type LIKE '% column' THEN 'COLUMN' WHEN o.type = 'table constraint' THEN 'CONSTRAINT'
                             WHEN o.type = 'composite type' THEN 'TYPE' ELSE upper(o.type) END,
                        o.identity, d.description) END AS stmt
FROM pg_description d CROSS JOIN LATERAL pg_identify_object(d.classoid, d.objoid, d.objsubid) o
LEFT JOIN pg_constraint con ON d.classoid = 'pg_constraint'::regclass AND con.oid = d.objoid
WHERE (d.classoid = 'pg_class'::regclass AND d.objoid = ANY($1::oid[]))
   OR (d.classoid = 'pg_type'::regclass AND d.objoid = ANY($2::oid[]))
   OR (d.classoid = 'pg_proc'::regclass AND d.objoid = ANY($3::oid[]))
   OR (d.classoid = 'pg_constraint'::regclass AND (d.objoid = ANY($4::oid[]) OR con.contypid = ANY($2::oid[])))
   OR (d.classoid = 'pg_trigger'::regclass AND d.objoid = ANY($5::oid[]))
   OR (d.classoid = 'pg_namespace'::regclass AND d.objoid = $6)
ORDER BY 1
"""
