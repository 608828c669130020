"""The `tenantfleet` command line: thin adapters over the service functions.

One module per command group, each adding its commands to the root group in
`host.cli.base`; importing them here is what registers them. Human output (tables) by
default, ``--json`` for scripts. Every `TenantFleetError` is caught once, in `main`, and
becomes a one-line reason on stderr and its exit code.
"""
from __future__ import annotations

import sys
from typing import Sequence

import click

from host.cli import db, directory, fleet, loadtest, migrate, moves, plugins, uninstall
from host.cli.base import cli
from router.errors import TenantFleetError

__all__ = ["cli", "main", "db", "directory", "fleet", "loadtest", "migrate", "moves", "plugins", "uninstall"]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: runs the CLI, mapping TenantFleetError to a one-line reason and exit code."""
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except TenantFleetError as exc:
        click.echo(f"error: {exc.code}: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # bad arguments: one line, like every other failure
        hint = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
        click.echo(f"error: USAGE: {exc.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
