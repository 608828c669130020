"""Fleet runs started from the host (admin API and console): a plugin upgrade (a recorded
migration run, `shard_migrations.fleet.FleetMigrator`, the same as `tenantfleet migrate
apply`), its resume, and a move's resume or abort (`shard_migrations.moves.mover.Mover`,
the same as `tenantfleet move --resume|--abort`).

Each runs in a task owned by the runtime's `TaskOwner` (cancelled when the host shuts
down; the run is recorded, so `resume` finishes it, from this host or the CLI). The
caller gets the run id as soon as the run is recorded; what fails before that (an
unknown version, drift, a plugin that doesn't exist) is raised to the caller, nothing
recorded. The run's own progress, failures and state are in ``fleet_runs`` and
``fleet_run_items``; pages read them there (`host.overview`), wherever the run runs.
A migration run holds the per-shard limiter of its own migrator, as the CLI's does.

Starting or resuming is one at a time per plugin (a move: per run) across every host: a
control-plane advisory lock is tried and held until the run is recorded as running, and
under it a live run of the same plugin (a heartbeat within ``3 * HEARTBEAT_S``) refuses
the request with RUN_BUSY. A double click, two operators, or two hosts asked to resume
the same run start it once. A plugin's uninstall (`host.operations.uninstall_plugin`)
starts under the same lock and is refused while an uninstall run of the plugin is live.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Final

from aiohttp import web

from host.runtime import HostRuntime
from router.errors import Internal, RunBusy, RunNotFound, TenantFleetError
from router.pools import connect
from shard_migrations.keys import HEARTBEAT_S, advisory_key
from shard_migrations.runs import owner_tag

log = logging.getLogger("tenantfleet.host.runner")
LIVE_S: Final = 3 * HEARTBEAT_S  # a run whose heartbeat is younger is running somewhere
_LIVE_RUN = ("SELECT run_id FROM fleet_runs WHERE kind = $3 AND plugin_id = $1 AND state = ANY($4::text[]) "
             "AND heartbeat_at > now() - make_interval(secs => $2) ORDER BY run_id LIMIT 1")


async def live_run(rt: HostRuntime, kind: str, plugin_id: str,
                   states: tuple[str, ...] = ("planned", "running")) -> int | None:
    """The id of a run of ``kind`` (``migrate``, ``uninstall``) of ``plugin_id`` in one of
    ``states`` that is running somewhere (its heartbeat younger than `LIVE_S`), or None."""
    run_id: int | None = await rt.control.fetchval(_LIVE_RUN, plugin_id, LIVE_S, kind, list(states))
    return run_id


@asynccontextmanager
async def starting(rt: HostRuntime, what: str) -> AsyncIterator[None]:
    """Hold the control plane's advisory lock for starting runs of ``what`` (a plugin, or a
    move's run) while the run is checked and recorded as running; RUN_BUSY at once if another
    request (on any host) holds it."""
    key = advisory_key(what, "host-run-start")
    # a connection of its own, not the pool's: the run being started needs the pool (which
    # may be one connection), and the lock goes with the connection whatever happens
    conn = await connect(rt.settings.control_dsn, rt.settings)
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            raise RunBusy(f"a run of {what} is being started or resumed right now: see the Runs page")
        yield
    finally:
        await conn.close()


class Runner:
    """This host's runs in progress (run id → task)."""

    def __init__(self) -> None:
        self._tasks: dict[int, asyncio.Task[Any]] = {}

    def running_here(self, run_id: int) -> bool:
        task = self._tasks.get(run_id)
        return task is not None and not task.done()

    async def start_upgrade(self, rt: HostRuntime, plugin_id: str, to: str | None = None) -> int:
        """Start a migration run taking ``plugin_id`` to ``to`` (default: the shipped version)
        on every tenant; its run id. PLUGIN_NOT_FOUND, VALIDATION_FAILED (unknown or older
        version), MIGRATION_DRIFT: raised before anything is recorded; RUN_BUSY while another
        run of the plugin is running (on any host) or being started."""
        rt.discovery.get(plugin_id)  # PLUGIN_NOT_FOUND before anything else
        async with starting(rt, plugin_id):
            live = await live_run(rt, "migrate", plugin_id)
            if live is not None:
                raise RunBusy(f"run {live} of {plugin_id} is running: watch it, or stop it first", runId=live)
            return await self._migrate(rt, plugin_id, to=to, resume=None)

    async def resume(self, rt: HostRuntime, run_id: int) -> int:
        """Finish a recorded migration run or move from where it stopped. RUN_NOT_FOUND;
        VALIDATION_FAILED if it is done, or still running (here or in another process)."""
        row = await self._run_row(rt, run_id)
        async with starting(rt, row["plugin_id"] if row["kind"] == "migrate" else f"run {run_id}"):
            return await self._resume(rt, run_id, await self._run_row(rt, run_id))  # read again under the lock

    @staticmethod
    async def _run_row(rt: HostRuntime, run_id: int) -> Any:
        row = await rt.control.fetchrow(
            "SELECT kind, plugin_id, state, extract(epoch FROM now() - heartbeat_at)::float8 AS age "
            "FROM fleet_runs WHERE run_id = $1", run_id)
        if row is None:
            raise RunNotFound(f"no run {run_id}", runId=run_id)
        return row

    async def _resume(self, rt: HostRuntime, run_id: int, row: Any) -> int:
        if self.running_here(run_id):
            raise RunBusy(f"run {run_id} is running on this host", runId=run_id)
        if row["state"] == "done":
            raise RunBusy(f"run {run_id} is done", runId=run_id)
        if row["kind"] in ("migrate", "move") and row["state"] == "running" and row["age"] is not None \
                and row["age"] < LIVE_S:
            raise RunBusy(f"run {run_id} is running in another process (heartbeat {row['age']:.0f} s ago)",
                          runId=run_id)
        if row["kind"] == "migrate":
            return await self._migrate(rt, row["plugin_id"], to=None, resume=run_id)
        if row["kind"] == "move":
            from shard_migrations.moves.mover import Mover

            mover = Mover(rt.directory, rt.settings)
            info = await mover.load(run_id)  # RUN_NOT_FOUND before a task starts
            if info.phase in ("done", "aborted"):
                raise RunBusy(f"move {run_id} is {info.phase}", runId=run_id)
            # recorded as running here before the lock is let go: a second resume (any host) sees it live
            await rt.control.execute("UPDATE fleet_runs SET state = 'running', owner = $2, heartbeat_at = now(), "
                                     "updated_at = now() WHERE run_id = $1", run_id, owner_tag())
            self._spawn(rt, run_id, f"move-resume-{run_id}", lambda: mover.resume(run_id))
            return run_id
        if row["kind"] == "uninstall":
            return await self._uninstall_resume(rt, row["plugin_id"], run_id)
        raise RunBusy(f"run {run_id} is a {row['kind']} run: resume it with `tenantfleet {row['kind']}`", runId=run_id)

    async def abort(self, rt: HostRuntime, run_id: int) -> dict[str, Any]:
        """Stop a run: a migration run running on this host is cancelled (its finished items
        stay applied, it is recorded ``cancelled``, `resume` finishes it); a move that has not
        switched is undone (`Mover.abort`). RUN_NOT_FOUND, VALIDATION_FAILED otherwise."""
        kind = await rt.control.fetchval("SELECT kind FROM fleet_runs WHERE run_id = $1", run_id)
        if kind is None:
            raise RunNotFound(f"no run {run_id}", runId=run_id)
        if kind == "move":
            from shard_migrations.moves.mover import Mover

            task = self._tasks.get(run_id)
            if task is not None and not task.done():
                await _cancel(task)
            return (await Mover(rt.directory, rt.settings).abort(run_id)).to_api()
        if kind == "migrate":
            task = self._tasks.get(run_id)
            if task is None or task.done():
                raise RunBusy(f"migration run {run_id} is not running on this host: stop it where it runs "
                              "(a migration run is stopped, not undone; resume finishes it)", runId=run_id)
            await _cancel(task)
            await rt.control.execute("UPDATE fleet_runs SET state = 'cancelled', updated_at = now() "
                                     "WHERE run_id = $1 AND state <> 'done'", run_id)
            return {"runId": run_id, "state": "cancelled"}
        raise RunBusy(f"a {kind} run can't be aborted here (`tenantfleet {kind}`)", runId=run_id)

    async def _migrate(self, rt: HostRuntime, plugin_id: str, *, to: str | None, resume: int | None) -> int:
        from shard_migrations.fleet import FleetMigrator, RunOptions, migration_pools

        package = rt.discovery.get(plugin_id)  # PLUGIN_NOT_FOUND
        recorded: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                async with migration_pools(rt.settings, rt.directory.dsn_of) as pools:
                    migrator = FleetMigrator(rt.control, pools, rt.settings, package)
                    report = await migrator.apply(RunOptions(to=to), resume=resume, on_run=recorded.set_result)
                log.info("run %s: %s → %s %s", report.run_id, plugin_id, report.version, report.state)
            except TenantFleetError as exc:
                if not recorded.done():
                    recorded.set_exception(exc)  # before the run was recorded: the caller's error
                    return
                log.warning("run of %s stopped: %s: %s (recorded in the run)", plugin_id, exc.code, exc.message)
            except asyncio.CancelledError:
                if not recorded.done():
                    recorded.cancel()
                raise
            except Exception as exc:  # a bug or a database error: recorded as the run's error by the migrator
                if not recorded.done():
                    recorded.set_exception(exc)
                    return
                log.exception("run of %s failed", plugin_id)

        task = rt.tasks.spawn(run(), name=f"upgrade-{plugin_id}")
        await asyncio.wait({recorded, task}, return_when=asyncio.FIRST_COMPLETED)
        if not recorded.done():  # the task ended without recording a run (cannot happen without an error)
            await task
            raise Internal(f"the run of {plugin_id} ended before it was recorded", pluginId=plugin_id)
        run_id = recorded.result()  # raises what stopped it before it was recorded
        self._tasks[run_id] = task
        task.add_done_callback(lambda _t: self._forget(run_id, _t))
        return run_id

    async def _uninstall_resume(self, rt: HostRuntime, plugin_id: str, run_id: int) -> int:
        """Finish an uninstall run (`shard_migrations.uninstall`); what refuses it (still in its
        grace period, running elsewhere) is raised to the caller, nothing changed."""
        from shard_migrations.uninstall import UninstallOptions, uninstall

        package = rt.discovery.get(plugin_id)
        claimed: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                report = await uninstall(rt.control, rt.owner_pools, rt.settings, package, UninstallOptions(),
                                         resume=run_id, on_run=claimed.set_result)
                await rt.registry.announce("global", plugin_id)
                log.info("run %s: uninstall of %s %s", run_id, plugin_id, report.state)
            except TenantFleetError as exc:
                if not claimed.done():
                    claimed.set_exception(exc)
                    return
                log.warning("run %s stopped: %s: %s (recorded in the run)", run_id, exc.code, exc.message)

        task = rt.tasks.spawn(run(), name=f"uninstall-resume-{run_id}")
        await asyncio.wait({claimed, task}, return_when=asyncio.FIRST_COMPLETED)
        if not claimed.done():
            await task
            raise Internal(f"run {run_id} ended before it was resumed", runId=run_id)
        claimed.result()
        self._tasks[run_id] = task
        task.add_done_callback(lambda _t: self._forget(run_id, _t))
        return run_id

    def _spawn(self, rt: HostRuntime, run_id: int, name: str, work: Callable[[], Awaitable[Any]]) -> None:
        async def run() -> None:
            try:
                await work()
            except TenantFleetError as exc:
                log.warning("run %s stopped: %s: %s (recorded in the run)", run_id, exc.code, exc.message)

        task = rt.tasks.spawn(run(), name=name)
        self._tasks[run_id] = task
        task.add_done_callback(lambda _t: self._forget(run_id, _t))

    def _forget(self, run_id: int, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(run_id) is task:
            del self._tasks[run_id]


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


RUNNER: Final[web.AppKey[Runner]] = web.AppKey("tenantfleet_runner")
