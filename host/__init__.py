"""How a request reaches a plugin: aiohttp app, plugin loading, context, fenced
transactions, RBAC, registry, events, cron, metrics. The CLI (`host.cli`) and the
embedded dev fleet (`host.fleet`) are sub-packages of their own, above the request path."""
