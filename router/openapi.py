"""The router service's OpenAPI 3.1 document (served at /v1/openapi.json), generated from
the pydantic models and field types that validate the requests (router/models.py), so it
says what the service does: formats, patterns, bounds, enums, the two bearer keys, and
every status each route can answer."""
from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, TypeAdapter
from pydantic.json_schema import models_json_schema

from router.http import REQUEST_ID_HEADER, REQUEST_ID_RE
from router.keys import TENANT_STATES
from router.models import (
    MAX_DOMAINS, UUID_PATTERN, Code, Domain, NewShard, NewTenant, ShardId, ShardOut, TenantOut,
)

MAX_LIST_LIMIT = 10_000
MAX_OFFSET = 1_000_000_000
_REF = "#/components/schemas/{model}"

_WHY = {
    400: "VALIDATION_FAILED: a parameter, header or body is invalid (the envelope names the field); "
         "BAD_REQUEST: not well-formed HTTP",
    401: "UNAUTHORIZED: no key, a malformed one, or an unknown one",
    403: "FORBIDDEN: the read key on a write",
    404: "not found (TENANT_NOT_FOUND, SHARD_NOT_FOUND)",
    408: "REQUEST_TIMEOUT: the body did not arrive in time",
    409: "already exists (TENANT_EXISTS, SHARD_EXISTS)",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE: a body whose Content-Type is not JSON (application/json or +json)",
    500: "INTERNAL: a fault of ours, logged with the request id",
    503: "SHARD_UNREACHABLE, NO_SHARD_AVAILABLE or the control plane down; see Retry-After",
}
# The X-Request-Id every answer carries, as router.http sets it (the host's document too).
REQUEST_ID_DOC: dict[str, Any] = {REQUEST_ID_HEADER: {
    "description": "the request's id (the client's own if tame)", "required": True,
    "schema": {"type": "string", "pattern": f"^{REQUEST_ID_RE.pattern}$"}}}
_RID = REQUEST_ID_DOC
_READ: list[dict[str, list[str]]] = [{"readKey": []}, {"adminKey": []}]
_ADMIN: list[dict[str, list[str]]] = [{"adminKey": []}]


def _schema(t: Any) -> dict[str, Any]:
    out: dict[str, Any] = TypeAdapter(t, config=ConfigDict(regex_engine="python-re")).json_schema(ref_template=_REF)
    return out


def error_doc(status: int, description: str) -> dict[str, Any]:
    """An error response in the envelope with the headers router.http sets for ``status``
    (both services' documents)."""
    headers: dict[str, Any] = dict(REQUEST_ID_DOC)
    if status == 401:
        headers["WWW-Authenticate"] = {"required": True, "schema": {"type": "string", "pattern": "^Bearer"}}
    if status == 503:
        headers["Retry-After"] = {"required": False, "schema": {"type": "string", "pattern": "^[0-9]+$"}}
    return {"description": description, "headers": headers,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def readiness_schema(states: tuple[str, ...]) -> dict[str, Any]:
    """``/readyz``'s body: the status and what each check found."""
    return {"type": "object", "required": ["status", "checks"], "additionalProperties": False, "properties": {
        "status": {"type": "string", "enum": list(states)},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}}}}


def readiness_responses(op: dict[str, Any], ready: tuple[str, ...], unready: tuple[str, ...]) -> dict[str, Any]:
    """``op`` (a ``/readyz`` operation, both services) answering the readiness body: with
    200 when ready, with 503 when not (or the edge's own 503 envelope, e.g. shutting down)."""
    responses = op["responses"]
    responses["200"] = {**responses["200"], "content": {"application/json": {"schema": readiness_schema(ready)}}}
    unready_doc = error_doc(503, "not ready: `checks` names what doesn't answer")
    unready_doc["content"] = {"application/json": {"schema": {
        "anyOf": [readiness_schema(unready), {"$ref": "#/components/schemas/Error"}]}}}
    responses["503"] = unready_doc
    return op


def _error(status: int) -> dict[str, Any]:
    return error_doc(status, _WHY[status])


def _ok(desc: str, schema: dict[str, Any], status: int = 200) -> dict[str, Any]:
    return {str(status): {"description": desc, "headers": dict(_RID), "content": {"application/json": {"schema": schema}}}}


def _op(summary: str, ok: dict[str, Any], errors: tuple[int, ...], *, security: list[dict[str, list[str]]] | None,
        parameters: list[dict[str, Any]] | None = None, body: type | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**ok, **{str(s): _error(s) for s in (*errors, 500)}}}
    if security is not None:
        op["security"] = security
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}
    return op


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def build() -> dict[str, Any]:
    _, defs = models_json_schema([(NewTenant, "validation"), (NewShard, "validation"),
                                  (TenantOut, "serialization"), (ShardOut, "serialization")], ref_template=_REF)
    schemas: dict[str, Any] = dict(defs["$defs"])
    schemas["Error"] = {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
        "error": {"type": "object", "required": ["code", "message", "requestId"], "additionalProperties": True,
                  "properties": {"code": {"type": "string", "pattern": "^[A-Z_]+$"}, "message": {"type": "string"},
                                 "requestId": {"type": "string"}, "field": {"type": "string"}}}}}
    tenant = {"$ref": "#/components/schemas/TenantOut"}
    shard = {"$ref": "#/components/schemas/ShardOut"}
    tenant_id = {"name": "id", "in": "path", "required": True,
                 "schema": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN}}
    # exactly one of id, code, domain: one form-exploded object parameter says so
    resolve_query = {"name": "lookup", "in": "query", "required": True, "style": "form", "explode": True,
                     "schema": {"type": "object", "minProperties": 1, "maxProperties": 1,
                                "additionalProperties": False, "properties": {
                                    "id": {"type": "string", "format": "uuid", "pattern": UUID_PATTERN},
                                    "code": _schema(Code), "domain": _schema(Domain)}},
                     "description": "exactly one of id, code or domain"}
    list_params = [
        _query("shard", _schema(ShardId), "only tenants on this shard"),
        _query("state", {"type": "string", "enum": list(TENANT_STATES)}, "only tenants in this state"),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 100},
               "at most this many (plain digits)"),
        _query("after", _schema(Code), "the page after this code: the last code of the previous page "
               "(a full page's Link header, rel=\"next\", names the next one)"),
        {**_query("offset", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                  "deprecated: skip this many more (its cost grows with it; page with after instead)"),
         "deprecated": True},
    ]
    page_ok = _ok("tenants in code order", {"type": "array", "items": tenant})
    page_ok["200"]["headers"]["Link"] = {
        "description": "on a full page: the next page's URL, rel=\"next\"", "required": False,
        "schema": {"type": "string", "pattern": "^<.*>; rel=\"next\"$"}}
    plain = {"200": {"description": "ok", "headers": dict(_RID),
                     "content": {"application/json": {"schema": {"type": "object"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "tenantfleet router", "version": "1",
                 "description": f"Reads need the read key or the admin key, writes the admin key. "
                                f"A tenant has at most {MAX_DOMAINS} domains."},
        "components": {
            "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer", "description": "TENANTFLEET_ADMIN_KEY"},
                                "readKey": {"type": "http", "scheme": "bearer", "description": "TENANTFLEET_READ_KEY"}},
            "schemas": schemas,
        },
        "paths": {
            "/v1/tenants/resolve": {"get": _op(
                "Where a tenant lives (exactly one of id, code, domain)", _ok("the tenant", tenant),
                (400, 401, 404, 503), security=_READ, parameters=[resolve_query])},
            "/v1/tenants": {
                "get": _op("List tenants by code, a keyset page at a time", page_ok,
                           (400, 401, 503), security=_READ, parameters=list_params),
                "post": _op("Create a tenant (on the least-loaded active shard unless shardId is given)",
                            _ok("created", tenant, 201), (400, 401, 403, 404, 408, 409, 413, 415, 503),
                            security=_ADMIN, body=NewTenant)},
            "/v1/tenants/{id}": {"get": _op("One tenant by id", _ok("the tenant", tenant), (400, 401, 404, 503),
                                            security=_READ, parameters=[tenant_id])},
            "/v1/tenants/{id}/suspend": {"post": _op(
                "Suspend an active tenant (bumps its epoch)", _ok("the tenant", tenant), (400, 401, 403, 404, 503),
                security=_ADMIN, parameters=[tenant_id])},
            "/v1/tenants/{id}/resume": {"post": _op(
                "Resume a suspended tenant (bumps its epoch)", _ok("the tenant", tenant), (400, 401, 403, 404, 503),
                security=_ADMIN, parameters=[tenant_id])},
            "/v1/shards": {
                "get": _op("List shards with tenant counts (DSN passwords redacted)",
                           _ok("shards", {"type": "array", "items": shard}), (400, 401, 503), security=_READ),
                "post": _op("Register a shard (its DSN is connected to and prepared first)",
                            _ok("registered", shard, 201), (400, 401, 403, 408, 409, 413, 415, 503),
                            security=_ADMIN, body=NewShard)},
            "/v1/openapi.json": {"get": _op("This document", plain, (400,), security=[])},
            "/healthz": {"get": _op("The process is up", plain, (400,), security=[])},
            "/readyz": {"get": readiness_responses(_op("Control plane reachable (and Redis, reported)", plain, (400, 503),
                                                       security=[]), ("ready",), ("not ready",))},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {
                "200": {"description": "text", "headers": dict(_RID), "content": {"text/plain": {"schema": {"type": "string"}}}},
                "400": _error(400), "500": _error(500)}}},
        },
    }


DOCUMENT: dict[str, Any] = build()
