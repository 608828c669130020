"""The one declaration of tenantfleet's own tables (SQLAlchemy Core).

`control` holds the control-plane database: the directory, the plugin registry,
tenant-owned roles and principals, and fleet run state. `shard` holds the ``fleet``
schema every shard carries: the migration ledger, the tenant fence and the event outbox.

The DDL executed against the servers is compiled from these declarations
(`control_ddl`, `shard_ddl`); nothing else writes CREATE TABLE for them. Tables added
after the baseline (schema version 5) are created by their Alembic revision instead
(`router/revisions`): ``console_sessions`` and ``console_audit`` (revision 0006), ``app_sessions``
(revision 0007).
"""
from __future__ import annotations

from sqlalchemy import (
    BigInteger, Boolean, CheckConstraint, Column, DateTime, ForeignKey, Identity, Index,
    Integer, MetaData, PrimaryKeyConstraint, Table, Text, UniqueConstraint, func, text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.schema import CreateIndex, CreateSchema, CreateTable

from router.keys import BOOTSTRAP_LOCK, SHARD_STATES, TENANT_STATES
from router.keys import SCHEMA_VERSION as SCHEMA_VERSION  # re-exported: tests and revisions read it here

# SCHEMA_VERSION (router.keys: read where SQLAlchemy isn't loaded) is bumped with every change
# below (and in `router.schema`'s shard preparation).

control = MetaData()
shard = MetaData(schema="fleet")


def _states(column: str, states: tuple[str, ...]) -> CheckConstraint:
    allowed = ", ".join(f"'{s}'" for s in states)  # constants from keys.py, never user text
    return CheckConstraint(f"{column} IN ({allowed})", name=f"{column}_valid")


def _now() -> Column[object]:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


schema_meta = Table(
    "tenantfleet_schema", control,
    Column("component", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# The shard's own record of the version that prepared it (control's is `schema_meta`):
# `router.schema.ensure_shard` refuses a shard whose version is newer than SCHEMA_VERSION.
shard_schema_meta = Table(
    "tenantfleet_schema", shard,
    Column("component", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

shards = Table(
    "shards", control,
    Column("shard_id", Text, primary_key=True),
    Column("dsn", Text, nullable=False),
    Column("state", Text, nullable=False, server_default="active"),
    Column("capacity", Integer, nullable=False, server_default="1000"),
    Column("weight", Integer, nullable=False, server_default="100"),
    _now(),
    # The request path's own LOGIN role on this shard and its generated password (version
    # 4; NULL until the shard is prepared by that version). Never selected for output.
    Column("login_role", Text, nullable=True),
    Column("login_password", Text, nullable=True),
    # How many tenants the directory has on this shard: kept by the triggers of
    # `TENANT_COUNT_DDL` in the same transaction as every insert, delete and shard change
    # of `tenants`, so placement and `shards list` read one row per shard instead of
    # counting 100k tenants (issue 12).
    Column("tenant_count", Integer, nullable=False, server_default="0"),
    _states("state", SHARD_STATES),
    CheckConstraint("capacity > 0", name="capacity_positive"),
)

tenants = Table(
    "tenants", control,
    Column("tenant_id", UUID(as_uuid=True), primary_key=True),
    Column("code", Text, nullable=False, unique=True),
    Column("schema_name", Text, nullable=False, unique=True),
    Column("shard_id", Text, ForeignKey("shards.shard_id"), nullable=False),
    Column("state", Text, nullable=False, server_default="provisioning"),
    Column("epoch", BigInteger, nullable=False, server_default="1"),
    _now(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    _states("state", TENANT_STATES),
    # Keyset pages (`tenants list`, GET /v1/tenants: ORDER BY code, after a code) by shard
    # or by state, and a shard's tenants in code order (the migrator's plan); the code's
    # own unique index serves the unfiltered list.
    Index("tenants_shard_code_idx", "shard_id", "code"),
    Index("tenants_state_code_idx", "state", "code"),
)

tenant_domains = Table(
    "tenant_domains", control,
    Column("domain", Text, primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.tenant_id", ondelete="CASCADE"), nullable=False),
    Index("tenant_domains_tenant_idx", "tenant_id"),
)

# --- plugin registry (the seed's tables) -------------------------------------------
sys_plugins = Table(
    "sys_plugins", control,
    Column("plugin_id", Text, primary_key=True),
    Column("api_version", Text, nullable=False),
    Column("version_installed", Text, nullable=False),
    Column("enabled_global", Boolean, nullable=False, server_default=text("false")),
    Column("killed", Boolean, nullable=False, server_default=text("false")),
    Column("config", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    _now(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

sys_tenant_plugins = Table(
    "sys_tenant_plugins", control,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.tenant_id", ondelete="CASCADE"), nullable=False),
    Column("plugin_id", Text, ForeignKey("sys_plugins.plugin_id"), nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=text("false")),
    Column("version_installed", Text, nullable=False),
    Column("config", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant_id", "plugin_id"),
    # one plugin over every tenant (the migrator's downgrade check, enabled tenants)
    Index("sys_tenant_plugins_plugin_idx", "plugin_id", "version_installed"),
)

sys_plugin_role_templates = Table(
    "sys_plugin_role_templates", control,
    Column("plugin_id", Text, nullable=False),
    Column("role_key", Text, nullable=False),
    Column("display_name", Text, nullable=False),
    Column("permissions", ARRAY(Text), nullable=False),
    Column("version", Text, nullable=False),
    PrimaryKeyConstraint("plugin_id", "role_key", "version"),
)

# tenant-owned: a tenant's roles and principals travel with the tenant, not the shard
roles = Table(
    "roles", control,
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.tenant_id", ondelete="CASCADE"), nullable=False),
    Column("role_key", Text, nullable=False),
    Column("display_name", Text, nullable=False),
    Column("permissions", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant_id", "role_key"),
)

principals = Table(
    "principals", control,
    Column("principal_id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.tenant_id", ondelete="CASCADE"), nullable=True),
    Column("name", Text, nullable=False),
    Column("key_hash", Text, nullable=False, unique=True),
    Column("roles", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("is_admin", Boolean, nullable=False, server_default=text("false")),
    _now(),
    # a tenant's keys (`keys list --tenant`), and the cascade when a tenant is deleted
    Index("principals_tenant_idx", "tenant_id"),
)

# --- fleet run state ----------------------------------------------------------------
fleet_runs = Table(
    "fleet_runs", control,
    Column("run_id", BigInteger, Identity(), primary_key=True),
    Column("kind", Text, nullable=False),                  # migrate | move | drain | rebalance
    Column("plugin_id", Text, nullable=True),
    Column("target_version", Text, nullable=True),
    Column("params", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("state", Text, nullable=False, server_default="planned"),  # planned|running|done|failed|cancelled
    Column("owner", Text, nullable=True),                  # host:pid of the process running it
    Column("heartbeat_at", DateTime(timezone=True), nullable=True),
    Column("summary", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    _now(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)

fleet_run_items = Table(
    "fleet_run_items", control,
    Column("run_id", BigInteger, ForeignKey("fleet_runs.run_id", ondelete="CASCADE"), nullable=False),
    Column("item_key", Text, nullable=False),              # "public:<shard>" or "tenant:<uuid>"
    Column("shard_id", Text, nullable=False),
    Column("tenant_id", UUID(as_uuid=True), nullable=True),
    Column("scope", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),  # pending|running|done|failed|skipped
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("run_id", "item_key"),
    Index("fleet_run_items_status_idx", "run_id", "status"),
)

# Which plugin handles which event on which host (host/subscriptions.py): each host
# writes its own rows and refreshes ``seen_at`` every few seconds; a row not refreshed
# within the TTL is a host that is gone. Events are delivered to every plugin that
# subscribes somewhere in the fleet, and settled once all of them handled it.
event_subscriptions = Table(
    "event_subscriptions", control,
    Column("host_id", Text, nullable=False),
    Column("plugin_id", Text, nullable=False),
    Column("event_name", Text, nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("host_id", "plugin_id", "event_name"),
    Index("event_subscriptions_seen_idx", "seen_at"),
)

# One row per tenant move (the run itself is the `fleet_runs` row of kind `move`). At most
# one open move per tenant (the partial unique index): a second `move` of the same tenant
# is refused. ``phase`` is recorded before each step's effects, so a resumed move knows
# what may exist; the names of the replication objects derive from ``run_id``.
tenant_moves = Table(
    "tenant_moves", control,
    Column("run_id", BigInteger, ForeignKey("fleet_runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), ForeignKey("tenants.tenant_id", ondelete="CASCADE"), nullable=False),
    Column("source_shard", Text, ForeignKey("shards.shard_id"), nullable=False),
    Column("target_shard", Text, ForeignKey("shards.shard_id"), nullable=False),
    Column("mode", Text, nullable=False),                  # online | offline
    Column("phase", Text, nullable=False, server_default="planned"),
    Column("epoch_before", BigInteger, nullable=False),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    _now(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("mode IN ('online', 'offline')", name="mode_valid"),
    CheckConstraint("source_shard <> target_shard", name="moves_somewhere"),
    Index("tenant_moves_open_idx", "tenant_id", unique=True,
          postgresql_where=text("phase NOT IN ('done', 'aborted')")),
)

# --- shard side: the `fleet` schema -----------------------------------------------------
sys_plugin_migrations = Table(
    "sys_plugin_migrations", shard,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("plugin_id", Text, nullable=False),
    Column("scope", Text, nullable=False),
    Column("tenant_id", UUID(as_uuid=True), nullable=True),   # NULL for public scope
    Column("name", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("checksum", Text, nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("scope IN ('public', 'tenant')", name="scope_valid"),
    CheckConstraint("(scope = 'public') = (tenant_id IS NULL)", name="tenant_matches_scope"),
    UniqueConstraint("plugin_id", "scope", "tenant_id", "name", name="sys_plugin_migrations_once",
                     postgresql_nulls_not_distinct=True),
)

tenant_fence = Table(
    "tenant_fence", shard,
    Column("tenant_id", UUID(as_uuid=True), primary_key=True),
    Column("schema_name", Text, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# The event outbox (STYLE.md habit 14): a plugin's event is written here in the same
# transaction as the change it reports, by fleet.emit_event below, and delivered after
# commit by the host (host/outbox.py). ``next_attempt_at`` is a lease: the writing host
# owns the first delivery until then, a relay that claims a row owns it until then; a
# row still undelivered after its lease is claimed again (at least once). Delivered rows
# are deleted after a retention period, so the table stays bounded by traffic.
event_outbox = Table(
    "event_outbox", shard,
    Column("event_id", UUID(as_uuid=True), primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("source", Text, nullable=False),                # the emitting plugin's id
    Column("name", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    _now(),
    Column("attempts", Integer, nullable=False, server_default="1"),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    # the plugins whose handlers ran for this event (delivered once every subscriber did)
    Column("handled_by", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    # what a relay sweeps: undelivered rows by due time
    Index("event_outbox_due_idx", "next_attempt_at", postgresql_where=text("delivered_at IS NULL")),
    # what the clean-up deletes
    Index("event_outbox_delivered_idx", "delivered_at", postgresql_where=text("delivered_at IS NOT NULL")),
)

# A move's final catch-up marker: written on the source under the exclusive fence and
# published (row-filtered to the move's run_id) with the tenant's tables; once the
# target holds it, the target holds every write the tenant committed before the fence.
move_markers = Table(
    "move_markers", shard,
    Column("run_id", BigInteger, primary_key=True),
    Column("seq", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Source schemas a move renamed out of the way (kept for a grace period, then dropped by
# `tenantfleet gc`).
retired_schemas = Table(
    "retired_schemas", shard,
    Column("schema_name", Text, primary_key=True),
    Column("tenant_id", UUID(as_uuid=True), nullable=False),
    Column("run_id", BigInteger, nullable=False),
    Column("retired_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Schema names are generated by the system (t_<32 hex>) and still never formatted into
# SQL client-side: these functions quote them server-side with format('%I').
SHARD_FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION fleet.create_tenant_schema(name text) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  v_existed boolean;
BEGIN
  IF name !~ '^t_[0-9a-f]{32}$' THEN
    RAISE EXCEPTION 'not a tenant schema name: %', name USING ERRCODE = '22023';
  END IF;
  v_existed := pg_catalog.to_regnamespace(name) IS NOT NULL;
  EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', name);
  -- a new schema holds nothing yet: skip looking for tables to grant (a pg_class scan)
  PERFORM fleet.ensure_tenant_roles(ARRAY[name], v_existed);
END $fn$;

-- Replaced by ensure_tenant_roles (the app role no longer holds tenant schemas).
DROP FUNCTION IF EXISTS fleet.grant_app_role(text[], boolean);

-- Each tenant schema's own role, fleet.tenant_role(schema) (see ensure_app_role for the
-- names): NOLOGIN, a member of the tenants' group role (public) and of nothing else,
-- USAGE on its schema and DML on its tables and sequences: those already there
-- (with_existing) and whatever the migrator creates later. ALTER DEFAULT PRIVILEGES
-- applies to objects created by the role running it, i.e. the shard DSN's owner role:
-- the same role the migrator connects as. A schema's default-ACL entries are dropped
-- with the schema. Existing tables are found in one pg_class scan for all
-- the schemas given: pg_class has no index on relnamespace alone, and GRANT ... ON ALL
-- TABLES IN SCHEMA scans it once per schema, which made catching up a shard quadratic
-- in its tenants. Idempotent; serialised per database by the bootstrap lock (two GRANTs
-- on one object at once fail with "tuple concurrently updated"). Roles are cluster-wide:
-- another database on this server (a tenant moved between databases of one server, or
-- a copy) may create the same role at once; the loser's 42710 / 23505 is absorbed, and
-- the role's rights in each database are that database's schema of the same name only.
-- Returns how many schemas.
CREATE OR REPLACE FUNCTION fleet.ensure_tenant_roles(names text[], with_existing boolean) RETURNS int
LANGUAGE plpgsql AS $fn$
DECLARE
  v_group name := fleet.tenant_group_role();
  v_name text;
  v_role name;
  r pg_catalog.pg_roles%ROWTYPE;
  v_list text;
  v_rights text;
  v_login name := fleet.login_role();
  v_pg16 boolean := pg_catalog.current_setting('server_version_num')::int >= 160000;
  v_switch name[] := '{}';
  v_new boolean;
BEGIN
  PERFORM pg_catalog.pg_advisory_xact_lock({bootstrap_lock});  -- router.keys.BOOTSTRAP_LOCK
  FOREACH v_name IN ARRAY names LOOP
    IF v_name !~ '^t_[0-9a-f]{32}$' THEN
      RAISE EXCEPTION 'not a tenant schema name: %', v_name USING ERRCODE = '22023';
    END IF;
    v_role := fleet.tenant_role(v_name);
    v_new := NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = v_role);
    IF v_new THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN INHERIT', v_role);
      EXCEPTION WHEN duplicate_object OR unique_violation THEN
        v_new := false;  -- another database on this server created it first
      END;
    END IF;
    -- A role of that name made by someone else with more power or other memberships
    -- would hand a tenant's transactions those rights: refuse it rather than use it.
    SELECT * INTO r FROM pg_catalog.pg_roles WHERE rolname = v_role;
    IF r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls OR r.rolcanlogin
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
                  WHERE m.member = r.oid AND g.rolname <> v_group) THEN
      RAISE EXCEPTION 'role % exists with attributes or memberships a tenant role must not have', v_role
        USING ERRCODE = '42501', HINT = format('drop it, or make it NOLOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB '
                                               'NOREPLICATION NOBYPASSRLS and a member of %s only', v_group);
    END IF;
    IF NOT pg_catalog.pg_has_role(v_role, v_group, 'MEMBER') THEN
      BEGIN
        EXECUTE format('GRANT %I TO %I', v_group, v_role);
      EXCEPTION
        WHEN unique_violation THEN
          NULL;  -- granted concurrently from another database
        WHEN insufficient_privilege THEN  -- PostgreSQL 16+: needs ADMIN on the group
          RAISE EXCEPTION 'role % may not add members to role %', current_user, v_group
            USING ERRCODE = '42501', HINT = format('as a superuser: GRANT %I TO %I WITH ADMIN OPTION', v_group, current_user);
      END;
    END IF;
    -- SET ROLE is checked against the session user, never the app role, which is a member
    -- of no tenant role: the request path's login role (granted below, for the batch) and
    -- the owner (who may run the old fence, or switch for a test or a repair).
    PERFORM fleet.grant_role_to_owner(v_role);
    -- A role made just now has no members: no need to ask. pg_has_role(v_login, ...) walks
    -- every membership of the login role (one per tenant of the shard) again after each
    -- CREATE ROLE, which made creating N tenants quadratic (issue 12).
    IF v_new OR NOT pg_catalog.pg_has_role(v_login, v_role, CASE WHEN v_pg16 THEN 'SET' ELSE 'MEMBER' END) THEN
      v_switch := v_switch || v_role;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', v_name, v_role);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO %I',
                   v_name, v_role);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT USAGE, SELECT ON SEQUENCES TO %I', v_name, v_role);
  END LOOP;
  -- The request path's login role may SET ROLE to these (the fence does), and inherits
  -- none of their rights: WITH INHERIT FALSE on 16+, its own NOINHERIT on 15. One GRANT
  -- for the whole batch.
  IF pg_catalog.cardinality(v_switch) > 0 THEN
    SELECT string_agg(format('%I', x), ', ') INTO v_list FROM pg_catalog.unnest(v_switch) x;
    BEGIN
      EXECUTE format('GRANT %s TO %I', v_list, v_login) || CASE WHEN v_pg16 THEN ' WITH INHERIT FALSE, SET TRUE' ELSE '' END;
    EXCEPTION WHEN insufficient_privilege THEN
      RAISE EXCEPTION 'role % may not grant tenant roles to the login role %', current_user, v_login
        USING ERRCODE = '42501', HINT = 'the shard''s owner needs CREATEROLE (and, on PostgreSQL 16+, ADMIN on the tenant roles, which it has for roles it created)';
    END;
  END IF;
  IF with_existing THEN
    -- one GRANT per schema for its tables (and views, ...), one for its sequences
    FOR v_role, v_list, v_rights IN
      SELECT fleet.tenant_role(x.nspname), string_agg(format('%I.%I', x.nspname, x.relname), ', '),
             CASE WHEN x.seq THEN 'USAGE, SELECT ON SEQUENCE' ELSE 'SELECT, INSERT, UPDATE, DELETE ON TABLE' END
      FROM (SELECT n.nspname, c.relname, c.relkind = 'S' AS seq
            FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY (names) AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')) x
      GROUP BY x.nspname, x.seq
    LOOP
      EXECUTE format('GRANT %s %s TO %I', v_rights, v_list, v_role);
    END LOOP;
  END IF;
  RETURN pg_catalog.cardinality(names);
END $fn$;

-- One tenant schema's role and grants, existing tables included: what a tenant move
-- calls on the target shard once the schema's tables are there. Idempotent.
CREATE OR REPLACE FUNCTION fleet.ensure_tenant_role(name text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  PERFORM fleet.ensure_tenant_roles(ARRAY[name], true);
END $fn$;

-- The roles of tenant schemas made just now in this transaction, none of whose roles
-- exists yet (`tenants import`: fresh tenant ids): what ensure_tenant_roles(names, false)
-- gives them (a role each, NOLOGIN and a member of the tenants' group only, USAGE on its
-- schema, the owner's default privileges; the owner and the login role may switch to
-- it), without the checks and the subtransaction per role that a role which may exist
-- already needs. All grants that share a grantee are one statement: the group to every
-- role, every role to the login role (and to a non-superuser owner). If any of the roles
-- exists (left by a dropped database, or being made by another database of this server
-- at this moment), it refuses with 42710 and changes nothing: the caller rolls back and
-- uses ensure_tenant_roles, which knows what to do with it. Serialised per database by
-- the bootstrap lock, like ensure_tenant_roles. Returns how many schemas.
CREATE OR REPLACE FUNCTION fleet.create_tenant_roles(names text[]) RETURNS int
LANGUAGE plpgsql AS $fn$
DECLARE
  v_pg16 boolean := pg_catalog.current_setting('server_version_num')::int >= 160000;
  v_super boolean;
  v_roles text;
  v_ddl text;
BEGIN
  PERFORM pg_catalog.pg_advisory_xact_lock({bootstrap_lock});  -- router.keys.BOOTSTRAP_LOCK
  IF pg_catalog.cardinality(names) IS NULL OR pg_catalog.cardinality(names) = 0 THEN
    RETURN 0;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.unnest(names) n WHERE n IS NULL OR n !~ '^t_[0-9a-f]{32}$') THEN
    RAISE EXCEPTION 'not a tenant schema name in %', names USING ERRCODE = '22023';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles
             WHERE rolname = ANY (SELECT fleet.tenant_role(n) FROM pg_catalog.unnest(names) n)) THEN
    RAISE EXCEPTION 'a role of these tenants exists already' USING ERRCODE = '42710',
      HINT = 'use fleet.ensure_tenant_roles';
  END IF;
  SELECT string_agg(format('CREATE ROLE %1$I NOLOGIN INHERIT; GRANT USAGE ON SCHEMA %2$I TO %1$I; '
                           'ALTER DEFAULT PRIVILEGES IN SCHEMA %2$I GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO %1$I; '
                           'ALTER DEFAULT PRIVILEGES IN SCHEMA %2$I GRANT USAGE, SELECT ON SEQUENCES TO %1$I',
                           fleet.tenant_role(n), n), '; '),
         string_agg(format('%I', fleet.tenant_role(n)), ', ')
    INTO v_ddl, v_roles FROM pg_catalog.unnest(names) n;
  EXECUTE v_ddl;
  EXECUTE format('GRANT %I TO %s', fleet.tenant_group_role(), v_roles);
  -- as ensure_tenant_roles: the login role may SET ROLE to them and inherits nothing;
  -- the owner may switch to them (a superuser may already)
  EXECUTE format('GRANT %s TO %I', v_roles, fleet.login_role())
          || CASE WHEN v_pg16 THEN ' WITH INHERIT FALSE, SET TRUE' ELSE '' END;
  SELECT rolsuper INTO v_super FROM pg_catalog.pg_roles WHERE rolname = current_user;
  IF NOT v_super THEN
    EXECUTE format('GRANT %s TO %I', v_roles, current_user);
  END IF;
  RETURN pg_catalog.cardinality(names);
END $fn$;

-- Lets the owner (current_user: the shard DSN's role) SET ROLE to a role it made or
-- shares. SET ROLE needs membership (PostgreSQL 16+: a membership with the SET option;
-- the ADMIN-only membership a CREATEROLE owner gets by creating the role is not
-- enough). A superuser owner passes either check already.
CREATE OR REPLACE FUNCTION fleet.grant_role_to_owner(role name) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  IF NOT pg_catalog.pg_has_role(current_user, role,
       CASE WHEN pg_catalog.current_setting('server_version_num')::int >= 160000 THEN 'SET' ELSE 'MEMBER' END) THEN
    BEGIN
      EXECUTE format('GRANT %I TO %I', role, current_user);
    EXCEPTION
      WHEN unique_violation THEN
        NULL;  -- granted concurrently from another database
      WHEN insufficient_privilege THEN  -- e.g. PostgreSQL 16+, a role another owner created
        RAISE EXCEPTION 'role % may not switch to role % and can''t grant it to itself', current_user, role
          USING ERRCODE = '42501', HINT = format('as a superuser: GRANT %I TO %I', role, current_user);
    END;
  END IF;
END $fn$;

-- A NOLOGIN role of the given name, created if missing and refused if it exists with
-- attributes that would turn "least privilege" into a privilege grant. Roles are
-- cluster-wide while the bootstrap advisory lock is per database: shard databases on
-- one server may race to CREATE ROLE; the loser gets 42710 or 23505 (the unique index
-- on pg_authid) and uses the winner's role.
CREATE OR REPLACE FUNCTION fleet.ensure_nologin_role(role name) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  r pg_catalog.pg_roles%ROWTYPE;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = role) THEN
    BEGIN
      EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', role);
    EXCEPTION
      WHEN duplicate_object OR unique_violation THEN
        NULL;  -- another database on this server created it first
      WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'role % may not create tenantfleet''s role % (it needs CREATEROLE)', current_user, role
          USING ERRCODE = '42501', HINT = format('as a superuser: ALTER ROLE %I CREATEROLE', current_user);
    END;
  END IF;
  SELECT * INTO r FROM pg_catalog.pg_roles WHERE rolname = role;
  IF r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls THEN
    RAISE EXCEPTION 'role % exists with attributes tenantfleet''s roles must not have', role
      USING ERRCODE = '42501', HINT = 'make it NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS';
  END IF;
  PERFORM fleet.grant_role_to_owner(role);
END $fn$;

-- The request path's roles on this shard, named from ``role`` (generated here, so the
-- names are passed as values and quoted server-side):
--   role               fleet.app_role(): what the host's connections switch to once
--                      each; NOINHERIT, a member of nothing; runs the fence and holds
--                      no right on any tenant schema or on public.
--   role_tenants       fleet.tenant_group_role(): NOLOGIN group every tenant role is a
--                      member of: read on public, USAGE on fleet (for the functions
--                      PUBLIC may execute there).
--   role_t_<32 hex>    fleet.tenant_role(schema): one per tenant schema (see
--                      ensure_tenant_roles); the fence switches to it, transaction-local.
-- At most 28 characters, so a tenant role's name (role + 35) stays within PostgreSQL's
-- 63. Never given CREATE. (EXECUTE on the fence: fence_ddl.)
CREATE OR REPLACE FUNCTION fleet.ensure_app_role(role name) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  v_group name := role || '_tenants';
BEGIN
  IF role !~ '^[a-z_][a-z0-9_]{0,27}$' THEN
    RAISE EXCEPTION 'not an app role name (at most 28 of a-z, 0-9, _): %', role USING ERRCODE = '22023';
  END IF;
  PERFORM fleet.ensure_nologin_role(role);
  PERFORM fleet.ensure_nologin_role(v_group);
  EXECUTE format('CREATE OR REPLACE FUNCTION fleet.app_role() RETURNS name LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
                 format('SELECT %L::pg_catalog.name', role));
  EXECUTE format('CREATE OR REPLACE FUNCTION fleet.tenant_group_role() RETURNS name LANGUAGE sql IMMUTABLE '
                 'PARALLEL SAFE AS %L', format('SELECT %L::pg_catalog.name', v_group));
  -- inlined into its callers (a SQL function of one expression): no call per request
  EXECUTE format('CREATE OR REPLACE FUNCTION fleet.tenant_role(schema_name text) RETURNS name LANGUAGE sql '
                 'IMMUTABLE PARALLEL SAFE AS %L', format('SELECT (%L || schema_name)::pg_catalog.name', role || '_'));
  EXECUTE format('GRANT USAGE ON SCHEMA fleet TO %I', role);
  EXECUTE format('GRANT EXECUTE ON FUNCTION fleet.tenant_lock_key(uuid) TO %I', role);
  EXECUTE format('GRANT SELECT ON TABLE fleet.tenant_fence TO %I', role);
  -- public: tenant roles read the plugins' shared (public-scope) tables through the
  -- group; the migrator writes them. (The app role no longer does: revoke_app_role_legacy.)
  EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', v_group);
  EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA public TO %I', v_group);
  EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO %I', v_group);
  EXECUTE format('GRANT USAGE ON SCHEMA fleet TO %I', v_group);
  -- Temporary tables are CREATE too: pg_temp is searched before the tenant's schema, so
  -- a temp table made on a pooled connection would shadow the next tenant's tables.
  -- Only PUBLIC holds TEMPORARY by default; the database owner keeps it by ownership.
  EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', pg_catalog.current_database());
END $fn$;

-- The request path's LOGIN role on this shard database (README "Database roles"), named
-- <app role>_login_<first 12 hex of md5(database name)>: one per database, because
-- shard databases sharing a server each have a password of their own and roles are
-- cluster-wide. LOGIN NOINHERIT and no other attribute; a member, with SET and never
-- INHERIT, of the app role (which the host's connections switch to once each) and of
-- every tenant role of this database (ensure_tenant_roles), and of nothing else; holds no
-- privilege but CONNECT on this database. So RESET ROLE (or set_config('role', 'none',
-- ...)) inside a tenant transaction gets a role that holds nothing, never the owner.
-- ``verifier``: a SCRAM-SHA-256 verifier of its password, made client-side, so the
-- password itself never reaches the server or its statement log; NULL leaves the
-- password as it is. Returns the role's name, also fleet.login_role() from then on.
CREATE OR REPLACE FUNCTION fleet.ensure_login_role(verifier text) RETURNS name
LANGUAGE plpgsql AS $fn$
DECLARE
  v_app name := fleet.app_role();
  v_role name := (fleet.app_role() || '_login_' || pg_catalog.left(pg_catalog.md5(pg_catalog.current_database()), 12))::name;
  v_pg16 boolean := pg_catalog.current_setting('server_version_num')::int >= 160000;
  r pg_catalog.pg_roles%ROWTYPE;
BEGIN
  IF verifier IS NOT NULL
     AND verifier !~ '^SCRAM-SHA-256\$[0-9]+:[A-Za-z0-9+/]+=*\$[A-Za-z0-9+/]+=*:[A-Za-z0-9+/]+=*$' THEN
    RAISE EXCEPTION 'not a SCRAM-SHA-256 verifier' USING ERRCODE = '22023';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = v_role) THEN
    BEGIN
      EXECUTE format('CREATE ROLE %I LOGIN NOINHERIT', v_role);
    EXCEPTION
      WHEN duplicate_object OR unique_violation THEN
        NULL;  -- made concurrently (another process preparing this database)
      WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'role % may not create the request path''s login role % (it needs CREATEROLE)', current_user, v_role
          USING ERRCODE = '42501', HINT = format('as a superuser: ALTER ROLE %I CREATEROLE', current_user);
    END;
  END IF;
  SELECT * INTO r FROM pg_catalog.pg_roles WHERE rolname = v_role;
  IF r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls
     OR EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
                WHERE m.member = r.oid AND g.rolname <> v_app AND g.rolname !~ ('^' || v_app || '_t_[0-9a-f]{32}$')) THEN
    RAISE EXCEPTION 'role % exists with attributes or memberships the request path''s login role must not have', v_role
      USING ERRCODE = '42501', HINT = format('drop it, or make it NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION '
                                             'NOBYPASSRLS and a member of %s and its tenant roles only', v_app);
  END IF;
  BEGIN
    IF verifier IS NOT NULL THEN
      EXECUTE format('ALTER ROLE %I LOGIN NOINHERIT PASSWORD %L', v_role, verifier);
    ELSIF NOT r.rolcanlogin OR r.rolinherit THEN
      EXECUTE format('ALTER ROLE %I LOGIN NOINHERIT', v_role);
    END IF;
    IF NOT pg_catalog.pg_has_role(v_role, v_app, CASE WHEN v_pg16 THEN 'SET' ELSE 'MEMBER' END) THEN
      EXECUTE format('GRANT %I TO %I', v_app, v_role) || CASE WHEN v_pg16 THEN ' WITH INHERIT FALSE, SET TRUE' ELSE '' END;
    END IF;
  EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'role % may not alter the request path''s login role % (it needs CREATEROLE and ADMIN on it)', current_user, v_role
      USING ERRCODE = '42501', HINT = format('as a superuser: ALTER ROLE %I CREATEROLE, or GRANT %I TO %I WITH ADMIN OPTION',
                                             current_user, v_role, current_user);
  END;
  -- PUBLIC usually holds CONNECT; a server that revoked it still lets this role in
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', pg_catalog.current_database(), v_role);
  EXECUTE format('CREATE OR REPLACE FUNCTION fleet.login_role() RETURNS name LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L',
                 format('SELECT %L::pg_catalog.name', v_role));
  RETURN v_role;
END $fn$;

-- Takes back what the app role held on these tenant schemas (and on public) when it
-- served every tenant itself (shards prepared by tenantfleet before tenant roles). Run
-- by ensure_shard only after the switching fence is in place: until then the fence
-- in use still runs tenant transactions as the app role. Returns how many schemas.
CREATE OR REPLACE FUNCTION fleet.revoke_app_role_legacy(names text[]) RETURNS int
LANGUAGE plpgsql AS $fn$
DECLARE
  v_app name := fleet.app_role();
  v_name text;
  v_list text;
BEGIN
  PERFORM pg_catalog.pg_advisory_xact_lock({bootstrap_lock});  -- router.keys.BOOTSTRAP_LOCK
  FOREACH v_name IN ARRAY names LOOP
    IF v_name !~ '^t_[0-9a-f]{32}$' THEN
      RAISE EXCEPTION 'not a tenant schema name: %', v_name USING ERRCODE = '22023';
    END IF;
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM %I', v_name, v_app);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE ALL ON TABLES FROM %I', v_name, v_app);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I REVOKE ALL ON SEQUENCES FROM %I', v_name, v_app);
  END LOOP;
  SELECT string_agg(format('%I.%I', n.nspname, c.relname), ', ') INTO v_list
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname = ANY (names) AND c.relkind IN ('r', 'p', 'v', 'm', 'f');
  IF v_list IS NOT NULL THEN
    EXECUTE format('REVOKE ALL ON TABLE %s FROM %I', v_list, v_app);
  END IF;
  SELECT string_agg(format('%I.%I', n.nspname, c.relname), ', ') INTO v_list
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname = ANY (names) AND c.relkind = 'S';
  IF v_list IS NOT NULL THEN
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %I', v_list, v_app);
  END IF;
  EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I', v_app);
  EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES FROM %I', v_app);
  RETURN pg_catalog.cardinality(names);
END $fn$;

-- Writes one event into the outbox inside the caller's (fenced tenant) transaction and
-- returns its id. SECURITY DEFINER, owned by the shard owner: the request path runs as
-- a role with rights on its tenant's schema and public only, and never gets a grant on
-- fleet.event_outbox itself; it can add rows through here and do nothing else to the
-- table. ``tenant`` is the fenced transaction's own tenant, passed by the host; it must
-- be on this shard, and the transaction must run as its role (SQLSTATE 42501 otherwise):
-- any SQL inside a tenant transaction can call this function, and tenant ids are no
-- secret there (schema names are t_<id hex>), so without the check one tenant's SQL could
-- write events that run other tenants' handlers in those tenants' transactions.
-- current_setting('role') is the role the fence switched to: SECURITY DEFINER changes
-- current_user, not that setting. ``lease_s``: how long the writing host owns the first
-- delivery before a relay may take the row.
CREATE OR REPLACE FUNCTION fleet.emit_event(tenant uuid, source text, name text, payload jsonb,
                                            lease_s double precision) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  v_id uuid := pg_catalog.gen_random_uuid();
  v_schema text;
BEGIN
  SELECT f.schema_name INTO v_schema FROM fleet.tenant_fence f WHERE f.tenant_id = tenant;
  IF v_schema IS NULL THEN
    RAISE EXCEPTION 'tenant % is not on this shard', tenant USING ERRCODE = 'TF404';
  END IF;
  IF fleet.tenant_role(v_schema) IS DISTINCT FROM pg_catalog.current_setting('role')::name THEN
    RAISE EXCEPTION 'events of tenant % may be written only in its own transaction', tenant
      USING ERRCODE = '42501';
  END IF;
  -- the writer's lease runs from the emit, not from the transaction's start (now()): a long
  -- transaction must not leave the relay free to deliver while the writer still does
  INSERT INTO fleet.event_outbox (event_id, tenant_id, source, name, payload, next_attempt_at)
  VALUES (v_id, tenant, source, name, payload,
          pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => GREATEST(lease_s, 0)));
  RETURN v_id;
END $fn$;
-- PostgreSQL grants EXECUTE on a new function to PUBLIC; for a SECURITY DEFINER function
-- that must be a decision, not a default (PostgreSQL docs, "Writing SECURITY DEFINER
-- Functions Safely"): revoke it, then grant it to PUBLIC on purpose. Why PUBLIC: every
-- request-path role (one per tenant, created as tenants come and go) must be able to
-- write its events, and the function does exactly one thing, insert an outbox row for a
-- tenant on this shard. USAGE on the fleet schema only lets a role look names up: its
-- tables grant nothing to PUBLIC and its other functions are revoked from PUBLIC or run
-- with the caller's rights.
REVOKE ALL ON FUNCTION fleet.emit_event(uuid, text, text, jsonb, double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fleet.emit_event(uuid, text, text, jsonb, double precision) TO PUBLIC;
GRANT USAGE ON SCHEMA fleet TO PUBLIC;

-- Drops a tenant schema and, unless another database on this server still grants it
-- rights (the same tenant there), its role.
CREATE OR REPLACE FUNCTION fleet.drop_tenant_schema(name text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  IF name !~ '^t_[0-9a-f]{32}$' THEN
    RAISE EXCEPTION 'not a tenant schema name: %', name USING ERRCODE = '22023';
  END IF;
  EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', name);
  BEGIN
    EXECUTE format('DROP ROLE IF EXISTS %I', fleet.tenant_role(name));
  EXCEPTION WHEN dependent_objects_still_exist THEN
    NULL;  -- still holds rights in another database of this server: that one drops it
  END;
END $fn$;

-- The tenant's advisory-lock key: the host takes it shared in every tenant transaction,
-- a mover takes it exclusive at cutover (pg_advisory_xact_lock(fleet.tenant_lock_key(id))).
CREATE OR REPLACE FUNCTION fleet.tenant_lock_key(tenant uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT pg_catalog.hashtextextended(tenant::text, 7466) $fn$;

-- The tenant's hold key: a move holds it exclusive (session-level, on source and target)
-- for the whole move; the migrator takes it shared with each tenant unit, so a tenant is
-- never migrated and moved at once.
CREATE OR REPLACE FUNCTION fleet.tenant_hold_key(tenant uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$ SELECT pg_catalog.hashtextextended(tenant::text, 7467) $fn$;

"""

# Installed by ensure_shard after every tenant schema has its role (the fence switches
# to it): replacing it first would fail the requests of tenants not yet caught up.
FENCE_FUNCTION = r"""
-- The request path's fence, called right after BEGIN in the same round trip: shared
-- tenant lock (waiting at most wait_ms for a mover), epoch check, search_path and role
-- set locally.
-- SQLSTATE TF404: the tenant is not on this shard; TF409: the shard's epoch is newer.
-- No SET clause on purpose: it would undo the set_config calls when the function returns.
CREATE OR REPLACE FUNCTION fleet.enter_tenant(tenant uuid, resolved_epoch bigint, wait_ms int) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
  -- fleet.tenant_lock_key(tenant), inlined: this runs on every request (the mover-lock
  -- test in tests/test_host_tx.py fails if the two ever differ)
  v_key bigint := pg_catalog.hashtextextended(tenant::text, 7466);
  v_epoch bigint;
  v_path text;
  v_role text;
  v_timeout text;
BEGIN
  -- Fast path: no mover holds the tenant, the shared lock is granted at once and
  -- lock_timeout is left alone. Only while a mover holds it do we wait, at most wait_ms.
  -- (Measured: ~9 us less per request than always setting and restoring lock_timeout.)
  IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(v_key) THEN
    v_timeout := pg_catalog.current_setting('lock_timeout');
    PERFORM pg_catalog.set_config('lock_timeout', wait_ms::text, true);
    PERFORM pg_catalog.pg_advisory_xact_lock_shared(v_key);
    PERFORM pg_catalog.set_config('lock_timeout', v_timeout, true);
  END IF;
  -- One statement reads the fence and sets the path; on a stale epoch the RAISE below
  -- aborts the transaction, which discards the transaction-local path with it.
  -- The transaction then runs as the tenant's role: PostgreSQL itself refuses another
  -- tenant's schema (SQLSTATE 42501) whatever name a query spells. Setting role is
  -- refused inside a SECURITY DEFINER function, so this one runs as its caller; SET
  -- ROLE is checked against the session user (the shard's owner), not the app role.
  SELECT f.epoch, pg_catalog.set_config('search_path', pg_catalog.quote_ident(f.schema_name) || ', public', true),
         pg_catalog.set_config('role', fleet.tenant_role(f.schema_name)::text, true)
    INTO v_epoch, v_path, v_role FROM fleet.tenant_fence f WHERE f.tenant_id = tenant;
  IF v_epoch IS NULL THEN
    RAISE EXCEPTION 'tenant % is not on this shard', tenant USING ERRCODE = 'TF404';
  END IF;
  IF v_epoch > resolved_epoch THEN
    RAISE EXCEPTION 'tenant % fence epoch % is newer than %', tenant, v_epoch, resolved_epoch USING ERRCODE = 'TF409';
  END IF;
  RETURN v_epoch;
END $fn$;
"""

# Columns added to shard tables after their first version: CREATE TABLE IF NOT EXISTS
# leaves a table made by an earlier version as it was, so each gets its ALTER (idempotent).
SHARD_COLUMNS_ADDED = [
    "ALTER TABLE fleet.event_outbox ADD COLUMN IF NOT EXISTS handled_by text[] NOT NULL DEFAULT '{}'::text[]",  # v4
]

# `shards.tenant_count`, kept in the same transaction as the change to `tenants`: one
# statement-level trigger per INSERT (COPY too) and DELETE, over the rows it touched (a
# bulk import of 10,000 tenants updates each shard's row once), and a row trigger on a
# tenant whose shard changes (a move's cutover). The shards' rows are locked in shard_id
# order first, so two statements touching the same shards can't deadlock on them.
# (TRUNCATE fires none of them: nothing of ours truncates `tenants`.)
TENANT_COUNT_FUNCTION = r"""
CREATE OR REPLACE FUNCTION tenantfleet_count_tenants() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  IF TG_OP = 'INSERT' THEN
    PERFORM 1 FROM shards WHERE shard_id IN (SELECT shard_id FROM counted_new) ORDER BY shard_id FOR NO KEY UPDATE;
    UPDATE shards s SET tenant_count = s.tenant_count + c.n
    FROM (SELECT shard_id, count(*)::int AS n FROM counted_new GROUP BY shard_id) c WHERE s.shard_id = c.shard_id;
  ELSIF TG_OP = 'DELETE' THEN
    PERFORM 1 FROM shards WHERE shard_id IN (SELECT shard_id FROM counted_old) ORDER BY shard_id FOR NO KEY UPDATE;
    UPDATE shards s SET tenant_count = s.tenant_count - c.n
    FROM (SELECT shard_id, count(*)::int AS n FROM counted_old GROUP BY shard_id) c WHERE s.shard_id = c.shard_id;
  ELSE  -- UPDATE OF shard_id, for each row whose shard changed
    PERFORM 1 FROM shards WHERE shard_id IN (OLD.shard_id, NEW.shard_id) ORDER BY shard_id FOR NO KEY UPDATE;
    UPDATE shards SET tenant_count = tenant_count - 1 WHERE shard_id = OLD.shard_id;
    UPDATE shards SET tenant_count = tenant_count + 1 WHERE shard_id = NEW.shard_id;
  END IF;
  RETURN NULL;
END $fn$;
"""
# Installed once, with the count of every shard's tenants taken under a lock that keeps
# tenants from changing meanwhile: a control plane from before `tenant_count` (schema
# version 4) is caught up in the same transaction that starts keeping it.
TENANT_COUNT_TRIGGERS = r"""
DO $do$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                 WHERE tgrelid = 'tenants'::regclass AND tgname = 'tenants_count_insert') THEN
    LOCK TABLE tenants IN SHARE ROW EXCLUSIVE MODE;
    CREATE TRIGGER tenants_count_insert AFTER INSERT ON tenants REFERENCING NEW TABLE AS counted_new
      FOR EACH STATEMENT EXECUTE FUNCTION tenantfleet_count_tenants();
    CREATE TRIGGER tenants_count_delete AFTER DELETE ON tenants REFERENCING OLD TABLE AS counted_old
      FOR EACH STATEMENT EXECUTE FUNCTION tenantfleet_count_tenants();
    CREATE TRIGGER tenants_count_move AFTER UPDATE OF shard_id ON tenants
      FOR EACH ROW WHEN (OLD.shard_id IS DISTINCT FROM NEW.shard_id) EXECUTE FUNCTION tenantfleet_count_tenants();
    UPDATE shards s SET tenant_count = (SELECT count(*) FROM tenants t WHERE t.shard_id = s.shard_id);
  END IF;
END $do$
"""
# Brought to a control plane of an earlier version by `control_ddl` (idempotent).
CONTROL_UPGRADES = [
    "ALTER TABLE shards ADD COLUMN IF NOT EXISTS tenant_count integer NOT NULL DEFAULT 0",
    "DROP INDEX IF EXISTS tenants_shard_idx",  # replaced by tenants_shard_code_idx (shard_id, code)
]

_dialect = postgresql.dialect()  # type: ignore[no-untyped-call]


def _ddl(metadata: MetaData) -> list[str]:
    out: list[str] = []
    for table in metadata.sorted_tables:
        out.append(str(CreateTable(table, if_not_exists=True).compile(dialect=_dialect)))
        for index in table.indexes:
            out.append(str(CreateIndex(index, if_not_exists=True).compile(dialect=_dialect)))
    return out


# Columns added to a table after it first shipped: CREATE TABLE IF NOT EXISTS leaves a
# table made by an earlier version as it was, so these are added to it (nullable, or with
# a default, so existing rows stay valid).
ADDED_COLUMNS: list[tuple[Table, str]] = [(shards, "login_role"), (shards, "login_password")]


def _added_columns() -> list[str]:
    out = []
    for table, name in ADDED_COLUMNS:
        col = table.c[name]
        assert col.nullable and col.server_default is None, name  # nothing to backfill
        out.append(f"ALTER TABLE {table.name} ADD COLUMN IF NOT EXISTS {col.name} {col.type.compile(dialect=_dialect)}")
    return out


def control_ddl() -> list[str]:
    """Statements that create the control-plane tables, or bring those of an earlier
    version up to date (idempotent)."""
    return [*_ddl(control), *_added_columns(), *CONTROL_UPGRADES, TENANT_COUNT_FUNCTION, TENANT_COUNT_TRIGGERS]


def shard_ddl() -> list[str]:
    """Statements that create a shard's ``fleet`` schema, tables and functions (idempotent)."""
    functions = SHARD_FUNCTIONS.replace("{bootstrap_lock}", str(int(BOOTSTRAP_LOCK)))  # a constant, not user text
    return [str(CreateSchema("fleet", if_not_exists=True).compile(dialect=_dialect)), *_ddl(shard),
            *SHARD_COLUMNS_ADDED, functions]


def fence_ddl() -> list[str]:
    """Statements that install the request path's fence, ``fleet.enter_tenant`` (idempotent;
    after `shard_ddl`, ``fleet.ensure_app_role`` and every tenant schema's role)."""
    return [FENCE_FUNCTION,
            "REVOKE EXECUTE ON FUNCTION fleet.enter_tenant(uuid, bigint, int) FROM PUBLIC",
            "DO $do$ BEGIN EXECUTE format('GRANT EXECUTE ON FUNCTION fleet.enter_tenant(uuid, bigint, int) TO %I', "
            "fleet.app_role()); END $do$"]
