"""The suite's guard against unhandled event-loop errors sees them (tests/conftest.py)."""
from __future__ import annotations

import asyncio

from tests.conftest import loop_errors


def test_a_dropped_task_that_failed_is_seen() -> None:
    loop = asyncio.new_event_loop()
    try:
        with loop_errors(loop) as seen:
            async def boom() -> None:
                raise RuntimeError("nobody awaits me")

            async def main() -> None:
                task = asyncio.ensure_future(boom())
                await asyncio.wait([task])  # finished, its exception never retrieved
                del task

            loop.run_until_complete(main())
    finally:
        loop.close()
    assert [type(c.get("exception")) for c in seen] == [RuntimeError]


def test_a_failing_callback_is_seen() -> None:
    loop = asyncio.new_event_loop()
    try:
        with loop_errors(loop) as seen:
            loop.call_soon(lambda: 1 / 0)
            loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert [type(c.get("exception")) for c in seen] == [ZeroDivisionError]
