"""Inventory: a per-tenant stock list (items with SKU, quantity and location) and a
shared table of units of measure."""

# uninstall: the tenant tables `plugins uninstall --policy export|purge` writes out and drops
# (shard_migrations/uninstall.py), and the policy used when the operator names none
meta = {"id": "inventory", "version": "1.1.0", "api": "1.x",
        "uninstall": {"policy": "keep", "tables": ["items"]}}

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plugins.api import PluginContext


def setup(ctx: "PluginContext") -> None:
    """Mount the routes. Imported here, not at the top: the CLI's migration commands load
    every plugin for its meta and migrations only, and the routes bring in aiohttp."""
    from plugins.inventory.routes import setup as mount
    mount(ctx)

__all__ = ["meta", "setup"]
