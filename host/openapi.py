"""``/openapi.json``: the host's OpenAPI 3.1 document, built from the routes the app really has
(plugin routes included, tagged by plugin), so it can't drift from what is served."""
from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from router.http import json_response

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": {"type": "string", "examples": ["PLUGIN_DISABLED", "FORBIDDEN", "TENANT_NOT_FOUND"]},
                       "message": {"type": "string"}, "requestId": {"type": "string"}},
        "additionalProperties": True,
    }},
}


def _tag(path: str) -> str:
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "plugins"] and len(parts) > 2 and not parts[2].startswith("{"):
        return f"plugin:{parts[2]}"
    return "admin" if parts[0] == "admin" else "host"


def document(app: web.Application) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method in ("HEAD", "*"):
            continue
        template = resource.canonical
        path = _PARAM.sub(lambda m: "{" + m.group(1) + "}", template)
        doc = (getattr(route.handler, "__doc__", None) or "").strip().splitlines()
        op: dict[str, Any] = {
            "tags": [_tag(path)],
            "summary": doc[0] if doc else "",
            "parameters": [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                           for n in _PARAM.findall(template)],
            "responses": {"200": {"description": "OK"},
                          "default": {"description": "Error envelope",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
        }
        permission = getattr(route.handler, "required_permission", None)
        if permission is not None:
            op["x-permission"] = permission
        if path.startswith("/api/plugins/") and not path.endswith("/health") or path == "/api/manifest":
            op["parameters"].append({"name": "X-Tenant", "in": "header", "required": False,
                                     "schema": {"type": "string"}, "description": "tenant code or id (else Host)"})
            op["security"] = [{"apiKey": []}]
        elif path.startswith("/admin"):
            op["security"] = [{"adminKey": []}]
        paths.setdefault(path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "tenantfleet plugin host", "version": "1"},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"},
                                "adminKey": {"type": "http", "scheme": "bearer"}},
        },
    }


async def openapi_view(request: web.Request) -> web.Response:
    """The host's OpenAPI document."""
    return json_response(document(request.app))
