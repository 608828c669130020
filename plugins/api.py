"""The plugin API: the one tenantfleet module a plugin imports.

A plugin package has ``meta = {"id", "version", "api": "1.x"}`` and
``setup(ctx: PluginContext) -> None``, which registers routes on ``ctx.router`` (mounted
under ``/api/plugins/{id}/``), event handlers, cron jobs and an optional health check.

Every plugin route is reached only after the host has resolved the tenant, checked the
kill switch and the plugin's enablement for it, and authenticated the caller; the
handler reads that with ``ctx.caller(request)``. ``ctx.rbac.require("perm")`` guards a
handler with one permission. Tenant data is touched only inside
``ctx.with_tenant_tx(tenant_id, fn)``: ``fn`` gets a connection whose ``search_path`` is
the tenant's schema, then ``public``; it may run more than once (a stale placement is
retried) and must only use transaction-scoped statements (no session ``SET``, no
session advisory locks). Raise the errors re-exported here to answer with the error
envelope; anything else becomes ``500 INTERNAL`` and is logged with its traceback.

Events leave with the transaction: ``await ctx.events.emit(name, payload, db=db)`` inside
``fn`` writes the event into the tenant's shard outbox in that same transaction, so it
exists exactly when the change it reports committed. After commit the host delivers it
(through Redis, or straight from the outbox when Redis is down); a Redis outage never
fails the request and never loses the event. Delivery is at least once to every plugin
that subscribes to the event on some host of the fleet, on one host that has the
handler (also while hosts run different plugin versions): a handler registered with
``ctx.events.on`` may see the same event again (same ``Event.id``) and must ignore
repeats, e.g. by recording the ids it handled in the same transaction as its effect.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence, TypeVar

from aiohttp import web

from router.errors import (
    Forbidden, NotFound, PayloadTooLarge, TenantFleetError, ValidationFailed,
)
from router.http import int_param, json_response as _json_response, parse_uint, read_json_object

API_VERSION = "1.0"
API_MAJOR = 1

__all__ = [
    "API_MAJOR", "API_VERSION", "Caller", "Config", "Cron", "CronRun", "Db", "Event", "Events", "Forbidden",
    "Handler", "Log", "NotFound", "PayloadTooLarge", "PluginContext", "PluginRouter", "Rbac", "Record",
    "Tenant", "TenantFleetError", "ValidationFailed", "int_param", "json_body", "json_response", "parse_uint",
]

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Record = Mapping[str, Any]


class Db(Protocol):
    """What ``with_tenant_tx`` hands to ``fn``: asyncpg's query methods on the tenant's
    connection, inside its transaction. Valid until the transaction ends (later calls raise
    ``asyncpg.InterfaceError``); prepared statements, cursors, savepoint objects and
    listeners are not offered, since the connection goes on to serve other tenants."""

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any: ...
    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any: ...
    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str: ...
    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Tenant:
    tenant_id: str
    code: str
    domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, for which tenant, and what this plugin is at for that tenant.

    ``plugin_version`` is the tenant's installed version of the plugin
    (``sys_tenant_plugins.version_installed``): mid-rollout, code serves both sides by it.
    """
    tenant: Tenant
    principal_id: str
    principal_name: str
    permissions: frozenset[str]
    plugin_version: str
    config: Mapping[str, Any] = field(default_factory=dict)

    def has(self, permission: str) -> bool:
        return permission in self.permissions


@dataclass(frozen=True, slots=True)
class Event:
    """An event as a handler receives it; ``id`` is the same on every redelivery."""
    id: str                     # uuid, given when the event was written
    name: str
    source: str                 # the emitting plugin's id
    tenant_id: str              # the tenant whose transaction wrote it
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class CronRun:
    job: str
    scheduled: datetime         # the tick this run is for (UTC)
    tenant_id: str | None       # set for per-tenant jobs


class PluginRouter(Protocol):
    """Registers routes under ``/api/plugins/{id}``; ``path`` starts with ``/``."""

    def get(self, path: str) -> Callable[[Handler], Handler]: ...
    def post(self, path: str) -> Callable[[Handler], Handler]: ...
    def put(self, path: str) -> Callable[[Handler], Handler]: ...
    def patch(self, path: str) -> Callable[[Handler], Handler]: ...
    def delete(self, path: str) -> Callable[[Handler], Handler]: ...


class Rbac(Protocol):
    def require(self, permission: str) -> Callable[[Handler], Handler]:
        """Guard a handler: 403 FORBIDDEN naming ``permission`` if the caller lacks it."""
        ...


class Config(Protocol):
    async def get_global(self, key: str, default: Any = None) -> Any:
        """This plugin's global config value (``sys_plugins.config``)."""
        ...

    async def get_tenant(self, tenant_id: str, key: str, default: Any = None) -> Any:
        """This plugin's config value for one tenant (``sys_tenant_plugins.config``)."""
        ...


class Events(Protocol):
    def on(self, name: str, handler: Callable[[Event], Awaitable[None]]) -> None:
        """Run ``handler`` for every ``name`` event, emitted by any plugin on any host.

        At least once, on one host of the fleet that has this handler: the same event (same
        ``id``) may come again after a host died or a handler failed, so handle it
        idempotently. A handler that raises is logged and gets the event again after a
        backoff (exponential, capped at 5 minutes, never given up); other plugins' handlers
        of the event are not affected, this plugin's other handlers of it see it again too.
        """
        ...

    async def emit(self, name: str, payload: Mapping[str, Any], *, db: Db) -> str:
        """Write an event in ``db``'s transaction (the ``with_tenant_tx`` this runs in); its id.

        The event belongs to that transaction's tenant and is delivered only if the
        transaction commits, after it commits; never waits for Redis or handlers.
        ``name``: dotted lower-case words (``inventory.item_created``); ``payload``: a JSON
        object of at most 64 KiB. Raises VALIDATION_FAILED for a bad name or payload (the
        transaction then rolls back), RuntimeError if ``db`` is not the current
        transaction's handle.
        """
        ...


class Cron(Protocol):
    def register(self, spec: str, job: Callable[[CronRun], Awaitable[None]], *, name: str | None = None,
                 per_tenant: bool = False) -> None:
        """Run ``job`` on a cron ``spec`` (UTC), on exactly one host per tick.

        ``per_tenant``: once per tenant that has this plugin enabled, with ``tenant_id`` set.
        Missed ticks are skipped, never replayed in a burst. VALIDATION_FAILED on a bad spec.
        """
        ...


class Log(Protocol):
    def __call__(self, msg: str, /, **meta: Any) -> None: ...


class PluginContext(Protocol):
    """Everything a plugin gets from the host."""

    plugin_id: str
    router: PluginRouter
    rbac: Rbac
    config: Config
    events: Events
    cron: Cron
    log: Log

    async def with_tenant_tx(self, tenant_id: str, fn: Callable[[Db], Awaitable[T]]) -> T:
        """Run ``fn`` in a fenced transaction scoped to the tenant's schema (see module docstring).

        Raises TENANT_NOT_FOUND, TENANT_SUSPENDED, TENANT_MOVING, and what ``fn`` raises.
        """
        ...

    async def resolve_tenant(self, *, domain: str | None = None, code: str | None = None) -> Tenant | None:
        """The tenant by domain or code, or None if there is none."""
        ...

    def caller(self, request: web.Request) -> Caller:
        """The authenticated caller of a plugin route (set by the host before the handler)."""
        ...

    def health_check(self, check: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
        """Add a check to ``/api/plugins/{id}/health``; raising marks the plugin unhealthy."""
        ...

    async def enabled_tenants(self) -> Sequence[str]:
        """Ids of the tenants that have this plugin enabled (for per-tenant background work)."""
        ...


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; VALIDATION_FAILED if it isn't one or a string in it
    holds a NUL character, PAYLOAD_TOO_LARGE, REQUEST_TIMEOUT if it doesn't arrive in time."""
    return await read_json_object(request)


def json_response(data: Any, *, status: int = 200) -> web.Response:
    """``data`` as a JSON response (orjson: datetimes, UUIDs and dataclasses are handled)."""
    return _json_response(data, status=status)
