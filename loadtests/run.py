"""``python -m loadtests.run SCENARIO``: check everything, run Locust headless in its own
process, judge, report. What ``tenantfleet loadtest run`` runs.

Before any load is sent: the scenario must exist (and be available), the SLO file and the
targets file must be valid, the URL must be loopback or given with ``--url``, answer
``/healthz``, and know every tenant of the targets with its key (``/api/whoami``); for
``upgrade`` the plugin must have something pending; for ``move`` the shard to drain must hold
target tenants and another active shard must exist. Any failure is one line ``error:
CODE: message`` and exit 2. Then Locust runs (``python -m locust -f loadtests/locustfile.py``,
``--processes N`` with ``--workers N``) for exactly ``--duration`` seconds; the output
folder gets Locust's HTML and CSV, ``summary.json``, ``plot.png`` and ``locust.log``.
Exit 0 when every limit held, 3 when one failed, 4 when the run was aborted on a breach,
1 when the run itself broke. This module imports neither Locust nor any asyncio code of
tenantfleet: it talks to the fleet over HTTP (urllib) and runs the ``tenantfleet`` CLI.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from loadtests import report
from loadtests.errors import EXIT_ERROR, LoadtestError
from loadtests.scenarios import SCENARIOS
from loadtests.slo import Slo, load_slo
from loadtests.targets import Targets, check_url, is_loopback, load_targets

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
MAX_DURATION_S = 3600
MOVE_OPS = ("drain", "rebalance", "tenant")
PREFLIGHT_TIMEOUT_S = 5.0
LOCUST_GRACE_S = 120       # Locust is killed if it outlives --duration by this much


@dataclass(frozen=True)
class Options:
    scenario: str
    targets: Path
    out: Path
    url: str | None = None
    slo: Path | None = None
    users: int = 20
    duration_s: float = 60.0
    warmup_s: float = 10.0
    steady_s: float | None = None
    workers: int = 0
    rate_per_user: float = 5.0
    zipf_s: float = 1.1
    plugin: str = "inventory"
    slow_shard: str | None = None
    event_s: float = 10.0
    event_timeout_s: float = 300.0
    move_shard: str | None = None
    move_op: str = "drain"
    move_to: str | None = None
    pinned: int = 5
    pinned_rate: float = 20.0
    slo_throttle: bool = True
    expect_workers: int = 0          # Locust workers started elsewhere (compose's locust-worker), waited for
    master_bind: str = "127.0.0.1"
    cli: tuple[str, ...] = ()
    json: bool = False
    env: Mapping[str, str] | None = None     # for the CLI and Locust processes (None: this process's)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.run",
        description="Run a load-test scenario against a tenantfleet deployment and judge it against an SLO file. "
                    "Exit 0: every limit held; 3: a limit failed; 4: aborted on a breach; 2: bad input "
                    "(nothing was sent); 1: the run broke.")
    p.add_argument("scenario", help=f"one of: {', '.join(SCENARIOS)}")
    p.add_argument("--targets", type=Path, required=True, help="targets file (`tenantfleet loadtest prepare` writes it)")
    p.add_argument("--out", type=Path, required=True, help="folder for the report (created)")
    p.add_argument("--url", default=None, help="the deployment's URL (default: the targets file's; "
                                                "a non-loopback URL must be given here)")
    p.add_argument("--slo", type=Path, default=None, help="SLO file (default: loadtests/slo/default.toml)")
    p.add_argument("--users", type=int, default=20, help="concurrent users (default 20)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load, all phases (default 60)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of warm-up, not judged (default 10)")
    p.add_argument("--steady", type=float, default=None,
                   help="seconds of the steady phase before the event (default: a third of what follows warm-up)")
    p.add_argument("--workers", type=int, default=0, help="Locust worker processes (0: one process; default 0)")
    p.add_argument("--expect-workers", type=int, default=0,
                   help="run as a Locust master and wait for this many workers started elsewhere (compose's "
                        "locust-worker service: `locust -f loadtests/locustfile.py --worker --tf-plan OUT/plan.json`)")
    p.add_argument("--master-bind", default="127.0.0.1",
                   help="with --expect-workers: the address the master listens on for workers (default 127.0.0.1)")
    p.add_argument("--rate", type=float, default=5.0, help="requests per second per user (default 5)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the tenant mix (default 1.1)")
    p.add_argument("--plugin", default="inventory", help="upgrade: the plugin to migrate (default inventory)")
    p.add_argument("--slow-shard", default=None, help="shard-slow: the shard to slow (default: the targets' last)")
    p.add_argument("--event-seconds", type=float, default=10.0, help="shard-slow: seconds the shard stays slow")
    p.add_argument("--move-shard", default=None, help="move: the shard to drain (default: the targets' last)")
    p.add_argument("--move-op", choices=MOVE_OPS, default="drain",
                   help="move: the fleet operation, `drain --move-shard` (default), `rebalance --apply` (its "
                        "moves are what `rebalance --plan` says as the run starts; pinned users write to those) "
                        "or `move TENANT --to --move-to` (one online move of --move-shard's busiest target tenant)")
    p.add_argument("--move-to", default=None,
                   help="move --move-op tenant: the shard the tenant moves to (default: the first other shard "
                        "of the targets)")
    p.add_argument("--pinned", type=int, default=5,
                   help="move: users pinned to tenants the operation moves, one tenant each (default 5)")
    p.add_argument("--pinned-rate", type=float, default=20.0,
                   help="move: writes per second of each pinned user (default 20)")
    p.add_argument("--no-slo-throttle", action="store_true",
                   help="upgrade, move: run the fleet operation without the SLO-aware throttle (to compare)")
    p.add_argument("--event-timeout", type=float, default=300.0,
                   help="an event still running at --duration is waited for this many more seconds, then stopped "
                        "(default 300)")
    p.add_argument("--cli", default=None, help="the tenantfleet command for fleet operations "
                                               "(default: this Python's `-m host.cli`)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
    return p


def _bad(message: str, code: str = "VALIDATION_FAILED") -> LoadtestError:
    return LoadtestError(code, message)


def check_options(o: Options) -> None:
    scenario = SCENARIOS.get(o.scenario)
    if scenario is None:
        raise _bad(f"unknown scenario {o.scenario!r} (known: {', '.join(SCENARIOS)})", "USAGE")
    if not scenario.available:
        raise LoadtestError("NOT_AVAILABLE", scenario.unavailable_reason)
    if not 1 <= o.users <= 10_000:
        raise _bad(f"--users must be between 1 and 10000, not {o.users}", "USAGE")
    if not 1 <= o.duration_s <= MAX_DURATION_S:
        raise _bad(f"--duration must be between 1 and {MAX_DURATION_S} seconds, not {o.duration_s:g}", "USAGE")
    if not 0 <= o.warmup_s < o.duration_s:
        raise _bad(f"--warmup must be at least 0 and shorter than --duration, not {o.warmup_s:g}", "USAGE")
    if not 0 <= o.workers <= 64:
        raise _bad(f"--workers must be between 0 and 64, not {o.workers}", "USAGE")
    if not 0 <= o.expect_workers <= 64:
        raise _bad(f"--expect-workers must be between 0 and 64, not {o.expect_workers}", "USAGE")
    if o.expect_workers and o.workers:
        raise _bad("--workers (local processes) and --expect-workers (workers elsewhere) exclude each other", "USAGE")
    if not 0 < o.rate_per_user <= 1000:
        raise _bad(f"--rate must be above 0 and at most 1000, not {o.rate_per_user:g}", "USAGE")
    if not 0 <= o.zipf_s <= 10:
        raise _bad(f"--zipf must be between 0 and 10, not {o.zipf_s:g}", "USAGE")
    if not 0 <= o.event_timeout_s <= MAX_DURATION_S:
        raise _bad(f"--event-timeout must be between 0 and {MAX_DURATION_S}, not {o.event_timeout_s:g}", "USAGE")
    if o.move_op not in MOVE_OPS:
        raise _bad(f"--move-op must be one of {', '.join(MOVE_OPS)}, not {o.move_op!r}", "USAGE")
    if o.move_op != "drain" and o.scenario != "move":
        raise _bad("--move-op is for the move scenario", "USAGE")
    if o.move_op == "rebalance" and o.move_shard is not None:
        raise _bad("--move-shard names the shard a drain empties: a rebalance picks its own moves", "USAGE")
    if o.move_to is not None and o.move_op != "tenant":
        raise _bad("--move-to is for --move-op tenant", "USAGE")
    if o.move_op == "tenant" and not o.slo_throttle:
        raise _bad("--no-slo-throttle: a single `move` is never throttled (drains and rebalances are)", "USAGE")
    if o.scenario == "move":
        if o.move_op == "tenant":  # a single move pins one user, to its tenant
            if o.users < 2:
                raise _bad(f"--users must be at least 2 (one is pinned to the moved tenant), not {o.users}", "USAGE")
        elif not 1 <= o.pinned < o.users:
            raise _bad(f"--pinned must be at least 1 and fewer than --users ({o.users}), not {o.pinned}", "USAGE")
        if not 0 < o.pinned_rate <= 1000:
            raise _bad(f"--pinned-rate must be above 0 and at most 1000, not {o.pinned_rate:g}", "USAGE")
    if not 1 <= o.event_s <= MAX_DURATION_S:
        raise _bad(f"--event-seconds must be between 1 and {MAX_DURATION_S}, not {o.event_s:g}", "USAGE")


def timeline(o: Options, slo: Slo) -> dict[str, float]:
    has_event = SCENARIOS[o.scenario].has_event
    rest = o.duration_s - o.warmup_s
    steady = o.steady_s if o.steady_s is not None else (rest / 3 if has_event else rest)
    if steady <= 0:
        raise _bad(f"--steady must be above 0, not {steady:g}", "USAGE")
    if has_event:
        event_min = max(slo.event_min_s, o.event_s if o.scenario == "shard-slow" else 0)
        if o.warmup_s + steady + event_min >= o.duration_s:
            raise _bad(f"--duration {o.duration_s:g} s leaves no time after the event: warm-up {o.warmup_s:g} s + "
                       f"steady {steady:g} s + event at least {event_min:g} s (the SLO's event_min_s) must end before it",
                       "USAGE")
    elif o.warmup_s + steady > o.duration_s + 1e-9:
        raise _bad(f"--warmup + --steady ({o.warmup_s + steady:g} s) exceed --duration {o.duration_s:g} s", "USAGE")
    bound = o.duration_s + (o.event_timeout_s if has_event else 0)
    return {"durationS": o.duration_s, "warmupS": o.warmup_s, "steadyS": steady, "boundS": bound}


def _get(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=PREFLIGHT_TIMEOUT_S) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def check_fleet(targets: Targets) -> None:
    """The URL answers ``/healthz``; every target tenant's key is accepted for it (``/api/whoami``)."""
    try:
        status, _ = _get(f"{targets.url}/healthz", {})
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LoadtestError("UNREACHABLE", f"{targets.url} does not answer ({reason}); nothing was sent") from None
    if status != 200:
        raise LoadtestError("UNREACHABLE", f"{targets.url}/healthz answered {status}, not 200; nothing was sent")

    # /api/whoami checks the key and the tenant and reads nothing else: the manifest would
    # also fill every target tenant's plugin-registry copy at once, which then expires (TTL
    # 30 s) in one wave in the middle of the run, and the steady phase, all of it cached,
    # would be a baseline no fleet has.
    def probe(t: Any) -> str | None:
        try:
            status, body = _get(f"{targets.url}/api/whoami",
                                {"Authorization": f"Bearer {t.apiKey}", "X-Tenant": t.code})
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            return f"{t.code} ({getattr(exc, 'reason', exc)})"
        if status == 200:
            found = body.get("tenantId") if isinstance(body, dict) else None
            return None if found == t.tenantId else f"{t.code} (is tenant {found}, not the targets' {t.tenantId})"
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        return f"{t.code} ({status}{' ' + code if code else ''})"

    with ThreadPoolExecutor(max_workers=8) as pool:
        bad = [b for b in pool.map(probe, targets.tenants) if b is not None]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise LoadtestError("VALIDATION_FAILED",
                            f"the targets name {len(bad)} of {len(targets.tenants)} tenants that {targets.url} does not "
                            f"know or whose key it refuses: {shown}; nothing was sent")


def _cli(o: Options, *args: str) -> tuple[int, str, str]:
    proc = subprocess.run([*o.cli, *args], capture_output=True, text=True, timeout=300, env=o.env)
    return proc.returncode, proc.stdout, proc.stderr


def _cli_ok(o: Options, failed: str, *args: str) -> str:
    """The CLI's stdout for ``args``; VALIDATION_FAILED (``failed``: its last stderr line) if it exits non-zero."""
    rc, out, err = _cli(o, *args)
    if rc != 0:
        raise LoadtestError("VALIDATION_FAILED", f"{failed}: {(err.strip().splitlines() or ['exit ' + str(rc)])[-1]}")
    return out


def event_command(o: Options, targets: Targets, planned: list[dict[str, Any]] | None = None) -> list[str]:
    """The CLI command the scenario runs under load, checked first (nothing pending is refused)."""
    if o.scenario == "upgrade":
        out = _cli_ok(o, f"`migrate plan {o.plugin}` failed", "--json", "migrate", "plan", o.plugin)
        pending = json.loads(out).get("filesPending", 0)
        if not pending:
            raise LoadtestError("NOTHING_PENDING",
                                f"plugin {o.plugin} has nothing pending on this fleet, so there is no upgrade to run: "
                                "prepare tenants at its previous version (`tenantfleet loadtest prepare --prefix NEW`)")
        return [*o.cli, "--json", "migrate", "apply", o.plugin, *_throttle_flag(o)]
    if o.scenario == "shard-slow":
        shards = sorted({t.shardId for t in targets.tenants})
        slow = o.slow_shard or shards[-1]
        if slow not in shards:
            raise _bad(f"--slow-shard {slow!r}: no target tenant lives there (targets' shards: {', '.join(shards)})")
        if len(shards) < 2:
            raise _bad("shard-slow needs target tenants on at least two shards (the others are judged)")
        return [*o.cli, "--json", "loadtest", "slow-shard", slow, "--seconds", f"{o.event_s:g}"]
    if o.scenario == "move" and o.move_op == "rebalance":
        if not planned:
            raise LoadtestError("NOTHING_PENDING", "the fleet is balanced: `rebalance --plan` has no move (set a new "
                                                   "or drained shard active first)")
        return [*o.cli, "--json", "rebalance", "--apply", *_throttle_flag(o)]
    if o.scenario == "move" and o.move_op == "tenant":
        code, to = moved_tenant(o, targets)
        _cli_ok(o, f"`move {code} --to {to} --dry-run` refused it", "--json", "move", code, "--to", to, "--dry-run")
        return [*o.cli, "--json", "move", code, "--to", to]
    if o.scenario == "move":
        shard = move_shard(o, targets)
        out = _cli_ok(o, f"`drain {shard} --plan` failed", "--json", "drain", shard, "--plan")
        if not json.loads(out).get("moves"):
            raise LoadtestError("NOTHING_PENDING", f"shard {shard} has no tenant to move off")
        return [*o.cli, "--json", "drain", shard, *_throttle_flag(o)]
    return []


def rebalance_moves(o: Options) -> list[dict[str, Any]]:
    """The moves ``rebalance --plan`` lists now (``--apply`` plans the same on the same fleet)."""
    out = _cli_ok(o, "`rebalance --plan` failed", "--json", "rebalance", "--plan")
    try:
        return list(json.loads(out)["moves"])
    except (ValueError, KeyError, TypeError):
        raise LoadtestError("VALIDATION_FAILED", f"`rebalance --plan` printed no plan: {out.strip()[:200]!r}") from None


def _throttle_flag(o: Options) -> list[str]:
    return [] if o.slo_throttle else ["--no-slo-throttle"]


def move_shard(o: Options, targets: Targets) -> str:
    shards = sorted({t.shardId for t in targets.tenants})
    shard = o.move_shard or shards[-1]
    if shard not in shards:
        raise _bad(f"--move-shard {shard!r}: no target tenant lives there (targets' shards: {', '.join(shards)})")
    return shard


def moved_tenant(o: Options, targets: Targets) -> tuple[str, str]:
    """``--move-op tenant``: (the busiest target tenant on `move_shard`, the shard it moves to)."""
    shard = move_shard(o, targets)
    shards = sorted({t.shardId for t in targets.tenants})
    to = o.move_to or next((s for s in shards if s != shard), None)
    if to is None or to == shard:
        raise _bad(f"--move-to: a shard other than {shard} is needed (the targets' shards: {', '.join(shards)})")
    return next(t.code for t in targets.tenants if t.shardId == shard), to


def pinned_tenants(o: Options, targets: Targets, planned: list[dict[str, Any]] | None = None) -> list[str]:
    """The first ``--pinned`` target tenants the operation moves (the targets are in Zipf
    rank order: the busiest first), one per pinned user: a drain's are the tenants on its
    shard, a rebalance's those in its plan (``planned``), a single move's its tenant."""
    if o.move_op == "rebalance":
        moving = {m["tenantId"] for m in planned or ()}
        chosen = [t.code for t in targets.tenants if t.tenantId in moving][:o.pinned]
        if not chosen:
            raise _bad(f"`rebalance --plan` moves {len(moving)} tenant(s), none of them in the targets file: no pinned "
                       "user could write to a moving tenant (prepare the targets again after the shards changed)")
        return chosen
    if o.move_op == "tenant":
        return [moved_tenant(o, targets)[0]]
    shard = move_shard(o, targets)
    return [t.code for t in targets.tenants if t.shardId == shard][:o.pinned]


def prepare(o: Options) -> tuple[dict[str, Any], Targets]:
    """Every check that comes before load; returns the plan for the Locust process."""
    check_options(o)
    slo = load_slo(o.slo)
    targets = load_targets(o.targets)
    if o.url is not None:
        targets = Targets(check_url(o.url, "--url"), targets.tenants)
    elif not is_loopback(targets.url):
        raise _bad(f"the targets file names {targets.url}, which is not loopback: give it with --url to load it")
    tl = timeline(o, slo)
    try:
        o.out.mkdir(parents=True, exist_ok=True)
        probe = o.out / ".writable"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise _bad(f"--out {o.out}: can't write there ({exc})") from None
    check_fleet(targets)
    planned = rebalance_moves(o) if o.scenario == "move" and o.move_op == "rebalance" else None
    command = event_command(o, targets, planned)
    slow = command[command.index("slow-shard") + 1] if o.scenario == "shard-slow" else None
    pinned = pinned_tenants(o, targets, planned) if o.scenario == "move" else []
    plan = {"scenario": o.scenario, "targets": targets.to_api(), "slo": slo.to_dict(), "timeline": tl,
            "users": o.users, "workers": o.workers or o.expect_workers, "ratePerUser": o.rate_per_user, "zipfS": o.zipf_s,
            "slowShard": slow, "pinned": pinned, "pinnedRate": o.pinned_rate,
            "sloThrottle": o.slo_throttle if o.scenario in ("upgrade", "move") and o.move_op != "tenant" else None, "eventCommand": command, "out": str(o.out.resolve())}
    return plan, targets


def locust_argv(o: Options, plan: dict[str, Any], plan_path: Path, url: str) -> list[str]:
    spawn_rate = max(1.0, o.users / max(1.0, o.warmup_s / 2))
    # Locust's -t is the hard bound; the locustfile stops the run at --duration, or after an
    # event that outlasts it (at most --event-timeout later)
    bound = int(round(plan["timeline"]["boundS"])) + 1
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "-u", str(o.users), "-r", f"{spawn_rate:g}", "-t", f"{bound}s",
            "--host", url, "--stop-timeout", "5", "--loglevel", "WARNING",
            "--html", str(o.out / "report.html"), "--csv", str(o.out / "locust"), "--tf-plan", str(plan_path)]
    if o.workers:
        argv += ["--processes", str(o.workers)]
    elif o.expect_workers:
        argv += ["--master", "--expect-workers", str(o.expect_workers), "--master-bind-host", o.master_bind]
    # the user classes: PinnedWriter (a fixed count, set from the plan) only in `move`
    argv += ["TenantStaff", "PinnedWriter"] if plan.get("pinned") else ["TenantStaff"]
    return argv


def execute(o: Options) -> int:
    """Check, run, judge and report; returns the exit code."""
    plan, targets = prepare(o)
    plan_path = o.out / "plan.json"
    plan_path.touch(mode=0o600)  # it holds the targets' keys
    plan_path.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    summary_path = o.out / "summary.json"
    summary_path.unlink(missing_ok=True)
    log_path = o.out / "locust.log"
    sys.stderr.write(f"{o.scenario}: {o.users} users for {o.duration_s:g} s against {targets.url} "
                     f"({len(targets.tenants)} tenants); report in {o.out}\n")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(locust_argv(o, plan, plan_path, targets.url), stdout=log, stderr=subprocess.STDOUT,
                                cwd=str(LOCUSTFILE.parent.parent), env=o.env)
        try:
            proc.wait(timeout=plan["timeline"]["boundS"] + LOCUST_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not summary_path.exists():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        sys.stderr.write(f"error: RUN_FAILED: Locust exited {proc.returncode} without a summary; "
                         f"its log ({log_path}) ends:\n{tail}\n")
        return EXIT_ERROR
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    png = report.plot(summary, o.out / "plot.png")
    summary["files"] = {"html": "report.html", "csv": "locust_stats.csv", "history": "locust_stats_history.csv",
                        "plot": png.name if png else None, "log": "locust.log", "summary": "summary.json"}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if o.json:
        sys.stdout.write(json.dumps({k: v for k, v in summary.items() if k != "timeseries"}, indent=2) + "\n")
    else:
        sys.stdout.write(report.verdict_table(summary) + "\n\n" + report.headline(summary) + "\n")
        sys.stdout.write(f"report: {o.out} (report.html, locust_stats.csv, summary.json"
                         f"{', plot.png' if png else '; no plot.png: matplotlib is not installed'})\n")
    return int(summary["exitCode"])


def options_from(argv: Sequence[str] | None) -> Options:
    a = build_parser().parse_args(argv)
    cli = tuple(a.cli.split()) if a.cli else (sys.executable, "-m", "host.cli")
    return Options(scenario=a.scenario, targets=a.targets, out=a.out, url=a.url, slo=a.slo, users=a.users,
                   duration_s=a.duration, warmup_s=a.warmup, steady_s=a.steady, workers=a.workers,
                   rate_per_user=a.rate, zipf_s=a.zipf, plugin=a.plugin, slow_shard=a.slow_shard,
                   event_s=a.event_seconds, event_timeout_s=a.event_timeout, move_shard=a.move_shard, move_op=a.move_op,
                   move_to=a.move_to,
                   pinned=a.pinned, pinned_rate=a.pinned_rate, slo_throttle=not a.no_slo_throttle,
                   expect_workers=a.expect_workers, master_bind=a.master_bind, cli=cli, json=a.json)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        import importlib.util
        if importlib.util.find_spec("locust") is None:
            raise LoadtestError("NOT_INSTALLED", "Locust is not installed: pip install -e '.[load]'")
        return execute(options_from(argv))
    except LoadtestError as exc:
        sys.stderr.write(f"error: {exc.code}: {exc.message}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("aborted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
