"""Inventory: a per-tenant stock list (items with SKU, quantity and location) and a
shared table of units of measure."""

meta = {"id": "inventory", "version": "1.1.0", "api": "1.x"}

from plugins.inventory.routes import setup

__all__ = ["meta", "setup"]
