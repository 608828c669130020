"""The operator console at ``/console``: server-rendered pages (aiohttp-jinja2, Jinja2 with
autoescape on) and forms, with a vendored htmx (``static/htmx.min.js``, 2.0.x, 0BSD) for
the live run progress; nothing is fetched from the internet, no build step.

Sign-in exchanges the admin key for a session (`host.console.sessions`); every page needs
one (without it: back to sign-in), and every POST the session's CSRF token (without it:
403, nothing read or changed). Every action calls the service functions the admin API
calls (`host.operations`, `host.runner`, the registry, RBAC and directory services) and
is written to the audit log (`host.console.audit`). Pages read through `host.overview`.

The console is a sub-application: its middleware renders errors as HTML pages (the
status and the envelope's code kept) and sets the security headers (a strict CSP: only
this origin's scripts and styles, no inline script, no framing).
"""
from __future__ import annotations

from pathlib import Path
from typing import Final

import aiohttp_jinja2
import jinja2
from aiohttp import web

from host.console import actions, pages
from host.console.plumbing import console_middleware, filters

HERE = Path(__file__).resolve().parent
STATIC: Final = HERE / "static"


def console_app() -> web.Application:
    """The console, to mount at `host.keys.CONSOLE_PATH` (``app.add_subapp``)."""
    app = web.Application(middlewares=[console_middleware])
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
                               undefined=jinja2.StrictUndefined)
    env.filters.update(filters())
    app.router.add_routes(pages.routes)
    app.router.add_routes(actions.routes)
    app.router.add_static("/static", STATIC, name="static", append_version=False)
    return app
