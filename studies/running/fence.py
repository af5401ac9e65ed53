"""Fencing a run's attempts: every write about a run names the attempt that makes it, and lands only
while that attempt still owns the run (the run is running and its attempt counter is that attempt's).

Why: a pool that reaps a run (its heartbeat looked stale) hands it out again as attempt N + 1 while
attempt N's process may still be alive somewhere. Without a fence, attempt N's late writes would
finish, fail or record cells of a run that attempt N + 1 now runs. With it, attempt N's writes change
nothing, and the first one that finds the run gone (a heartbeat) stops attempt N's process."""
from __future__ import annotations

from studies.store.db import Run
from studies.store.states import RunState


class RunLost(RuntimeError):
    """This attempt no longer owns its run: another attempt, a pool's settle or a cancel took it."""

    def __init__(self, run_id: int, attempt: int, what: str = "") -> None:
        super().__init__(f"attempt {attempt} of run {run_id} no longer owns it" + (f" ({what})" if what else ""))
        self.run_id, self.attempt = run_id, attempt


def owned_by(run_id: int, attempt: int) -> tuple:
    """The WHERE clause of a write that attempt `attempt` of run `run_id` may make."""
    return (Run.id == run_id, Run.state == RunState.RUNNING, Run.attempts == attempt)


def owns(run: Run | None, attempt: int) -> bool:
    """The same test on a row read inside the writing transaction."""
    return run is not None and run.state == RunState.RUNNING and run.attempts == attempt
