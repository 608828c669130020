"""`--no-slo-throttle`, shared by the commands that run shard-wide work (`migrate apply`,
`drain`, `rebalance`): it switches off the SLO-aware throttle (settings.slo_throttle) for
this run only."""
from __future__ import annotations

from typing import Any, Callable

import click

from host.cli.base import CliState
from router.background import lower_process_priority, moves_yield

HELP = ("Don't slow down on a shard whose request p95 (published by the hosts) nears its SLO limit "
        "(TENANTFLEET_SLO_THROTTLE=false does the same for every run).")


def option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--no-slo-throttle", "no_slo_throttle", is_flag=True, help=HELP)(fn)


def apply(state: CliState, no_slo_throttle: bool, *, background: bool = False, moves: bool = False) -> None:
    """Settings for a shard-wide run: the throttle as asked; with ``background`` (a
    migration: nothing it does holds a tenant's writes for long), this process at the
    operations' CPU priority (``operation_nice``, ``SCHED_IDLE`` with ``operation_idle``:
    the request path sharing this machine goes first; see router.background). With
    ``moves`` (a drain or rebalance), the same only when `moves_yield` says so (the
    machine has CPU to spare now: their cutover holds the tenant's writes, and a starved
    cutover is a longer pause); when it doesn't, the moves' pools keep normal priority too."""
    if no_slo_throttle:
        state.replace_settings(slo_throttle=False)
    if moves:
        background = moves_yield(state.settings.move_idle, state.settings.operation_nice)
        if not background:
            state.replace_settings(move_idle=False)
    if background:
        lower_process_priority(state.settings.operation_nice, state.settings.operation_idle)
