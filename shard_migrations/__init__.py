"""The fleet migrator: plan, apply, ledger, checksums, locks, batching, per-shard backoff,
resume and verify for plugin schema upgrades across every shard and tenant.

Entry points: `shard_migrations.fleet.FleetMigrator` (a whole run), `shard_migrations.engine.apply_tenant`
(one tenant, for the host's "enable plugin" path), `shard_migrations.verify.verify`, and the
`tenantfleet migrate ...` commands in `host.cli.migrate`.
"""
