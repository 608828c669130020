"""The console's pages (GET): adapters that read through `host.overview`, the registry and
RBAC services, and render a template."""
from __future__ import annotations

import secrets
import uuid
from typing import Any

import orjson
from aiohttp import web

from host import overview
from host.console import audit
from host.console.plumbing import login_csrf, redirect, render, runtime
from host.keys import AUDIT_PAGE, CONSOLE_LOGIN_COOKIE, CONSOLE_PATH
from host.runner import RUNNER
from router.errors import ValidationFailed
from router.http import parse_uint
from router.keys import TENANT_STATES
from router.models import TenantRecord

routes = web.RouteTableDef()
RUN_KINDS = ("migrate", "move", "drain", "rebalance", "uninstall")
MAX_RUN_ID = 2**63 - 1


def pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def run_id_of(text: str) -> int:
    return parse_uint(text, "run", 1, MAX_RUN_ID)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path only (never another site), without
    whitespace or control characters (a CR/LF can't go into the Location header)."""
    if target and target.startswith(CONSOLE_PATH + "/") and not target.startswith("//") and "\\" not in target \
            and len(target) <= 2000 and not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in target):
        return target
    return f"{CONSOLE_PATH}/fleet"


async def tenant_of(request: web.Request, name: str) -> TenantRecord:
    """The tenant named by id or code, read from the control plane now (not a cache):
    TENANT_NOT_FOUND, VALIDATION_FAILED."""
    directory = runtime(request).directory
    try:
        tenant_id = str(uuid.UUID(name))
    except ValueError:
        return await directory.get(code=name.strip().lower())
    return await directory.get(id=tenant_id)


@routes.get("")
@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return redirect(f"{CONSOLE_PATH}/fleet")


@routes.get("/login")
async def login_page(request: web.Request) -> web.Response:
    return await login_form(request)


async def login_form(request: web.Request, *, error: str | None = None, status: int = 200,
                     operator: str = "") -> web.Response:
    """The sign-in form with a fresh CSRF token of its own (a cookie and the same value in the form)."""
    token = login_csrf(request) or secrets.token_urlsafe(32)
    resp = await render(request, "login.html", {"csrf": token, "error": error, "operator": operator,
                                                "next": safe_next(request.query.get("next"))},
                        status=status, counts=False)
    resp.set_cookie(CONSOLE_LOGIN_COOKIE, token, path=CONSOLE_PATH, httponly=True, samesite="Strict",
                    secure=request.secure, max_age=3600)
    return resp


@routes.get("/fleet")
async def fleet_page(request: web.Request) -> web.Response:
    return await render(request, "fleet.html", {"shards": await overview.shards(runtime(request))})


@routes.get("/tenants")
async def tenants_page(request: web.Request) -> web.Response:
    q = request.query.get("q", "")
    state = request.query.get("state") or None
    found = await overview.search_tenants(runtime(request).control, q, state)
    return await render(request, "tenants.html", {"q": q, "state": state, "states": TENANT_STATES, "tenants": found})


async def tenant_view(request: web.Request, name: str, *, config_error: dict[str, str] | None = None,
                      status: int = 200) -> web.Response:
    rt = runtime(request)
    rec = await tenant_of(request, name)
    plugins = await overview.tenant_plugins(rt, rec.tenant_id)
    for p in plugins:
        p["configText"] = None if p["config"] is None else pretty(p["config"])
    if config_error is not None:  # what was typed stays in the form, beside the error
        for p in plugins:
            if p["pluginId"] == config_error["pluginId"]:
                p["configText"] = config_error["text"]
                p["configError"] = config_error["message"]
    return await render(request, "tenant.html", {"tenant": rec, "plugins": plugins}, status=status)


@routes.get("/tenants/{tenant}")
async def tenant_page(request: web.Request) -> web.Response:
    return await tenant_view(request, request.match_info["tenant"])


@routes.get("/plugins")
async def plugins_page(request: web.Request) -> web.Response:
    rt = runtime(request)
    listed = await rt.registry.list_plugins()
    versions = await overview.plugin_versions(rt.control)
    for p in listed["plugins"]:
        p["tenantVersions"] = versions.get(p["pluginId"], {})
    return await render(request, "plugins.html", listed)


@routes.get("/plugins/{plugin}/uninstall")
async def uninstall_page(request: web.Request) -> web.Response:
    """The confirmation step of an uninstall chosen on the Plugins page (nothing is done
    here): what will happen, to which tenants, and the form that does it."""
    from shard_migrations.uninstall import POLICIES, cleanup_of

    rt = runtime(request)
    package = rt.discovery.get(request.match_info["plugin"])
    policy = request.query.get("policy") or None
    if policy is not None and policy not in POLICIES:
        raise ValidationFailed(f"policy must be one of {', '.join(POLICIES)}", field="policy")
    name = request.query.get("tenant", "").strip()
    rec = await tenant_of(request, name) if name else None
    cleanup = cleanup_of(package)
    listed = await rt.registry.list_plugins()
    plugin = next(p for p in listed["plugins"] if p["pluginId"] == package.id)
    return await render(request, "uninstall.html", {
        "plugin": plugin, "policy": policy or cleanup.policy, "chosen": policy, "tenant": rec,
        "grace": request.query.get("grace", "").strip(), "tables": cleanup.tables,
        "exportDir": None if rt.settings.export_dir is None else str(rt.settings.export_dir)})


@routes.get("/roles")
async def roles_page(request: web.Request) -> web.Response:
    rt = runtime(request)
    name = request.query.get("tenant", "").strip()
    ctx: dict[str, Any] = {"tenantName": name, "tenant": None, "diffs": [], "roles": []}
    if name:
        rec = await tenant_of(request, name)
        ctx["tenant"] = rec
        ctx["roles"] = await overview.tenant_roles(rt.control, rec.tenant_id)
        for pid in sorted(rt.registry.discovery.plugins):
            ctx["diffs"].append({"pluginId": pid, "templates": {t["roleKey"]: t for t in rt.registry.role_templates(pid)},
                                 "diff": await rt.registry.role_diff(pid, rec.tenant_id)})
    return await render(request, "roles.html", ctx)


@routes.get("/runs")
async def runs_page(request: web.Request) -> web.Response:
    kind = request.query.get("kind") or None
    if kind is not None and kind not in RUN_KINDS:
        raise ValidationFailed(f"kind must be one of {', '.join(RUN_KINDS)}", field="kind")
    return await render(request, "runs.html", {"kind": kind, "kinds": RUN_KINDS,
                                               "runs": await overview.list_runs(runtime(request).control, kind)})


async def _run_context(request: web.Request) -> dict[str, Any]:
    run_id = run_id_of(request.match_info["run"])
    run = await overview.run_progress(runtime(request).control, run_id)
    return {"run": run, "here": request.config_dict[RUNNER].running_here(run_id),
            "live": run["state"] in ("planned", "running")}


@routes.get("/runs/{run}")
async def run_page(request: web.Request) -> web.Response:
    return await render(request, "run.html", {**await _run_context(request), "oob": False})


@routes.get("/runs/{run}/progress")
async def run_progress(request: web.Request) -> web.Response:
    """The progress block alone (htmx polls it; it stops polling once the run has ended)."""
    return await render(request, "_progress.html", {**await _run_context(request), "oob": True})


@routes.get("/keys")
async def keys_page(request: web.Request) -> web.Response:
    return await keys_view(request, request.query.get("tenant", "").strip())


async def keys_view(request: web.Request, name: str, *, created: dict[str, Any] | None = None,
                    error: str | None = None, status: int = 200) -> web.Response:
    rt = runtime(request)
    rec = await tenant_of(request, name) if name else None
    principals = await rt.rbac.list_principals(None if rec is None else rec.tenant_id)
    roles = [] if rec is None else await overview.tenant_roles(rt.control, rec.tenant_id)
    return await render(request, "keys.html", {"tenantName": name, "tenant": rec, "principals": principals,
                                               "roles": roles, "created": created, "error": error}, status=status)


@routes.get("/audit")
async def audit_page(request: web.Request) -> web.Response:
    """The audit log, a page of `AUDIT_PAGE` entries at a time (``?before=ID``: older ones),
    refused sign-ins hidden with ``?hide=refused-sign-ins``."""
    raw_before = request.query.get("before")
    before = None if not raw_before else parse_uint(raw_before, "before", 1, MAX_RUN_ID)
    hide = request.query.get("hide") or None
    if hide not in (None, "refused-sign-ins"):
        raise ValidationFailed("hide must be refused-sign-ins", field="hide")
    entries = await audit.recent(runtime(request).control, AUDIT_PAGE, before=before,
                                 hide_refused_sign_ins=hide is not None)
    for e in entries:
        e["detailsText"] = "" if not e["details"] else pretty(e["details"])
    older = entries[-1]["id"] if len(entries) == AUDIT_PAGE else None
    return await render(request, "audit.html", {"entries": entries, "hide": hide, "older": older})

