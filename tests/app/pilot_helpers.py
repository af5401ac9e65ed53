"""Waiting on a Textual app under Pilot: the one polling loop the app tests share."""
from __future__ import annotations

import time


async def wait_until(pilot, predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    """Let the app run until `predicate()` is true; fail the test (naming `what` and the screen) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(interval)
        if predicate():
            return
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; screen {pilot.app.screen!r}")
