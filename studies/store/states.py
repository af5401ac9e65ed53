"""The states a study, a run and a cell can be in, and the sets every reader derives from them.

Stored as their string values (the columns are plain text, so a store stays readable by any SQL
client); a member compares equal to its value, so rows read back compare with the enums directly.
"""
from __future__ import annotations

from enum import Enum


class _State(str, Enum):
    """A str-valued enum that prints as its value (like 3.11's StrEnum, on 3.10 too)."""

    __str__ = str.__str__
    __format__ = str.__format__


class StudyState(_State):
    CREATED = "created"  # made, never started
    RUNNING = "running"  # hands out runs (a pool serves it: `unlearn study run` or `unlearn worker`)
    PAUSED = "paused"  # hands out nothing new; running runs finish
    CANCELLED = "cancelled"  # stopped for good; written cells stay
    DONE = "done"  # every run finished (done, diverged or failed)


class RunState(_State):
    PENDING = "pending"  # waiting for a worker slot
    ASKING = "asking"  # TPE: a budget slot reserved while the sampler picks (method, lr); not a run yet
    RUNNING = "running"
    DONE = "done"
    DIVERGED = "diverged"  # stopped by a non-finite loss or the perplexity bound; its later cells are diverged
    FAILED = "failed"  # every attempt died
    CANCELLED = "cancelled"


class CellStatus(_State):
    """One (method, lr, steps) point of a study's grid."""

    DONE = "done"  # evaluated, not diverged: a cell that can win
    DIVERGED = "diverged"
    RUNNING = "running"
    PENDING = "pending"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A worker slot is taken, or will be, by a run in one of these.
ACTIVE_RUN_STATES = frozenset({RunState.PENDING, RunState.ASKING, RunState.RUNNING})
# Runs that are real (method, lr) points: everything but a TPE reservation.
REAL_RUN_STATES = frozenset(set(RunState) - {RunState.ASKING})
# A study in one of these hands out no run.
IDLE_STUDY_STATES = frozenset({StudyState.CREATED, StudyState.CANCELLED, StudyState.DONE})
