"""The admin API's fleet overview and runs (admin key required), over the same services
as the console's pages and buttons:

    GET  /admin/overview                      tenants and runs per state, shards with readiness and p95
    GET  /admin/runs[?kind=migrate|move|drain|rebalance]   the latest runs with their progress
    GET  /admin/runs/{run}                    one run: progress per shard and phase, failures
    POST /admin/plugins/{plugin}/upgrade      202 {runId}: a recorded migration run to the shipped version
    POST /admin/runs/{run}/resume             202: finish a recorded migration run or move
    POST /admin/runs/{run}/abort              stop a migration run running here, or undo a move
"""
from __future__ import annotations

import orjson
from aiohttp import web

from host import overview
from host.context import PLUGIN_HOST, PluginHost
from host.runner import RUNNER
from host.runtime import HostRuntime
from router.errors import ValidationFailed
from router.http import check_json_media_type, json_response, parse_uint

routes = web.RouteTableDef()
RUN_KINDS = ("migrate", "move", "drain", "rebalance", "uninstall")
MAX_RUN_ID = 2**63 - 1
RUN_ID_PATTERN = r"^[1-9][0-9]{0,17}$"  # 1 .. 10^18 - 1: within bigint, as run_id_of accepts


async def _rt(request: web.Request) -> HostRuntime:
    host: PluginHost = request.app[PLUGIN_HOST]
    rt = host.runtime
    await rt.auth.check_admin(rt.settings.admin_key, request)
    return rt


async def no_body(request: web.Request) -> None:
    """These routes take no body; one that is sent must still be a JSON object (read and
    ignored), as the document says: anything else is VALIDATION_FAILED, nothing done."""
    if not request.can_read_body:
        return
    check_json_media_type(request)
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise ValidationFailed("body is not valid JSON", field="body") from None
    if not isinstance(data, dict):
        raise ValidationFailed("body must be a JSON object (or nothing)", field="body")


def run_id_of(text: str) -> int:
    """A run id from a path: VALIDATION_FAILED unless plain digits within bigint."""
    return parse_uint(text, "run", 1, MAX_RUN_ID)


@routes.get("/admin/overview")
async def get_overview(request: web.Request) -> web.Response:
    """Tenants and runs per state; shards with tenants, bytes, readiness and this host's p95."""
    rt = await _rt(request)
    return json_response({"counts": await overview.state_counts(rt.control), "shards": await overview.shards(rt)})


@routes.get("/admin/runs")
async def get_runs(request: web.Request) -> web.Response:
    """The latest runs (of one kind with ``?kind=``), newest first, with their progress."""
    rt = await _rt(request)
    kind = request.query.get("kind")
    if kind is not None and kind not in RUN_KINDS:
        raise ValidationFailed(f"kind must be one of {', '.join(RUN_KINDS)}", field="kind")
    return json_response(await overview.list_runs(rt.control, kind))


@routes.get("/admin/runs/{run}")
async def get_run(request: web.Request) -> web.Response:
    """One run: state, progress per shard and phase, latest failures with their errors."""
    rt = await _rt(request)
    return json_response(await overview.run_progress(rt.control, run_id_of(request.match_info["run"])))


@routes.post("/admin/plugins/{plugin}/upgrade")
async def post_upgrade(request: web.Request) -> web.Response:
    """Start a recorded migration run of the plugin to its shipped version (`migrate apply` for
    another version, or a part of the fleet)."""
    rt = await _rt(request)
    await no_body(request)
    run_id = await request.app[RUNNER].start_upgrade(rt, request.match_info["plugin"])
    return json_response({"runId": run_id, "pluginId": request.match_info["plugin"]}, status=202)


@routes.post("/admin/runs/{run}/resume")
async def post_resume(request: web.Request) -> web.Response:
    """Finish a recorded migration run or move from where it stopped (202: started)."""
    rt = await _rt(request)
    await no_body(request)
    run_id = await request.app[RUNNER].resume(rt, run_id_of(request.match_info["run"]))
    return json_response({"runId": run_id, "action": "resume"}, status=202)


@routes.post("/admin/runs/{run}/abort")
async def post_abort(request: web.Request) -> web.Response:
    """Stop a migration run running on this host, or undo a move that has not switched."""
    rt = await _rt(request)
    await no_body(request)
    return json_response(await request.app[RUNNER].abort(rt, run_id_of(request.match_info["run"])))
