"""How a request reaches a plugin: aiohttp app, plugin loading, context, pools, CLI, embedded fleet."""
