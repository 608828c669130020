"""Where a tenant lives, and the shared base of every other package.

Where a tenant lives: the directory (`directory`), placement decisions, the two-level
resolve cache and client (`cache`, `client`), the router service (`service`).

The shared base: errors and the envelope (`errors`), settings (`settings`), HTTP edge
helpers (`http`), shard pools (`pools`), table declarations (`tables`), constants
(`keys`). Every package of ours imports from here; `router` imports from none of them
(tests/test_layout.py checks the whole graph: CLI → host → shard_migrations → plugin API
→ router).
"""
