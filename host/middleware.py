"""The host's per-request duties around the shared edge (`router.http`): metrics and one
JSON log line per request, ``{pluginId, tenantId, route, method, status, ms, requestId}``.

The envelope, the request-id rule, the request checks and the error mapping are
`router.http.envelope_middleware_with`'s, the same as the router's.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import orjson
from aiohttp import web

from host.keys import REQ_PLUGIN, REQ_TENANT
from host.logs import access_json, direct_handler
from host.metrics import METRICS
from host.tenancy import REQUEST_TENANT
from router.http import envelope_middleware_with

access_log = logging.getLogger("tenantfleet.access")


def _route(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None or info.route.resource is None:
        return "unmatched"
    return info.route.resource.canonical


def _context(request: web.Request) -> Mapping[str, Any]:
    return {"pluginId": request.get(REQ_PLUGIN), "tenantId": request.get(REQ_TENANT)}


def _record(request: web.Request, rid: str, status: int, seconds: float) -> None:
    plugin = request.get(REQ_PLUGIN)
    route = _route(request)
    if plugin is not None:
        metrics = request.app[METRICS]
        metrics.observe(plugin, route, status, seconds)
        rec = REQUEST_TENANT.get()
        if rec is not None and rec.tenant_id == request.get(REQ_TENANT):  # this request's tenant, not an earlier one's
            metrics.shard_latency.record(rec.shard_id, seconds)
    if access_log.isEnabledFor(logging.INFO):
        fields: dict[str, Any] = {"pluginId": plugin, "tenantId": request.get(REQ_TENANT), "route": route,
                                  "method": request.method, "status": status, "ms": round(seconds * 1000, 3),
                                  "requestId": rid}
        sink = direct_handler(access_log, logging.INFO)
        if sink is not None:  # the same line logging would write, for a fraction of the CPU
            sink.write_line(access_json(access_log.name, time.time(), fields))
        else:
            access_log.info(_Line(fields), extra={"fields": fields})


class _Line:
    """The access line's message, rendered only if a handler formats it (not on the request path)."""
    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return orjson.dumps(self.fields).decode()


envelope_middleware = envelope_middleware_with(observe=_record, log_context=_context)
