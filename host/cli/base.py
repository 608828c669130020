"""The root `tenantfleet` group and what every command module shares: `CliState`, `emit`, `run`.

Command modules (`host.cli.fleet`, `host.cli.directory`, `host.cli.plugins`,
`host.cli.migrate`) add their commands to `cli`; `host.cli` imports them and runs `main`.

The CLI starts fast (`tenantfleet --help` in well under 0.3 s): importing a command module
registers its commands and imports nothing heavy. asyncpg, aiohttp, SQLAlchemy, redis,
prometheus-client, pydantic and rich are imported by the command that needs them, when it
runs (tests/test_cli_start.py checks what `--help` loads; bench/cli_start.py times it).
"""
from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any, Coroutine, Iterable, Sequence, TypeVar

import click
import orjson

if TYPE_CHECKING:
    import asyncio
    from contextlib import AbstractAsyncContextManager

    from rich.console import Console

    from router.runtime import RouterRuntime
    from router.settings import Settings

T = TypeVar("T")


class CliState:
    """What every command is handed: ``--json``, the settings and the console.

    The settings are built (`Settings.load()`, which names a bad key) the first time a
    command asks for them, and the console likewise: a command that needs neither pays for
    neither (pydantic and rich are the slowest imports after the drivers)."""

    def __init__(self, *, json: bool, settings: Settings | None = None, console: Console | None = None) -> None:
        self.json = json
        self._settings = settings
        self._console = console

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from router.settings import Settings

            self._settings = Settings.load()
        return self._settings

    def replace_settings(self, **changes: Any) -> None:
        """This command's settings with ``changes`` (e.g. a flag that overrides a setting)."""
        self._settings = self.settings.model_copy(update=changes)

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console()
        return self._console


def run(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio

    return asyncio.run(coro)


def router_runtime(settings: Settings) -> AbstractAsyncContextManager[RouterRuntime]:
    """`router.runtime.open_runtime(settings)`, imported when a command runs, not when the CLI loads."""
    from router.runtime import open_runtime

    return open_runtime(settings)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, for services to shut down in order (call inside the loop)."""
    import asyncio
    import signal

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
    from rich.table import Table

    if isinstance(data, dict):
        single = Table(title=title, show_header=False)
        single.add_column("field", style="bold")
        single.add_column("value")
        for key in columns or list(data.keys()):
            single.add_row(header(key), _cell(data.get(key)))
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
        label = header(col)
        if col.lower().endswith("id"):  # ids wrap on a narrow terminal rather than being cut short
            table.add_column(label, overflow="fold", min_width=len(label))
        else:
            table.add_column(label)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    state.console.print(table)


# Headers people read, where the words of the JSON key are not already that.
HEADERS: dict[str, str] = {
    "versionInstalled": "Installed", "versionAvailable": "Available", "enabledGlobal": "Enabled globally",
    "enabledTenants": "Enabled for tenants", "killedBy": "Killed by", "dsn": "DSN", "url": "URL",
    "schemaName": "Schema", "schema": "Schema", "ms": "ms", "isAdmin": "Admin", "etaS": "ETA (s)",
}
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def header(key: str) -> str:
    """A table header for a JSON key: ``shardId`` → ``Shard``, ``created_at`` → ``Created at``,
    ``versionInstalled`` → ``Installed`` (`HEADERS`). The JSON keeps the key itself."""
    if key in HEADERS:
        return HEADERS[key]
    words = [w.lower() for w in _WORD.findall(key)] or [key]
    if len(words) > 1 and words[-1] == "id":
        words.pop()  # "Shard" over "Shard id": the column holds the shard's id
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def _cell(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return "" if v is None else str(v)


def _json_after_command(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        state = ctx.find_object(CliState)
        if state is not None:
            state.json = True
    return value


class _Command(click.Command):
    """A command that also takes ``--json`` after its name (``tenantfleet tenants list --json``),
    where people type it; before the command (``tenantfleet --json tenants list``) works too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(["--json"], is_flag=True, expose_value=False, callback=_json_after_command,
                                        help="Machine-readable JSON output."))


class _Group(click.Group):
    command_class = _Command
    group_class = type  # sub-groups are _Group too, so their commands take --json as well


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
def cli(ctx: click.Context, as_json: bool) -> None:
    """tenantfleet: tenant router, plugin host and fleet migrator for schema-per-tenant PostgreSQL.

    Configuration comes from TENANTFLEET_* environment variables (and the TOML file
    named by TENANTFLEET_CONFIG). Without TENANTFLEET_CONTROL_DSN, commands use the
    embedded fleet that `tenantfleet up` started under .fleet/.
    """
    ctx.obj = CliState(json=as_json)


pass_state = click.make_pass_decorator(CliState)


@cli.command("version")
@pass_state
def version_cmd(state: CliState) -> None:
    """Print tenantfleet's version (reads no settings and opens no connection)."""
    from importlib.metadata import version

    if state.json:
        emit(state, {"version": version("tenantfleet")})
    else:
        click.echo(f"tenantfleet {version('tenantfleet')}")
