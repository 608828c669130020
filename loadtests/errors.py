"""The one error type of the load-test runner: bad input found before any load is sent.

`LoadtestError` carries a code like the fleet's error envelope (``VALIDATION_FAILED``,
``UNREACHABLE``, ``NOT_AVAILABLE`` ...); `loadtests.run` prints it as one line
``error: CODE: message`` and exits with its exit code (2 for bad input, like the CLI).
"""
from __future__ import annotations

# Exit codes of `loadtests.run` (and so of `tenantfleet loadtest run`).
EXIT_PASS = 0
EXIT_ERROR = 1          # the run itself broke (Locust crashed, no summary written)
EXIT_BAD_INPUT = 2      # refused before any load: bad SLO file, scenario, targets, URL
EXIT_SLO_FAILED = 3     # the run finished and at least one limit failed
EXIT_ABORTED = 4        # a limit stayed breached past the SLO's abort grace: stopped early


class LoadtestError(Exception):
    """Refused before any load is sent; ``code`` names the kind, ``message`` what and where."""

    def __init__(self, code: str, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.exit_code = exit_code
