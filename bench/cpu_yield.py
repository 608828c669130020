"""How much a fleet operation's CPU lifts the request path's p95, by CPU policy (issue 10).

A CPU hog (one Python process spinning, standing in for an operation's CPU: the CLI of
`migrate apply`, its backends' DDL) runs under one policy, switched on and off every 2 s,
while a `steady` load test runs against a served fleet (`make up` and `tenantfleet
loadtest prepare`). Seconds with the hog on are compared with seconds with it off in the
same run, so a machine whose load drifts (other work sharing the cores) moves both sides
alike. Policies: ``normal`` (nice 0, the floor: what an operation costs when it doesn't
yield), ``nice`` (nice 10: `operation_idle = false`), ``idle`` (SCHED_IDLE, as
operations run by default). Prints, per policy and run, the median over seconds of the
per-second p95 with the hog on over off, and the medians of those ratios.

    .venv/bin/tenantfleet up &                       # a served fleet
    .venv/bin/tenantfleet loadtest prepare --tenants 200
    .venv/bin/python bench/cpu_yield.py [--runs 2] [--duration 60] [--users 20]

Loopback only (the targets file's URL must be loopback), bounded: each run lasts
``--duration`` s and the hog is killed at its end. Linux only (SCHED_IDLE, chrt).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import machine, print_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {"normal": [], "nice": ["nice", "-n", "10"], "idle": ["chrt", "--idle", "0"]}
PERIOD_S = 2.0


def toggle_hog(policy: str, start_at: float, seconds: float, log: list[tuple[float, bool | None]]) -> None:
    """Run the hog on even PERIOD_S windows from ``start_at``, stopped on odd ones; log (time,
    on), and (time, None) once it is gone."""
    hog = subprocess.Popen([*POLICIES[policy], sys.executable, "-c", "while True: pass"])
    try:
        os.kill(hog.pid, signal.SIGSTOP)
        time.sleep(max(0.0, start_at - time.time()))
        k = 0
        while time.time() < start_at + seconds:
            on = k % 2 == 0
            os.kill(hog.pid, signal.SIGCONT if on else signal.SIGSTOP)
            log.append((time.time(), on))
            k += 1
            time.sleep(max(0.0, start_at + PERIOD_S * k - time.time()))
    finally:
        hog.kill()
        hog.wait()
        log.append((time.time(), None))


def one_run(policy: str, targets: Path, duration: float, users: int) -> dict[str, Any]:
    warmup = 10.0
    log: list[tuple[float, bool | None]] = []
    with tempfile.TemporaryDirectory(prefix="cpu-yield-") as tmp:
        out = Path(tmp) / "run"
        start_at = time.time() + warmup + 2
        hog = threading.Thread(target=toggle_hog, args=(policy, start_at, duration - warmup - 4, log), daemon=True)
        hog.start()
        proc = subprocess.run([sys.executable, "-m", "loadtests.run", "steady", "--targets", str(targets),
                               "--out", str(out), "--duration", f"{duration:g}", "--warmup", f"{warmup:g}",
                               "--users", str(users)],
                              cwd=str(ROOT), capture_output=True, text=True, timeout=duration + 120)
        hog.join()
        summary_path = out / "summary.json"
        if not summary_path.exists():
            raise SystemExit(f"the load test failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        summary = json.loads(summary_path.read_text())

    def state(t: float) -> bool | None:
        now: bool | None = None
        for at, on in log:
            if at <= t:
                now = on
        return now

    on: list[float] = []
    off: list[float] = []
    t0 = summary["startedAt"]
    for sec in summary["timeseries"]:
        a = t0 + sec["t"]
        first, last = state(a + 0.05), state(a + 0.95)  # a second wholly inside one state
        if first is None or first != last or sec.get("p95") is None:
            continue
        (on if first else off).append(sec["p95"])
    if len(on) < 3 or len(off) < 3:
        raise SystemExit(f"too few whole seconds to compare ({len(on)} on, {len(off)} off): a longer --duration")
    p_on, p_off = statistics.median(on), statistics.median(off)
    return {"policy": policy, "secondsOn": len(on), "secondsOff": len(off), "p95OnMs": p_on, "p95OffMs": p_off,
            "ratio": p_on / p_off}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=Path, default=ROOT / ".fleet" / "loadtest" / "targets.json",
                    help="targets file (`tenantfleet loadtest prepare` writes it)")
    ap.add_argument("--runs", type=int, default=2, help="runs per policy (interleaved)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per run")
    ap.add_argument("--users", type=int, default=20, help="load test users (5 requests/s each)")
    ap.add_argument("--policies", default="normal,nice,idle", help="comma-separated: normal, nice, idle")
    a = ap.parse_args()
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise SystemExit(f"--policies: unknown {', '.join(bad) or '(none)'}; known: {', '.join(POLICIES)}")
    if not a.targets.exists():
        raise SystemExit(f"{a.targets}: no targets file; run `tenantfleet loadtest prepare --tenants 200` on a "
                         "served fleet first")
    if a.duration < 30:
        raise SystemExit("--duration: at least 30 s (10 s warm-up, then whole 2 s windows)")
    if not hasattr(os, "SCHED_IDLE"):
        raise SystemExit("SCHED_IDLE is Linux only")
    load_before = os.getloadavg()[0]
    runs: list[dict[str, Any]] = []
    for i in range(a.runs):
        for policy in policies:
            r = one_run(policy, a.targets, a.duration, a.users)
            r["run"] = i + 1
            runs.append(r)
            print(f"run {i + 1} {policy:6}: p95 hog on {r['p95OnMs']:.1f} ms / off {r['p95OffMs']:.1f} ms = "
                  f"{r['ratio']:.2f}x ({r['secondsOn']} / {r['secondsOff']} s)", flush=True)
    rows = []
    medians: dict[str, float] = {}
    for policy in policies:
        ratios = [r["ratio"] for r in runs if r["policy"] == policy]
        medians[policy] = statistics.median(ratios)
        rows.append((policy, " ".join(f"{x:.2f}x" for x in ratios), f"{medians[policy]:.2f}x",
                     f"{medians[policy] / medians['normal']:.2f}" if "normal" in medians else "-"))
    print_table("p95 with a one-core hog on / off, by the hog's CPU policy (median of runs)",
                ["policy", "runs", "median", "vs normal"], rows)
    print(f"load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    write_results("cpu_yield", {"machine": machine(), "runs": runs, "medians": medians,
                                "loadAverage": [load_before, os.getloadavg()[0]]})


if __name__ == "__main__":
    main()
