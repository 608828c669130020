"""The CLI starts fast because loading it imports nothing heavy (issue 12).

`tenantfleet --help`, a group's `--help` and `tenantfleet version` must not load the
database drivers, the HTTP stack, the SQL toolkit, Redis, prometheus-client, pydantic or
rich: each command imports what it needs when it runs. Checked by what a fresh process
holds in ``sys.modules`` afterwards, not by timing (bench/cli_start.py times it).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("asyncpg", "aiohttp", "sqlalchemy", "redis", "prometheus_client", "pydantic", "rich", "uvloop", "asyncio")

# Runs the CLI's `main` in a fresh interpreter, then prints which HEAVY modules it loaded.
PROBE = """
import sys
{prelude}
from host.cli import main
try:
    main({argv!r})
except SystemExit as exc:
    code = exc.code
else:
    code = 0
import json
sys.__stderr__.write(json.dumps({{"code": code, "loaded": [m for m in {heavy!r} if m in sys.modules]}}) + "\\n")
"""


def _probe(argv: list[str], prelude: str = "", env: dict[str, str] | None = None) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(prelude=prelude, argv=argv, heavy=HEAVY)],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=60,
                          env=env if env is not None else os.environ.copy())
    result: dict[str, object] = orjson.loads(proc.stderr.strip().splitlines()[-1])
    result["stdout"] = proc.stdout
    return result


@pytest.mark.parametrize("argv", [
    ["--help"], ["version"], ["--json", "version"], ["tenants", "--help"], ["tenants", "list", "--help"],
    ["migrate", "--help"], ["migrate", "apply", "--help"], ["plugins", "--help"], ["shards", "--help"],
    ["up", "--help"], ["db", "--help"], ["db", "upgrade", "--help"], ["loadtest", "--help"],
    ["loadtest", "run", "--help"], ["move", "--help"], ["drain", "--help"], ["rebalance", "--help"], ["gc", "--help"],
], ids=" ".join)
def test_help_and_version_load_no_driver_http_or_orm(argv: list[str]) -> None:
    result = _probe(argv)
    assert result["code"] == 0
    assert result["loaded"] == []
    assert "Usage:" in str(result["stdout"]) or "0." in str(result["stdout"])


def test_the_probe_sees_a_heavy_import() -> None:
    """The check above can fail: a module imported before the CLI is reported."""
    result = _probe(["--help"], prelude="import asyncpg, sqlalchemy")
    assert result["loaded"] == ["asyncpg", "sqlalchemy", "asyncio"]


def test_bad_setting_still_refuses_a_command_that_reads_settings(tmp_path: Path) -> None:
    """Settings are built when a command first needs them; a bad key still stops it, with its name."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTFLEET_")}
    env["TENANTFLEET_FLEET_DIR"] = str(tmp_path)
    env["TENANTFLEET_NO_SUCH_KEY"] = "1"
    cmd = [sys.executable, "-m", "host.cli"]
    listed = subprocess.run([*cmd, "tenants", "list"], cwd=str(ROOT), env=env, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 2
    assert listed.stderr.startswith("error: CONFIG_INVALID:") and "NO_SUCH_KEY" in listed.stderr
    helped = subprocess.run([*cmd, "tenants", "list", "--help"], cwd=str(ROOT), env=env, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "Usage:" in helped.stdout
