# Locust's EventHook.add_listener is untyped: calling it is the one untyped call here.
# mypy: disable-error-code="no-untyped-call"
"""The Locust side of a run: users, the phase controller, the event, the gate. Loaded by
``python -m locust -f loadtests/locustfile.py --tf-plan PLAN.json`` (started by
`loadtests.run`, which validated everything first and wrote the plan); never imported by
anything else (Locust patches the process with gevent).

On the master (or the only process): every request's time is recorded exactly
(`gate.Recording`; workers send theirs with their reports); a controller greenlet starts
the scenario's event at ``warmup_s + steady_s`` by running the `tenantfleet` CLI as a
subprocess; an optional watcher stops the run when a limit stays breached past the SLO's
``abort_grace_s``; at quit the run is judged, ``summary.json`` written to the plan's
output folder and the process exit code set (0 pass, 3 an SLO failed, 4 aborted).
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import gevent  # type: ignore[import-untyped]  # gevent ships no type information
from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner

from loadtests.errors import EXIT_ABORTED, EXIT_PASS, EXIT_SLO_FAILED
from loadtests.gate import (
    Recording, Row, judge, live_breaches, passed, pause_row, pause_summary, percentile, write_pauses,
)
from loadtests.scenarios import ALL_ROUTES, JUDGED_PHASES, SCENARIOS, SLOW_PREFIX, Timeline, phase_at
from loadtests.slo import Slo
from loadtests.users import PinnedWriter, TenantStaff

__all__ = ["PinnedWriter", "TenantStaff"]

ABORT_WINDOW_S = 10.0      # the abort check looks at the last 10 s of requests
AFTER_MIN_S = 3.0          # a run whose event outlasts --duration goes on this long after it
OUTPUT_TAIL = 4000
PLAN_WAIT_S = 600.0        # a worker started before the master's run waits this long for its plan
CUTOVER_SLACK_S = 1.0      # move: a pinned tenant's write pause is the longest gap within 1 s of its commit         # characters of the event command's output kept in the summary


class Run:
    """State of the run in this process (one per Locust process)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.scenario = SCENARIOS[plan["scenario"]]
        self.slo = Slo.from_dict(plan["slo"])
        t = plan["timeline"]
        self.timeline = Timeline(t["durationS"], t["warmupS"], t["steadyS"], self.slo.event_min_s)
        self.recording = Recording()
        self.pending: list[list[Any]] = []      # a worker's samples not yet sent (absolute times)
        self.pending_acks: list[list[Any]] = []  # a worker's pinned-write acknowledgements not yet sent
        self.event_output = ""                    # the event command's whole output (moves: parsed)
        self.start: float | None = None
        self.event: dict[str, Any] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.aborted: dict[str, Any] | None = None
        self.is_worker = False

    def now_s(self) -> float:
        return time.time() - (self.start or time.time())


RUN: Run | None = None


def _options(parser: Any) -> None:
    parser.add_argument("--tf-plan", type=str, default="", help="tenantfleet: the run plan loadtests.run wrote")


def _init(environment: Environment, **_: Any) -> None:
    global RUN
    plan_path = getattr(environment.parsed_options, "tf_plan", "")
    if not plan_path:
        raise SystemExit("loadtests/locustfile.py is started by `tenantfleet loadtest run` (no --tf-plan given)")
    path = Path(plan_path)
    if isinstance(environment.runner, WorkerRunner):
        # a worker started on its own (compose's locust-worker) waits for the master's run to write the plan
        deadline = time.monotonic() + PLAN_WAIT_S
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(1.0)
    RUN = Run(json.loads(path.read_text(encoding="utf-8")))
    RUN.is_worker = isinstance(environment.runner, WorkerRunner)
    plan = RUN.plan
    TenantStaff.configure(plan["targets"]["tenants"], zipf_s=plan["zipfS"], rate_per_user=plan["ratePerUser"],
                          slow_shard=plan.get("slowShard"))
    pinned = set(plan.get("pinned") or [])
    if pinned:
        tenants = [t for t in plan["targets"]["tenants"] if t["code"] in pinned]
        index = getattr(environment.runner, "worker_index", 0) if RUN.is_worker else 0
        PinnedWriter.configure(tenants, rate=float(plan.get("pinnedRate", 20.0)), offset=int(index),
                               stride=max(1, int(plan.get("workers") or 1)) if RUN.is_worker else 1)


def _on_request(request_type: str, name: str, response_time: float, exception: BaseException | None,
                context: dict[str, Any] | None = None, **_: Any) -> None:
    run = RUN
    if run is None:
        return
    if name.startswith(SLOW_PREFIX):
        route = f"{SLOW_PREFIX}{request_type} {name[len(SLOW_PREFIX):]}"
    else:
        route = f"{request_type} {name}"
    pinned = (context or {}).get("pinned")
    if run.is_worker:
        run.pending.append([time.time(), route, float(response_time), exception is None])
        if pinned and exception is None:
            run.pending_acks.append([time.time(), pinned])
    elif run.start is not None:
        run.recording.add(run.now_s(), route, float(response_time), exception is None)
        if pinned and exception is None:
            run.recording.ack(run.now_s(), str(pinned))


def _send(client_id: str, data: dict[str, Any]) -> None:
    run = RUN
    if run is not None and run.pending:
        data["tf_samples"], run.pending = run.pending, []
    if run is not None and run.pending_acks:
        data["tf_acks"], run.pending_acks = run.pending_acks, []


def _receive(client_id: str, data: dict[str, Any]) -> None:
    run = RUN
    if run is None or run.start is None:
        return
    start = run.start
    run.recording.extend([s[0] - start, s[1], s[2], s[3]] for s in data.get("tf_samples", []))
    for t, tenant in data.get("tf_acks", []):
        run.recording.ack(float(t) - start, str(tenant))


def _start(environment: Environment, **_: Any) -> None:
    run = RUN
    if run is None or run.is_worker or run.start is not None:
        return
    run.start = time.time()
    if run.scenario.has_event:
        gevent.spawn(_run_event, run)
    gevent.spawn(_stop, run, environment)
    if run.slo.abort_grace_s > 0:
        gevent.spawn(_watch, run, environment)


def _run_event(run: Run) -> None:
    gevent.sleep(max(0.0, run.timeline.event_at_s - run.now_s()))
    argv = [str(a) for a in run.plan["eventCommand"]]
    run.event = {"command": argv, "startS": run.now_s(), "endS": None, "exitCode": None, "output": ""}
    run.recording.event_start_s = run.event["startS"]
    try:
        run.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        run.event.update(endS=run.now_s(), exitCode=-1, output=f"could not start: {exc}")
        run.recording.event_end_s = run.event["endS"]
        return
    out, err = run.proc.communicate()
    run.event_output = out.decode("utf-8", "replace")     # the command's --json document
    text = (run.event_output + err.decode("utf-8", "replace"))[-OUTPUT_TAIL:]
    run.event.update(endS=run.now_s(), exitCode=run.proc.returncode, output=text)
    run.recording.event_end_s = run.event["endS"]


def _stop(run: Run, environment: Environment) -> None:
    """Quit at ``duration``, or, when the event is still running then, once it has ended (and
    its phase's minimum length and AFTER_MIN_S more have passed). Locust's own ``-t`` is the
    hard bound (duration + the event timeout): an operation still running then is stopped."""
    t = run.timeline
    gevent.sleep(max(0.0, t.duration_s - run.now_s()))
    if run.scenario.has_event:
        while run.recording.event_end_s is None:
            gevent.sleep(0.2)
        end = max(run.recording.event_end_s, t.event_at_s + t.event_min_s) + AFTER_MIN_S
        gevent.sleep(max(0.0, end - run.now_s()))
    assert environment.runner is not None
    environment.runner.quit()


def _watch(run: Run, environment: Environment) -> None:
    """The optional abort (k6's abortOnFail): once a second, the last ABORT_WINDOW_S of
    requests against the current phase's limits; breached for longer than the grace: quit."""
    since: float | None = None
    steady_p95: float | None = None
    while True:
        gevent.sleep(1.0)
        now = run.now_s()
        phase = phase_at(now, run.timeline, run.scenario.has_event, run.recording.event_end_s)
        if phase not in JUDGED_PHASES:
            continue
        if phase != "steady" and steady_p95 is None:
            steady = sorted(ms for t, r, ms, _ in run.recording.samples
                            if run.timeline.warmup_s <= t < run.timeline.event_at_s and not r.startswith(SLOW_PREFIX))
            steady_p95 = percentile(steady, 0.95) if len(steady) >= run.slo.min_samples else None
        window = []
        for sample in reversed(run.recording.samples):
            if sample[0] < now - ABORT_WINDOW_S - 5:   # workers report a few seconds late
                break
            if sample[0] >= now - ABORT_WINDOW_S:
                window.append(sample)
        breaches = live_breaches(window, run.slo.limits_for(phase, ALL_ROUTES), steady_p95, run.slo.min_samples)
        if not breaches:
            since = None
            continue
        since = now if since is None else since
        if now - since > run.slo.abort_grace_s:
            run.aborted = {"atS": now, "phase": phase, "breaches": breaches,
                           "reason": f"{'; '.join(breaches)} in the {phase} phase for over {run.slo.abort_grace_s:g} s"}
            environment.process_exit_code = EXIT_ABORTED
            assert environment.runner is not None
            environment.runner.quit()
            return


def _quit(environment: Environment, **_: Any) -> None:
    run = RUN
    if run is None or run.is_worker:
        return
    if run.proc is not None and run.proc.poll() is None:
        # the run is bounded: an operation still going at the end is stopped (migrations resume)
        run.proc.terminate()
        try:
            run.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            run.proc.kill()
        run.event.update(endS=run.now_s(), exitCode=run.proc.returncode, stoppedAtEnd=True)
        run.recording.event_end_s = run.event["endS"]
    summary = summarize(run, environment)
    out = Path(run.plan["out"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    environment.process_exit_code = summary["exitCode"]


def summarize(run: Run, environment: Environment) -> dict[str, Any]:
    phases = run.recording.by_phase(run.timeline, run.scenario.has_event)
    rows = judge(phases, run.slo)
    if run.scenario.has_event:
        code = run.event.get("exitCode")
        rows.append(Row("event", "-", "operation exit code", None if code is None else float(code), 0.0, 0,
                        "pass" if code == 0 else "FAIL"))
    if run.aborted is not None:
        verdict, exit_code = "aborted", EXIT_ABORTED
    elif passed(rows):
        verdict, exit_code = "pass", EXIT_PASS
    else:
        verdict, exit_code = "fail", EXIT_SLO_FAILED
    pause: dict[str, Any] | None = None
    if run.plan.get("pinned"):
        pause = write_pause(run)
        rows.append(pause_row(pause, run.slo))
        if run.aborted is None and verdict == "pass" and not passed(rows):
            verdict, exit_code = "fail", EXIT_SLO_FAILED
    total = environment.stats.total
    t = run.timeline
    return {
        "scenario": run.scenario.name, "verdict": verdict, "exitCode": exit_code,
        "startedAt": run.start, "users": run.plan["users"], "workers": run.plan["workers"],
        "url": run.plan["targets"]["url"], "tenants": len(run.plan["targets"]["tenants"]),
        "timeline": {"durationS": t.duration_s, "warmupS": t.warmup_s, "steadyS": t.steady_s,
                     "eventAtS": t.event_at_s if run.scenario.has_event else None,
                     "eventMinS": t.event_min_s, "eventEndS": run.recording.event_end_s,
                     "endS": run.now_s()},
        "event": run.event or None, "aborted": run.aborted, "writePause": pause,
        "sloThrottle": run.plan.get("sloThrottle"), "throttle": _operation_record(run, "sloThrottle"),
        "operationCpu": _operation_record(run, "cpuPriority"),
        "rows": [r.to_api() for r in rows],
        "phases": {p: {route: st.summary() for route, st in routes.items()} for p, routes in phases.items() if routes},
        "timeseries": run.recording.timeseries(),
        "slowest": run.recording.slowest(t, run.scenario.has_event),
        "slo": run.slo.to_dict(),
        # Locust's own counters, for comparison (its percentiles are rounded; the gate's are not)
        "locust": {"requests": total.num_requests, "failures": total.num_failures,
                   "p95RoundedMs": total.get_response_time_percentile(0.95) if total.num_requests else None},
        "recordedRequests": len(run.recording.samples),
    }


def _operation_record(run: Run, key: str) -> dict[str, Any] | None:
    """An object from the fleet operation's JSON output (``sloThrottle``: what its SLO
    throttle did; ``cpuPriority``: a drain's moves yielding the CPU or not, and the load
    average that decided it)."""
    try:
        doc = json.loads(run.event_output) if run.event_output else {}
    except ValueError:
        return None
    out = doc.get(key) if isinstance(doc, dict) else None
    return out if isinstance(out, dict) else None


def write_pause(run: Run) -> dict[str, Any]:
    """The pinned tenants' client-side write pause around the event (see `gate.write_pauses`),
    with p50/p99/max, and each tenant's server-side cutover pause from the drain's output."""
    start = run.recording.event_start_s
    end = run.recording.event_end_s
    if start is None:
        return {"n": 0, "tenants": {}}
    run_end = run.now_s()
    by_id = {t["tenantId"]: t["code"] for t in run.plan["targets"]["tenants"]}
    try:
        out = json.loads(run.event_output)
        moves = out.get("moves", [out] if "tenantId" in out else [])  # a drain's or rebalance's; one `move`'s
    except (ValueError, AttributeError):
        moves = []
    moved = {by_id.get(str(m.get("tenantId"))): m for m in (moves if isinstance(moves, list) else [])
             if isinstance(m, dict)}
    pauses: dict[str, dict[str, Any]] = {}
    for code in run.plan["pinned"]:
        m = moved.get(code) or {}
        acks = {code: run.recording.acks.get(code, [])}
        committed = m.get("committedAt")
        if isinstance(committed, (int, float)) and run.start is not None:
            # the gap around the tenant's own commit point (the mover's wall clock, this machine's)
            at = committed - run.start
            p: dict[str, Any] = dict(write_pauses(acks, at - CUTOVER_SLACK_S, at + CUTOVER_SLACK_S, run_end)[code])
            p["window"] = "cutover"
        else:   # no cutover time (the move failed, or an older CLI): the whole event
            p = dict(write_pauses(acks, start, end if end is not None else run_end, run_end)[code])
            p["window"] = "event"
        p.update(moved=(m.get("state") or m.get("phase")) == "done", mode=m.get("mode"), serverPauseMs=m.get("pauseMs"))
        pauses[code] = p
    return {**pause_summary(pauses), "tenants": pauses}


# Registered here rather than by decorator (an untyped decorator would untype each function).
events.init_command_line_parser.add_listener(_options)
events.init.add_listener(_init)
events.request.add_listener(_on_request)
events.report_to_master.add_listener(_send)
events.worker_report.add_listener(_receive)
events.test_start.add_listener(_start)
events.quitting.add_listener(_quit)
