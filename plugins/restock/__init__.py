"""Restock: requests to reorder stock, raised when an item runs low."""

meta = {"id": "restock", "version": "1.1.0", "api": "1.x"}

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plugins.api import PluginContext


def setup(ctx: "PluginContext") -> None:
    """Mount the routes. Imported here, not at the top: the CLI's migration commands load
    every plugin for its meta and migrations only, and the routes bring in aiohttp."""
    from plugins.restock.handlers import setup as mount
    mount(ctx)

__all__ = ["meta", "setup"]
