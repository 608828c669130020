"""Contract test: schemathesis (every check it enables by default: status codes, content
types, response headers and schemas, valid data accepted, invalid data rejected, auth not
ignored, 405 with Allow, ...) against the router's own OpenAPI document, as the admin and
as a reader, bounded in examples. It runs in a worker thread (schemathesis is synchronous)
while the service keeps serving in the test's event loop."""
from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from router.openapi import DOCUMENT
from tests.fleetkit import Servers, open_fleet, serve_router

ADMIN, READ = "contract-admin-key", "contract-read-key"
EXAMPLES = 25
# Registering a shard connects to the DSN it is given: generated DSNs name hosts anywhere
# (DNS look-ups, connect timeouts), so that one operation is run by tests/test_router_service.py.
# A fleet-wide plugin uninstall disables (or, with grace 0, purges) the plugin for every
# tenant of the module's fleet, the very tenant the other cases here call as; it is run,
# bad input included, by tests/test_uninstall.py.
SKIP = {("POST", "/v1/shards"), ("POST", "/admin/plugins/{plugin}/uninstall")}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def router(servers: Servers) -> AsyncIterator[str]:
    async with AsyncExitStack() as stack:
        fleet = await open_fleet(servers, stack, shards=2)
        yield await serve_router(fleet.settings.model_copy(update={"admin_key": ADMIN, "read_key": READ}), stack)


def run_contract(document: dict[str, Any], base_url: str, key: str) -> list[str]:
    """Every operation, positive and negative data; the failures found (as text)."""
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        if (op.method.upper(), op.path) in SKIP:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {key}"})
            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body): nothing to test
                assert mode is GenerationMode.NEGATIVE and not op.body and not list(op.iter_parameters())
            except (Exception, BaseExceptionGroup) as exc:  # reported; the run goes on to the next operation
                failures.append(f"{op.method.upper()} {op.path} [{mode}]: {str(exc)[:1500]}")
    return failures


@pytest.mark.parametrize("key", [ADMIN, READ], ids=["admin", "reader"])
async def test_the_router_does_what_its_openapi_document_says(router: str, key: str) -> None:
    failures = await asyncio.to_thread(run_contract, DOCUMENT, router, key)
    assert not failures, "\n\n".join(failures)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def host(servers: Servers) -> AsyncIterator[tuple[dict[str, Any], str, str, str, str]]:
    """(document, url, admin key, a tenant's key with every inventory and restock role, its code)."""
    from host.openapi import document
    from tests.hostkit import ADMIN_KEY, host_settings, running_host, tenant_with_key

    async with AsyncExitStack() as stack:
        fleet = await open_fleet(servers, stack, shards=2)
        h = await stack.enter_async_context(running_host(host_settings(fleet)))
        rec, key = await tenant_with_key(fleet, h, roles=("INVENTORY_MANAGER", "RESTOCK_CLERK"),
                                         plugins=("inventory", "restock"))
        yield document(h.app), h.url, ADMIN_KEY, key, rec.code


@pytest.mark.parametrize("who", ["admin", "tenant"])
async def test_the_host_does_what_its_openapi_document_says(host: tuple[dict[str, Any], str, str, str, str],
                                                            who: str) -> None:
    doc, url, admin_key, tenant_key, _ = host
    failures = await asyncio.to_thread(run_contract, doc, url, admin_key if who == "admin" else tenant_key)
    assert not failures, "\n\n".join(failures)


async def test_a_plugin_routes_success_is_one_the_host_document_allows(
        host: tuple[dict[str, Any], str, str, str, str]) -> None:
    """Generated bodies seldom make a valid item, so the run above may never see a plugin's
    own success status (inventory's create answers 201): one valid request, checked whole."""
    doc, url, _, tenant_key, tenant = host
    op = schemathesis.openapi.from_dict(doc)["/api/plugins/inventory/items"]["POST"]
    case = op.Case(body={"sku": "contract-1", "qty": 1},
                   headers={"X-Tenant": tenant, "Authorization": f"Bearer {tenant_key}"})
    response = await asyncio.to_thread(case.call_and_validate, base_url=url)
    assert response.status_code == 201
