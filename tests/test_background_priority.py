"""Fleet operations give the CPU to the request path first (router/background.py): the
PostgreSQL backends behind an operation's pools (migrations, moves) run at the settings'
``operation_nice`` where they are processes of this machine, the request path's don't, and
the CLI process of a shard-wide run lowers its own priority; with ``operation_idle`` (the
default) both also run under SCHED_IDLE. A pid that is not a backend of the server we are
connected to is never touched. Against the embedded servers."""
from __future__ import annotations

import os
import subprocess
import sys

from pathlib import Path

import asyncpg

from router.background import local_backend_pid, lower_backend_priority, lower_process_priority, moves_yield
from router.pools import ShardPools
from shard_migrations.fleet import migration_pools
from shard_migrations.moves.mover import mover_pools
from tests.fleetkit import Fleet

ROOT = Path(__file__).resolve().parent.parent


async def _backend(conn: asyncpg.Connection) -> tuple[int, str]:
    row = await conn.fetchrow("SELECT pg_backend_pid() AS pid, current_setting('data_directory') AS dd")
    assert row is not None
    return int(row["pid"]), str(row["dd"])


async def _started(conn: asyncpg.Connection) -> float:
    return float(await conn.fetchval("SELECT extract(epoch FROM pg_postmaster_start_time())::float8"))


async def test_an_operations_pool_runs_its_backends_niced_and_the_request_paths_do_not(fleet: Fleet) -> None:
    s = fleet.settings.model_copy(update={"operation_nice": 7})

    async def lookup(shard_id: str) -> str | None:
        return fleet.shard_dsns.get(shard_id)
    async with ShardPools(s, lookup, background=True) as ops, ShardPools(s, lookup) as serving:
        async with (await ops.get("shard1")).acquire() as conn:
            pid, _ = await _backend(conn)
            assert os.getpriority(os.PRIO_PROCESS, pid) == 7
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        async with (await serving.get("shard1")).acquire() as conn:
            pid, _ = await _backend(conn)
            assert os.getpriority(os.PRIO_PROCESS, pid) == 0
            assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    async with migration_pools(s, lookup) as ops:              # what `migrate apply` works through
        async with (await ops.get("shard3")).acquire() as conn:
            pid, _ = await _backend(conn)
            assert os.getpriority(os.PRIO_PROCESS, pid) == 7
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    nice_only = s.model_copy(update={"operation_idle": False})
    async with ShardPools(nice_only, lookup, background=True) as ops:
        async with (await ops.get("shard2")).acquire() as conn:
            pid, _ = await _backend(conn)
            assert os.getpriority(os.PRIO_PROCESS, pid) == 7
            assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    off = s.model_copy(update={"operation_nice": 0})
    async with ShardPools(off, lookup, background=True) as ops:
        async with (await ops.get("shard2")).acquire() as conn:
            pid, _ = await _backend(conn)
            assert os.getpriority(os.PRIO_PROCESS, pid) == 0
            assert os.sched_getscheduler(pid) == os.SCHED_OTHER


async def test_only_a_proven_backend_of_the_connected_server_is_reniced(fleet: Fleet) -> None:
    conn = await asyncpg.connect(fleet.shard_dsns["shard1"])
    try:
        pid, data_dir = await _backend(conn)
        started = await _started(conn)
        assert local_backend_pid(pid, data_dir, started) == pid
        # our own process, a made-up data directory, another server's directory: not a backend of it
        assert local_backend_pid(os.getpid(), data_dir, started) is None
        assert local_backend_pid(pid, "/nonexistent", started) is None
        # a server elsewhere (a container) whose data directory has this one's path, and whose
        # backend's pid is one of this server's backends: its start time is not this server's
        assert local_backend_pid(pid, data_dir, started - 3600) is None
        assert local_backend_pid(pid, data_dir, None) is None
        other = await asyncpg.connect(fleet.shard_dsns["shard2"])
        try:
            _, other_dir = await _backend(other)
        finally:
            await other.close()
        if other_dir != data_dir:                       # embedded: one server per shard
            assert local_backend_pid(pid, other_dir, started) is None
        assert await lower_backend_priority(conn, 3) == pid and os.getpriority(os.PRIO_PROCESS, pid) == 3
        assert await lower_backend_priority(conn, 2) == pid and os.getpriority(os.PRIO_PROCESS, pid) == 3  # never raised
    finally:
        await conn.close()


def test_the_process_of_a_shard_wide_run_lowers_its_own_priority_and_never_raises_it() -> None:
    code = ("import os; from router.background import lower_process_priority as l; "
            "a = l(5); b = l(3); print(a, b, os.getpriority(os.PRIO_PROCESS, 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["5", "None", "5"]
    assert lower_process_priority(0) is None
    code = ("import os; from router.background import lower_process_priority as l; "
            "a = l(5, idle=True); print(a, os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0) == os.SCHED_IDLE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["5", "5", "True"]


def test_a_migrate_apply_cli_runs_under_sched_idle_unless_told_otherwise(fleet: Fleet) -> None:
    """The whole CLI process of `migrate apply`: its own policy, seen from inside the command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLEET_")}
    env["TENANTFLEET_CONTROL_DSN"] = fleet.settings.control_dsn
    probe = ("import os, sys\n"
             "import host.cli.throttle as t\n"
             "real = t.apply\n"
             "def apply(state, flag, *, background=False):\n"
             "    real(state, flag, background=background)\n"
             "    sys.stderr.write(f'policy={os.sched_getscheduler(0)} nice={os.getpriority(os.PRIO_PROCESS, 0)}\\n')\n"
             "    raise SystemExit(0)\n"
             "t.apply = apply\n"
             "from host.cli import main\n"
             "main(['migrate', 'apply', 'inventory'])\n")
    for extra, policy in (({}, os.SCHED_IDLE), ({"TENANTFLEET_OPERATION_IDLE": "false"}, os.SCHED_OTHER)):
        proc = subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True, text=True,
                              timeout=60, cwd=str(ROOT))
        assert f"policy={policy} nice=10" in proc.stderr, proc.stderr


def test_moves_yield_only_when_asked_and_the_machine_has_cpu_to_spare() -> None:
    assert moves_yield(True, 10, load=0.5, cpus=2)
    assert not moves_yield(True, 10, load=2.0, cpus=2)      # saturated: a fenced copy could starve
    assert not moves_yield(True, 10, load=7.9, cpus=2)
    assert not moves_yield(False, 10, load=0.0, cpus=2)     # move_idle = false
    assert not moves_yield(True, 0, load=0.0, cpus=2)       # operation_nice = 0: nothing is lowered


async def test_the_movers_pools_keep_normal_priority_when_moves_may_not_yield(fleet: Fleet) -> None:
    s = fleet.settings.model_copy(update={"move_idle": False, "operation_nice": 7})
    async with mover_pools(fleet.directory, s) as pools:
        async with (await pools.get("shard1")).acquire() as conn:
            pid, _ = await _backend(conn)
            assert os.getpriority(os.PRIO_PROCESS, pid) == 0
            assert os.sched_getscheduler(pid) == os.SCHED_OTHER
        # what a drain's report says (cpuPriority): not yielding, and why
        assert pools.note["yielding"] is False and pools.note["moveIdle"] is False and pools.note["cpus"] >= 1
    # asked to yield: it does exactly when the load average it read was below the CPU count
    async with mover_pools(fleet.directory, fleet.settings.model_copy(update={"move_idle": True,
                                                                              "operation_nice": 7})) as pools:
        note = pools.note
        assert note["yielding"] is (note["load1"] < note["cpus"]) and pools.yields is note["yielding"]
        async with (await pools.get("shard1")).acquire() as conn:
            pid, _ = await _backend(conn)
            assert (os.getpriority(os.PRIO_PROCESS, pid) == 7) is note["yielding"]
