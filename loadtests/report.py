"""What a finished run leaves: the verdict table (text) and the PNG plot, from ``summary.json``.

The plot needs matplotlib (the ``load`` extra); without it `plot` says so and returns None.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any, figure: str) -> str:
    if value is None:
        return "-"
    if figure == "error ratio":
        return f"{value:.4f}"
    if figure.startswith("p95 /"):
        return f"{value:.2f}x"
    if figure == "operation exit code":
        return f"{value:.0f}"
    return f"{value:.1f}"


def verdict_table(summary: dict[str, Any]) -> str:
    """The rows as an aligned text table: phase, route, figure, value, limit, requests, verdict."""
    head = ("phase", "route", "figure", "value", "limit", "requests", "verdict")
    lines = [head]
    for r in summary["rows"]:
        value = _fmt(r["value"], r["figure"])
        if r.get("bound") is not None and r["verdict"] != "pass":
            value += f" (at least {r['bound']:.2f}x)"
        lines.append((r["phase"], r["route"], r["figure"], value,
                      _fmt(r["limit"], r["figure"]), str(r["n"]) if r["n"] else "-", r["verdict"]))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def headline(summary: dict[str, Any]) -> str:
    verdict = summary["verdict"]
    fails = [r for r in summary["rows"] if r["verdict"] == "FAIL"]
    text = {"pass": "PASS: every SLO limit held",
            "fail": f"FAIL: {len(fails)} limit(s) broken",
            "aborted": f"ABORTED: {(summary.get('aborted') or {}).get('reason', '')}"}[verdict]
    line = f"{summary['scenario']}: {text} (exit {summary['exitCode']})"
    unsure = [r for r in summary["rows"] if r["verdict"] == "unsure"]
    if unsure:
        line += (f"\n{len(unsure)} ratio(s) above the limit but within sampling noise (unsure, not failed): "
                 "more requests (a longer run, more users) decide them")
    pause = summary.get("writePause") or {}
    if pause.get("n"):
        line += (f"\nwrite pause of {pause['n']} pinned tenants: p50 {pause['p50']:.0f} ms, p99 {pause['p99']:.0f} ms, "
                 f"max {pause['max']:.0f} ms")
    return line


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    """p50/p95 and errors per second, the event window shaded, the SLO lines drawn; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = summary["timeseries"]
    t = [p["t"] for p in ts]
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    ax.plot(t, [p["p50"] for p in ts], label="p50 (ms)", color="tab:blue", linewidth=1.2)
    ax.plot(t, [p["p95"] for p in ts], label="p95 (ms)", color="tab:orange", linewidth=1.2)
    tl = summary["timeline"]
    ax.axvspan(0, tl["warmupS"], color="grey", alpha=0.12, label="warm-up")
    if tl.get("eventAtS") is not None:
        end = tl["eventEndS"] if tl["eventEndS"] is not None else tl["endS"]
        end = max(end, tl["eventAtS"] + tl["eventMinS"])
        ax.axvspan(tl["eventAtS"], end, color="tab:red", alpha=0.12, label="event phase")
    slo = summary["slo"]
    limits = dict(slo["limits"])
    limits.update(slo["routes"].get("all routes", {}))
    if "p95_ms" in limits:
        ax.axhline(limits["p95_ms"], color="tab:orange", linestyle="--", linewidth=1, label="SLO p95 limit")
    steady = summary["phases"].get("steady", {}).get("all routes", {})
    ratio = {**limits, **slo["phases"].get("event", {})}.get("p95_ratio_to_steady")
    if ratio is not None and steady.get("p95") is not None:
        ax.axhline(steady["p95"] * ratio, color="tab:red", linestyle=":", linewidth=1,
                   label=f"{ratio:g}x steady p95 (event limit)")
    pause = summary.get("writePause") or {}
    if pause.get("tenants"):
        marks = sorted(pause["tenants"].values(), key=lambda p: p["atS"])
        ax.scatter([p["atS"] for p in marks], [p["pauseMs"] for p in marks], marker="x", color="tab:purple",
                   zorder=5, label=f"pinned tenant write pause (ms): p50 {pause['p50']:.0f}, p99 {pause['p99']:.0f}, "
                                   f"max {pause['max']:.0f}")
        limit = {**limits, **slo["phases"].get("event", {})}.get("write_pause_p99_ms")
        if limit is not None:
            ax.axhline(limit, color="tab:purple", linestyle="--", linewidth=1, label="SLO write pause p99 limit")
    ax.set_xlabel("seconds since the start of the load")
    ax.set_ylabel("response time (ms)")
    ax.set_ylim(bottom=0)
    errs = ax.twinx()
    errs.bar(t, [p["errors"] for p in ts], width=0.8, color="tab:red", alpha=0.5, label="errors / s")
    errs.set_ylabel("errors per second")
    errs.set_ylim(bottom=0, top=max([1] + [p["errors"] for p in ts]) * 4)
    lines, labels = ax.get_legend_handles_labels()
    l2, lab2 = errs.get_legend_handles_labels()
    ax.legend(lines + l2, labels + lab2, loc="upper left", fontsize=8)
    ax.set_title(f"{summary['scenario']}: {summary['verdict']} ({summary['users']} users, "
                 f"{summary['tenants']} tenants)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
