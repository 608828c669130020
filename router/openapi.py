"""The router service's OpenAPI document (served at /v1/openapi.json)."""
from __future__ import annotations

from typing import Any

from router.keys import CODE_RE, TENANT_STATES

_ERROR = {"$ref": "#/components/schemas/Error"}


def _resp(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"application/json": {"schema": schema or _ERROR}}
    return {"description": desc, "content": body}


_ERRORS = {"400": _resp("VALIDATION_FAILED"), "500": _resp("INTERNAL")}
_ADMIN: list[dict[str, list[str]]] = [{"adminKey": []}]

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "tenantfleet router", "version": "1"},
    "components": {
        "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                               "requestId": {"type": "string"}}}}},
            "Tenant": {"type": "object", "properties": {
                "tenant_id": {"type": "string", "format": "uuid"}, "code": {"type": "string"},
                "schema": {"type": "string"}, "shard_id": {"type": "string"},
                "state": {"type": "string", "enum": list(TENANT_STATES)},
                "epoch": {"type": "integer"}, "domains": {"type": "array", "items": {"type": "string"}}}},
            "Shard": {"type": "object", "properties": {
                "shard_id": {"type": "string"}, "dsn": {"type": "string"}, "state": {"type": "string"},
                "capacity": {"type": "integer"}, "weight": {"type": "integer"}, "tenants": {"type": "integer"}}},
            "NewTenant": {"type": "object", "required": ["code"], "properties": {
                "code": {"type": "string", "pattern": CODE_RE.pattern},
                "domains": {"type": "array", "items": {"type": "string"}}, "shard_id": {"type": "string"}}},
            "NewShard": {"type": "object", "required": ["shard_id", "dsn"], "properties": {
                "shard_id": {"type": "string"}, "dsn": {"type": "string"},
                "capacity": {"type": "integer", "minimum": 1}, "weight": {"type": "integer", "minimum": 0}}},
        },
    },
    "paths": {
        "/v1/tenants/resolve": {"get": {
            "summary": "Where a tenant lives (exactly one of id, code, domain)",
            "parameters": [{"name": n, "in": "query", "schema": {"type": "string"}} for n in ("id", "code", "domain")],
            "responses": {"200": _resp("the tenant", {"$ref": "#/components/schemas/Tenant"}),
                          "404": _resp("TENANT_NOT_FOUND"), **_ERRORS}}},
        "/v1/tenants": {
            "get": {"summary": "List tenants",
                    "parameters": [{"name": n, "in": "query", "schema": {"type": t}}
                                   for n, t in (("shard", "string"), ("state", "string"),
                                                ("limit", "integer"), ("offset", "integer"))],
                    "responses": {"200": _resp("tenants", {"type": "array",
                                                           "items": {"$ref": "#/components/schemas/Tenant"}}),
                                  **_ERRORS}},
            "post": {"summary": "Create a tenant on the least-loaded active shard", "security": _ADMIN,
                     "requestBody": {"content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/NewTenant"}}}},
                     "responses": {"201": _resp("created", {"$ref": "#/components/schemas/Tenant"}),
                                   "401": _resp("UNAUTHORIZED"), "409": _resp("TENANT_EXISTS"), **_ERRORS}}},
        "/v1/tenants/{id}": {"get": {
            "summary": "One tenant by id",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _resp("the tenant", {"$ref": "#/components/schemas/Tenant"}),
                          "404": _resp("TENANT_NOT_FOUND"), **_ERRORS}}},
        "/v1/tenants/{id}/suspend": {"post": {
            "summary": "Suspend a tenant (bumps its epoch)", "security": _ADMIN,
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _resp("the tenant", {"$ref": "#/components/schemas/Tenant"}), **_ERRORS}}},
        "/v1/tenants/{id}/resume": {"post": {
            "summary": "Resume a suspended tenant (bumps its epoch)", "security": _ADMIN,
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _resp("the tenant", {"$ref": "#/components/schemas/Tenant"}), **_ERRORS}}},
        "/v1/shards": {
            "get": {"summary": "List shards with tenant counts",
                    "responses": {"200": _resp("shards", {"type": "array",
                                                          "items": {"$ref": "#/components/schemas/Shard"}})}},
            "post": {"summary": "Register a shard (its DSN is checked first)", "security": _ADMIN,
                     "requestBody": {"content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/NewShard"}}}},
                     "responses": {"201": _resp("registered", {"$ref": "#/components/schemas/Shard"}),
                                   "409": _resp("SHARD_EXISTS"), "502": _resp("SHARD_UNREACHABLE"), **_ERRORS}}},
        "/healthz": {"get": {"summary": "The process is up", "responses": {"200": {"description": "ok"}}}},
        "/readyz": {"get": {"summary": "Control plane reachable (and Redis, reported)",
                            "responses": {"200": {"description": "ready"}, "503": _resp("not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
    },
}
