"""The router service (aiohttp): resolve, tenants and shards over HTTP.

Handlers are adapters: parse, call one directory/resolver function, render. Writes
need the admin key (``Authorization: Bearer $TENANTFLEET_ADMIN_KEY``); with no admin
key configured, writes are refused rather than open.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import AsyncExitStack
from typing import Any, Awaitable, Callable, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from router.client import ResolveClient
from router.directory import normalise_query
from router.errors import Unauthorized, ValidationFailed
from router.http import Handler, envelope_middleware, json_response, read_json_object
from router.models import TenantRecord, parse_tenant_id
from router.openapi import DOCUMENT
from router.runtime import RouterRuntime, open_runtime
from router.settings import Settings


class Resolver(Protocol):
    async def resolve(self, *, id: str | None = None, code: str | None = None,
                      domain: str | None = None) -> TenantRecord: ...


RUNTIME = web.AppKey("runtime", RouterRuntime)
CLIENT = web.AppKey("client", ResolveClient)
RESOLVER = web.AppKey("resolver", Resolver)
REGISTRY = web.AppKey("registry", CollectorRegistry)
HTTP_REQUESTS = web.AppKey("http_requests", Counter)
HTTP_LATENCY = web.AppKey("http_latency", Histogram)


def _require_admin(request: web.Request) -> None:
    key = request.app[RUNTIME].settings.admin_key
    if not key:
        raise Unauthorized("writes need an admin key: set TENANTFLEET_ADMIN_KEY on the router")
    auth = request.headers.get("Authorization", "")
    given = auth[7:] if auth.startswith("Bearer ") else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise Unauthorized("missing or wrong admin key")


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValidationFailed(f"{name} must be an integer", field=name) from exc


async def resolve(request: web.Request) -> web.Response:
    q = request.query
    unknown = set(q) - {"id", "code", "domain"}
    if unknown:
        raise ValidationFailed(f"unknown query parameter {sorted(unknown)[0]}", field=sorted(unknown)[0])
    if any(len(q.getall(k)) > 1 for k in q):
        raise ValidationFailed("each query parameter may be given once")
    kind, value = normalise_query(id=q.get("id"), code=q.get("code"), domain=q.get("domain"))
    rec = await request.app[RESOLVER].resolve(**{kind: value})
    return json_response(rec.to_dict())


async def list_tenants(request: web.Request) -> web.Response:
    d = request.app[RUNTIME].directory
    recs = await d.list_tenants(shard_id=request.query.get("shard"), state=request.query.get("state"),
                                limit=_int_param(request, "limit", 100), offset=_int_param(request, "offset", 0))
    return json_response([r.to_dict() for r in recs])


async def create_tenant(request: web.Request) -> web.Response:
    _require_admin(request)
    body = await read_json_object(request)
    domains = body.get("domains", [])
    shard = body.get("shard_id")
    if shard is not None and not isinstance(shard, str):
        raise ValidationFailed("shard_id must be a string", field="shard_id")
    rec = await request.app[RUNTIME].directory.create_tenant(body.get("code"), domains, shard_id=shard)  # type: ignore[arg-type]
    return json_response(rec.to_dict(), status=201)


async def get_tenant(request: web.Request) -> web.Response:
    tid = parse_tenant_id(request.match_info["id"])
    return json_response((await request.app[RESOLVER].resolve(id=tid)).to_dict())


async def suspend_tenant(request: web.Request) -> web.Response:
    _require_admin(request)
    rec = await request.app[RUNTIME].directory.suspend(request.match_info["id"])
    return json_response(rec.to_dict())


async def resume_tenant(request: web.Request) -> web.Response:
    _require_admin(request)
    rec = await request.app[RUNTIME].directory.resume(request.match_info["id"])
    return json_response(rec.to_dict())


async def list_shards(request: web.Request) -> web.Response:
    return json_response([s.to_dict() for s in await request.app[RUNTIME].directory.list_shards()])


async def add_shard(request: web.Request) -> web.Response:
    _require_admin(request)
    body = await read_json_object(request)
    rec = await request.app[RUNTIME].directory.add_shard(
        body.get("shard_id"), body.get("dsn"),  # type: ignore[arg-type]
        capacity=body.get("capacity", 1000), weight=body.get("weight", 100))
    return json_response(rec.to_dict(), status=201)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    checks: dict[str, Any] = {}
    try:
        await rt.control.fetchval("SELECT 1", timeout=2)
        checks["control"] = "ok"
    except Exception as exc:  # any failure means not ready; the reason is reported
        checks["control"] = f"{exc.__class__.__name__}: {exc}"
    client = request.app.get(CLIENT)
    if client is not None:
        # Asked now (PING, short timeout), not the breaker's last state. Redis is only the
        # router's cache: with it down every resolve is answered from the control plane,
        # so the router stays ready and says so.
        redis = await client.ping_redis()
        checks["redis"] = "ok" if redis in ("ok", "off") else f"unavailable ({redis}); serving from the control plane"
    ok = checks["control"] == "ok"
    return json_response({"status": "ready" if ok else "not ready", "checks": checks}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return json_response(DOCUMENT)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    resp = await handler(request)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    request.app[HTTP_REQUESTS].labels(route, f"{resp.status // 100}xx").inc()
    request.app[HTTP_LATENCY].labels(route).observe(time.perf_counter() - started)
    return resp


def build_app(runtime: RouterRuntime, resolver: Resolver, registry: CollectorRegistry) -> web.Application:
    """The router service over an already-open runtime and resolver (the caller owns both)."""
    app = web.Application(middlewares=[metrics_middleware, envelope_middleware],
                          client_max_size=runtime.settings.max_body_bytes)
    app[RUNTIME] = runtime
    app[RESOLVER] = resolver
    app[REGISTRY] = registry
    app[HTTP_REQUESTS] = Counter("tenantfleet_router_http_requests_total", "Router HTTP requests",
                                 ["route", "status"], registry=registry)
    app[HTTP_LATENCY] = Histogram("tenantfleet_router_http_seconds", "Router HTTP latency", ["route"],
                                  registry=registry)
    r = app.router
    r.add_get("/v1/tenants/resolve", resolve)
    r.add_get("/v1/tenants", list_tenants)
    r.add_post("/v1/tenants", create_tenant)
    r.add_get("/v1/tenants/{id}", get_tenant)
    r.add_post("/v1/tenants/{id}/suspend", suspend_tenant)
    r.add_post("/v1/tenants/{id}/resume", resume_tenant)
    r.add_get("/v1/shards", list_shards)
    r.add_post("/v1/shards", add_shard)
    r.add_get("/v1/openapi.json", openapi)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    return app


async def open_service(settings: Settings, stack: AsyncExitStack) -> web.Application:
    """Open the runtime and the two-level resolve client on ``stack`` and build the app.

    Directory changes made through this service are published by the client, so every
    other client (other routers, hosts) drops its stale entry.
    """
    registry = CollectorRegistry()
    runtime = await stack.enter_async_context(open_runtime(settings))
    client = await stack.enter_async_context(ResolveClient(runtime.settings, runtime.directory.lookup,
                                                           registry=registry))
    runtime.directory.on_change = client.publish
    app = build_app(runtime, client, registry)
    app[CLIENT] = client
    return app


async def serve(settings: Settings, *, port: int | None = None,
                ready: Callable[[int], Awaitable[None]] | None = None, stop: asyncio.Event | None = None) -> None:
    """Run the router service until ``stop`` is set (or cancelled).

    Shutdown order: stop accepting and drain (runner.cleanup), then close pools.
    """
    async with AsyncExitStack() as stack:
        app = await open_service(settings, stack)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, settings.bind_host, settings.router_port if port is None else port)
        await site.start()
        bound = runner.addresses[0][1]
        if ready is not None:
            await ready(bound)
        await (stop or asyncio.Event()).wait()
