"""`tenantfleet loadtest prepare|run|slow-shard`: load tests and the SLO gate.

`prepare` and `slow-shard` are adapters over `host.loadprep`. `run` starts the load-test
runner as a process of its own (``python -m loadtests.run``): Locust patches its process
with gevent at import, so nothing here imports Locust or `loadtests`; the runner's exit
code (0 pass, 3 an SLO failed, 4 aborted on a breach, 2 bad input, 1 the run broke) is
this command's.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from host.cli.base import CliState, cli, emit, pass_state, run
from router.errors import ValidationFailed

# The services (the host runtime: aiohttp, asyncpg, redis) are imported when a command runs,
# so that loading the CLI stays fast.

SCENARIO_NAMES = ("steady", "upgrade", "move", "shard-slow")


def _default_targets(state: CliState) -> Path:
    return state.settings.fleet_dir / "loadtest" / "targets.json"


def _known_keys(path: Path) -> dict[str, str]:
    """{code: apiKey} from an earlier targets file at ``path`` (reused: keys are stored hashed)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return {str(t["code"]): str(t["apiKey"]) for t in doc.get("tenants", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


@cli.group()
def loadtest() -> None:
    """Load tests and the SLO gate: prepare tenants, run a scenario under Locust, judge it.

    \b
    tenantfleet loadtest prepare --tenants 200          # tenants, keys, items; writes the targets file
    tenantfleet loadtest run steady --users 20 --duration 60
    tenantfleet loadtest run upgrade                     # migrate apply inventory under load
    tenantfleet loadtest run shard-slow                  # one shard held by a lock; the others judged
    tenantfleet loadtest run move                        # drain a shard under load; pinned writers' pause

    Needs the `load` extra (Locust, matplotlib): pip install -e '.[load]'.
    """


@loadtest.command("prepare")
@click.option("--tenants", "count", type=click.IntRange(1, 10_000), required=True, help="How many tenants.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Targets file to write (default: <fleet dir>/loadtest/targets.json; 0600, it holds keys).")
@click.option("--url", default=None, help="The host URL users will load (default: http://BIND_HOST:HOST_PORT).")
@click.option("--prefix", default="lt", show_default=True,
              help="Tenant codes are PREFIX-0001...; existing ones are reused.")
@click.option("--items", type=click.IntRange(1, 100_000), default=20, show_default=True,
              help="Inventory items per tenant (ids 1..ITEMS).")
@click.option("--inventory-version", default=None,
              help="Inventory version for new tenants (default: the one before the shipped one, so `run upgrade` "
                   "has an upgrade to roll).")
@pass_state
def prepare(state: CliState, count: int, out: Path | None, url: str | None, prefix: str, items: int,
            inventory_version: str | None) -> None:
    """Set up tenants, keys and inventory items for load tests and write the targets file.

    Works on the embedded fleet or the one TENANTFLEET_* names; idempotent (tenants that
    exist are reused, with their keys from an earlier targets file at --out).
    """
    from host.loadprep import prepare_load_tenants

    s = state.settings
    path = out or _default_targets(state)
    base = url or f"http://{s.bind_host}:{s.host_port}"
    if not base.startswith(("http://", "https://")):
        raise ValidationFailed("--url must be an http(s) URL", field="url")
    started = time.monotonic()
    doc = run(prepare_load_tenants(s, tenants=count, url=base.rstrip("/"), prefix=prefix, items=items,
                                   version=inventory_version, known_keys=_known_keys(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    shards: dict[str, int] = {}
    for t in doc["tenants"]:
        shards[t["shardId"]] = shards.get(t["shardId"], 0) + 1
    emit(state, {"targets": str(path), "url": doc["url"], "tenants": len(doc["tenants"]),
                 "shards": ", ".join(f"{k}: {v}" for k, v in sorted(shards.items())),
                 "inventoryVersion": doc["pluginVersion"], "seconds": round(time.monotonic() - started, 1)})


@loadtest.command("run", context_settings={"ignore_unknown_options": False})
@click.argument("scenario", type=click.Choice(SCENARIO_NAMES))
@click.option("--targets", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Targets file (default: <fleet dir>/loadtest/targets.json).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: <fleet dir>/loadtest/SCENARIO-<UTC time>).")
@click.option("--url", default=None, help="Deployment URL (default: the targets file's; required if not loopback).")
@click.option("--slo", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SLO file (TOML; default loadtests/slo/default.toml).")
@click.option("--users", type=int, default=20, show_default=True, help="Concurrent users.")
@click.option("--duration", type=float, default=60.0, show_default=True, help="Seconds of load, all phases.")
@click.option("--warmup", type=float, default=10.0, show_default=True, help="Seconds of warm-up (not judged).")
@click.option("--steady", type=float, default=None, help="Seconds of steady load before the event "
                                                         "(default: a third of what follows warm-up).")
@click.option("--workers", type=int, default=0, show_default=True,
              help="Locust worker processes (0: a single process).")
@click.option("--rate", type=float, default=5.0, show_default=True, help="Requests per second per user.")
@click.option("--zipf", type=float, default=1.1, show_default=True,
              help="Zipf exponent of the tenant mix (0: every tenant alike).")
@click.option("--plugin", default="inventory", show_default=True, help="upgrade: the plugin to migrate.")
@click.option("--slow-shard", default=None, help="shard-slow: the shard to slow (default: the targets' last).")
@click.option("--event-seconds", type=float, default=10.0, show_default=True,
              help="shard-slow: seconds the shard stays slow.")
@click.option("--move-shard", default=None, help="move: the shard to drain (default: the targets' last).")
@click.option("--move-op", type=click.Choice(("drain", "rebalance", "tenant")), default="drain", show_default=True,
              help="move: the fleet operation, `drain --move-shard`, `rebalance --apply` (its moves are what "
                   "`rebalance --plan` says as the run starts; pinned users write to those tenants) or "
                   "`move TENANT --to SHARD` (one online move of --move-shard's busiest target tenant).")
@click.option("--move-to", default=None,
              help="move --move-op tenant: the shard the tenant moves to (default: the targets' first other shard).")
@click.option("--pinned", type=int, default=5, show_default=True,
              help="move: users pinned to the busiest tenants the operation moves, whose write pause is judged.")
@click.option("--pinned-rate", type=float, default=20.0, show_default=True,
              help="move: writes per second of each pinned user.")
@click.option("--no-slo-throttle", "no_slo_throttle", is_flag=True,
              help="upgrade, move: run the fleet operation without the SLO-aware throttle (to compare verdicts).")
@click.option("--event-timeout", type=float, default=300.0, show_default=True,
              help="An event still running at --duration is waited for this long, then stopped.")
@pass_state
def run_cmd(state: CliState, scenario: str, targets: Path | None, out: Path | None, url: str | None,
            slo: Path | None, users: int, duration: float, warmup: float, steady: float | None, workers: int,
            rate: float, zipf: float, plugin: str, slow_shard: str | None, event_seconds: float,
            move_shard: str | None, move_op: str, move_to: str | None, pinned: int, pinned_rate: float,
            no_slo_throttle: bool,
            event_timeout: float) -> None:
    """Run SCENARIO (steady, upgrade, move, shard-slow) headless and judge it against the SLO file.

    Phases: warm-up, steady, event (the scenario's fleet operation), after. Prints a table
    (phase, route, figure, limit, verdict) and writes Locust's HTML and CSV, summary.json and
    plot.png to --out. Exit 0 when every limit held, 3 when one failed, 4 when a breach
    outlasted the SLO's abort grace, 2 for bad input (nothing sent), 1 when the run broke.
    Every run stops by itself: after --duration, or, when the event outlasts it, once the
    event has ended (at most --event-timeout later; an event still running then is stopped).
    """
    folder = out or state.settings.fleet_dir / "loadtest" / f"{scenario}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    argv: list[Any] = [sys.executable, "-m", "loadtests.run", scenario,
                       "--targets", targets or _default_targets(state), "--out", folder,
                       "--users", users, "--duration", duration, "--warmup", warmup, "--workers", workers,
                       "--rate", rate, "--zipf", zipf, "--plugin", plugin, "--event-seconds", event_seconds,
                       "--event-timeout", event_timeout, "--pinned", pinned, "--pinned-rate", pinned_rate,
                       "--move-op", move_op]
    for flag, value in (("--url", url), ("--slo", slo), ("--steady", steady), ("--slow-shard", slow_shard),
                        ("--move-shard", move_shard), ("--move-to", move_to)):
        if value is not None:
            argv += [flag, value]
    if no_slo_throttle:
        argv.append("--no-slo-throttle")
    if state.json:
        argv.append("--json")
    proc = subprocess.Popen([str(a) for a in argv])
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the runner and Locust too: let them finish their report
        code = proc.wait()
    sys.exit(code)


@loadtest.command("slow-shard")
@click.argument("shard_id")
@click.option("--seconds", type=float, required=True, help="How long the shard stays slow (at most 3600).")
@click.option("--hold-ms", type=int, default=250, show_default=True, help="Each hold of the tenants' locks.")
@click.option("--gap-ms", type=int, default=250, show_default=True, help="Pause between holds.")
@pass_state
def slow_shard(state: CliState, shard_id: str, seconds: float, hold_ms: int, gap_ms: int) -> None:
    """Make SHARD_ID slow on purpose (the shard-slow scenario's event): for --seconds, hold every
    tenant's cutover lock there for --hold-ms, release for --gap-ms, again. Bounded in time."""
    from host.loadprep import hold_shard

    emit(state, run(hold_shard(state.settings, shard_id, seconds=seconds, hold_ms=hold_ms, gap_ms=gap_ms)))
