"""Restock: listens to inventory's events and raises a request when an item runs low;
a cron job counts each tenant's open requests.

The low-stock threshold is the tenant's config ``threshold`` (default 5). Events come at
least once: each one's id is recorded in ``restock_events_seen`` in the same statement
that raises the request, so a repeated event raises nothing (ids are kept for
`SEEN_KEEP_DAYS`, far beyond any redelivery).
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from plugins.api import CronRun, Db, Event, PluginContext, json_response

DEFAULT_THRESHOLD = 5
REORDER_QTY = 10
SEEN_KEEP_DAYS = 30

# One statement: remember the event, and raise a request only if the event is new and no
# request for the SKU is open.
RAISE_SQL = """
WITH seen AS (INSERT INTO restock_events_seen (event_id) VALUES ($3::uuid) ON CONFLICT DO NOTHING RETURNING 1)
INSERT INTO restock_requests (sku, qty) SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM seen)
  AND NOT EXISTS (SELECT 1 FROM restock_requests WHERE sku = $1 AND status = 'open')
"""


def setup(ctx: PluginContext) -> None:
    """Register restock's event handlers, cron job and routes."""

    async def on_stock_change(event: Event) -> None:
        if not isinstance(event.payload.get("qty"), int):
            return
        tenant_id = event.tenant_id
        if tenant_id not in await ctx.enabled_tenants():
            return
        threshold = await ctx.config.get_tenant(tenant_id, "threshold", DEFAULT_THRESHOLD)
        if event.payload["qty"] >= threshold:
            return
        sku = str(event.payload.get("sku"))

        async def run(db: Db) -> str:
            return await db.execute(RAISE_SQL, sku, REORDER_QTY, event.id)
        if await ctx.with_tenant_tx(tenant_id, run) == "INSERT 0 1":
            ctx.log("restock requested", tenantId=tenant_id, sku=sku, eventId=event.id)

    ctx.events.on("inventory.item_created", on_stock_change)
    ctx.events.on("inventory.item_updated", on_stock_change)

    async def count_open(run: CronRun) -> None:
        assert run.tenant_id is not None

        async def q(db: Db) -> Any:
            await db.execute("DELETE FROM restock_events_seen WHERE seen_at < now() - make_interval(days => $1)",
                             SEEN_KEEP_DAYS)
            return await db.fetchval("SELECT count(*) FROM restock_requests WHERE status = 'open'")
        n = await ctx.with_tenant_tx(run.tenant_id, q)
        ctx.log("open restock requests", tenantId=run.tenant_id, open=n)

    ctx.cron.register("*/5 * * * *", count_open, name="count_open", per_tenant=True)

    @ctx.router.get("/requests")
    @ctx.rbac.require("restock.view")
    async def list_requests(request: web.Request) -> web.StreamResponse:
        tenant_id = ctx.caller(request).tenant.tenant_id

        async def q(db: Db) -> list[Any]:
            return await db.fetch("SELECT id, sku, qty, status, requested_at FROM restock_requests "
                                  "ORDER BY id DESC LIMIT 100")
        rows = await ctx.with_tenant_tx(tenant_id, q)
        return json_response({"requests": [dict(r) for r in rows]})
