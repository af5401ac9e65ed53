"""Starting a study from a form: the values a user types (learning rates, milestones, devices)
parsed into what `create_study` takes, and the detached scheduler that `unlearn study run
--detach` starts, so the app and the CLI launch a study the same way."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UnlearnError
from studies.store.db import Store

_RANGE = re.compile(r"^\s*(?P<lo>[^.\s][^\s]*?)\s*\.\.\s*(?P<hi>[^\sxX]+)\s*(?:[xX×]\s*(?P<n>\S+))?\s*$")


@dataclass(frozen=True)
class LearningRates:
    """A grid's list (`values`) or TPE's log-uniform range (`low`, `high`)."""

    values: tuple[float, ...] | None = None
    low: float | None = None
    high: float | None = None

    @property
    def range(self) -> tuple[float, float] | None:
        return (self.low, self.high) if self.low is not None else None


def parse_learning_rates(text: str) -> LearningRates:
    """`1e-5,3e-5` → those values; `1e-5..1e-3 x4` → 4 values spaced evenly in log between the ends
    (both included); `1e-5..1e-3` → the range itself (for TPE). Raises UnlearnError (one line)."""
    text = (text or "").strip()
    if not text:
        raise UnlearnError("give learning rates: a list like 1e-5,3e-5 or a range like 1e-5..1e-3 x4")
    m = _RANGE.match(text)
    if m:
        lo, hi = _positive(m["lo"]), _positive(m["hi"])
        if not lo < hi:
            raise UnlearnError(f"learning-rate range {text!r}: the low end must be below the high end")
        if m["n"] is None:
            return LearningRates(low=lo, high=hi)
        try:
            n = int(m["n"])
        except ValueError:
            raise UnlearnError(f"learning-rate range {text!r}: xN takes a whole number, not {m['n']!r}") from None
        if not 2 <= n <= 100:
            raise UnlearnError(f"learning-rate range {text!r}: xN takes 2 to 100 values")
        step = (math.log10(hi) - math.log10(lo)) / (n - 1)
        values = [float(f"{10 ** (math.log10(lo) + i * step):.3g}") for i in range(n)]
        values[0], values[-1] = lo, hi
        return LearningRates(values=tuple(values))
    values = tuple(_positive(x) for x in text.split(",") if x.strip())
    if not values:
        raise UnlearnError(f"learning rates {text!r}: no number in it")
    return LearningRates(values=values)


def _positive(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise UnlearnError(f"learning rate {text.strip()!r} is not a number") from None
    if not (math.isfinite(x) and x > 0):
        raise UnlearnError(f"learning rate {text.strip()!r} must be a positive number")
    return x


def parse_milestones(text: str) -> list[int]:
    """`5,10,20,40` → sorted unique positive step counts. Raises UnlearnError (one line)."""
    try:
        steps = [int(s) for s in (text or "").split(",") if s.strip()]
    except ValueError:
        raise UnlearnError(f"steps must be comma-separated positive integers, not {text!r}") from None
    if not steps or any(s <= 0 for s in steps):
        raise UnlearnError(f"steps must be comma-separated positive integers, not {text!r}")
    return sorted(set(steps))


def device_slots(gpu_indices: list[int], cpu_workers: int | None) -> list[str]:
    """The scheduler's slots: one per chosen GPU, else `cpu_workers` CPU slots. Never asks torch
    what is visible (the app may not import it): the caller says."""
    if gpu_indices:
        return [f"cuda:{i}" for i in sorted(set(gpu_indices))]
    if cpu_workers is None or cpu_workers < 1:
        raise UnlearnError("choose a GPU or at least 1 CPU worker")
    return ["cpu"] * cpu_workers


def launch_detached(store: Store, name: str, slots: list[str], retry_failed: bool = True) -> tuple[str, int | None, Path | None]:
    """What `unlearn study run NAME --detach` does: hand the study's runs out again, then start the
    scheduler in its own session (it outlives the terminal). Returns (one line for the user, the
    scheduler's pid, its log); pid and log are None when there was nothing to run."""
    from studies.running.pool import detach
    from studies.lifecycle.study import resume_study

    resumed = resume_study(store, name, retry_failed=retry_failed)
    if not resumed.running:
        return resumed.message, None, None
    pid, log = detach(store, name, slots)
    return (f"scheduler pid {pid} runs study {name} on {', '.join(slots)}; log {log}. "
            f"Follow it: unlearn study status {name}"), pid, log
