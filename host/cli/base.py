"""The root `tenantfleet` group and what every command module shares: `CliState`, `emit`, `run`.

Command modules (`host.cli.fleet`, `host.cli.directory`, `host.cli.plugins`,
`host.cli.migrate`) add their commands to `cli`; `host.cli` imports them and runs `main`.
"""
from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass
from typing import Any, Coroutine, Iterable, Sequence, TypeVar

import click
import orjson
from rich.console import Console
from rich.table import Table

from router.settings import Settings

T = TypeVar("T")


@dataclass
class CliState:
    settings: Settings
    json: bool
    console: Console


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, for services to shut down in order (call inside the loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def emit(state: CliState, data: Any, *, columns: Sequence[str] | None = None, title: str | None = None) -> None:
    """Print ``data`` as JSON (``--json``) or as a table of ``columns``."""
    if state.json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
        return
    if isinstance(data, dict):
        single = Table(title=title, show_header=False)
        single.add_column("field", style="bold")
        single.add_column("value")
        for key in columns or list(data.keys()):
            single.add_row(key, _cell(data.get(key)))
        state.console.print(single)
        return
    rows: Iterable[dict[str, Any]] = data
    if columns is None:
        first = next(iter(rows), None)
        if first is None:
            state.console.print("(none)")
            return
        columns = list(first.keys())
    table = Table(title=title)
    for col in columns:
        if col.lower().endswith("id"):  # ids wrap on a narrow terminal rather than being cut short
            table.add_column(col, overflow="fold", min_width=len(col))
        else:
            table.add_column(col)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    state.console.print(table)


def _cell(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return "" if v is None else str(v)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
def cli(ctx: click.Context, as_json: bool) -> None:
    """tenantfleet: tenant router, plugin host and fleet migrator for schema-per-tenant PostgreSQL.

    Configuration comes from TENANTFLEET_* environment variables (and the TOML file
    named by TENANTFLEET_CONFIG). Without TENANTFLEET_CONTROL_DSN, commands use the
    embedded fleet that `tenantfleet up` started under .fleet/.
    """
    ctx.obj = CliState(settings=Settings.load(), json=as_json, console=Console())


pass_state = click.make_pass_decorator(CliState)
