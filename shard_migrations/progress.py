"""Live run progress: a rich progress bar per shard on a terminal, plain lines otherwise.

The view polls a snapshot function (`FleetMigrator.snapshot`) from a task it owns; it
never touches the run itself.
"""
from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Callable

from prometheus_client import CollectorRegistry, write_to_textfile
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from shard_migrations.keys import PROGRESS_PLAIN_S, PROGRESS_TTY_S

Snapshot = Callable[[], list[dict[str, Any]]]


def _eta(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m"


def _state(row: dict[str, Any]) -> str:
    if row["state"] == "backing_off":
        return f"backing off {row['backoffS']:.1f}s"
    return str(row["state"])


def plain_line(row: dict[str, Any]) -> str:
    return (f"{row['shardId']}: {row['done']}/{row['total']} done, {row['failed']} failed, "
            f"{row['deferred']} tenants backing off, shard {_state(row)}, {row['rate']:.1f}/s, eta {_eta(row['etaS'])}")


class ProgressView:
    """``async with ProgressView(console, snapshot, live=console.is_terminal)``."""

    def __init__(self, console: Console, snapshot: Snapshot, *, live: bool, title: str = "",
                 metrics: CollectorRegistry | None = None, metrics_file: str | None = None) -> None:
        self.console = console
        self.snapshot = snapshot
        self.live = live
        self.title = title
        self.metrics = metrics
        self.metrics_file = metrics_file
        self._task: asyncio.Task[None] | None = None
        self._progress: Progress | None = None
        self._rows: dict[str, TaskID] = {}

    async def __aenter__(self) -> "ProgressView":
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[red]{task.fields[failed]} failed"), TextColumn("{task.fields[deferred]} waiting"),
                TextColumn("{task.fields[state]}"), TextColumn("{task.fields[rate]}/s"),
                TextColumn("eta {task.fields[eta]}"), console=self.console, auto_refresh=False)
            self._progress.start()
        self._task = asyncio.create_task(self._loop(), name="migrate-progress")
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.render(final=True)
        if self._progress is not None:
            self._progress.stop()

    async def _loop(self) -> None:
        every = PROGRESS_TTY_S if self.live else PROGRESS_PLAIN_S
        while True:
            await asyncio.sleep(every)
            self.render()

    def render(self, final: bool = False) -> None:
        rows = self.snapshot()
        if self.metrics is not None and self.metrics_file:
            write_to_textfile(self.metrics_file, self.metrics)
        if self._progress is None:
            for row in rows:
                self.console.print(f"{self.title}{plain_line(row)}", highlight=False, soft_wrap=True)
            return
        for row in rows:
            fields = {"failed": row["failed"], "deferred": row["deferred"], "state": _state(row),
                      "rate": f"{row['rate']:.1f}", "eta": _eta(row["etaS"])}
            tid = self._rows.get(row["shardId"])
            if tid is None:
                tid = self._rows[row["shardId"]] = self._progress.add_task(row["shardId"], total=row["total"] or 1,
                                                                           **fields)
            self._progress.update(tid, completed=row["done"] + row["failed"] if row["total"] else 1, **fields)
        self._progress.refresh()
