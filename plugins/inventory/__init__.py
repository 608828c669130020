"""Inventory: a per-tenant stock list (items with SKU, quantity and location) and a
shared table of units of measure."""

# uninstall: the tenant tables `plugins uninstall --policy export|purge` writes out and drops
# (shard_migrations/uninstall.py), and the policy used when the operator names none
meta = {"id": "inventory", "version": "1.1.0", "api": "1.x",
        "uninstall": {"policy": "keep", "tables": ["items"]}}

from plugins.inventory.routes import setup

__all__ = ["meta", "setup"]
