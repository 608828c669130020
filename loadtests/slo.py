"""The SLO file (TOML): which limits a run is judged against.

::

    [run]                        # how the gate runs (all optional)
    min_samples = 20             # a percentile from fewer requests gets no verdict ("few")
    abort_grace_s = 0            # > 0: a limit breached longer than this stops the run (exit 4)
    event_min_s = 5              # the event phase lasts at least this long
    confidence = 0.95            # a p95 ratio fails only when its breach is real at this confidence
                                 # (0: judge the ratio itself; see loadtests/gate.py)

    [limits]                     # every route, in every judged phase (steady, event, after)
    p95_ms = 500
    p99_ms = 1000
    error_ratio = 0.001

    [phases.event]               # one phase's overrides (steady, event, after)
    p95_ratio_to_steady = 1.25   # this phase's p95 over the steady phase's p95, same route, same run

    [routes."GET /items"]        # one route's overrides, in every phase
    p95_ms = 300

Routes are ``GET /items``, ``GET /items/{id}``, ``POST /items``, ``PATCH /items/{id}``,
``GET /manifest`` and ``all routes`` (every request of the phase together). The more
specific table wins: route over phase over ``[limits]``. ``write_pause_p99_ms`` (the
client-side write pause of tenants being moved) is read for the ``move`` scenario.

`load_slo` refuses an unknown table or key, a value of the wrong type or out of range,
an unknown phase or route, naming it (`LoadtestError` VALIDATION_FAILED).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from loadtests.errors import LoadtestError
from loadtests.scenarios import ALL_ROUTES, JUDGED_PHASES, ROUTES

DEFAULT_SLO = Path(__file__).resolve().parent / "slo" / "default.toml"

# limit key -> (lowest allowed, highest allowed); every limit is a number
LIMIT_KEYS: dict[str, tuple[float, float]] = {
    "p95_ms": (0.0, 3_600_000.0),
    "p99_ms": (0.0, 3_600_000.0),
    "error_ratio": (0.0, 1.0),
    "p95_ratio_to_steady": (0.0, 1000.0),
    "write_pause_p99_ms": (0.0, 3_600_000.0),
}
RUN_KEYS: dict[str, tuple[type, float, float]] = {
    "min_samples": (int, 1, 1_000_000),
    "abort_grace_s": (float, 0, 3600),
    "event_min_s": (float, 0, 3600),
    "confidence": (float, 0, 0.999),
}
ROUTE_NAMES = (*ROUTES, ALL_ROUTES)


@dataclass(frozen=True)
class Slo:
    min_samples: int = 20
    abort_grace_s: float = 0.0
    event_min_s: float = 5.0
    confidence: float = 0.95
    limits: Mapping[str, float] = field(default_factory=dict)
    phases: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    routes: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    source: str = ""

    def limits_for(self, phase: str, route: str) -> dict[str, float]:
        """The limits that hold for ``route`` in ``phase`` (route over phase over defaults)."""
        out = dict(self.limits)
        out.update(self.phases.get(phase, {}))
        out.update(self.routes.get(route, {}))
        if phase == "steady":
            out.pop("p95_ratio_to_steady", None)  # the steady phase is the base of the ratio
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"run": {"min_samples": self.min_samples, "abort_grace_s": self.abort_grace_s,
                        "event_min_s": self.event_min_s, "confidence": self.confidence},
                "limits": dict(self.limits), "phases": {k: dict(v) for k, v in self.phases.items()},
                "routes": {k: dict(v) for k, v in self.routes.items()}, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Slo":
        """The inverse of `to_dict` (for the plan the runner hands to Locust); validated again."""
        doc = {"run": data["run"], "limits": data["limits"], "phases": data["phases"], "routes": data["routes"]}
        return parse_slo(doc, str(data.get("source", "")))


def _bad(where: str, message: str) -> LoadtestError:
    return LoadtestError("VALIDATION_FAILED", f"SLO file {where}: {message}")


def _table(doc: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise _bad(where, f"[{key}] must be a table, not {type(value).__name__}")
    return value


def _limits(table: Mapping[str, Any], where: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in table.items():
        if key not in LIMIT_KEYS:
            raise _bad(where, f"unknown key {key!r} in [{name}] (known: {', '.join(LIMIT_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, f"{name}.{key} must be a number, not {type(value).__name__} ({value!r})")
        lo, hi = LIMIT_KEYS[key]
        if not lo <= value <= hi:
            raise _bad(where, f"{name}.{key} must be between {lo:g} and {hi:g}, not {value!r}")
        out[key] = float(value)
    return out


def parse_slo(doc: Mapping[str, Any], where: str) -> Slo:
    """Validate a parsed SLO document (see the module docstring); VALIDATION_FAILED names what is wrong."""
    unknown = set(doc) - {"run", "limits", "phases", "routes"}
    if unknown:
        raise _bad(where, f"unknown table(s) {', '.join(sorted(unknown))} (known: run, limits, phases, routes)")
    run: dict[str, Any] = {}
    for key, value in _table(doc, "run", where).items():
        if key not in RUN_KEYS:
            raise _bad(where, f"unknown key {key!r} in [run] (known: {', '.join(RUN_KEYS)})")
        kind, lo, hi = RUN_KEYS[key]
        ok = not isinstance(value, bool) and (isinstance(value, int) if kind is int else isinstance(value, (int, float)))
        if not ok:
            raise _bad(where, f"run.{key} must be {'an integer' if kind is int else 'a number'}, "
                              f"not {type(value).__name__} ({value!r})")
        if not lo <= value <= hi:
            raise _bad(where, f"run.{key} must be between {lo:g} and {hi:g}, not {value!r}")
        run[key] = kind(value)
    limits = _limits(_table(doc, "limits", where), where, "limits")
    phases: dict[str, dict[str, float]] = {}
    for phase, table in _table(doc, "phases", where).items():
        if phase not in JUDGED_PHASES:
            raise _bad(where, f"unknown phase {phase!r} in [phases] (judged phases: {', '.join(JUDGED_PHASES)})")
        if not isinstance(table, dict):
            raise _bad(where, f"[phases.{phase}] must be a table")
        phases[phase] = _limits(table, where, f"phases.{phase}")
    routes: dict[str, dict[str, float]] = {}
    for route, table in _table(doc, "routes", where).items():
        if route not in ROUTE_NAMES:
            raise _bad(where, f"unknown route {route!r} in [routes] (known: {', '.join(ROUTE_NAMES)})")
        if not isinstance(table, dict):
            raise _bad(where, f'[routes."{route}"] must be a table')
        routes[route] = _limits(table, where, f'routes."{route}"')
    return Slo(limits=limits, phases=phases, routes=routes, source=where, **run)


def load_slo(path: Path | None) -> Slo:
    """Read and validate the SLO file at ``path`` (default: loadtests/slo/default.toml)."""
    path = path or DEFAULT_SLO
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadtestError("VALIDATION_FAILED", f"SLO file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadtestError("VALIDATION_FAILED", f"SLO file {path}: can't be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise LoadtestError("VALIDATION_FAILED", f"SLO file {path}: not TOML ({exc})") from None
    return parse_slo(doc, str(path))
