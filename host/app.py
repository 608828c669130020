"""The host's aiohttp app: build it, run it.

    app = build_app(settings)                 # plugins discovered, loaded and mounted
    async with serving(settings, port=0) as (app, url): ...   # run it in this loop
    await serve(settings, port)               # run until cancelled (`tenantfleet serve`, `up`)

Lifespan (``cleanup_ctx``): `open_host_runtime` opens control pool, shard pools,
directory, resolve client, Redis, registry and the owned background tasks (pub/sub,
cron, event queue consumer, outbox relay). Shutdown order: the runner stops the
listener, drains in-flight requests for up to `DRAIN_TIMEOUT_S`, then the lifespan
cancels the owned tasks (events being handled stay in the outbox for the next relay)
and closes Redis, the resolve client and the pools, in that order.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from host import admin, admin_runs, admin_uninstall
from host.appshell import appshell_app
from host.console import console_app
from host.context import PLUGIN_HOST, PluginHost
from host.keys import APP_PATH, CONSOLE_PATH, DRAIN_TIMEOUT_S, READYZ_REDIS_TIMEOUT_S
from host.loader import load_plugins, mount
from host.manifest import manifest, whoami
from host.metrics import METRICS, HostMetrics
from host.middleware import envelope_middleware
from host.openapi import openapi_view
from host.runner import RUNNER, Runner
from host.runtime import RUNTIME, HostRuntime, open_host_runtime
from router.http import BODY_TIMEOUT, EdgeRunner, freeze_startup_heap, http_settings, json_response
from router.models import ShardRecord
from router.settings import Settings
from shard_migrations.packages import Discovery, discover

log = logging.getLogger("tenantfleet.host")

T = TypeVar("T")


def build_app(settings: Settings, *, discovery: Discovery | None = None,
              metrics: HostMetrics | None = None) -> web.Application:
    """The host app with every acceptable plugin mounted; resources open at startup.

    ``discovery`` defaults to `shard_migrations.packages.discover()`; tests pass their own.
    """
    found = discovery if discovery is not None else discover()
    app = web.Application(middlewares=[envelope_middleware], client_max_size=settings.max_body_bytes,
                          handler_args=http_settings(settings.http_timeout_s))
    app[BODY_TIMEOUT] = settings.http_timeout_s
    host = PluginHost()
    load_plugins(found, host)
    app[PLUGIN_HOST] = host
    app[METRICS] = metrics if metrics is not None else HostMetrics()

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        async with open_host_runtime(settings, found, app[METRICS], cron_jobs=host.cron_jobs(),
                                     event_handlers=host.event_handlers()) as rt:
            app[RUNTIME] = rt
            host.attach(rt)
            rt.start_delivery()  # after attach: handlers reach the runtime through their contexts
            try:
                yield
            finally:
                await rt.tasks.close()  # no handler may run on a detached context
                host.attach(None)

    app.cleanup_ctx.append(lifespan)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/openapi.json", openapi_view)
    app.router.add_get("/api/manifest", manifest)
    app.router.add_get("/api/whoami", whoami)
    app.router.add_routes(admin.routes)
    app.router.add_routes(admin_runs.routes)
    app.router.add_routes(admin_uninstall.routes)
    app[RUNNER] = Runner()
    app.add_subapp(CONSOLE_PATH, console_app())
    app.add_subapp(APP_PATH, appshell_app(host, found, body_timeout_s=settings.http_timeout_s))
    mount(app, host, found)
    return app


async def healthz(request: web.Request) -> web.Response:
    """The process is up (no dependencies checked)."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Control plane and every registered shard answer ``SELECT 1``, Redis answers ``PING``
    (each asked now, with a short timeout).

    503 ``unready`` naming what doesn't answer, if the control plane or a shard doesn't.
    Redis down is ``200 degraded``: this host still serves every request correctly
    without it (events go from the outbox to the handlers here; changes reach other hosts
    by the cache TTLs), so taking every host out of rotation for it would turn a Redis
    outage into a full one; cron ticks are skipped meanwhile. ``checks.redis`` says why.
    """
    rt = request.app[RUNTIME]
    checks: dict[str, str] = {}

    async def control() -> list[ShardRecord]:
        await rt.control.fetchval("SELECT 1")
        return await rt.directory.list_shards()

    async def redis_ping() -> None:
        await rt.redis.ping()

    # control plane and Redis at once; then every shard at once: one unreachable server
    # costs its timeout once, not once per check
    found, pong = await asyncio.gather(asyncio.wait_for(control(), 2.0),
                                       asyncio.wait_for(redis_ping(), READYZ_REDIS_TIMEOUT_S), return_exceptions=True)
    shards: list[ShardRecord] = []
    if isinstance(found, BaseException):  # any failure is the answer here, reported by class
        checks["control"] = found.__class__.__name__
    else:
        checks["control"] = "ok"
        shards = found
    results = await asyncio.gather(*(asyncio.wait_for(_select_one(rt, s.shard_id), 2.0) for s in shards),
                                   return_exceptions=True)
    for shard, result in zip(shards, results):  # reported per shard, not raised
        checks[f"shard:{shard.shard_id}"] = "ok" if result is None else result.__class__.__name__
    ready = all(v == "ok" for v in checks.values())
    checks["redis"] = "ok" if pong is None else pong.__class__.__name__
    status = "unready" if not ready else "ready" if checks["redis"] == "ok" else "degraded"
    return json_response({"status": status, "checks": checks}, status=200 if ready else 503)


async def _select_one(rt: HostRuntime, shard_id: str) -> None:
    async with rt.tx.connection(shard_id) as conn:  # the request path's own connections
        await conn.fetchval("SELECT 1")


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@asynccontextmanager
async def serving(settings: Settings, *, host: str | None = None, port: int | None = None,
                  discovery: Discovery | None = None) -> AsyncIterator[tuple[web.Application, str]]:
    """Run the host in this event loop; yields (app, base URL). ``port=0`` picks a free port."""
    app = build_app(settings, discovery=discovery)
    runner = EdgeRunner(app, access_log=None, shutdown_timeout=DRAIN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host or settings.bind_host, settings.host_port if port is None else port)
        await site.start()
        bound = runner.addresses[0][1]
        yield app, f"http://{host or settings.bind_host}:{bound}"
    finally:
        await runner.cleanup()


async def serve(settings: Settings, *, port: int | None = None, host: str | None = None,
                ready: Callable[[str], Awaitable[None]] | None = None, stop: asyncio.Event | None = None,
                discovery: Discovery | None = None) -> None:
    """Serve the host until ``stop`` is set (or cancelled); ``ready(url)`` once listening.

    Shutdown order: stop accepting, drain in-flight requests (up to `DRAIN_TIMEOUT_S`),
    cancel the owned tasks, close Redis and the pools (see `serving`).
    """
    async with serving(settings, host=host, port=port, discovery=discovery) as (_, url):
        log.info("host listening on %s", url)
        freeze_startup_heap()
        if ready is not None:
            await ready(url)
        await (stop or asyncio.Event()).wait()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (a Linux/macOS dependency), else None (asyncio's).

    Why: the request path is mostly socket I/O (PostgreSQL round trips, the HTTP
    response); uvloop's transports cost less CPU per send and receive than the selector
    loop's (bench/request_path.py, both sides on the same loop: see bench/README.md).
    """
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on `loop_factory`'s loop: how `tenantfleet serve` and `up` run the host."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
