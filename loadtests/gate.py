"""The SLO gate's judging: exact percentiles from recorded requests, one verdict per limit.

Locust buckets response times to ~2 significant digits (147 ms is kept as 150) and its
final CSV lags its in-process totals, so the gate keeps every request's time itself
(`Recording`, filled from Locust's ``request`` event in the Locust process, merged from
the workers in a distributed run) and judges from those: nearest-rank percentiles, no
rounding.

`judge` returns one `Row` per (phase, route, limit): the figure, the limit and a verdict:
``pass``, ``FAIL``, ``few`` (a percentile from fewer than the SLO's ``min_samples``
requests: no verdict, not a failure) or ``info`` (shown, not judged: the slow shard's own
requests in ``shard-slow``). The error ratio is judged from any number of requests.

The ratio of a phase's p95 to the steady phase's p95 compares two samples, and a p95 from
a few hundred requests moves by more than 25% between two windows of the same load on a
busy machine: an A/A run (the `upgrade` scenario with an operation that does nothing, on
two shared cores) failed the 1.25x limit on a route in 2 runs of 2. So a ratio is judged
with distribution-free confidence bounds on both percentiles (order statistics, exact
binomial; `quantile_bounds`), at the SLO's ``confidence`` (0.95): ``FAIL`` when even the
phase's lower bound over the steady phase's upper bound is above the limit (the breach is
real at that confidence), ``pass`` when the ratio itself is within it, and ``unsure``
between: above the limit, but within what sampling alone explains (not a failure; more
requests, a longer run, decide it). The row's ``bound`` is that lower ratio; each of its
two bounds is one-sided at ``confidence``, so the ratio's is proven at ``2 * confidence - 1``
(0.90) only, though it is wrong far less often (independent requests, a true ratio on the
limit: 0.5-0.75% of simulated runs; tests/test_loadtest_gate.py). ``few`` when
the steady phase has too few requests for an upper bound (59 at 0.95). ``confidence = 0``
judges the ratio itself, as before.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from loadtests.scenarios import ALL_ROUTES, JUDGED_PHASES, PHASES, PINNED_ROUTE, SLOW_PREFIX, Timeline, phase_at
from loadtests.slo import Slo

FIGURES = {"p95_ms": "p95 ms", "p99_ms": "p99 ms", "error_ratio": "error ratio",
           "p95_ratio_to_steady": "p95 / steady p95", "write_pause_p99_ms": "write pause p99 ms"}


def _binomial_cdf(n: int, q: float) -> list[float]:
    """P(Binomial(n, q) <= k) for k = 0..n (log-space terms: exact enough for any n here)."""
    if not 0 < q < 1:
        raise ValueError("q must be in (0, 1)")
    lq, l1q, ln1 = math.log(q), math.log1p(-q), math.lgamma(n + 1)
    out, acc = [], 0.0
    for k in range(n + 1):
        acc += math.exp(ln1 - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lq + (n - k) * l1q)
        out.append(min(acc, 1.0))
    return out


def quantile_bounds(n: int, q: float, confidence: float) -> tuple[int | None, int | None]:
    """1-based ranks (lower, upper) of the order statistics that bound the ``q`` quantile of
    the distribution ``n`` samples came from, each one-sided at ``confidence``: the true
    quantile is at least the ``lower``-th smallest sample, and at most the ``upper``-th,
    each with that probability, whatever the distribution. None where ``n`` is too small."""
    if n <= 0:
        return None, None
    cdf = _binomial_cdf(n, q)
    lower = None
    for r in range(n, 0, -1):            # P(X_(r) <= quantile) = P(Bin >= r) = 1 - F(r - 1)
        if 1.0 - cdf[r - 1] >= confidence:
            lower = r
            break
    upper = None
    for r in range(1, n + 1):            # P(X_(r) >= quantile) = P(Bin <= r - 1) = F(r - 1)
        if cdf[r - 1] >= confidence:
            upper = r
            break
    return lower, upper


def ratio_bound(phase_sorted: Sequence[float], steady_sorted: Sequence[float], q: float,
                confidence: float) -> float | None:
    """The lower confidence bound of (phase quantile / steady quantile): the phase's lower
    bound over the steady phase's upper bound; None when either sample is too small."""
    lo, _ = quantile_bounds(len(phase_sorted), q, confidence)
    _, hi = quantile_bounds(len(steady_sorted), q, confidence)
    if lo is None or hi is None or steady_sorted[hi - 1] <= 0:
        return None
    return phase_sorted[lo - 1] / steady_sorted[hi - 1]


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in (0, 1]); exact, never above the max."""
    if not sorted_ms:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q * len(sorted_ms)))
    return sorted_ms[rank - 1]


@dataclass
class Stats:
    """One (phase, route)'s requests: their times (ms) and how many failed."""
    times: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def n(self) -> int:
        return len(self.times)

    def summary(self) -> dict[str, Any]:
        s = sorted(self.times)
        if not s:
            return {"n": 0, "errors": self.errors}
        return {"n": len(s), "errors": self.errors, "errorRatio": self.errors / len(s),
                "p50": percentile(s, 0.50), "p95": percentile(s, 0.95), "p99": percentile(s, 0.99), "max": s[-1]}


@dataclass
class Recording:
    """Every request of a run as ``(t, route, ms, ok)``; ``t`` in seconds from the start of the load.

    The event's window (``event_start_s``/``event_end_s``) and outcome come from the
    phase controller in the Locust process."""
    samples: list[tuple[float, str, float, bool]] = field(default_factory=list)
    # `move`: when each pinned tenant's writes were acknowledged (seconds from the start)
    acks: dict[str, list[float]] = field(default_factory=dict)
    event_start_s: float | None = None
    event_end_s: float | None = None

    def add(self, t: float, route: str, ms: float, ok: bool) -> None:
        self.samples.append((t, route, ms, ok))

    def extend(self, rows: Iterable[Sequence[Any]]) -> None:
        self.samples.extend((float(r[0]), str(r[1]), float(r[2]), bool(r[3])) for r in rows)

    def ack(self, t: float, tenant: str) -> None:
        self.acks.setdefault(tenant, []).append(t)

    def by_phase(self, timeline: Timeline, has_event: bool) -> dict[str, dict[str, Stats]]:
        """``{phase: {route: Stats}}``, with ``all routes`` per phase (judged requests only)."""
        out: dict[str, dict[str, Stats]] = {p: {} for p in PHASES}
        for t, route, ms, ok in self.samples:
            phase = phase_at(t, timeline, has_event, self.event_end_s)
            keys = (route,) if route.startswith(SLOW_PREFIX) else (route, ALL_ROUTES)
            for key in keys:
                st = out[phase].setdefault(key, Stats())
                st.times.append(ms)
                if not ok:
                    st.errors += 1
        return out

    def slowest(self, timeline: Timeline, has_event: bool, per_route: int = 5) -> dict[str, list[dict[str, Any]]]:
        """``{phase: [{t, route, ms, ok}]}``: the ``per_route`` slowest judged requests of each
        route in each phase, slowest first (when, in seconds from the start, a route's p95
        was made: a route with ~50 requests in the event has its 3rd-slowest as its p95)."""
        picked: dict[str, dict[str, list[tuple[float, float, bool]]]] = {}
        for t, route, ms, ok in self.samples:
            if route.startswith(SLOW_PREFIX):
                continue
            top = picked.setdefault(phase_at(t, timeline, has_event, self.event_end_s), {}).setdefault(route, [])
            top.append((ms, t, ok))
            if len(top) > 4 * per_route:          # keep it bounded over a long run
                top.sort(reverse=True)
                del top[per_route:]
        out: dict[str, list[dict[str, Any]]] = {}
        for phase in PHASES:
            rows = [{"t": round(t, 3), "route": route, "ms": round(ms, 2), "ok": ok}
                    for route, top in sorted(picked.get(phase, {}).items())
                    for ms, t, ok in sorted(top, reverse=True)[:per_route]]
            if rows:
                out[phase] = sorted(rows, key=lambda r: -r["ms"])
        return out

    def timeseries(self, bucket_s: float = 1.0) -> list[dict[str, Any]]:
        """Per ``bucket_s``: requests, errors, p50 and p95 of the judged requests (for the plot)."""
        buckets: dict[int, Stats] = {}
        for t, route, ms, ok in self.samples:
            if route.startswith(SLOW_PREFIX):
                continue
            st = buckets.setdefault(int(t // bucket_s), Stats())
            st.times.append(ms)
            st.errors += 0 if ok else 1
        out = []
        for k in sorted(buckets):
            s = sorted(buckets[k].times)
            out.append({"t": k * bucket_s, "n": len(s), "errors": buckets[k].errors,
                        "p50": percentile(s, 0.5), "p95": percentile(s, 0.95)})
        return out


@dataclass(frozen=True)
class Row:
    phase: str
    route: str
    figure: str
    value: float | None
    limit: float | None
    n: int
    verdict: str          # pass | FAIL | unsure | few | info
    bound: float | None = None   # ratio rows: the ratio's lower confidence bound (see the module docstring)

    def to_api(self) -> dict[str, Any]:
        return asdict(self)


def _row(phase: str, route: str, key: str, value: float | None, limit: float | None, n: int, *,
         percentile_figure: bool, min_samples: int) -> Row:
    if value is None or (percentile_figure and n < min_samples):
        return Row(phase, route, FIGURES[key], value, limit, n, "few")
    if route.startswith(SLOW_PREFIX) or limit is None:
        return Row(phase, route, FIGURES[key], value, limit, n, "info")
    return Row(phase, route, FIGURES[key], value, limit, n, "pass" if value <= limit else "FAIL")


def _ratio_row(phase: str, route: str, s: Sequence[float], steady: Sequence[float] | None, limit: float | None,
               slo: Slo) -> Row:
    figure = FIGURES["p95_ratio_to_steady"]
    if steady is None or len(s) < slo.min_samples or steady[-1] <= 0:
        return Row(phase, route, figure, None, limit, len(s), "few")
    ref = percentile(steady, 0.95)
    value = percentile(s, 0.95) / ref if ref > 0 else None
    if value is None:
        return Row(phase, route, figure, None, limit, len(s), "few")
    if route.startswith(SLOW_PREFIX) or limit is None:
        return Row(phase, route, figure, value, limit, len(s), "info")
    if slo.confidence <= 0:
        return Row(phase, route, figure, value, limit, len(s), "pass" if value <= limit else "FAIL")
    bound = ratio_bound(s, steady, 0.95, slo.confidence)
    if bound is None:
        return Row(phase, route, figure, value, limit, len(s), "few")
    verdict = "pass" if value <= limit else "FAIL" if bound > limit else "unsure"
    return Row(phase, route, figure, value, limit, len(s), verdict, round(bound, 4))


def judge(phases: dict[str, dict[str, Stats]], slo: Slo) -> list[Row]:
    """One row per (judged phase, route, limit) that has requests; see the module docstring."""
    rows: list[Row] = []
    steady_sorted = {route: sorted(st.times) for route, st in phases.get("steady", {}).items()
                     if st.n >= slo.min_samples}
    for phase in JUDGED_PHASES:
        routes = phases.get(phase, {})
        for route in sorted(routes, key=_route_order):
            st = routes[route]
            if st.n == 0:
                continue
            base = route[len(SLOW_PREFIX):] if route.startswith(SLOW_PREFIX) else route
            limits = slo.limits_for(phase, base)
            s = sorted(st.times)
            p95, p99 = percentile(s, 0.95), percentile(s, 0.99)
            figures: list[tuple[str, float | None, bool]] = [("p95_ms", p95, True), ("p99_ms", p99, True),
                                                             ("error_ratio", st.errors / st.n, False)]
            for key, value, is_pct in figures:
                if key in limits or route.startswith(SLOW_PREFIX):
                    rows.append(_row(phase, route, key, value, limits.get(key), st.n,
                                     percentile_figure=is_pct, min_samples=slo.min_samples))
            if "p95_ratio_to_steady" in limits:
                rows.append(_ratio_row(phase, route, s, steady_sorted.get(base), limits["p95_ratio_to_steady"], slo))
    return rows


def _route_order(route: str) -> tuple[int, str]:
    return (2 if route.startswith(SLOW_PREFIX) else 1 if route == ALL_ROUTES else 0, route)


def live_breaches(window: Sequence[tuple[float, str, float, bool]], limits: dict[str, float],
                  steady_p95: float | None, min_samples: int) -> list[str]:
    """What the judged requests of a recent window breach, all routes together (for the abort
    check): each as ``"p95 812.0 ms > 500 ms"``. Fewer than ``min_samples`` requests: nothing."""
    times = sorted(ms for _, route, ms, _ in window if not route.startswith(SLOW_PREFIX))
    if len(times) < min_samples:
        return []
    errors = sum(1 for _, route, _, ok in window if not ok and not route.startswith(SLOW_PREFIX))
    out = []
    p95, p99 = percentile(times, 0.95), percentile(times, 0.99)
    if "p95_ms" in limits and p95 > limits["p95_ms"]:
        out.append(f"p95 {p95:.1f} ms > {limits['p95_ms']:g} ms")
    if "p99_ms" in limits and p99 > limits["p99_ms"]:
        out.append(f"p99 {p99:.1f} ms > {limits['p99_ms']:g} ms")
    if "error_ratio" in limits and errors / len(times) > limits["error_ratio"]:
        out.append(f"error ratio {errors / len(times):.4f} > {limits['error_ratio']:g}")
    ratio = limits.get("p95_ratio_to_steady")
    if ratio is not None and steady_p95 and p95 / steady_p95 > ratio:
        out.append(f"p95 / steady p95 {p95 / steady_p95:.2f} > {ratio:g}")
    return out


def write_pauses(acks: dict[str, list[float]], start_s: float, end_s: float,
                 run_end_s: float) -> dict[str, dict[str, float]]:
    """Per pinned tenant, the longest gap (ms) between consecutive acknowledged writes that
    reaches into the event window ``[start_s, end_s]`` (its cutover is in there): ``{tenant:
    {"pauseMs", "atS"}}`` with ``atS`` the end of the gap. A tenant whose writes stopped being
    acknowledged counts the gap up to ``run_end_s``; one never acknowledged, the whole window."""
    out: dict[str, dict[str, float]] = {}
    for tenant, times in acks.items():
        ts = sorted(times)
        best, at = 0.0, start_s
        prev: float | None = None
        for t in [*ts, run_end_s]:
            if prev is not None and t >= start_s and prev <= end_s and t - prev > best:
                best, at = t - prev, t
            prev = t
        if not ts:
            best, at = run_end_s - start_s, run_end_s
        out[tenant] = {"pauseMs": round(best * 1000, 1), "atS": round(at, 3)}
    return out


def pause_summary(pauses: dict[str, dict[str, float]]) -> dict[str, Any]:
    """p50/p99/max of the pinned tenants' write pauses (nearest rank; few tenants: p99 = max)."""
    s = sorted(p["pauseMs"] for p in pauses.values())
    if not s:
        return {"n": 0}
    return {"n": len(s), "p50": percentile(s, 0.5), "p99": percentile(s, 0.99), "max": s[-1]}


def pause_row(summary: dict[str, Any], slo: Slo) -> Row:
    """The ``move`` scenario's verdict on the write pause: p99 over the pinned tenants against
    ``write_pause_p99_ms`` (judged from any number of tenants: it is one figure per tenant)."""
    limit = slo.limits_for("event", PINNED_ROUTE).get("write_pause_p99_ms")
    value = summary.get("p99")
    n = int(summary.get("n", 0))
    if value is None:
        return Row("event", PINNED_ROUTE, FIGURES["write_pause_p99_ms"], None, limit, n, "few")
    verdict = "info" if limit is None else "pass" if value <= limit else "FAIL"
    return Row("event", PINNED_ROUTE, FIGURES["write_pause_p99_ms"], float(value), limit, n, verdict)


def passed(rows: Iterable[Row]) -> bool:
    return all(r.verdict != "FAIL" for r in rows)
