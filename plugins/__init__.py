"""The plugins that ship with tenantfleet. Each subpackage is one plugin (see shard_migrations/packages.py)."""
