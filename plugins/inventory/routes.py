"""Inventory routes: list/get/create/update items, reconcile counts.

Serves both sides of a rollout: ``location`` (added in 1.1.0) is read and written only
for tenants whose installed version has it (``ctx.caller(request).plugin_version``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from aiohttp import web

from plugins.api import Db, NotFound, PluginContext, ValidationFailed, int_param, json_body, json_response, parse_uint

LOCATION_SINCE = (1, 1, 0)
MAX_LIMIT = 500


@lru_cache(maxsize=64)
def _version(v: str) -> tuple[int, ...]:
    core = v.split("-", 1)[0].split("+", 1)[0]
    return tuple(int(p) for p in core.split(".")[:3])


def _item_id(request: web.Request) -> int:
    return parse_uint(request.match_info["id"], "id", 1, 2**63 - 1)


def _str(body: dict[str, Any], key: str, *, required: bool, max_len: int) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ValidationFailed(f"{key} is required", field=key)
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_len:
        raise ValidationFailed(f"{key} must be a string of 1-{max_len} characters", field=key)
    return value


def _qty(body: dict[str, Any], *, required: bool) -> int | None:
    value = body.get("qty")
    if value is None:
        if required:
            raise ValidationFailed("qty is required", field="qty")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2_000_000_000:
        raise ValidationFailed("qty must be an integer between 0 and 2000000000", field="qty")
    return value


# Whole query texts, keyed by "inventory >= 1.1.0 is installed for the caller" (the
# `location` column): nothing is assembled at run time, and each text stays the same so
# asyncpg's statement cache reuses it. The list returns compact rows; timestamps come with
# the single item (two timestamptz per row cost ~25% of the list route, see bench/README.md).
LIST_SQL = {
    False: "SELECT id, sku, name, qty FROM items ORDER BY id LIMIT $1 OFFSET $2",
    True: "SELECT id, sku, name, qty, location FROM items ORDER BY id LIMIT $1 OFFSET $2",
}
# JSON field names are camelCase on every API: the timestamps are renamed in the SQL.
GET_SQL = {
    False: "SELECT id, sku, name, qty, created_at AS \"createdAt\", updated_at AS \"updatedAt\" FROM items WHERE id = $1",
    True: "SELECT id, sku, name, qty, created_at AS \"createdAt\", updated_at AS \"updatedAt\", location FROM items WHERE id = $1",
}
INSERT_SQL = {
    False: "INSERT INTO items (sku, name, qty) VALUES ($1, $2, $3) ON CONFLICT (sku) DO NOTHING "
           "RETURNING id, sku, name, qty, created_at AS \"createdAt\", updated_at AS \"updatedAt\"",
    True: "INSERT INTO items (sku, name, qty, location) VALUES ($1, $2, $3, $4) ON CONFLICT (sku) DO NOTHING "
          "RETURNING id, sku, name, qty, created_at AS \"createdAt\", updated_at AS \"updatedAt\", location",
}
UPDATE_SQL = {
    False: "UPDATE items SET name = coalesce($2, name), qty = coalesce($3, qty), updated_at = now() "
           "WHERE id = $1 RETURNING id, sku, name, qty, created_at AS \"createdAt\", updated_at AS \"updatedAt\"",
    True: "UPDATE items SET name = coalesce($2, name), qty = coalesce($3, qty), location = coalesce($4, location), "
          "updated_at = now() WHERE id = $1 RETURNING id, sku, name, qty, created_at AS \"createdAt\", updated_at AS \"updatedAt\", location",
}


def setup(ctx: PluginContext) -> None:
    """Register inventory's routes and its health check."""
    def has_location(request: web.Request) -> bool:
        return _version(ctx.caller(request).plugin_version) >= LOCATION_SINCE

    @ctx.router.get("/items")
    @ctx.rbac.require("inventory.view")
    async def list_items(request: web.Request) -> web.StreamResponse:
        """Items by id: ``{items: [{id, sku, name, qty[, location]}], limit, offset}``."""
        caller = ctx.caller(request)
        limit = int_param(request, "limit", 50, 1, MAX_LIMIT)
        offset = int_param(request, "offset", 0, 0, 10_000_000)
        sql = LIST_SQL[_version(caller.plugin_version) >= LOCATION_SINCE]

        async def run(db: Db) -> list[Any]:
            return await db.fetch(sql, limit, offset)
        rows = await ctx.with_tenant_tx(caller.tenant.tenant_id, run)
        return json_response({"items": [dict(r) for r in rows], "limit": limit, "offset": offset})

    @ctx.router.get("/items/{id}")
    @ctx.rbac.require("inventory.view")
    async def get_item(request: web.Request) -> web.StreamResponse:
        caller = ctx.caller(request)
        item_id = _item_id(request)
        sql = GET_SQL[has_location(request)]

        async def run(db: Db) -> Any:
            return await db.fetchrow(sql, item_id)
        row = await ctx.with_tenant_tx(caller.tenant.tenant_id, run)
        if row is None:
            raise NotFound(f"no item {item_id}", itemId=item_id)
        return json_response(dict(row))

    @ctx.router.post("/items")
    @ctx.rbac.require("inventory.manage")
    async def create_item(request: web.Request) -> web.StreamResponse:
        caller = ctx.caller(request)
        body = await json_body(request)
        sku = _str(body, "sku", required=True, max_len=64)
        name = _str(body, "name", required=False, max_len=200)
        qty = _qty(body, required=True)
        with_location = has_location(request)
        location = _str(body, "location", required=False, max_len=100) if with_location else None
        if not with_location and "location" in body:
            raise ValidationFailed("location needs inventory 1.1.0, not installed for this tenant", field="location")

        async def run(db: Db) -> Any:
            if with_location:
                row = await db.fetchrow(INSERT_SQL[True], sku, name, qty, location)
            else:
                row = await db.fetchrow(INSERT_SQL[False], sku, name, qty)
            if row is not None:  # the event commits with the row, or neither does
                await ctx.events.emit("inventory.item_created", {"id": row["id"], "sku": sku, "qty": qty}, db=db)
            return row
        row = await ctx.with_tenant_tx(caller.tenant.tenant_id, run)
        if row is None:
            raise ValidationFailed(f"an item with sku {sku} exists", field="sku")
        return json_response(dict(row), status=201)

    @ctx.router.patch("/items/{id}")
    @ctx.rbac.require("inventory.manage")
    async def update_item(request: web.Request) -> web.StreamResponse:
        caller = ctx.caller(request)
        item_id = _item_id(request)
        body = await json_body(request)
        name = _str(body, "name", required=False, max_len=200)
        qty = _qty(body, required=False)
        with_location = has_location(request)
        if not with_location and "location" in body:
            raise ValidationFailed("location needs inventory 1.1.0, not installed for this tenant", field="location")
        location = _str(body, "location", required=False, max_len=100) if with_location else None

        async def run(db: Db) -> Any:
            if with_location:
                row = await db.fetchrow(UPDATE_SQL[True], item_id, name, qty, location)
            else:
                row = await db.fetchrow(UPDATE_SQL[False], item_id, name, qty)
            if row is not None:
                await ctx.events.emit("inventory.item_updated", {"id": item_id, "sku": row["sku"], "qty": row["qty"]},
                                      db=db)
            return row
        row = await ctx.with_tenant_tx(caller.tenant.tenant_id, run)
        if row is None:
            raise NotFound(f"no item {item_id}", itemId=item_id)
        return json_response(dict(row))

    @ctx.router.post("/reconcile")
    @ctx.rbac.require("inventory.reconcile")
    async def reconcile(request: web.Request) -> web.StreamResponse:
        """Body ``{"counts": [{"sku", "qty"}]}``: set each counted item's qty; report the differences."""
        caller = ctx.caller(request)
        body = await json_body(request)
        counts = body.get("counts")
        if not isinstance(counts, list) or not 1 <= len(counts) <= 1000:
            raise ValidationFailed("counts must be a list of 1-1000 {sku, qty} objects", field="counts")
        pairs: list[tuple[str, int]] = []
        for c in counts:
            if not isinstance(c, dict):
                raise ValidationFailed("each count must be an object {sku, qty}", field="counts")
            sku = _str(c, "sku", required=True, max_len=64)
            qty = _qty(c, required=True)
            assert sku is not None and qty is not None
            pairs.append((sku, qty))

        async def run(db: Db) -> list[Any]:
            rows = await db.fetch(
                "WITH counted AS (SELECT * FROM unnest($1::text[], $2::int[]) AS c(sku, qty)), "
                "old AS (SELECT i.id, i.sku, i.qty FROM items i JOIN counted USING (sku) FOR UPDATE) "
                "UPDATE items i SET qty = counted.qty, updated_at = now() FROM counted, old "
                "WHERE i.sku = counted.sku AND old.id = i.id AND i.qty <> counted.qty "
                "RETURNING i.sku, old.qty AS was, i.qty AS now",
                [p[0] for p in pairs], [p[1] for p in pairs])
            for r in rows:
                await ctx.events.emit("inventory.item_updated", {"sku": r["sku"], "qty": r["now"]}, db=db)
            return rows
        rows = await ctx.with_tenant_tx(caller.tenant.tenant_id, run)
        changed = [dict(r) for r in rows]
        return json_response({"changed": changed, "counted": len(pairs)})

    async def health() -> dict[str, Any]:
        return {"check": "routes", "routes": 5}

    ctx.health_check(health)
