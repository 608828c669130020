"""Property: no request to any route of the router or the host answers 500 or leaves the
envelope, whatever its path parameters, query, key, tenant header and body (hypothesis,
bounded in examples; each service on a fleet of this module's own)."""
from __future__ import annotations

import json
import re
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator
from urllib.parse import quote, urlencode

import aiohttp
import orjson
import pytest_asyncio
from aiohttp import web
from hypothesis import HealthCheck, given, settings, strategies as st

from router.service import open_service
from tests.fleetkit import Servers, open_fleet
from tests.hostkit import ADMIN_KEY, Host, host_settings, running_host, tenant_with_key

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
ROUTER_ADMIN, ROUTER_READ = "fuzz-admin-key", "fuzz-read-key"
FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# any character but lone surrogates (not encodable); header values also without controls
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_HEADER = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=8)
_FIELDS = ["code", "domains", "shard_id", "shardId", "dsn", "capacity", "weight", "sku", "name", "qty", "location",
           "counts", "tenant", "roles", "permissions", "displayName"]
_QUERY_NAMES = ["id", "code", "domain", "shard", "state", "limit", "offset", "tenant"]
_MEDIA_TYPES = ["application/json", "application/json", "application/json; charset=utf-8",
                "application/merge-patch+json", "text/plain", "application/x-www-form-urlencoded"]
# values that once answered 500 somewhere, mixed into the generated ones
_NASTY = ["shard1\x00", "\x00", "\u0661", "1_0", " 5", "05", "1103142582953399675889682814599168", "-1"]


class Target:
    def __init__(self, url: str, app: web.Application, keys: list[str], names: list[str]) -> None:
        self.url, self.keys, self.names = url, keys, names
        self.routes = sorted({(r.method, r.resource.canonical) for r in app.router.routes()
                              if r.resource is not None and r.method not in ("HEAD", "*")})


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def targets(servers: Servers) -> AsyncIterator[dict[str, Target]]:
    async with AsyncExitStack() as stack:
        fleet = await open_fleet(servers, stack, shards=2)
        app = await open_service(fleet.settings.model_copy(update={"admin_key": ROUTER_ADMIN,
                                                                     "read_key": ROUTER_READ}), stack)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host: Host = await stack.enter_async_context(running_host(host_settings(fleet)))
        rec, key = await tenant_with_key(fleet, host)
        names = [rec.code, rec.tenant_id, rec.domains[0], "inventory", "restock", "1", "INVENTORY_MANAGER", "shard1"]
        yield {"router": Target(f"http://127.0.0.1:{runner.addresses[0][1]}", app, [ROUTER_ADMIN, ROUTER_READ], names),
               "host": Target(host.url, host.app, [ADMIN_KEY, key], names)}


def text_or(values: list[str]) -> st.SearchStrategy[str]:
    """One of ``values`` (names that exist), one that once answered 500, or any text."""
    return st.one_of(st.sampled_from(values), st.sampled_from(_NASTY), _TEXT)


def request_to(draw: st.DrawFn, target: Target, method: str,
               template: str) -> tuple[str, str, dict[str, str], bytes | None]:
    path = _PARAM.sub(lambda m: quote(draw(text_or(target.names)), safe=""), template)
    query = draw(st.lists(st.tuples(text_or(_QUERY_NAMES), text_or(target.names)), max_size=3))
    url = target.url + path + ("?" + urlencode(query) if query else "")
    headers: dict[str, str] = {}
    key = draw(st.sampled_from([None, "random", *target.keys, *target.keys]))
    if key is not None:
        headers["Authorization"] = "Bearer " + (draw(_HEADER) if key == "random" else key)
    tenant = draw(st.sampled_from([None, "random", target.names[0]]))
    if tenant is not None:
        headers["X-Tenant"] = draw(_HEADER) if tenant == "random" else tenant
    body = draw(st.none() | st.binary(max_size=200)
                | st.dictionaries(text_or(_FIELDS), _JSON, max_size=4).map(lambda d: json.dumps(d).encode()))  # stdlib: big ints too
    if body is not None:  # mostly JSON, as a client means it; sometimes what it isn't
        headers["Content-Type"] = draw(st.sampled_from(_MEDIA_TYPES))
    return method, url, headers, body


async def _check(http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
                 body: bytes | None) -> None:
    async with http.request(method, url, headers=headers, data=body) as r:
        text = await r.read()
        status, ctype = r.status, r.headers.get("Content-Type", "")
    where = (method, url, headers, body, status, text[:300])
    assert status != 500, where
    if status >= 400:
        assert ctype.startswith("application/json"), where
        err: Any = orjson.loads(text)["error"]
        assert err["code"] != "INTERNAL" and err["requestId"], where
        assert status < 500 or err["code"] in ("SHARD_UNREACHABLE", "NO_SHARD_AVAILABLE", "TENANT_MOVING",
                                               "TENANT_NOT_READY", "FENCE_STALE"), where


async def _every_route(target: Target, data: st.DataObject) -> None:
    """One generated request to each route of ``target`` (so each route gets every example)."""
    async with aiohttp.ClientSession() as http:
        for method, template in target.routes:
            await _check(http, *data.draw(st.composite(lambda draw: request_to(draw, target, method, template))()))


@FUZZ
@given(data=st.data())
async def test_no_route_of_the_router_answers_500(targets: dict[str, Target], data: st.DataObject) -> None:
    await _every_route(targets["router"], data)


@FUZZ
@given(data=st.data())
async def test_no_route_of_the_host_answers_500(targets: dict[str, Target], data: st.DataObject) -> None:
    await _every_route(targets["host"], data)
