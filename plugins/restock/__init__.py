"""Restock: requests to reorder stock, raised when an item runs low."""

meta = {"id": "restock", "version": "1.1.0", "api": "1.x"}

from plugins.restock.handlers import setup

__all__ = ["meta", "setup"]
