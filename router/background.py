"""Background priority for fleet operations: migrations give the CPU to the request path
first, and so do moves when the machine has CPU to spare (see below).

On a fleet whose shard servers have cores of their own, a migration's DDL or a move's copy
competes with requests only on the shard it works on, and the per-shard limiter (with the
SLO throttle) bounds that. Where the operation shares cores with the request path (the
embedded fleet, a small machine running the host and its shard servers, the operator's
CLI on a serving machine), its CPU lifts every request's latency: a 200-tenant migration
over ~1.5 s of DDL on two cores took the load test's p95 to 2x its steady value. Lowering
the operation's CPU priority (Unix ``nice``) lets the scheduler run the request path
first, and the operation on what is left.

Two parts, both best effort and both off with ``operation_nice = 0``:

- `lower_process_priority`: the operation's own process (the CLI running ``migrate
  apply``), never the host serving requests;
- `lower_backend_priority`: the PostgreSQL backend behind each of a migration's own
  connections (its pools are dedicated to it), when that backend is a process of this
  machine that we may renice. It is renice'd only once it is proven to be the backend we
  are connected to: ``pg_backend_pid()`` names a process whose parent is the postmaster
  recorded in the server's own ``data_directory/postmaster.pid``, whose name is
  ``postgres``, and that file's start time is the server's ``pg_postmaster_start_time()``
  (a server in a container or on another machine has other pids: nothing is changed there;
  and where such a server's data directory has the path of a local server's, its backend's
  pid, from another pid namespace, may be a local backend's of the other server: the start
  times tell them apart). Reading ``data_directory`` needs a superuser or ``pg_read_all_settings``
  (the owner DSN of the embedded fleet is the superuser); raising a process's nice value
  needs the same Unix user or root. Otherwise nothing happens, said once in the log.

Both also put the process under Linux's ``SCHED_IDLE`` policy (``operation_idle``, on by
default): it then runs only on a CPU no other task wants, and a request-path task that
wakes preempts it at once. A nice value alone is weaker: the kernel (EEVDF) lets the
running task finish its slice before a woken one runs, on every hop of a request (client,
host, backend, host, client). Measured with a one-core CPU hog switched on and off
every 2 s under a steady load test (bench/cpu_yield.py: per-second p95 with the hog on
over off, median of the seconds): with other work on the machine, normal priority
1.18x and 1.38x, nice 10 1.11x and 1.14x, SCHED_IDLE 0.92x and 0.94x; on a quiet one
1.67x, 1.56x and 1.47x (medians of 2 runs): there the two vCPUs are the hypervisor's to
schedule, and a busy core costs the request path whatever its policy in the guest. Where the policy can't be set (another user's process without
CAP_SYS_NICE, not Linux) the nice value stays, said once in the log.

A lowered priority holds for the connection's life: operation pools are closed when the
operation ends, and the backends exit with them. PostgreSQL's own advice against
renicing backends is about lock holders starved by busier ones (priority inversion). A
migration's transactions are short and its locks are per tenant, so a request waits at
most for one tenant's statement running at low priority; under ``SCHED_IDLE`` that
statement waits for a CPU nothing else wants, so on a machine whose CPUs are saturated by
other work a migrating tenant's requests can wait for it for long (the SLO throttle then
pauses new operations on the shard; ``operation_idle = false`` keeps nice alone). Moves (drain, rebalance) yield
the same way only when the machine has CPU to spare as they start (`moves_yield`: the
1-minute load average below the CPU count): an offline move copies the tenant's rows
while its writes are fenced, and on a loaded machine (load average 8) a reniced mover
stretched one pinned tenant's write pause to 487 ms (server side 316 ms) against 90-230
ms at normal priority; on a quiet one, under SCHED_IDLE, the load test's drains kept
their pauses at 70-81 ms (p99) and the request path's p95 at 1.13-1.27x its steady value
(1.49x at normal priority).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module for every shard-wide command: no driver at import
    import asyncpg

log = logging.getLogger("tenantfleet.background")

_warned: set[str] = set()


def _once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.info(message, *args)


def lower_process_priority(nice: int, idle: bool = False) -> int | None:
    """Raise this process's nice value to ``nice`` (never lower it: a process started with
    ``nice -n 19`` stays at 19) and, with ``idle``, put it under ``SCHED_IDLE``. Returns the
    nice value now, None when not changed."""
    if nice <= 0 or not hasattr(os, "getpriority"):
        return None
    if idle:
        set_idle(0)
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current >= nice:
        return None
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:  # pragma: no cover - raising one's own nice value is always allowed on Linux
        _once("process", "could not lower the operation's CPU priority: %s", exc)
        return None
    return nice


def set_idle(pid: int) -> bool:
    """Put process ``pid`` (0: this one) under ``SCHED_IDLE``; False where it can't be
    (not Linux, or another user's process without CAP_SYS_NICE), said once in the log."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        if os.sched_getscheduler(pid) != os.SCHED_IDLE:
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # EPERM: another Unix user's process; ESRCH: it just exited
        _once("idle", "operations keep the normal scheduling policy (nice only): %s", exc)
        return False
    return True


def moves_yield(move_idle: bool, nice: int, load: float | None = None, cpus: int | None = None) -> bool:
    """Whether a batch of moves runs at the operations' priority: asked for (``move_idle``,
    ``operation_nice`` > 0) and the machine has CPU to spare, its 1-minute load average
    (``load``) below its CPU count (``cpus``). A move's fenced copy and its cutover hold the
    tenant's writes: under SCHED_IDLE they wait for a CPU nothing else wants, which a quiet
    machine has at once and a saturated one may not have for long."""
    if not move_idle or nice <= 0:
        return False
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # pragma: no cover - no load average: don't guess
            return False
    return load < (cpus if cpus is not None else (os.cpu_count() or 1))


START_SLACK_S = 30.0   # postmaster.pid's start time vs pg_postmaster_start_time(): set moments apart


def _postmaster(data_directory: str) -> tuple[int, float] | None:
    """(pid, start time, Unix seconds) from ``data_directory/postmaster.pid`` (lines 1 and 3)."""
    try:
        lines = Path(data_directory, "postmaster.pid").read_text(encoding="ascii").split("\n")
        return int(lines[0].strip()), float(lines[2].strip())
    except (OSError, ValueError, UnicodeDecodeError, IndexError):
        return None


def _parent_and_name(pid: int) -> tuple[int, str] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    try:
        return int(fields["PPid"].strip()), fields.get("Name", "").strip()
    except (KeyError, ValueError):
        return None


def local_backend_pid(backend_pid: int, data_directory: str | None, started_at: float | None) -> int | None:
    """``backend_pid`` when it is, on this machine, a child of the postmaster recorded in
    ``data_directory``, named ``postgres``, and that postmaster started at ``started_at``
    (the server's ``pg_postmaster_start_time()``, Unix seconds); else None."""
    if not data_directory or started_at is None or not os.path.isdir("/proc"):
        return None
    postmaster = _postmaster(data_directory)
    info = _parent_and_name(backend_pid)
    if postmaster is None or info is None:
        return None
    (master, master_start), (parent, name) = postmaster, info
    if abs(master_start - started_at) > START_SLACK_S:
        return None
    return backend_pid if parent == master and name == "postgres" else None


async def lower_backend_priority(conn: "asyncpg.Connection", nice: int, idle: bool = False) -> int | None:
    """Renice the backend behind ``conn`` to ``nice`` (and, with ``idle``, put it under
    ``SCHED_IDLE``) when it is provably a process of this machine (see the module's
    docstring). Returns its pid when it was renice'd."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return None
    import asyncpg
    try:
        row = await conn.fetchrow("SELECT pg_catalog.pg_backend_pid() AS pid, "
                                  "pg_catalog.current_setting('data_directory') AS data_directory, "
                                  "extract(epoch FROM pg_catalog.pg_postmaster_start_time())::float8 AS started")
    except asyncpg.InsufficientPrivilegeError:
        _once("privilege", "operation backends keep their CPU priority: the shard role may not read "
                           "data_directory (superuser or pg_read_all_settings)")
        return None
    assert row is not None
    pid = local_backend_pid(int(row["pid"]), row["data_directory"], row["started"])
    if pid is None:
        return None
    try:
        if os.getpriority(os.PRIO_PROCESS, pid) < nice:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError as exc:  # EPERM: another Unix user's server and we are not root; ESRCH: it just exited
        _once("renice", "operation backends keep their CPU priority: %s", exc)
        return None
    if idle:
        set_idle(pid)
    return pid
