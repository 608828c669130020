"""The router service (aiohttp): resolve, tenants and shards over HTTP.

Handlers are adapters: parse, call one directory/resolver function, render. Every
``/v1`` route but the OpenAPI document needs a key (``Authorization: Bearer <key>``):
reads the read key (``TENANTFLEET_READ_KEY``) or the admin key, writes the admin key
(``TENANTFLEET_ADMIN_KEY``). With no key configured nothing is open: 401. /healthz,
/readyz, /metrics and /v1/openapi.json are open.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any, Awaitable, Callable, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from router.client import ResolveClient
from router.directory import normalise_query
from router.errors import ValidationFailed
from router.http import (
    BODY_TIMEOUT, EdgeRunner, Handler, envelope_middleware, freeze_startup_heap, http_settings, int_param,
    json_response, parse_body, read_json_object, require_service_key,
)
from router.keys import TENANT_STATES
from router.models import NewShard, NewTenant, TenantRecord, check_shard_id, parse_tenant_id
from router.openapi import DOCUMENT, MAX_LIST_LIMIT, MAX_OFFSET
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
    """The admin key: 401 UNAUTHORIZED without a known key, 403 FORBIDDEN for the read key."""
    s = request.app[RUNTIME].settings
    require_service_key(request, admin_key=s.admin_key, read_key=s.read_key, write=True)


def _require_reader(request: web.Request) -> None:
    """The read key or the admin key: 401 UNAUTHORIZED otherwise."""
    s = request.app[RUNTIME].settings
    require_service_key(request, admin_key=s.admin_key, read_key=s.read_key, write=False)


def _known_params(request: web.Request, allowed: set[str]) -> None:
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise ValidationFailed(f"unknown query parameter {unknown[0]}", field=unknown[0])


async def resolve(request: web.Request) -> web.Response:
    _require_reader(request)
    q = request.query
    _known_params(request, {"id", "code", "domain"})
    kind, value = normalise_query(id=q.get("id"), code=q.get("code"), domain=q.get("domain"))
    rec = await request.app[RESOLVER].resolve(**{kind: value})
    return json_response(rec.to_api())


async def list_tenants(request: web.Request) -> web.Response:
    """A keyset page of tenants in code order: ``after`` is the last code of the previous
    page. A full page carries ``Link: <...?after=<its last code>...>; rel="next"``."""
    _require_reader(request)
    _known_params(request, {"shard", "state", "limit", "after", "offset"})
    shard, state, after = request.query.get("shard"), request.query.get("state"), request.query.get("after")
    if shard is not None:
        check_shard_id(shard)
    if state is not None and state not in TENANT_STATES:
        raise ValidationFailed(f"state must be one of {', '.join(TENANT_STATES)}", field="state")
    limit = int_param(request, "limit", 100, 1, MAX_LIST_LIMIT)
    d = request.app[RUNTIME].directory
    recs = await d.list_tenants(shard_id=shard, state=state, limit=limit, after=after,
                                offset=int_param(request, "offset", 0, 0, MAX_OFFSET))
    headers = None
    if len(recs) == limit:  # maybe more: the next page starts after this one's last code
        query = {k: v for k, v in (("shard", shard), ("state", state)) if v is not None}
        nxt = request.rel_url.with_query({**query, "limit": str(limit), "after": recs[-1].code})
        headers = {"Link": f'<{nxt}>; rel="next"'}
    return json_response([r.to_api() for r in recs], headers=headers)


async def create_tenant(request: web.Request) -> web.Response:
    _require_admin(request)
    body = parse_body(NewTenant, await read_json_object(request))
    rec = await request.app[RUNTIME].directory.create_tenant(body.code, body.domains, shard_id=body.shard_id)
    return json_response(rec.to_api(), status=201)


async def get_tenant(request: web.Request) -> web.Response:
    _require_reader(request)
    tid = parse_tenant_id(request.match_info["id"])
    return json_response((await request.app[RESOLVER].resolve(id=tid)).to_api())


async def suspend_tenant(request: web.Request) -> web.Response:
    _require_admin(request)
    rec = await request.app[RUNTIME].directory.suspend(request.match_info["id"])
    return json_response(rec.to_api())


async def resume_tenant(request: web.Request) -> web.Response:
    _require_admin(request)
    rec = await request.app[RUNTIME].directory.resume(request.match_info["id"])
    return json_response(rec.to_api())


async def list_shards(request: web.Request) -> web.Response:
    _require_reader(request)
    return json_response([s.to_api() for s in await request.app[RUNTIME].directory.list_shards()])


async def add_shard(request: web.Request) -> web.Response:
    _require_admin(request)
    body = parse_body(NewShard, await read_json_object(request))
    rec = await request.app[RUNTIME].directory.add_shard(body.shard_id, body.dsn, capacity=body.capacity,
                                                         weight=body.weight)
    return json_response(rec.to_api(), status=201)


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
                          client_max_size=runtime.settings.max_body_bytes,
                          handler_args=http_settings(runtime.settings.http_timeout_s))
    app[BODY_TIMEOUT] = runtime.settings.http_timeout_s
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


async def listen(app: web.Application, stack: AsyncExitStack, host: str, port: int) -> int:
    """Serve ``app`` on ``host:port`` (0: a free port) until ``stack`` closes (which stops
    accepting and drains first); the bound port. `EdgeRunner`: what aiohttp's parser
    refuses gets the envelope too."""
    runner = EdgeRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, host, port).start()
    bound: int = runner.addresses[0][1]
    return bound


async def serve(settings: Settings, *, port: int | None = None,
                ready: Callable[[int], Awaitable[None]] | None = None, stop: asyncio.Event | None = None) -> None:
    """Run the router service until ``stop`` is set (or cancelled).

    Shutdown order: stop accepting and drain (runner.cleanup), then close pools.
    """
    async with AsyncExitStack() as stack:
        app = await open_service(settings, stack)
        bound = await listen(app, stack, settings.bind_host, settings.router_port if port is None else port)
        freeze_startup_heap()
        if ready is not None:
            await ready(bound)
        await (stop or asyncio.Event()).wait()
