"""HTTP plumbing shared by tenantfleet's aiohttp services: request ids, the error
envelope middleware, JSON bodies via orjson.

Every error leaves as ``{"error": {"code", "message", "requestId", ...}}``. A
`TenantFleetError` renders as itself; aiohttp's HTTP errors keep their status with a
matching code; anything else is ``500 INTERNAL`` with the traceback in the log only.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from router.errors import Internal, MethodNotAllowed, NotFound, PayloadTooLarge, TenantFleetError, ValidationFailed

log = logging.getLogger("tenantfleet.http")

REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_ID_HEADER = "X-Request-Id"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id(request: web.Request) -> str:
    rid = request.get(REQUEST_ID)
    if rid is None:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        rid = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else uuid.uuid4().hex
        request[REQUEST_ID] = rid
    return rid


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(exc: TenantFleetError, rid: str) -> web.Response:
    """The envelope response for ``exc``: its status, ``X-Request-Id``, and ``Retry-After``
    when the error says when to come back (TENANT_MOVING)."""
    headers = {REQUEST_ID_HEADER: rid}
    retry = exc.details.get("retryAfter")
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return json_response(exc.envelope(rid), status=exc.status, headers=headers)


def from_http(exc: web.HTTPException) -> TenantFleetError:
    """The envelope error for one of aiohttp's HTTP errors (the status is kept by the caller)."""
    if exc.status == 404:
        return NotFound("no such route")
    if exc.status == 413:
        return PayloadTooLarge("request body too large")
    if exc.status == 405:
        return MethodNotAllowed(f"method not allowed; allowed: {', '.join(sorted(getattr(exc, 'allowed_methods', ())))}")
    return ValidationFailed(exc.reason or "bad request")


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request_id(request)
    try:
        resp = await handler(request)
    except TenantFleetError as exc:
        if exc.status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc.message, extra={"requestId": rid},
                      exc_info=isinstance(exc, Internal))
        return error_response(exc, rid)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp_err = error_response(from_http(exc), rid)
        resp_err.set_status(exc.status)
        return resp_err
    except Exception:
        log.exception("%s %s raised", request.method, request.path, extra={"requestId": rid})
        return error_response(Internal("internal error"), rid)
    resp.headers.setdefault(REQUEST_ID_HEADER, rid)
    return resp


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (router service, host admin API and plugin routes alike).

    The app's ``client_max_size`` bounds it: PAYLOAD_TOO_LARGE beyond that;
    VALIDATION_FAILED (``field: body``) for no body, malformed JSON or anything but an object.
    """
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("request body too large") from None
    if not raw:
        raise ValidationFailed("a JSON object body is required", field="body")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValidationFailed("body is not valid JSON", field="body") from None
    if not isinstance(data, dict):
        raise ValidationFailed("body must be a JSON object", field="body")
    return data
