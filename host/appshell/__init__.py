"""The tenant app shell at ``/app``: a tenant's staff sign in with their tenant (code or
domain) and their API key, and get the frontend manifest (menu and widgets) their
principal may see, each plugin widget in a sandboxed iframe behind a postMessage bridge.

- Sign-in exchanges the key for a session (`host.appshell.sessions`: the tenant and the
  key's principal id, never the key). Every page needs one (without it: back to
  sign-in); every POST, and every bridge call whatever its method, the session's CSRF
  token (without it: 403, nothing read or changed).
- The shell (``GET /app``) renders `host.manifest.visible_plugins`, the service behind
  ``/api/manifest``: plugins killed or not enabled for the tenant left out, entries whose
  permission the principal lacks left out.
- Widgets: ``<iframe sandbox="allow-scripts">`` (never ``allow-same-origin``: the widget's
  document runs on an opaque origin and can read neither the shell's DOM nor its
  cookies), the document served from the plugin package's ``widgets/`` folder
  (``/app/widgets/{plugin}/{file}``) with a ``Content-Security-Policy: sandbox
  allow-scripts`` of its own (sandboxed even when opened directly) and ``default-src
  'none'``: the widget loads its own script and style from this host and nothing else,
  and may connect nowhere (data comes through the bridge).
- The bridge (``static/shell.js`` in the shell, ``static/bridge.js`` in a widget):
  messages ``{v: 1, id, method, ...}``; one method, ``call`` (GET or POST of one of the
  widget's own plugin's routes for the signed-in tenant). The shell knows which plugin a
  message comes from by the window that sent it (``event.source``, mapped to the iframe
  the shell created), never by what the message says, and runs the call at
  ``/app/call/{plugin}{route}`` (session cookie + ``X-CSRF-Token``): the plugin route
  itself, mounted there behind the same gate as ``/api/plugins`` (`host.loader.enter_plugin`:
  tenant servable, kill switch, enablement, the route's RBAC on the session's principal,
  the fenced transaction), so nothing outside that plugin's routes is reachable there.
- Errors: a browser gets pages, the bridge (and any other client) the JSON envelope.
"""
from __future__ import annotations

from pathlib import Path
from typing import Final

import aiohttp_jinja2
import jinja2
from aiohttp import web

from host.appshell import views
from host.appshell.plumbing import app_middleware, security_headers
from host.context import PluginHost
from router.http import BODY_TIMEOUT
from shard_migrations.packages import Discovery

HERE = Path(__file__).resolve().parent
STATIC: Final = HERE / "static"


def appshell_app(host: PluginHost, discovery: Discovery, *, body_timeout_s: float) -> web.Application:
    """The app shell, to mount at `host.keys.APP_PATH` (``app.add_subapp``), after the
    plugins are loaded (their routes are mounted under ``/call``)."""
    app = web.Application(middlewares=[app_middleware])
    app.on_response_prepare.append(security_headers)
    app[BODY_TIMEOUT] = body_timeout_s
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
                         undefined=jinja2.StrictUndefined)
    app.router.add_routes(views.routes)
    views.mount_calls(app, host, discovery)
    app.router.add_static("/static", STATIC, name="static", append_version=False)
    return app
