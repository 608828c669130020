"""Runs many `tenantfleet` command lines in one process (for tests/test_cli_errors.py).

Reads a JSON list of argv lists on stdin; writes, for each, ``{argv, code, stdout, stderr,
raised}`` as one JSON list on stdout. ``raised`` is the traceback of anything `main` let
escape (what a user would see as a traceback), else null.
"""
from __future__ import annotations

import contextlib
import io
import sys
import traceback

import orjson

from host.cli import main


def run_one(argv: list[str]) -> dict[str, object]:
    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    raised = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if exc.code is not None else 0
        except BaseException:  # anything else would reach the user as a traceback
            raised = traceback.format_exc()
            code = None
    return {"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "raised": raised}


if __name__ == "__main__":
    cases = orjson.loads(sys.stdin.buffer.read())
    results = [run_one(argv) for argv in cases]
    sys.stdout.buffer.write(orjson.dumps(results))
