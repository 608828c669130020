"""The SLO gate's judging on recorded requests, without Locust: a passing and a failing case
for each kind of limit, exact percentiles, phases, and SLO / targets files refused with
their fault named. (These modules are plain Python; tests/test_layout.py checks that none
of them loads Locust or gevent.)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loadtests.errors import LoadtestError
from loadtests.gate import (Recording, Stats, judge, live_breaches, passed, percentile, quantile_bounds,
                            ratio_bound)
from loadtests.report import verdict_table
from loadtests.scenarios import SLOW_PREFIX, Timeline, phase_at
from loadtests.slo import DEFAULT_SLO, Slo, load_slo, parse_slo
from loadtests.targets import parse_targets

TIMELINE = Timeline(duration_s=40, warmup_s=5, steady_s=10, event_min_s=5)


def stats(times: list[float], errors: int = 0) -> Stats:
    return Stats(times=list(times), errors=errors)


def slo(**tables: dict[str, object]) -> Slo:
    return parse_slo({"run": {"min_samples": 10}, **tables}, "test")


def verdicts(rows: list, figure: str, phase: str = "steady", route: str = "GET /items") -> list[str]:
    return [r.verdict for r in rows if r.figure == figure and r.phase == phase and r.route == route]


def test_percentiles_are_exact_nearest_rank_never_bucketed_and_never_above_the_max() -> None:
    s = [float(v) for v in range(1, 101)]
    assert percentile(s, 0.95) == 95.0 and percentile(s, 0.99) == 99.0 and percentile(s, 0.5) == 50.0
    assert percentile([147.0] * 30, 0.95) == 147.0          # Locust would keep 150
    assert percentile([1.0, 2.0, 1000.0], 0.99) == 1000.0
    with pytest.raises(ValueError):
        percentile([], 0.95)


@pytest.mark.parametrize("key, figure, limit_ok, limit_bad", [
    ("p95_ms", "p95 ms", 95.0, 94.9),
    ("p99_ms", "p99 ms", 99.0, 98.9),
])
def test_a_percentile_limit_passes_at_the_figure_and_fails_just_below_it(
        key: str, figure: str, limit_ok: float, limit_bad: float) -> None:
    phases = {"steady": {"GET /items": stats([float(v) for v in range(1, 101)])}}
    ok = judge(phases, slo(limits={key: limit_ok}))
    bad = judge(phases, slo(limits={key: limit_bad}))
    assert verdicts(ok, figure) == ["pass"] and passed(ok)
    assert verdicts(bad, figure) == ["FAIL"] and not passed(bad)
    row = next(r for r in bad if r.figure == figure)
    assert (row.value, row.limit, row.n) == (limit_ok, limit_bad, 100)


def test_the_error_ratio_passes_at_its_limit_and_fails_above_it_even_from_few_requests() -> None:
    phases = {"steady": {"GET /items": stats([1.0] * 1000, errors=1)}}
    assert verdicts(judge(phases, slo(limits={"error_ratio": 0.001})), "error ratio") == ["pass"]
    phases = {"steady": {"GET /items": stats([1.0] * 1000, errors=2)}}
    assert verdicts(judge(phases, slo(limits={"error_ratio": 0.001})), "error ratio") == ["FAIL"]
    few = {"steady": {"GET /items": stats([1.0] * 3, errors=1)}}
    assert verdicts(judge(few, slo(limits={"error_ratio": 0.001})), "error ratio") == ["FAIL"]


def test_the_event_p95_over_the_steady_p95_passes_within_the_ratio_and_fails_beyond_it() -> None:
    steady = stats([10.0] * 100)
    limits = slo(phases={"event": {"p95_ratio_to_steady": 1.25}})
    within = judge({"steady": {"GET /items": steady}, "event": {"GET /items": stats([12.5] * 100)}}, limits)
    beyond = judge({"steady": {"GET /items": steady}, "event": {"GET /items": stats([12.6] * 100)}}, limits)
    assert verdicts(within, "p95 / steady p95", "event") == ["pass"]
    assert verdicts(beyond, "p95 / steady p95", "event") == ["FAIL"]
    assert next(r for r in beyond if r.figure == "p95 / steady p95").value == pytest.approx(1.26)
    # the steady phase is the ratio's base, so it has no ratio row of its own
    assert verdicts(beyond, "p95 / steady p95", "steady") == []


def test_a_percentile_from_fewer_requests_than_min_samples_gets_no_verdict() -> None:
    rows = judge({"steady": {"GET /items": stats([999.0] * 9)}}, slo(limits={"p95_ms": 1.0}))
    assert verdicts(rows, "p95 ms") == ["few"] and passed(rows)
    rows = judge({"steady": {"GET /items": stats([10.0] * 9)}, "event": {"GET /items": stats([99.0] * 50)}},
                 slo(phases={"event": {"p95_ratio_to_steady": 1.25}}))
    assert verdicts(rows, "p95 / steady p95", "event") == ["few"]   # no steady p95 to compare with


def test_route_limits_win_over_phase_limits_which_win_over_the_defaults() -> None:
    s = slo(limits={"p95_ms": 100}, phases={"event": {"p95_ms": 200}}, routes={"GET /manifest": {"p95_ms": 300}})
    assert s.limits_for("steady", "GET /items")["p95_ms"] == 100
    assert s.limits_for("event", "GET /items")["p95_ms"] == 200
    assert s.limits_for("event", "GET /manifest")["p95_ms"] == 300


def test_requests_fall_into_phases_by_time_and_the_event_phase_lasts_at_least_event_min_s() -> None:
    rec = Recording()
    for t in (1, 6, 16, 19, 22, 30):
        rec.add(float(t), "GET /items", 5.0, True)
    rec.add(31.0, SLOW_PREFIX + "GET /items", 500.0, False)
    rec.event_start_s, rec.event_end_s = 15.0, 17.0        # the operation took 2 s; the phase lasts 5
    phases = rec.by_phase(TIMELINE, has_event=True)
    assert {p: routes["all routes"].n for p, routes in phases.items() if "all routes" in routes} == \
        {"warmup": 1, "steady": 1, "event": 2, "after": 2}
    assert phases["after"][SLOW_PREFIX + "GET /items"].errors == 1   # kept apart, not in "all routes"
    assert phase_at(17.0, TIMELINE, True, None) == "event"            # still running: event to the end
    assert phase_at(39.0, TIMELINE, False, None) == "steady"          # no event: steady to the end


def test_the_summary_names_each_routes_slowest_requests_per_phase_with_when_they_came() -> None:
    """A route with ~50 requests in the event has its 3rd-slowest as its p95: the summary
    says which requests those were and when (the second of a stall)."""
    rec = Recording()
    rng = random.Random(7)
    for i in range(400):                           # steady 5-15 s, event 15-20 s
        t = 5.0 + i * 0.0375
        rec.add(t, "GET /manifest", 10.0 + rng.random(), True)
        rec.add(t, "GET /items", 12.0 + rng.random(), True)
    for t, ms in ((16.2, 90.0), (16.25, 70.0), (18.0, 40.0)):
        rec.add(t, "GET /manifest", ms, True)
    rec.add(17.0, "GET /items", 55.0, False)
    rec.add(17.5, SLOW_PREFIX + "GET /items", 900.0, True)   # the slow shard's own: not judged, not listed
    rec.event_start_s, rec.event_end_s = 15.0, 20.0
    slow = rec.slowest(TIMELINE, has_event=True, per_route=2)
    assert [(r["route"], r["t"], r["ms"], r["ok"]) for r in slow["event"]] == [
        ("GET /manifest", 16.2, 90.0, True), ("GET /manifest", 16.25, 70.0, True), ("GET /items", 17.0, 55.0, False)
    ] + [(r["route"], r["t"], r["ms"], r["ok"]) for r in slow["event"][3:]]
    assert len(slow["event"]) == 4 and {r["route"] for r in slow["event"]} == {"GET /manifest", "GET /items"}
    assert all(r["ms"] < 14 for r in slow["steady"]) and len(slow["steady"]) == 4
    assert "warmup" not in slow and "after" not in slow


def test_the_slow_shards_own_requests_are_shown_but_not_judged() -> None:
    phases = {"event": {SLOW_PREFIX + "GET /items": stats([5000.0] * 50, errors=50)}}
    rows = judge(phases, slo(limits={"p95_ms": 10, "error_ratio": 0}))
    assert rows and {r.verdict for r in rows} == {"info"} and passed(rows)


def test_the_abort_check_names_each_breached_limit_of_the_recent_window() -> None:
    window = [(float(i), "GET /items", 100.0, i % 10 != 0) for i in range(100)]
    assert live_breaches(window, {"p95_ms": 200, "error_ratio": 0.2}, None, 20) == []
    breaches = live_breaches(window, {"p95_ms": 50, "p99_ms": 50, "error_ratio": 0.01, "p95_ratio_to_steady": 1.25},
                             40.0, 20)
    assert breaches == ["p95 100.0 ms > 50 ms", "p99 100.0 ms > 50 ms", "error ratio 0.1000 > 0.01",
                        "p95 / steady p95 2.50 > 1.25"]
    assert live_breaches(window[:5], {"p95_ms": 1}, None, 20) == []     # too few requests to say


def test_the_verdict_table_names_phase_route_figure_value_limit_and_verdict() -> None:
    rows = judge({"steady": {"GET /items": stats([float(v) for v in range(1, 101)], errors=1)}},
                 slo(limits={"p95_ms": 90, "error_ratio": 0.001}))
    table = verdict_table({"rows": [r.to_api() for r in rows]})
    lines = table.splitlines()
    assert lines[0].split() == ["phase", "route", "figure", "value", "limit", "requests", "verdict"]
    assert any(ln.split()[:2] == ["steady", "GET"] and "p95 ms" in ln and "95.0" in ln and "90.0" in ln
               and ln.endswith("FAIL") for ln in lines)
    assert any("error ratio" in ln and "0.0100" in ln and ln.endswith("FAIL") for ln in lines)


def test_the_default_slo_file_holds_the_issue_bounds() -> None:
    s = load_slo(None)
    assert s.source == str(DEFAULT_SLO)
    assert s.limits_for("event", "GET /items")["p95_ratio_to_steady"] == 1.25
    assert s.limits_for("event", "GET /items")["error_ratio"] == 0.001
    assert s.limits_for("event", "GET /items")["write_pause_p99_ms"] == 250


@pytest.mark.parametrize("text, named", [
    ("[limit]\np95_ms = 1\n", "unknown table(s) limit"),
    ("[limits]\np95 = 1\n", "unknown key 'p95' in [limits]"),
    ("[limits]\np95_ms = '250ms'\n", "limits.p95_ms must be a number, not str"),
    ("[limits]\nerror_ratio = true\n", "limits.error_ratio must be a number, not bool"),
    ("[limits]\nerror_ratio = 1.5\n", "limits.error_ratio must be between 0 and 1"),
    ("[run]\nmin_samples = 2.5\n", "run.min_samples must be an integer"),
    ("[run]\nabort_after = 3\n", "unknown key 'abort_after' in [run]"),
    ("[phases.warmup]\np95_ms = 1\n", "unknown phase 'warmup'"),
    ('[routes."GET /nope"]\np95_ms = 1\n', "unknown route 'GET /nope'"),
    ("limits = 3\n", "[limits] must be a table"),
    ("[limits\n", "not TOML"),
])
def test_a_bad_slo_file_is_refused_naming_the_fault(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "slo.toml"
    path.write_text(text)
    with pytest.raises(LoadtestError) as err:
        load_slo(path)
    assert err.value.code == "VALIDATION_FAILED" and err.value.exit_code == 2
    assert named in err.value.message and str(path) in err.value.message


def test_a_missing_slo_file_is_named() -> None:
    with pytest.raises(LoadtestError, match="no such file"):
        load_slo(Path("/nonexistent/slo.toml"))


GOOD_TENANT = {"tenantId": "7f0c", "code": "lt-0001", "shardId": "shard1", "apiKey": "k", "items": 5}


@pytest.mark.parametrize("doc, named", [
    ([], "must be a JSON object"),
    ({"version": 2, "url": "http://127.0.0.1:1", "tenants": [GOOD_TENANT]}, "version must be 1"),
    ({"version": 1, "url": "ftp://x", "tenants": [GOOD_TENANT]}, "is not an http(s) URL"),
    ({"version": 1, "url": "http://127.0.0.1:1", "tenants": []}, "tenants must be a list of 1-"),
    ({"version": 1, "url": "http://127.0.0.1:1", "tenants": [dict(GOOD_TENANT, items=0)]}, "tenants[0].items"),
    ({"version": 1, "url": "http://127.0.0.1:1", "tenants": [dict(GOOD_TENANT, apiKey=7)]}, "tenants[0].apiKey"),
    ({"version": 1, "url": "http://127.0.0.1:1", "tenants": [GOOD_TENANT, GOOD_TENANT]}, "listed twice"),
    ({"version": 1, "url": "http://127.0.0.1:1", "tenants": [dict(GOOD_TENANT, role="x")]}, "unknown key(s) role"),
])
def test_a_bad_targets_file_is_refused_naming_the_fault(doc: object, named: str) -> None:
    with pytest.raises(LoadtestError) as err:
        parse_targets(json.loads(json.dumps(doc)), "t.json")
    assert err.value.code == "VALIDATION_FAILED" and named in err.value.message


def test_write_pause_is_the_longest_acknowledged_gap_reaching_into_the_event_and_is_judged() -> None:
    from loadtests.gate import pause_row, pause_summary, write_pauses

    every_50ms = [i * 0.05 for i in range(400)]                       # 0 .. 19.95 s
    cut = [t for t in every_50ms if not 12.0 < t < 12.3]               # 12.0 -> 12.3: a 300 ms gap
    gap_before_event = [t for t in every_50ms if not 2.0 < t < 3.0]   # a 1 s gap, but before the event
    pauses = write_pauses({"a": cut, "b": gap_before_event, "c": every_50ms[:220], "d": []},
                          start_s=10.0, end_s=15.0, run_end_s=20.0)
    assert pauses["a"] == {"pauseMs": 300.0, "atS": 12.3}
    assert pauses["b"]["pauseMs"] == 50.0                              # only gaps touching [10, 15] count
    assert pauses["c"]["pauseMs"] == pytest.approx(9050.0)            # writes stopped at 10.95: to the run's end
    assert pauses["d"]["pauseMs"] == 10000.0                           # never acknowledged: the whole window
    summary = pause_summary({k: pauses[k] for k in ("a", "b")})
    assert summary == {"n": 2, "p50": 50.0, "p99": 300.0, "max": 300.0}
    limits = slo(phases={"event": {"write_pause_p99_ms": 250}})
    failed = pause_row(summary, limits)
    assert (failed.route, failed.figure, failed.value, failed.limit, failed.verdict) == (
        "pinned writes", "write pause p99 ms", 300.0, 250.0, "FAIL")
    assert not passed([failed])
    ok = pause_row(pause_summary({"b": pauses["b"]}), limits)
    assert ok.verdict == "pass" and ok.value == 50.0
    assert pause_row(pause_summary({}), limits).verdict == "few"


def test_quantile_bounds_are_the_exact_order_statistics_of_the_binomial() -> None:
    # the p95's upper bound at 95% needs 59 samples: 1 - 0.95**59 >= 0.95 > 1 - 0.95**58
    assert quantile_bounds(58, 0.95, 0.95) == (quantile_bounds(58, 0.95, 0.95)[0], None)
    assert quantile_bounds(59, 0.95, 0.95)[1] == 59
    lo, hi = quantile_bounds(1000, 0.95, 0.95)
    assert lo is not None and hi is not None and lo < 950 < hi
    assert 935 <= lo <= 942 and 958 <= hi <= 965          # ~ 950 -/+ 1.645 * sqrt(1000 * .95 * .05)
    assert quantile_bounds(0, 0.95, 0.95) == (None, None)


def _phase(rng: random.Random, seconds: int, per_s: int, shift: float = 1.0, burst: float = 0.35) -> list[float]:
    """Response times of one route: lognormal, with a factor of its own for each second
    (requests of the same second share a burst, as on a busy machine)."""
    out: list[float] = []
    for _ in range(seconds):
        f = rng.lognormvariate(0, burst)
        out += [shift * f * rng.lognormvariate(2.6, 0.35) for _ in range(per_s)]
    return out


def test_an_a_a_run_does_not_fail_the_ratio_on_sampling_noise_but_a_real_breach_does() -> None:
    """Same distribution in both phases (an A/A run: 11 s steady, 5 s event) for a route of
    10 requests/s: the ratio itself goes over 1.25x on noise alone in about one run of six;
    the gate fails it only when the bounds say the breach is real. A 1.6x slowdown of a
    route of 100 requests/s fails nearly every time."""
    limits = slo(phases={"event": {"p95_ratio_to_steady": 1.25}})
    point = slo(run={"min_samples": 10, "confidence": 0}, phases={"event": {"p95_ratio_to_steady": 1.25}})
    aa_fails = point_fails = 0
    for seed in range(200):
        rng = random.Random(seed)
        phases = {"steady": {"GET /manifest": stats(_phase(rng, 11, 10))},
                  "event": {"GET /manifest": stats(_phase(rng, 5, 10))}}
        aa_fails += verdicts(judge(phases, limits), "p95 / steady p95", "event", "GET /manifest") == ["FAIL"]
        point_fails += verdicts(judge(phases, point), "p95 / steady p95", "event", "GET /manifest") == ["FAIL"]
    assert point_fails >= 15, point_fails        # judging the ratio itself fails A/A runs
    assert aa_fails <= 2, aa_fails               # the bounds don't
    real = 0
    for seed in range(100):
        rng = random.Random(1000 + seed)
        phases = {"steady": {"GET /items": stats(_phase(rng, 11, 100, burst=0.1))},
                  "event": {"GET /items": stats(_phase(rng, 5, 100, shift=1.6, burst=0.1))}}
        rows = judge(phases, limits)
        real += verdicts(rows, "p95 / steady p95", "event") == ["FAIL"]
        row = next(r for r in rows if r.figure == "p95 / steady p95")
        assert row.bound is not None and row.bound < row.value
    assert real >= 95, real


def test_a_ratio_above_the_limit_within_noise_is_unsure_shown_with_its_bound_and_not_a_failure() -> None:
    steady = [10.0] * 100
    event = [10.0] * 18 + [14.0] * 2                                       # p95 14 -> 1.4x from 20 requests
    rows = judge({"steady": {"GET /items": stats(steady)}, "event": {"GET /items": stats(event)}},
                 slo(phases={"event": {"p95_ratio_to_steady": 1.25}}))
    row = next(r for r in rows if r.figure == "p95 / steady p95")
    assert row.verdict == "unsure" and row.value == pytest.approx(1.4) and row.bound == pytest.approx(1.0)
    assert passed(rows)
    table = verdict_table({"rows": [r.to_api() for r in rows]})
    assert "1.40x (at least 1.00x)" in table and "unsure" in table


def test_the_slo_file_takes_a_confidence_between_0_and_0_999() -> None:
    assert parse_slo({"run": {"confidence": 0.9}}, "t").confidence == 0.9
    assert load_slo(DEFAULT_SLO).confidence == 0.95
    with pytest.raises(LoadtestError, match="run.confidence must be between 0 and 0.999"):
        parse_slo({"run": {"confidence": 1.0}}, "t")


def test_the_ratio_bound_is_wrong_less_often_than_one_minus_its_confidence_at_a_true_ratio_on_the_limit() -> None:
    """Each order-statistic bound is one-sided at ``confidence``, so the ratio's lower bound
    is proven only at 2 * confidence - 1 (0.90); with independent requests and the event
    phase exactly 1.25x the steady one, the bound passes 1.25 (a FAIL of a breach that
    isn't there) far less often than 5% of runs."""
    for n_steady, n_event in ((110, 50), (400, 400)):
        rng = random.Random(n_steady)
        wrong = 0
        for _ in range(400):
            steady = sorted(rng.expovariate(1.0) for _ in range(n_steady))
            event = sorted(1.25 * rng.expovariate(1.0) for _ in range(n_event))
            bound = ratio_bound(event, steady, 0.95, 0.95)
            wrong += bound is not None and bound > 1.25
        assert wrong <= 20, (n_steady, n_event, wrong)      # 5% of 400
