"""Restock: listens to inventory's events and raises a request when an item runs low;
a cron job counts each tenant's open requests.

The low-stock threshold is the tenant's config ``threshold`` (default 5).
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from plugins.api import CronRun, Db, Event, PluginContext, json_response

DEFAULT_THRESHOLD = 5
REORDER_QTY = 10


def setup(ctx: PluginContext) -> None:
    """Register restock's event handlers, cron job and routes."""

    async def on_stock_change(event: Event) -> None:
        if event.tenant_id is None or not isinstance(event.payload.get("qty"), int):
            return
        tenant_id = event.tenant_id
        if tenant_id not in await ctx.enabled_tenants():
            return
        threshold = await ctx.config.get_tenant(tenant_id, "threshold", DEFAULT_THRESHOLD)
        if event.payload["qty"] >= threshold:
            return
        sku = str(event.payload.get("sku"))

        async def run(db: Db) -> None:
            await db.execute(
                "INSERT INTO restock_requests (sku, qty) SELECT $1, $2 WHERE NOT EXISTS "
                "(SELECT 1 FROM restock_requests WHERE sku = $1 AND status = 'open')", sku, REORDER_QTY)
        await ctx.with_tenant_tx(tenant_id, run)
        ctx.log("restock requested", tenantId=tenant_id, sku=sku)

    ctx.events.on("inventory.item_created", on_stock_change)
    ctx.events.on("inventory.item_updated", on_stock_change)

    async def count_open(run: CronRun) -> None:
        assert run.tenant_id is not None

        async def q(db: Db) -> Any:
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
