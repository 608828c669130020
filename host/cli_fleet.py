"""`tenantfleet up` and `tenantfleet down`: the embedded dev fleet."""
from __future__ import annotations

import click

from host.cli import CliState, cli, pass_state


@cli.command()
@pass_state
def down(state: CliState) -> None:
    """Stop every server `tenantfleet up` started (data is kept; `up --reset` wipes it)."""
    from host.embedded import EmbeddedFleet

    fleet_dir = state.settings.fleet_dir
    if not (fleet_dir / "fleet.json").exists():
        click.echo(f"no embedded fleet under {fleet_dir}")
        return
    EmbeddedFleet(fleet_dir, shards=state.settings.shards).stop()
    click.echo(f"stopped the embedded fleet under {fleet_dir}")
