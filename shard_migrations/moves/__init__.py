"""Tenant moves between shards (issue 9): copy a tenant schema's definition and rows to
another shard, verify, replicate, cut over, clean up.

`shard_migrations.moves.schema_copy` is the building block: a tenant schema's DDL and
fingerprint read from the catalog, and the statements replayed on the target.
"""
