"""Sides that take turns step by step: each in its own thread, one optimizer step per turn.

Alternating whole runs leaves a few seconds between the sides' measurements, and on a shared
two-core machine a side's median over five runs still moves by 10-20 % from one bench run to the
next, more than the differences a step-overhead bench is after. Here the sides run in lockstep:
side A takes step 1, then B its step 1, then C, then B step 2 (the order rotates every round, so
no side always follows the same one), and so on; only the side holding the turn runs, the others
wait on a condition (no CPU). A step's time is read on the side's own turn, from its start to the
side's tick at the step's end, so the i-th steps of the sides are measured within a second of each
other and their ratio pairs them: a busy moment of the machine lands on neighbouring steps alike.

Torch's process-wide switches that a side may set for itself (deterministic algorithms and the
NaN-filling of fresh memory, which the engine sets while it runs) are saved at the end of each
turn and given back at the start of that side's next one, so no side runs under another's.

Not a bench script itself (the leading underscore): bench/step_overhead.py uses it.
"""
from __future__ import annotations

import random
import statistics
import threading
import time
from typing import Callable


def _torch_switches() -> tuple[bool, bool, bool]:
    import torch
    import torch.utils.deterministic as det

    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            det.fill_uninitialized_memory)


def _set_torch_switches(state: tuple[bool, bool, bool]) -> None:
    import torch
    import torch.utils.deterministic as det

    on, warn_only, fill = state
    torch.use_deterministic_algorithms(on, warn_only=warn_only)
    det.fill_uninitialized_memory = fill


class Lockstep:
    """Turns for `names`, one step each per round, the round's order rotating by one each time.

    A side's thread calls `start(name)` before its work, `tick(name)` at the end of every step
    and `stop(name)` when it is done (also on an error, so the others never wait for it).
    `times[name][i]` is the `clock` seconds of its turn ending at its (i + 1)-th tick."""

    def __init__(self, names: list[str], clock: Callable[[], float] = time.process_time):
        self.names = list(names)
        self.clock = clock
        self.times: dict[str, list[float]] = {n: [] for n in self.names}
        self._cond = threading.Condition()
        self._live = list(self.names)
        self._queue = list(self.names)  # who takes a turn in this round, in order
        self._round = 0
        initial = _torch_switches()
        self._switches = {n: initial for n in self.names}
        self._began: dict[str, float] = {}

    def _await_turn(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._queue[:1] == [name])
        _set_torch_switches(self._switches[name])
        self._began[name] = self.clock()

    def _pass_turn(self, name: str, leaving: bool = False) -> None:
        self._switches[name] = _torch_switches()
        with self._cond:
            if self._queue[:1] == [name]:
                self._queue.pop(0)
            if leaving:
                self._live.remove(name)
                if name in self._queue:
                    self._queue.remove(name)
            if not self._queue and self._live:  # a new round, its order rotated by one
                self._round += 1
                k = self._round % len(self._live)
                self._queue = self._live[k:] + self._live[:k]
            self._cond.notify_all()

    def start(self, name: str) -> None:
        self._await_turn(name)

    def tick(self, name: str) -> None:
        self.times[name].append(self.clock() - self._began[name])
        self._pass_turn(name)
        self._await_turn(name)

    def stop(self, name: str) -> None:
        self._pass_turn(name, leaving=True)

    def run(self, sides: dict[str, Callable[[Callable[[], None]], object]]) -> dict[str, object]:
        """Run each side, `side(tick)`, in its own thread, in lockstep; return what each returned.
        An error in any side is raised here after every thread has ended."""
        results: dict[str, object] = {}
        errors: dict[str, BaseException] = {}

        def body(name: str) -> None:
            try:
                self.start(name)
                results[name] = sides[name](lambda: self.tick(name))
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                errors[name] = e
            finally:
                self.stop(name)

        threads = [threading.Thread(target=body, args=(n,), name=f"lockstep-{n}") for n in self.names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            name, err = next(iter(errors.items()))
            raise RuntimeError(f"side {name} failed in lockstep: {err}") from err
        return results


def paired_ratios(times: dict[str, list[float]], num: str, den: str, skip: int = 1) -> list[float]:
    """Step by step, num's i-th step time over den's i-th (the first `skip` steps left out: they
    load the model and set up)."""
    a, b = times[num][skip:], times[den][skip:]
    return [x / y for x, y in zip(a, b) if y > 0]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_interval(values: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval of the median (percentile method, a fixed seed so a report can be
    checked): how far the median of this many noisy steps can be trusted."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * (resamples - 1))]
    hi = meds[int((1 + level) / 2 * (resamples - 1))]
    return lo, hi
