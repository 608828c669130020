"""The one middleware around every request: request id, error envelope, metrics, log line.

- `TenantFleetError` → its envelope and status.
- aiohttp's HTTP errors → the matching envelope (404 NOT_FOUND, 413 PAYLOAD_TOO_LARGE,
  other 4xx VALIDATION_FAILED with the real status kept in ``status``).
- anything else → ``500 INTERNAL`` with only the request id; the traceback goes to the log.
- one JSON log line per request: ``{pluginId, tenantId, route, status, ms, requestId}``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from host.keys import MAX_HEADER_BYTES, REQ_ID, REQ_PLUGIN, REQ_TENANT, REQUEST_ID_HEADER
from host.logs import access_json, direct_handler
from host.metrics import METRICS
from router.errors import Internal, TenantFleetError, ValidationFailed
from router.http import error_response, from_http

access_log = logging.getLogger("tenantfleet.access")
log = logging.getLogger("tenantfleet.host")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Generated ids: a random per-process prefix and a counter, unique across hosts without a
# getrandom() call per request (measured in bench/request_path.py's profile).
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _check_headers(request: web.Request) -> None:
    for name, value in request.raw_headers:
        if len(name) + len(value) > MAX_HEADER_BYTES:
            raise ValidationFailed(f"a request header is larger than {MAX_HEADER_BYTES} bytes",
                                   field=name.decode("latin-1")[:64])


def _route(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None or info.route.resource is None:
        return "unmatched"
    return info.route.resource.canonical


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    rid = request.headers.get(REQUEST_ID_HEADER)
    if rid is None or not _REQUEST_ID_RE.match(rid):
        rid = f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"
    request[REQ_ID] = rid
    status = 500
    try:
        _check_headers(request)
        resp = await handler(request)
        status = resp.status
    except TenantFleetError as exc:
        if exc.status >= 500:  # the operator needs these; the client gets the envelope only
            log.error("%s %s failed: %s: %s", request.method, request.path, exc.code, exc.message,
                      exc_info=exc.__cause__ is not None,
                      extra={"requestId": rid, "pluginId": request.get(REQ_PLUGIN), "tenantId": request.get(REQ_TENANT)})
        resp = error_response(exc, rid)
        status = exc.status
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = error_response(from_http(exc), rid)
        if 400 <= exc.status < 500:
            resp.set_status(exc.status)  # the envelope says why; the status stays aiohttp's
        status = resp.status
    except asyncio.CancelledError:
        status = 499  # the client went away; nothing to send
        raise
    except Exception:
        log.exception("unhandled error", extra={"requestId": rid, "pluginId": request.get(REQ_PLUGIN),
                                                "tenantId": request.get(REQ_TENANT)})
        resp = error_response(Internal("internal error"), rid)
        status = 500
    finally:
        _record(request, rid, status, time.perf_counter() - started)
    resp.headers[REQUEST_ID_HEADER] = rid
    return resp


def _record(request: web.Request, rid: str, status: int, seconds: float) -> None:
    plugin = request.get(REQ_PLUGIN)
    route = _route(request)
    if plugin is not None:
        request.app[METRICS].observe(plugin, route, status, seconds)
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
