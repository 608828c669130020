"""`PluginContext` as the host implements it: one per loaded plugin.

Contexts are built when the app is built (routes must be known before it starts) and
reach the runtime through `PluginHost.runtime`, which the app's lifespan fills in;
calling runtime-backed methods before startup raises RuntimeError.
"""
from __future__ import annotations

import contextvars
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Final, Mapping, Sequence, TypeVar

import orjson
from aiohttp import web

from host import rbac
from host import outbox
from host.cron import Job, parse_spec
from host.keys import REQ_CALLER
from host.runtime import HostRuntime
from plugins.api import Caller, CronRun, Db, Event, Handler, Tenant
from router.errors import TenantNotFound

T = TypeVar("T")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler


class PluginHost:
    """The loaded plugins' contexts and the runtime they share."""

    def __init__(self) -> None:
        self.contexts: dict[str, HostPluginContext] = {}
        self.refused: dict[str, str] = {}
        self._runtime: HostRuntime | None = None

    @property
    def runtime(self) -> HostRuntime:
        if self._runtime is None:
            raise RuntimeError("the host has not started")
        return self._runtime

    def attach(self, runtime: HostRuntime | None) -> None:
        self._runtime = runtime

    def event_handlers(self) -> list[tuple[str, str, Callable[[Event], Awaitable[None]]]]:
        """(plugin id, event name, handler) of every loaded plugin, for `open_host_runtime`."""
        return [(ctx.plugin_id, name, handler) for ctx in self.contexts.values() for name, handler in ctx.event_handlers]

    def cron_jobs(self) -> list[Job]:
        return [job for ctx in self.contexts.values() for job in ctx.jobs]


PLUGIN_HOST: Final[web.AppKey["PluginHost"]] = web.AppKey("tenantfleet_plugin_host")


class _Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def _add(self, method: str, path: str) -> Callable[[Handler], Handler]:
        if not path.startswith("/"):
            raise ValueError(f"plugin route paths start with '/': {path!r}")

        def register(handler: Handler) -> Handler:
            self.routes.append(Route(method, path, handler))
            return handler
        return register

    def get(self, path: str) -> Callable[[Handler], Handler]:
        return self._add("GET", path)

    def post(self, path: str) -> Callable[[Handler], Handler]:
        return self._add("POST", path)

    def put(self, path: str) -> Callable[[Handler], Handler]:
        return self._add("PUT", path)

    def patch(self, path: str) -> Callable[[Handler], Handler]:
        return self._add("PATCH", path)

    def delete(self, path: str) -> Callable[[Handler], Handler]:
        return self._add("DELETE", path)


class _Rbac:
    def require(self, permission: str) -> Callable[[Handler], Handler]:
        return rbac.require(permission)


class _Config:
    def __init__(self, ctx: "HostPluginContext") -> None:
        self._ctx = ctx

    async def get_global(self, key: str, default: Any = None) -> Any:
        return self._ctx.host.runtime.registry.global_config(self._ctx.plugin_id).get(key, default)

    async def get_tenant(self, tenant_id: str, key: str, default: Any = None) -> Any:
        tp = await self._ctx.host.runtime.registry.tenant_plugin(tenant_id, self._ctx.plugin_id)
        return default if tp is None else tp.config.get(key, default)


@dataclass
class _TxScope:
    """The `with_tenant_tx` transaction a plugin's code runs in: its handle, its tenant,
    and the events written in it so far (handed to delivery once it commits)."""
    db: Db
    tenant_id: str
    events: list[tuple[str, str, str, Mapping[str, Any]]] = field(default_factory=list)


_TX_SCOPE: contextvars.ContextVar[_TxScope | None] = contextvars.ContextVar("tenantfleet_tx_scope", default=None)


class _Events:
    def __init__(self, ctx: "HostPluginContext") -> None:
        self._ctx = ctx

    def on(self, name: str, handler: Callable[[Event], Awaitable[None]]) -> None:
        self._ctx.event_handlers.append((name, handler))

    async def emit(self, name: str, payload: Mapping[str, Any], *, db: Db) -> str:
        scope = _TX_SCOPE.get()
        if scope is None or scope.db is not db:
            raise RuntimeError("events.emit(..., db=db) takes the db of the with_tenant_tx it is called in")
        body = outbox.encode_event(name, payload)  # VALIDATION_FAILED before anything is written
        event_id = await outbox.write(db, scope.tenant_id, self._ctx.plugin_id, name, body)
        # What was written, decoded: handlers run here after commit (Redis down) see the
        # same JSON as through Redis or the relay, not the emitter's objects or later edits.
        scope.events.append((event_id, self._ctx.plugin_id, name, orjson.loads(body)))
        return event_id


class _Cron:
    def __init__(self, ctx: "HostPluginContext") -> None:
        self._ctx = ctx

    def register(self, spec: str, job: Callable[[CronRun], Awaitable[None]], *, name: str | None = None,
                 per_tenant: bool = False) -> None:
        self._ctx.jobs.append(Job(self._ctx.plugin_id, name or str(getattr(job, "__name__", "job")), parse_spec(spec),
                                  job, per_tenant))


class _Log:
    def __init__(self, plugin_id: str) -> None:
        self._plugin_id = plugin_id
        self._logger = logging.getLogger(f"tenantfleet.plugin.{plugin_id}")

    def __call__(self, msg: str, /, **meta: Any) -> None:
        self._logger.info(msg, extra={"pluginId": self._plugin_id, **meta})


@dataclass
class HostPluginContext:
    plugin_id: str
    host: PluginHost
    router: _Router = field(default_factory=_Router)
    rbac: _Rbac = field(default_factory=_Rbac)
    event_handlers: list[tuple[str, Callable[[Event], Awaitable[None]]]] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    health_checks: list[Callable[[], Awaitable[Mapping[str, Any]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.config = _Config(self)
        self.events = _Events(self)
        self.cron = _Cron(self)
        self.log = _Log(self.plugin_id)

    async def with_tenant_tx(self, tenant_id: str, fn: Callable[[Db], Awaitable[T]]) -> T:
        rt = self.host.runtime
        scope: _TxScope | None = None

        async def scoped(db: Db) -> T:
            nonlocal scope
            # The tenant the fence entered (tx.run resolves this id): what emit records,
            # whatever text the plugin passed. A retried attempt starts with no events.
            scope = _TxScope(db, str(uuid.UUID(tenant_id)))
            token = _TX_SCOPE.set(scope)
            try:
                return await fn(db)
            finally:
                _TX_SCOPE.reset(token)

        result = await rt.tx.run(tenant_id, scoped)
        if scope is not None and scope.events:
            rt.events.committed(scope.tenant_id, scope.events)  # never raises, never waits
        return result

    async def resolve_tenant(self, *, domain: str | None = None, code: str | None = None) -> Tenant | None:
        try:
            rec = await self.host.runtime.resolver.resolve(domain=domain, code=code)
        except TenantNotFound:
            return None
        return Tenant(tenant_id=rec.tenant_id, code=rec.code, domains=rec.domains)

    def caller(self, request: web.Request) -> Caller:
        caller: Caller | None = request.get(REQ_CALLER)
        if caller is None:
            raise RuntimeError("caller() is only available inside a plugin route")
        return caller

    def health_check(self, check: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
        self.health_checks.append(check)

    async def enabled_tenants(self) -> Sequence[str]:
        return await self.host.runtime.registry.enabled_tenants(self.plugin_id)
