"""The HTTP edge shared by tenantfleet's aiohttp services (router and host): request ids,
the error envelope, request checks every route gets, bearer-key checks, JSON bodies via
orjson, integer query parameters.

Every error leaves as ``{"error": {"code", "message", "requestId", ...}}``. A
`TenantFleetError` renders as itself; aiohttp's HTTP errors keep their 4xx status with a
matching code (405 with ``Allow``); anything else is ``500 INTERNAL`` with the traceback
in the log only. 401 answers carry ``WWW-Authenticate: Bearer``; errors that say when to
come back (TENANT_MOVING, SHARD_UNREACHABLE) carry ``Retry-After``.

Checks made before any handler runs (each a 400 VALIDATION_FAILED, nothing changed):
a request header over `MAX_HEADER_BYTES`; a NUL (``%00``) anywhere in the path or query
(PostgreSQL text can't hold one); a query parameter given more than once.

What aiohttp's HTTP parser refuses before any middleware runs (an unknown method, raw
non-ASCII bytes in the path, broken chunked encoding, no ``Host`` on HTTP/1.1, a request
line or header over `PARSER_MAX_FIELD`) gets the envelope too, ``400 BAD_REQUEST``, and
one INFO log line without a traceback: serve apps with `EdgeRunner`.
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import itertools
import json
import logging
import re
import secrets
import time
from typing import Any, Awaitable, Callable, Mapping, TypeVar

import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from aiohttp.web_request import BaseRequest
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from router.errors import (
    BadRequest, Forbidden, Internal, MethodNotAllowed, NotFound, PayloadTooLarge, RequestTimeout, TenantFleetError,
    Unauthorized, UnsupportedMediaType, ValidationFailed,
)

log = logging.getLogger("tenantfleet.http")

REQUEST_ID = web.RequestKey("tenantfleet_request_id", str)
REQUEST_ID_HEADER = "X-Request-Id"
# A client's X-Request-Id is kept only if it is this tame (it goes into log lines);
# otherwise the server makes one.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Generated ids: a random per-process prefix and a counter, unique across processes without
# a getrandom() call per request (measured in bench/request_path.py's profile).
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)

# Every header over this is refused by `check_request` with the envelope. aiohttp's own
# parser limit (`PARSER_MAX_FIELD`, for the request line and each header, on both services
# through `http_settings`) is set well above it, so that the envelope, not aiohttp's
# plain-text 400, answers the long headers and paths a client is likely to send.
MAX_HEADER_BYTES = 8192
PARSER_MAX_FIELD = 65536
# How long a body read may take, per app (settings.http_timeout_s); the same value is the
# connection's keep-alive timeout, which in aiohttp also cuts a request whose header never
# completes (web_protocol.RequestHandler arms it at connection_made).
BODY_TIMEOUT = web.AppKey("tenantfleet_body_timeout_s", float)
# How deep a JSON body may nest. orjson reads up to 1024 levels but writes only 254, so a
# body between the two would be accepted and then fail (500) wherever it is written back
# (a plugin's config, an echo); no request of ours needs more than a few levels.
MAX_JSON_DEPTH = 64
# Integers a JSON body may hold: PostgreSQL's bigint, and what orjson writes back.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_LONG_DIGITS = re.compile(rb"[0-9]{19}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (request, request id, status, seconds): what a service records per request (metrics, log line)
Observer = Callable[[web.Request, str, int, float], None]
# extra log fields for a request that failed with a 5xx (the host adds plugin and tenant)
LogContext = Callable[[web.Request], Mapping[str, Any]]

_BEARER_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,512}")
# Canonical non-negative decimal integers only: ASCII digits, no sign, no padding, no
# leading zero, no '_' (Python's int() would take ' 5', '05', '1_0' and '١').
_UINT_RE = re.compile(r"0|[1-9][0-9]{0,17}")


def http_settings(timeout_s: float) -> dict[str, Any]:
    """``handler_args`` for `web.Application`: idle connections and unfinished request
    headers are closed after ``timeout_s`` (aiohttp's keep-alive timer runs from the
    connection's start until a whole request has arrived), and the unread rest of a body
    (after an early answer, or a body read that timed out) is drained for at most
    ``timeout_s`` before the connection is closed (aiohttp's lingering time, 10 s by default);
    the request line and each header may be `PARSER_MAX_FIELD` bytes long."""
    return {"keepalive_timeout": timeout_s, "lingering_time": timeout_s,
            "max_line_size": PARSER_MAX_FIELD, "max_field_size": PARSER_MAX_FIELD}


def new_request_id(request: web.Request) -> str:
    """The request's id: the client's ``X-Request-Id`` if it matches `REQUEST_ID_RE` whole, else a new one."""
    rid = request.headers.get(REQUEST_ID_HEADER)
    if rid is None or not REQUEST_ID_RE.fullmatch(rid):
        rid = f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"
    request[REQUEST_ID] = rid
    return rid


def request_id(request: web.Request) -> str:
    rid = request.get(REQUEST_ID)
    return rid if rid is not None else new_request_id(request)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``data`` as JSON via orjson (datetimes, UUIDs and dataclasses are handled)."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(exc: TenantFleetError, rid: str) -> web.Response:
    """The envelope response for ``exc``: its status, ``X-Request-Id``, ``Retry-After`` when
    the error says when to come back, ``WWW-Authenticate`` on 401, ``Allow`` on 405."""
    headers = {REQUEST_ID_HEADER: rid}
    retry = exc.details.get("retryAfter", exc.retry_after)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tenantfleet"'
    allowed = exc.details.get("allowed")
    if exc.status == 405 and allowed is not None:
        headers["Allow"] = ", ".join(allowed)
    return json_response(exc.envelope(rid), status=exc.status, headers=headers)


def from_http(exc: web.HTTPException) -> TenantFleetError:
    """The envelope error for one of aiohttp's HTTP errors (the caller keeps its 4xx status)."""
    if exc.status == 404:
        return NotFound("no such route")
    if exc.status == 413:
        return PayloadTooLarge("request body too large")
    if exc.status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()))
        return MethodNotAllowed(f"method not allowed; allowed: {', '.join(allowed)}", allowed=allowed)
    return ValidationFailed(exc.reason or "bad request")


def check_request(request: web.Request) -> None:
    """The checks every route gets before its handler (see the module docstring)."""
    for name, value in request.raw_headers:
        if len(name) + len(value) > MAX_HEADER_BYTES:
            raise ValidationFailed(f"a request header is larger than {MAX_HEADER_BYTES} bytes",
                                   field=name.decode("latin-1")[:64])
    if "%00" in request.raw_path:
        raise ValidationFailed("the path and query may not contain a NUL character (%00)", field="path")
    if request.query_string:
        query = request.query
        names = query.keys()  # distinct names (multidict)
        if len(query) != len(names):
            repeated = next(n for n in names if len(query.getall(n)) > 1)
            raise ValidationFailed(f"query parameter {repeated} is given more than once", field=repeated)


def envelope_middleware_with(observe: Observer | None = None,
                             log_context: LogContext | None = None) -> Middleware:
    """The one envelope middleware: request id, `check_request`, error mapping; ``observe``
    is called once per request with the final status (499 if the client went away)."""

    @web.middleware
    async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        rid = new_request_id(request)
        status = 500
        try:
            check_request(request)
            resp = await handler(request)
            status = resp.status
        except TenantFleetError as exc:
            if exc.status >= 500:  # the operator needs these; the client gets the envelope only
                log.error("%s %s failed: %s: %s", request.method, request.path, exc.code, exc.message,
                          exc_info=isinstance(exc, Internal) or exc.__cause__ is not None,
                          extra={"requestId": rid, **(log_context(request) if log_context else {})})
            resp = error_response(exc, rid)
            status = exc.status
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = error_response(from_http(exc), rid)
            if exc.status < 500:
                resp.set_status(exc.status)  # the envelope says why; the status stays aiohttp's
            status = resp.status
        except asyncio.CancelledError:
            status = 499  # the client went away; nothing to send
            raise
        except Exception:
            log.exception("%s %s raised", request.method, request.path,
                          extra={"requestId": rid, **(log_context(request) if log_context else {})})
            resp = error_response(Internal("internal error"), rid)
            status = 500
        finally:
            if observe is not None:
                observe(request, rid, status, time.perf_counter() - started)
        resp.headers[REQUEST_ID_HEADER] = rid
        return resp

    return envelope


envelope_middleware = envelope_middleware_with()


# --- what the HTTP parser refuses ----------------------------------------------------------------

_PARSER_BYTES = re.compile(r":?\s*(?:b'|b\"|bytearray\().*$")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _parser_reason(exc: BaseException | None, message: str | None) -> str:
    """aiohttp's reason for refusing a request, on one line and without the client's bytes
    (its messages quote them: ``Invalid method encountered:\n\n  b'FOO / HTTP/1.1'``)."""
    text = message or (getattr(exc, "message", None) if exc is not None else None) or "malformed request"
    first = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "malformed request")
    first = _UNPRINTABLE.sub("?", _PARSER_BYTES.sub("", first)).rstrip(" :.")
    return first[:120] or "malformed request"


class _EnvelopeRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering with the envelope where aiohttp would send
    plain text: for a request its parser refused (400), and for an exception that escaped
    every middleware (500; none of ours lets one through)."""
    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        rid = new_request_id(request)  # type: ignore[arg-type]  # request ids are read from a BaseRequest
        if status < 500:  # the client's malformed request: worth a line, not a traceback
            reason = _parser_reason(exc, message)
            log.info("malformed HTTP request from %s refused: %s", request.remote, reason, extra={"requestId": rid})
            err: TenantFleetError = BadRequest(f"malformed HTTP request: {reason}")
        else:
            log.error("request from %s failed outside the handlers", request.remote, exc_info=exc,
                      extra={"requestId": rid})
            err = Internal("internal error")
        if request.writer.output_size > 0:  # as aiohttp: part of an answer is out, the connection is broken
            raise ConnectionError("the response is already being sent; cannot send the error")
        resp = error_response(err, rid)
        resp.set_status(status)
        resp.force_close()
        return resp


class _EnvelopeServer(web.Server):
    """`web.Server` whose connections are `_EnvelopeRequestHandler`s."""

    def __call__(self) -> web.RequestHandler:
        handler = super().__call__()
        handler.__class__ = _EnvelopeRequestHandler  # same slots: the subclass only overrides handle_error
        return handler


class EdgeRunner(web.AppRunner):
    """`web.AppRunner` for the router and the host: what aiohttp's HTTP parser refuses
    (before any middleware or route) is answered with the envelope, ``400 BAD_REQUEST``,
    an ``X-Request-Id`` and one INFO log line, not aiohttp's plain text and an ERROR
    traceback. aiohttp has no parameter for its connection handler's class; its
    `web.Server` makes plain `web.RequestHandler`s, so once `setup` has made the server
    it is given a subclass that makes ours (public classes and ``handle_error``'s
    documented signature only; tests/test_edge_gaps.py fails if an aiohttp upgrade
    changes that)."""

    async def setup(self) -> None:
        await super().setup()
        server = self.server
        assert server is not None and type(server) is web.Server, type(server)
        server.__class__ = _EnvelopeServer


def freeze_startup_heap() -> int:
    """Once a service listens: collect, then freeze what is left (`gc.freeze`), so that
    Python's full collections no longer walk what was allocated while starting (modules,
    classes, pydantic and SQLAlchemy models, the plugin registry); returns how many objects
    are frozen now.

    Why: a full (generation-2) collection walks every tracked object with the whole
    process stopped. In a serving host (router and host in one process, 200 tenants) one
    took ~80 ms about every 30 s: every request in flight, on every route and shard, waited
    at the same instant (load tests: the whole fleet's slowest requests all at once). What
    is frozen stays alive (frozen cycles are never collected); startup's objects live as
    long as the process anyway. Called again (the second service of ``tenantfleet up``),
    it freezes what was added since."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# --- keys --------------------------------------------------------------------------------------

def bearer(request: web.Request) -> str:
    """The bearer token of ``Authorization: Bearer <token>``.

    UNAUTHORIZED (401, ``WWW-Authenticate: Bearer``) if the header is missing, not a
    Bearer one, or the token is not 1-512 visible ASCII characters (every key we issue is).
    """
    header = request.headers.get("Authorization")
    if header is None:
        raise Unauthorized("an API key is required: Authorization: Bearer <key>")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _BEARER_TOKEN_RE.fullmatch(token):
        raise Unauthorized("malformed Authorization header: expected Bearer <key>")
    return token


def key_matches(token: str, key: str) -> bool:
    """Constant-time comparison of a `bearer` token with a configured key ('' never matches)."""
    return bool(key) and hmac.compare_digest(token.encode(), key.encode())


def require_service_key(request: web.Request, *, admin_key: str, read_key: str, write: bool) -> None:
    """The router's keys: the admin key may do anything, the read key may only read.

    UNAUTHORIZED for a missing, malformed or unknown key (also when no key is configured:
    nothing is open); FORBIDDEN for the read key on a write.
    """
    token = bearer(request)
    if key_matches(token, admin_key):
        return
    if key_matches(token, read_key):
        if write:
            raise Forbidden("the read key can't change anything: this needs the admin key", permission="admin")
        return
    if not admin_key and not read_key:
        raise Unauthorized("this service has no key configured (TENANTFLEET_ADMIN_KEY, TENANTFLEET_READ_KEY): "
                           "nothing but health, metrics and OpenAPI is open")
    raise Unauthorized("unknown key")


# --- bodies and parameters --------------------------------------------------------------------

async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (router service, host admin API and plugin routes alike).

    The app's ``client_max_size`` bounds it: PAYLOAD_TOO_LARGE beyond that (at once when
    ``Content-Length`` says so); UNSUPPORTED_MEDIA_TYPE (415) for a ``Content-Type`` that
    isn't JSON (`check_json_media_type`), before any of it is read; REQUEST_TIMEOUT (408) if it
    doesn't arrive within the app's `BODY_TIMEOUT`; VALIDATION_FAILED (``field: body``)
    for no body, a body that can't be decoded as its ``Content-Encoding`` says, malformed
    JSON, JSON nested deeper than `MAX_JSON_DEPTH`, anything but an object; naming the
    field, for a string holding a NUL character (which PostgreSQL can't store) or an
    integer outside the signed 64-bit range (orjson would make it an inexact float).
    """
    if request.content_length is not None and request.content_length > request.client_max_size:
        raise PayloadTooLarge("request body too large")
    check_json_media_type(request)
    try:
        async with asyncio.timeout(request.app.get(BODY_TIMEOUT, 30.0)):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("request body too large") from None
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time") from None
    except web.RequestPayloadError:  # e.g. Content-Encoding: gzip over bytes that aren't
        raise ValidationFailed("the body could not be read (not what its Content-Encoding says, or cut short)",
                               field="body") from None
    if not raw:
        raise ValidationFailed("a JSON object body is required", field="body")
    return parse_json_object(raw)


def parse_json_object(raw: bytes, what: str = "body") -> dict[str, Any]:
    """``raw`` as a JSON object, with `read_json_object`'s checks (``what`` names it in the
    errors: the console's config form says ``config``). VALIDATION_FAILED for malformed
    JSON (with ``at``: line and column, unless ``what`` is the body), anything but an
    object, JSON nested deeper than `MAX_JSON_DEPTH`, a NUL character in a string or an
    integer outside the signed 64-bit range."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        _check_int64(raw, what)  # an integer too long even for a double (1e309) is refused by its name
        at = {} if what == "body" else {"at": f"line {exc.lineno} column {exc.colno}"}
        raise ValidationFailed(f"{what} is not valid JSON" + (f" ({exc.msg} at line {exc.lineno} column {exc.colno})"
                                                              if at else ""), field=what, **at) from None
    if not isinstance(data, dict):
        raise ValidationFailed(f"{what} must be a JSON object", field=what)
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(data, MAX_JSON_DEPTH):
        raise ValidationFailed(f"{what} nests deeper than {MAX_JSON_DEPTH} levels", field=what)
    _check_int64(raw, what)
    if b"\\u0000" in raw:  # the only way JSON text spells NUL; walk only then
        where = _nul_at(data, "")
        if where is not None:
            raise ValidationFailed(f"{where or what} contains a NUL character (\\u0000)", field=where or what)
    return data


def check_json_media_type(request: web.Request) -> None:
    """UNSUPPORTED_MEDIA_TYPE (415) unless a body's ``Content-Type`` is JSON:
    ``application/json`` or any ``+json`` type, parameters allowed. A body without a
    ``Content-Type`` is read as JSON (what API clients mean); ``curl -d`` sends
    ``application/x-www-form-urlencoded``, which is refused and told what to send."""
    if hdrs.CONTENT_TYPE not in request.headers:
        return
    media = request.content_type  # lower-cased, parameters dropped
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise UnsupportedMediaType(f"the body must be JSON: send Content-Type: application/json, not {media[:100]}",
                               field="Content-Type")


def _check_int64(raw: bytes, what: str = "body") -> None:
    """VALIDATION_FAILED naming the first integer of the JSON text ``raw`` outside int64."""
    if _LONG_DIGITS.search(raw):  # only then can an integer be out of range: look closer
        where = _int_out_of_range_at(raw)
        if where is not None:
            raise ValidationFailed(f"{where or what} is an integer outside the signed 64-bit range "
                                   f"({INT64_MIN}..{INT64_MAX})", field=where or what)


class _Int64Overflow:
    """A JSON integer token outside the signed 64-bit range (what `_int_out_of_range_at` looks for)."""
    __slots__ = ()


_OVERFLOW = _Int64Overflow()


def _int64_or_marker(token: str) -> int | _Int64Overflow:
    # int() is never given more than 20 digits here (Python refuses past 4300 anyway)
    if len(token.lstrip("-")) > 19:
        return _OVERFLOW
    value = int(token)
    return value if INT64_MIN <= value <= INT64_MAX else _OVERFLOW


def _int_out_of_range_at(raw: bytes) -> str | None:
    """The path of the first integer in the JSON text ``raw`` outside int64, else None.

    orjson reads an integer past 64 bits as a float (18446744073709551616 becomes
    1.8446744073709552e+19), silently inexact; the stdlib's parser sees each integer token
    as written, so it finds them (only bodies with a run of 19+ digits get here)."""
    try:
        data = json.loads(raw, parse_int=_int64_or_marker)
    except ValueError:  # orjson accepted it; anything the stdlib won't read holds no such integer
        return None
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, v = stack.pop()
        if v is _OVERFLOW:
            return path
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}" if path else str(k), c) for k, c in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", c) for i, c in reversed(list(enumerate(v))))
    return None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` deep (iterative: a
    body can be deeper than Python's recursion limit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        children = v.values() if isinstance(v, dict) else v
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _nul_at(value: Any, path: str) -> str | None:
    """The path of the first string (key or value) holding a NUL, else None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if "\x00" in k:
                return sub
            found = _nul_at(v, sub)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_at(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], data: Mapping[str, Any]) -> M:
    """``data`` (a JSON object) as ``model``, or VALIDATION_FAILED naming the first bad field;
    an old snake_case name is told its camelCase one (``shard_id`` → ``shardId``)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        fields = {f.alias or n for n, f in model.model_fields.items()}
        # an old snake_case name first: its "missing camelCase field" error says less
        first = next((e for e in errors if e["type"] == "extra_forbidden" and e["loc"]
                      and to_camel(str(e["loc"][0])) in fields), errors[0])
        where = ".".join(str(p) for p in first["loc"]) or "body"
        name = str(first["loc"][0]) if first["loc"] else "body"
        if first["type"] == "extra_forbidden":
            if to_camel(name) in fields:
                raise ValidationFailed(f"{name} is not a field: it is spelled {to_camel(name)}",
                                       field=name, use=to_camel(name)) from None
            raise ValidationFailed(f"unknown field {name}; the fields are {', '.join(sorted(fields))}",
                                   field=name) from None
        raise ValidationFailed(f"{where}: {first['msg']}", field=where) from None


def parse_uint(raw: str, name: str, lo: int, hi: int) -> int:
    """A canonical decimal integer within ``lo..hi``, else VALIDATION_FAILED naming ``name``.

    Only ASCII digits with no sign, padding, leading zero or '_' are numbers here:
    ``' 5'``, ``'05'``, ``'+5'``, ``'1_0'`` and ``'١'`` are refused, not parsed.
    """
    if not _UINT_RE.fullmatch(raw):
        raise ValidationFailed(f"{name} must be a whole number written in plain digits (like 10)", field=name)
    value = int(raw)
    if not lo <= value <= hi:
        raise ValidationFailed(f"{name} must be between {lo} and {hi}", field=name)
    return value


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """Query parameter ``name`` as `parse_uint`, or ``default`` when absent."""
    raw = request.query.get(name)
    return default if raw is None else parse_uint(raw, name, lo, hi)
