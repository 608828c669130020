"""CLI start-up benchmark: how long `tenantfleet --help` and a no-op command take as processes.

Operators script the CLI over thousands of tenants, so the fixed cost of starting it
matters (issue 12: under 0.3 s). Each command below is run ``--runs`` times as a whole
process (the installed ``tenantfleet`` script next to this Python, else
``python -m host.cli``), interleaved round by round so that a noisy neighbour hits
every command alike, and the median wall time is printed against the floor measured in
the same run: ``python -c pass`` with the same interpreter.

    .venv/bin/python bench/cli_start.py [--runs 10] [--importtime]

``--importtime`` also prints the slowest imports of ``tenantfleet --help``
(``python -X importtime``), to see what a regression pulled in. Nothing here needs a
fleet: none of the measured commands opens a connection.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import machine, print_table, write_results  # noqa: E402

AIM_S = 0.3
COMMANDS: dict[str, list[str]] = {
    "tenantfleet --help": ["--help"],
    "tenantfleet version": ["version"],
    "tenantfleet tenants --help": ["tenants", "--help"],
    "tenantfleet migrate apply --help": ["migrate", "apply", "--help"],
}


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "tenantfleet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "host.cli"]


def _time_once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return elapsed


def _slowest_imports(top: int) -> list[tuple[str, float]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "host.cli", "--help"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        rows.append((name.rstrip(), int(cumulative) / 1e6))
    return sorted(rows, key=lambda r: r[1], reverse=True)[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="Runs of each command (median reported).")
    ap.add_argument("--importtime", action="store_true", help="Also print the slowest imports of `--help`.")
    args = ap.parse_args()

    cli = _cli()
    floor_argv = [sys.executable, "-c", "pass"]
    samples: dict[str, list[float]] = {"python -c pass": []} | {name: [] for name in COMMANDS}
    for argv in [floor_argv] + [cli + a for a in COMMANDS.values()]:
        _time_once(argv)  # warm the page cache and the .pyc files once
    for _ in range(args.runs):
        samples["python -c pass"].append(_time_once(floor_argv))
        for name, a in COMMANDS.items():
            samples[name].append(_time_once(cli + a))

    floor = statistics.median(samples["python -c pass"])
    results: dict[str, Any] = {"machine": machine(), "runs": args.runs, "cli": cli, "aim_s": AIM_S, "commands": {}}
    rows = []
    for name, values in samples.items():
        med = statistics.median(values)
        results["commands"][name] = {"median_s": med, "min_s": min(values), "max_s": max(values),
                                     "ratio_to_floor": med / floor}
        verdict = "floor" if name == "python -c pass" else ("under aim" if med < AIM_S else "OVER AIM")
        rows.append((name, med * 1000, min(values) * 1000, max(values) * 1000, f"{med / floor:.1f}x", verdict))
    print_table(f"CLI start-up, median of {args.runs} runs (aim: under {AIM_S * 1000:.0f} ms)",
                ["command", "median ms", "min ms", "max ms", "vs python -c pass", ""], rows)
    if args.importtime:
        imports = _slowest_imports(15)
        results["slowest_imports_of_help"] = dict(imports)
        print_table("slowest imports of `tenantfleet --help` (cumulative)", ["module", "ms"],
                    [(name, seconds * 1000) for name, seconds in imports])
    print(f"results: {write_results('cli_start', results)}")


if __name__ == "__main__":
    main()
