"""``/openapi.json``: the host's OpenAPI 3.1 document, built from the routes the app really
has (plugin routes included, tagged by plugin), so it can't drift from what is served.

Admin request bodies come from the pydantic models that validate them (`host.admin`);
path parameters from the patterns the handlers check; every operation lists the statuses
the host can answer. Plugin routes are described generically: any JSON object in, any
JSON out, with the statuses the host's gate and the shared edge add.
"""
from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from host.admin import BODIES as ADMIN_BODIES
from host.admin import TENANT_REF_PATTERN, NewPrincipal, RoleBody
from host.admin_uninstall import BODIES as UNINSTALL_BODIES
from host.admin_uninstall import ImportBody, UninstallBody
from host.admin_runs import RUN_ID_PATTERN
from host.context import PLUGIN_HOST
from host.keys import APP_PATH, CONSOLE_PATH
from host.rbac import ROLE_KEY_RE
from router.http import json_response
from router.models import UUID_PATTERN
from router.openapi import REQUEST_ID_DOC, error_doc, readiness_responses

_PARAM = re.compile(r"\{([^}:]+)(?::([^}]*))?\}")
_REF = "#/components/schemas/{model}"

_WHY = {
    400: "VALIDATION_FAILED: a parameter, header or body is invalid (the envelope names the field); "
         "BAD_REQUEST: not well-formed HTTP",
    401: "UNAUTHORIZED: no key, a malformed one, or an unknown one",
    403: "FORBIDDEN (a key without the right), PLUGIN_DISABLED, TENANT_SUSPENDED",
    404: "not found: TENANT_NOT_FOUND, PLUGIN_NOT_FOUND, NOT_FOUND",
    408: "REQUEST_TIMEOUT: the body did not arrive in time",
    409: "PLUGIN_REFUSED, MIGRATION_DRIFT, MIGRATION_INCOMPLETE",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE: a body whose Content-Type is not JSON (application/json or +json)",
    500: "INTERNAL or MIGRATION_FAILED: a fault, logged with the request id",
    503: "SHARD_UNREACHABLE, TENANT_MOVING, TENANT_NOT_READY, FENCE_STALE, or not ready; see Retry-After",
}
_RID = REQUEST_ID_DOC
# the host's own tenant-facing routes: a tenant's key and X-Tenant, like plugin routes, answered 200
_TENANT_API = ("/api/manifest", "/api/whoami")
# admin operations answered 202: a recorded run started (host.admin_runs)
BODIES = {**ADMIN_BODIES, **UNINSTALL_BODIES}
ASYNC_ADMIN = ("/admin/plugins/{plugin}/upgrade", "/admin/runs/{run}/resume", "/admin/plugins/{plugin}/uninstall")


def _param_schema(name: str, regex: str | None, plugin_ids: list[str]) -> dict[str, Any]:
    if regex is not None and re.fullmatch(r"[A-Za-z0-9_|-]+", regex):
        return {"type": "string", "enum": regex.split("|")}  # {action:enable|disable}
    if name == "tenant":
        return {"type": "string", "pattern": TENANT_REF_PATTERN, "description": "tenant id or code"}
    if name == "plugin":
        return {"type": "string", "pattern": r"^[a-z][a-z0-9_]{1,30}$",
                "examples": plugin_ids or ["inventory"], "description": "plugin id"}
    if name == "role":
        return {"type": "string", "pattern": ROLE_KEY_RE.pattern}
    if name == "principal":
        return {"type": "string", "format": "uuid", "pattern": UUID_PATTERN}
    if name == "run":
        return {"type": "string", "pattern": RUN_ID_PATTERN, "description": "run id"}
    return {"type": "string"}


def _error(status: int) -> dict[str, Any]:
    return error_doc(status, _WHY[status])


def _kind(path: str) -> str:
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "plugins"] and len(parts) > 2 and not parts[2].startswith("{"):
        return "health" if path.endswith("/health") and len(parts) == 4 else "plugin"
    if path in _TENANT_API:
        return "plugin"
    return "admin" if parts[0] == "admin" else "open"


def _tag(path: str, kind: str) -> str:
    if kind in ("plugin", "health") and path not in _TENANT_API:
        return f"plugin:{path.strip('/').split('/')[2]}"
    return "admin" if kind == "admin" else "host"


def document(app: web.Application) -> dict[str, Any]:
    plugin_ids = sorted(app[PLUGIN_HOST].contexts) if PLUGIN_HOST in app else []
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method in ("HEAD", "*"):
            continue
        template = resource.canonical
        if any(template == p or template.startswith(p + "/") for p in (CONSOLE_PATH, APP_PATH)):
            continue  # the console's and the app shell's pages, forms and session-bound bridge: not the API
        path = _PARAM.sub(lambda m: "{" + m.group(1) + "}", template)
        kind = _kind(path)
        doc = (getattr(route.handler, "__doc__", None) or "").strip().splitlines()
        params: list[dict[str, Any]] = [
            {"name": n, "in": "path", "required": True, "schema": _param_schema(n, rx or None, plugin_ids)}
            for n, rx in _PARAM.findall(template)]
        statuses = {400, 500}
        op: dict[str, Any] = {"tags": [_tag(path, kind)], "summary": doc[0] if doc else "", "parameters": params}
        if kind == "plugin":
            params.append({"name": "X-Tenant", "in": "header", "required": True,
                           "schema": {"type": "string", "pattern": TENANT_REF_PATTERN},
                           "description": "tenant code or id (without it, the Host header's tenant domain)"})
            op["security"] = [{"apiKey": []}]
            statuses |= {401, 403, 404, 409, 503}
        elif kind == "admin":
            op["security"] = [{"adminKey": []}]
            statuses |= {401, 403, 404, 409, 503}
        else:
            op["security"] = []
            statuses |= {503}
        permission = getattr(route.handler, "required_permission", None)
        if permission is not None:
            op["x-permission"] = permission
        if route.method in ("POST", "PUT", "PATCH"):
            model = BODIES.get((route.method, path), None)
            if model is not None:
                schema: dict[str, Any] = {"$ref": f"#/components/schemas/{model.__name__}"}
            else:  # plugin routes and admin config: any object; what the handler reads is its own
                schema = {"type": "object"}
            known = (route.method, path) in BODIES
            op["requestBody"] = {"required": known or kind == "plugin",
                                 "content": {"application/json": {"schema": schema}}}
            statuses |= {408, 413, 415}
        # a plugin's handler picks its own success status (inventory answers 201 on create)
        ok = ("201" if route.method == "POST" and path == "/admin/principals"
              else "202" if route.method == "POST" and path in ASYNC_ADMIN
              else "2XX" if kind == "plugin" and path not in _TENANT_API else "200")
        content = ({"text/plain": {"schema": {"type": "string"}}} if path == "/metrics"
                   else {"application/json": {"schema": {}}})
        op["responses"] = {ok: {"description": "OK", "headers": dict(_RID), "content": content},
                           **{str(s): _error(s) for s in sorted(statuses)}}
        if path == "/readyz":
            readiness_responses(op, ("ready", "degraded"), ("unready",))
        paths.setdefault(path, {})[route.method.lower()] = op
    _, defs = models_json_schema([(NewPrincipal, "validation"), (RoleBody, "validation"),
                                       (UninstallBody, "validation"), (ImportBody, "validation")], ref_template=_REF)
    schemas: dict[str, Any] = dict(defs["$defs"])
    schemas["Error"] = {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
        "error": {"type": "object", "required": ["code", "message", "requestId"], "additionalProperties": True,
                  "properties": {"code": {"type": "string", "pattern": "^[A-Z_]+$"}, "message": {"type": "string"},
                                 "requestId": {"type": "string"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "tenantfleet plugin host", "version": "1"},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "a tenant's API key"},
                                "adminKey": {"type": "http", "scheme": "bearer", "description": "TENANTFLEET_ADMIN_KEY"}},
        },
    }


async def openapi_view(request: web.Request) -> web.Response:
    """The host's OpenAPI document."""
    return json_response(document(request.app))
