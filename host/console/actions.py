"""The console's actions (POST, CSRF-checked by `console_middleware`): each parses its form,
calls the service function the admin API calls, writes the audit entry (`act`), and
redirects to the page that shows the result. A refused action is rendered as an error
page (or, for a tenant's config, back in its form) with nothing changed."""
from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from host import operations
from host.console import audit, sessions
from host.console.pages import keys_view, login_form, run_id_of, safe_next, tenant_of, tenant_view
from host.console.plumbing import act, form, redirect, runtime, wants_html
from host.keys import CONSOLE_COOKIE, CONSOLE_LOGIN_COOKIE, CONSOLE_PATH
from host.runner import RUNNER
from router.errors import Forbidden, TenantFleetError, Unauthorized, ValidationFailed
from router.http import parse_json_object

routes = web.RouteTableDef()
_ROLE_LIST = re.compile(r"[\s,]+")


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    """Exchange the admin key for a session cookie (the sign-in form's own CSRF token checked first)."""
    rt = runtime(request)
    data = await form(request)
    operator = data.get("operator", "")
    if not sessions.csrf_ok(request.cookies.get(CONSOLE_LOGIN_COOKIE) or "", data.get("csrf")):
        refused = Forbidden("missing or wrong CSRF token on the sign-in form: load it again", field="csrf")
        await audit.record(rt.control, actor=operator[:80] or "?", action="console.sign-in", target=None,
                           outcome=refused.code, details={"error": refused.message}, remote=request.remote)
        if not wants_html(request):
            raise refused
        return await login_form(request, error=refused.message, status=refused.status, operator=operator)
    try:
        token, found = await sessions.sign_in(rt.control, admin_key=rt.settings.admin_key, key=data.get("key", ""),
                                              operator=operator, remote=request.remote,
                                              ttl_s=rt.settings.console_session_s)
    except (Unauthorized, ValidationFailed) as exc:
        await audit.record(rt.control, actor=operator[:80] or "?", action="console.sign-in", target=None,
                           outcome=exc.code, remote=request.remote)
        if not wants_html(request):
            raise
        return await login_form(request, error=exc.message, status=exc.status, operator=operator)
    await audit.record(rt.control, actor=found.actor, action="console.sign-in", target=None, outcome="ok",
                       remote=request.remote)
    resp = redirect(safe_next(data.get("next")))
    resp.set_cookie(CONSOLE_COOKIE, token, path=CONSOLE_PATH, httponly=True, samesite="Strict",
                    secure=request.secure, max_age=int(rt.settings.console_session_s))
    resp.del_cookie(CONSOLE_LOGIN_COOKIE, path=CONSOLE_PATH)
    return resp


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    rt = runtime(request)
    await act(request, "console.sign-out", None,
              lambda: sessions.sign_out(rt.control, request.cookies.get(CONSOLE_COOKIE),
                                       admin_key=rt.settings.admin_key))
    resp = redirect(f"{CONSOLE_PATH}/login")
    resp.del_cookie(CONSOLE_COOKIE, path=CONSOLE_PATH)
    return resp


@routes.post("/tenants/{tenant}/plugins/{plugin}/{action:enable|disable}")
async def tenant_plugin(request: web.Request) -> web.Response:
    rt = runtime(request)
    rec = await tenant_of(request, request.match_info["tenant"])
    pid, action = request.match_info["plugin"], request.match_info["action"]
    await act(request, f"tenant.plugin.{action}", f"{rec.code}/{pid}",
              lambda: operations.set_tenant_plugin(rt, pid, rec, enabled=action == "enable"))
    return redirect(f"{CONSOLE_PATH}/tenants/{rec.code}")


@routes.post("/tenants/{tenant}/plugins/{plugin}/config")
async def tenant_config(request: web.Request) -> web.Response:
    """Save a tenant's config for a plugin: the text must be a JSON object (checked as the
    admin API checks a body); otherwise the form comes back with the error, nothing saved."""
    rt = runtime(request)
    rec = await tenant_of(request, request.match_info["tenant"])
    pid = request.match_info["plugin"]
    text = (await form(request)).get("config", "")

    async def save() -> Any:
        return await rt.registry.set_tenant_config(pid, rec.tenant_id, parse_json_object(text.encode(), "config"))

    try:
        await act(request, "tenant.plugin.config", f"{rec.code}/{pid}", save)
    except TenantFleetError as exc:
        if exc.status >= 500 or not wants_html(request):
            raise
        return await tenant_view(request, rec.code, status=exc.status,
                                 config_error={"pluginId": pid, "text": text, "message": f"{exc.code}: {exc.message}"})
    return redirect(f"{CONSOLE_PATH}/tenants/{rec.code}")


@routes.post("/tenants/{tenant}/{action:suspend|resume}")
async def tenant_state(request: web.Request) -> web.Response:
    rt = runtime(request)
    rec = await tenant_of(request, request.match_info["tenant"])
    action = request.match_info["action"]
    change = rt.directory.suspend if action == "suspend" else rt.directory.resume
    await act(request, f"tenant.{action}", rec.code, lambda: change(rec.tenant_id))
    return redirect(f"{CONSOLE_PATH}/tenants/{rec.code}")


@routes.post("/plugins/{plugin}/{action:enable|disable|kill|revive}")
async def plugin_global(request: web.Request) -> web.Response:
    rt = runtime(request)
    pid, action = request.match_info["plugin"], request.match_info["action"]
    await act(request, f"plugin.{action}", pid, lambda: operations.set_global(rt, pid, action))
    return redirect(f"{CONSOLE_PATH}/plugins")


@routes.post("/plugins/{plugin}/upgrade")
async def plugin_upgrade(request: web.Request) -> web.Response:
    """Start a recorded migration run to the shipped version; go and watch it."""
    rt = runtime(request)
    pid = request.match_info["plugin"]
    to = (await form(request)).get("to") or None
    run_id = await act(request, "plugin.upgrade", pid,
                       lambda: request.config_dict[RUNNER].start_upgrade(rt, pid, to), {"to": to})
    return redirect(f"{CONSOLE_PATH}/runs/{run_id}")


@routes.post("/plugins/{plugin}/uninstall")
async def plugin_uninstall(request: web.Request) -> web.Response:
    """Uninstall a plugin (the policy chosen on the confirmation page; one tenant or every
    tenant) through the admin API's service function; go and watch the run as soon as it is
    recorded (one tenant's too: its unit may be busy for a long while)."""
    rt = runtime(request)
    pid = request.match_info["plugin"]
    data = await form(request)
    policy = data.get("policy") or None
    tenant = data.get("tenant", "").strip() or None
    grace = data.get("grace", "").strip() or None
    details = {"policy": policy or "(the plugin's)", "tenant": tenant, "grace": grace}
    if data.get("confirm") != "yes":  # a POST that skipped the confirmation page: nothing done
        raise ValidationFailed("confirm the uninstall on its page first", field="confirm")
    result = await act(request, "plugin.uninstall", pid if tenant is None else f"{tenant}/{pid}",
                       lambda: operations.uninstall_plugin(rt, pid, policy=policy, tenant=tenant, grace=grace,
                                                         wait=False),
                       details)
    return redirect(f"{CONSOLE_PATH}/runs/{result['runId']}")


@routes.post("/roles/{tenant}/{plugin}/{role}/apply")
async def apply_role(request: web.Request) -> web.Response:
    """Apply one role template to the tenant's role of that name (nothing else changes)."""
    rt = runtime(request)
    rec = await tenant_of(request, request.match_info["tenant"])
    pid, role = request.match_info["plugin"], request.match_info["role"]
    await act(request, "role.apply", f"{rec.code}/{pid}/{role}",
              lambda: rt.registry.apply_role_template(pid, rec.tenant_id, role))
    return redirect(f"{CONSOLE_PATH}/roles?tenant={rec.code}")


@routes.post("/runs/{run}/{action:resume|abort}")
async def run_action(request: web.Request) -> web.Response:
    rt = runtime(request)
    run_id = run_id_of(request.match_info["run"])
    runner = request.config_dict[RUNNER]
    action = request.match_info["action"]
    work = (lambda: runner.resume(rt, run_id)) if action == "resume" else (lambda: runner.abort(rt, run_id))
    await act(request, f"run.{action}", str(run_id), work)
    return redirect(f"{CONSOLE_PATH}/runs/{run_id}")


@routes.post("/keys")
async def create_key(request: web.Request) -> web.Response:
    """A new principal and its key, shown once on the page that answers (never stored)."""
    rt = runtime(request)
    data = await form(request)
    name = data.get("tenant", "").strip()
    roles = [r for r in _ROLE_LIST.split(data.get("roles", "").strip()) if r]
    rec = await tenant_of(request, name) if name else None

    async def create() -> dict[str, Any]:
        return await rt.rbac.create_principal(tenant_id=None if rec is None else rec.tenant_id,
                                              name=data.get("name", ""), roles=roles)

    try:
        created = await act(request, "key.create", name or "(fleet)", create,
                            {"name": data.get("name", ""), "roles": roles})
    except TenantFleetError as exc:
        if exc.status >= 500 or not wants_html(request):
            raise
        return await keys_view(request, name, error=f"{exc.code}: {exc.message}", status=exc.status)
    return await keys_view(request, name, created=created, status=201)


@routes.post("/keys/{principal}/revoke")
async def revoke_key(request: web.Request) -> web.Response:
    rt = runtime(request)
    principal = request.match_info["principal"]
    revoked = await act(request, "key.revoke", principal, lambda: operations.revoke_key(rt, principal))
    back = (await form(request)).get("tenant", "").strip()
    return redirect(f"{CONSOLE_PATH}/keys" + (f"?tenant={revoked['tenantId']}" if back and revoked["tenantId"] else ""))

