"""No `tenantfleet` command ever prints a traceback: bad arguments and a stopped fleet each
get one clear line, ``error: CODE: message``, and a non-zero exit.

Every command of the CLI is covered: a command added without a case here fails
`test_every_command_has_a_case`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import orjson

from host.cli import cli
from host.fleet.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
TENANT = "00000000-0000-4000-8000-000000000001"

# Arguments that parse, for every command: run against a stopped fleet, each must fail cleanly.
VALID_ARGS: dict[str, list[str]] = {
    "up": ["--no-serve"],
    "down": [],
    "serve": ["--port", "0"],
    "router serve": ["--port", "0"],
    "tenants create": ["initech", "--domain", "initech.example.com"],
    "tenants list": [],
    "tenants show": ["acme"],
    "tenants suspend": ["acme"],
    "tenants resume": ["acme"],
    "tenants import": ["tenants.csv"],
    "shards add": ["shard9", "postgresql://postgres@127.0.0.1:1/postgres"],
    "shards list": [],
    "shards set-state": ["shard1", "draining"],
    "plugins list": [],
    "plugins enable": ["inventory", "--tenant", "acme"],
    "plugins disable": ["inventory", "--tenant", "acme"],
    "plugins kill": ["inventory"],
    "plugins config": ["inventory", "acme"],
    "plugins roles": ["inventory", "acme"],
    "plugins uninstall": ["inventory", "--tenant", "acme", "--policy", "keep"],
    "plugins import-export": ["exports/inventory/acme", "--tenant", "acme"],
    "keys create": ["--tenant", "acme", "--name", "clerk"],
    "keys list": [],
    "keys revoke": [TENANT],
    "migrate plan": ["inventory"],
    "migrate apply": ["inventory"],
    "migrate status": [],
    "migrate verify": ["inventory"],
    "move": ["acme", "--to", "shard2", "--dry-run"],
    "drain": ["shard1", "--plan"],
    "rebalance": [],
    "gc": ["--dry-run"],
    "db current": [],
    "db upgrade": [],
    "db history": [],
    "version": [],
    "loadtest prepare": ["--tenants", "2"],
    "loadtest run": ["steady"],
    "loadtest slow-shard": ["shard1", "--seconds", "1"],
}
# Commands that don't need the fleet's servers to answer (`loadtest run` reaches the fleet
# over HTTP through its targets file; tests/test_loadtest_run.py covers its refusals).
OFFLINE = {"down", "version", "db history", "loadtest run"}
# `up` starts the servers (it is what a stopped fleet needs), so it is only given bad arguments.
STARTS_THE_FLEET = {"up"}


def _leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[str]:
    out: list[str] = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _leaf_commands(cmd, (*prefix, name))
        else:
            out.append(" ".join((*prefix, name)))
    return out


def _run(fleet_dir: Path, cases: list[list[str]]) -> list[dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLEET_")}
    env["TENANTFLEET_FLEET_DIR"] = str(fleet_dir)
    proc = subprocess.run([sys.executable, "-m", "tests.cli_driver"], input=orjson.dumps(cases), env=env,
                          cwd=str(ROOT), capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    results: list[dict[str, object]] = orjson.loads(proc.stdout)
    return results


def _one_clear_line(result: dict[str, object]) -> str | None:
    """Why ``result`` is not one clear failure line, or None."""
    if result["raised"] is not None:
        return f"raised:\n{result['raised']}"
    stderr = str(result["stderr"])
    if "Traceback" in stderr:
        return f"printed a traceback:\n{stderr}"
    lines = stderr.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: ") or lines[0].count(":") < 2:
        return f"stderr is not one `error: CODE: message` line: {stderr!r}"
    if result["code"] in (0, None):
        return f"exit code {result['code']}"
    return None


def test_every_command_has_a_case() -> None:
    assert sorted(_leaf_commands(cli)) == sorted(VALID_ARGS)


def test_bad_arguments_get_one_line_and_exit_2(tmp_path: Path) -> None:
    commands = sorted(VALID_ARGS)
    cases = [[*c.split(), "--no-such-option"] for c in commands]
    cases += [[*c.split(), *VALID_ARGS[c], "unexpected-extra"] for c in commands]
    cases += [["tenants", "list", "--limit", "ten"], ["shards", "set-state", "shard1", "melted"],
              ["no-such-command"], ["migrate", "status", "not-a-run"]]
    wrong = []
    for result in _run(tmp_path / "fleet", cases):
        why = _one_clear_line(result)
        if why is None and result["code"] != 2:
            why = f"exit code {result['code']}, not 2"
        if why is not None:
            wrong.append(f"tenantfleet {' '.join(map(str, result['argv']))}: {why}")  # type: ignore[call-overload]
    assert wrong == []


def test_every_command_against_a_stopped_fleet_gets_one_line(tmp_path: Path) -> None:
    fleet_dir = tmp_path / "fleet"
    fleet_dir.mkdir()
    dead = {name: free_port() for name in ("control", "shard1", "valkey")}  # nothing listens on these
    info = {"root": str(fleet_dir), "control_dsn": f"postgresql://postgres:pw@127.0.0.1:{dead['control']}/postgres",
            "shard_dsns": {"shard1": f"postgresql://postgres:pw@127.0.0.1:{dead['shard1']}/postgres"},
            "redis_url": f"redis://127.0.0.1:{dead['valkey']}/0", "redis_host": "127.0.0.1",
            "redis_port": dead["valkey"]}
    (fleet_dir / "fleet.json").write_bytes(orjson.dumps({"ports": dead, "info": info}))
    commands = sorted(set(VALID_ARGS) - OFFLINE - STARTS_THE_FLEET)
    wrong = []
    for result in _run(fleet_dir, [[*c.split(), *VALID_ARGS[c]] for c in commands]):
        why = _one_clear_line(result)
        if why is None and "SHARD_UNREACHABLE" not in str(result["stderr"]) \
                and "FLEET_ERROR" not in str(result["stderr"]):
            why = f"does not say the fleet is unreachable: {result['stderr']!r}"
        if why is not None:
            wrong.append(f"tenantfleet {' '.join(map(str, result['argv']))}: {why}")  # type: ignore[call-overload]
    assert wrong == []
