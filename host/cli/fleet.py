"""`tenantfleet up` and `tenantfleet down`: the embedded dev fleet (or external servers)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click

from host.cli.base import CliState, cli, pass_state, router_runtime, stop_on_signals

# The fleet launcher, the demo set-up and the services are imported when `up` runs.
if TYPE_CHECKING:
    from host.fleet.demo import DemoInfo
    from router.settings import Settings


def _start_embedded(state: CliState, shards: int | None, reset: bool) -> Settings:
    from rich.table import Table

    from host.fleet.embedded import PASSWORD_FILE, EmbeddedFleet
    from router.pools import redact

    s = state.settings
    if reset:
        EmbeddedFleet(s.fleet_dir).reset()
    fleet = EmbeddedFleet(s.fleet_dir, shards=shards)
    info = fleet.start()
    table = Table(title=f"embedded fleet under {info.root}")
    for col in ("server", "address"):
        table.add_column(col)
    table.add_row("control plane", redact(info.control_dsn))
    for shard_id, dsn in info.shard_dsns.items():
        table.add_row(shard_id, redact(dsn))
    table.add_row("valkey", info.redis_url)
    table.add_row("password", f"{info.root}/{PASSWORD_FILE} (user postgres)")
    state.console.print(table)
    return s.model_copy(update={"control_dsn": info.control_dsn, "redis_url": info.redis_url,
                                "shard_dsns": ",".join(info.shard_dsns.values())})


async def _prepare(settings: Settings) -> DemoInfo:
    from host.fleet.demo import DemoInfo, ensure_demo_tenants, ensure_shards, load_demo_keys, save_demo_keys
    from host.provision import provision_tenants

    shard_dsns = {f"shard{i}": dsn for i, dsn in enumerate(settings.shard_dsn_list, start=1)}
    async with router_runtime(settings) as rt:
        await ensure_shards(rt, shard_dsns)
        demo = DemoInfo(admin_key=settings.admin_key, read_key=settings.read_key,
                        tenants=await ensure_demo_tenants(rt))
    keys = load_demo_keys(settings.fleet_dir)
    missing = [t for t in demo.tenants if t.code not in keys]
    if missing:  # enable the plugins (applying their migrations), roles, one API key each
        keys.update(await provision_tenants(settings, missing))
        save_demo_keys(settings.fleet_dir, keys)
    demo.api_keys = {t.code: keys[t.code] for t in demo.tenants}
    return demo


def _print_tour(state: CliState, settings: Settings, demo: DemoInfo, router_port: int, host_port: int) -> None:
    base = f"http://{settings.bind_host}:{router_port}"
    host = f"http://{settings.bind_host}:{host_port}"
    acme, globex = demo.api_keys.get("acme", ""), demo.api_keys.get("globex", "")
    # plain echo, not rich: commands must not be wrapped, so they work when pasted
    lines = [
        f"\nrouter  {base}   (OpenAPI: {base}/v1/openapi.json, metrics: {base}/metrics)",
        f"host    {host}   (metrics: {host}/metrics)",
        f"console {host}/console   (sign in with the admin key)",
        f"admin key: {demo.admin_key}  (kept in {settings.fleet_dir}/admin.key)",
        f"read key:  {demo.read_key}  (the router's reads; kept in {settings.fleet_dir}/read.key)",
        f"API keys: acme {acme}, globex {globex}  (kept in {settings.fleet_dir}/demo-keys.json)",
        "",
        "try:",
        f"  curl -s {host}/api/plugins/inventory/items -H 'X-Tenant: acme' -H 'Authorization: Bearer {acme}'",
        f"  curl -s -X POST {host}/api/plugins/inventory/items -H 'Host: globex.example.com'"
        f" -H 'Authorization: Bearer {globex}' -H 'Content-Type: application/json'"
        " -d '{\"sku\": \"bolt-1\", \"name\": \"Bolt\", \"qty\": 5}'",
        f"  curl -s {host}/api/plugins/inventory/items -H 'X-Tenant: globex' -H 'Authorization: Bearer {globex}'",
        f"  curl -s {host}/api/manifest -H 'X-Tenant: acme' -H 'Authorization: Bearer {acme}'",
        f"  curl -s '{base}/v1/tenants/resolve?code=acme' -H 'Authorization: Bearer {demo.read_key}'",
        f"  curl -s '{base}/v1/tenants/resolve?domain=globex.example.com' -H 'Authorization: Bearer {demo.read_key}'",
        f"  curl -s -X POST {base}/v1/tenants -H 'Authorization: Bearer {demo.admin_key}'"
        " -H 'Content-Type: application/json' -d '{\"code\": \"initech\", \"domains\": [\"initech.example.com\"]}'",
        f"  curl -s {base}/v1/shards -H 'Authorization: Bearer {demo.read_key}'",
        "  .venv/bin/tenantfleet tenants list",
    ]
    click.echo("\n".join(lines))


@cli.command()
@click.option("--shards", type=click.IntRange(1, 16), default=None,
              help="Shard servers to run (default: as before, else 3). Embedded fleet only.")
@click.option("--reset", is_flag=True, help="Stop the embedded fleet and wipe its data first.")
@click.option("--serve/--no-serve", default=True, show_default=True,
              help="Serve the router and host in the foreground (Ctrl-C stops them; servers keep running).")
@pass_state
def up(state: CliState, shards: int | None, reset: bool, serve: bool) -> None:
    """Start the fleet and serve it.

    Without TENANTFLEET_CONTROL_DSN: starts the embedded fleet under .fleet/ (a control
    plane, one PostgreSQL server per shard, Valkey), keeping data and ports across
    restarts. With it: uses those servers and registers TENANTFLEET_SHARD_DSNS as
    shard1..N. Then ensures demo tenants, prints what runs where, and serves.
    """
    import asyncio

    from host.fleet.demo import admin_key_for, read_key_for

    settings = state.settings if state.settings.is_external else _start_embedded(state, shards, reset)
    settings = settings.model_copy(update={"admin_key": admin_key_for(settings.fleet_dir, settings.admin_key),
                                           "read_key": read_key_for(settings.fleet_dir, settings.read_key)})
    demo = asyncio.run(_prepare(settings))
    if not serve:
        _print_tour(state, settings, demo, settings.router_port, settings.host_port)
        return

    async def serve_all() -> None:
        from host import app as host_app
        from router import service

        stop = stop_on_signals()
        listening: dict[str, int] = {}

        def listening_on(service_name: str, port: int) -> None:
            listening[service_name] = port
            if len(listening) == 2:  # print once, when both services accept
                _print_tour(state, settings, demo, listening["router"], listening["host"])
                click.echo("\nserving; Ctrl-C stops the services (`tenantfleet down` stops the servers)")

        async def router_ready(port: int) -> None:
            listening_on("router", port)

        async def host_ready(url: str) -> None:
            listening_on("host", int(url.rsplit(":", 1)[1]))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(service.serve(settings, ready=router_ready, stop=stop))
            tg.create_task(host_app.serve(settings, ready=host_ready, stop=stop))

    from host.app import run as run_on_fast_loop
    from host.logs import json_logging

    with json_logging(settings.log_level):  # one JSON line per request and event, on stderr
        run_on_fast_loop(serve_all())  # uvloop when installed, as `tenantfleet serve`
    click.echo("stopped serving; the fleet's servers keep running (`tenantfleet down` stops them)")


@cli.command()
@pass_state
def down(state: CliState) -> None:
    """Stop every server `tenantfleet up` started (data is kept; `up --reset` wipes it)."""
    from host.fleet.embedded import EmbeddedFleet

    fleet_dir = state.settings.fleet_dir
    if not (fleet_dir / "fleet.json").exists():
        click.echo(f"no embedded fleet under {fleet_dir}")
        return
    EmbeddedFleet(fleet_dir).stop()
    click.echo(f"stopped the embedded fleet under {fleet_dir}")


