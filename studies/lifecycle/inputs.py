"""What a user types to define a study, parsed once for both faces: the CLI's flags (`unlearn study
create`, `unlearn study run`, `unlearn run`) and the app's new-study form call these same functions,
so both accept the same forms and say the same thing when one is wrong.

Learning rates (`--lr`, `--lr-range`, the form's "learning rates" field), one grammar:
  1e-5,3e-5          a list: the grid sampler runs each
  1e-5..1e-3 x4      N values spaced evenly in log between the ends (both included): a list too
  1e-5:1e-3          a range (`1e-5..1e-3` is the same): the TPE sampler draws from it log-uniformly
A range means TPE (`study_sampler`); a list with `--sampler tpe` is an error.

Milestones (`--steps`): comma-separated positive step counts. Devices (`--gpus`, `--workers`, the
form's GPU ticks and CPU workers): one pool slot per GPU, else N CPU slots. Run settings (the
form's advanced section): a field's text converted the way its CLI flag converts it.

Each error is one line (UnlearnError) that names the input by `label`: the flag on the CLI, the
field's name in the app. Headless and torch-free: the app's process imports this module.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from engine.errors import UnlearnError

# Declared here, and spec.py imports it: the CLI's light path (tui/cli/common.py) imports this
# module, and spec.py would load every method.
SAMPLERS = ("grid", "tpe")
LR_FORMS = "a list 1e-5,3e-5 or 1e-5..1e-3 x4 (grid), or a range 1e-5:1e-3 (tpe)"
MAX_SPACED = 100  # `LOW..HIGH xN`: more values than this is a typo, not a grid

# LOW..HIGH or LOW:HIGH, then an optional `xN` (or `×N`). LOW is the shortest text before the
# first `..` or `:`, so a decimal point in it stays in it (`1.5e-5..1e-3`); HIGH stops before an
# `x`, so `1e-3x4` needs no space. A list has neither separator and does not match.
_RANGE = re.compile(r"^\s*(?P<lo>[^:\s]+?)\s*(?:\.\.|:)\s*(?P<hi>[^:\sxX×]+)\s*(?:[xX×]\s*(?P<n>\S+))?\s*$")


@dataclass(frozen=True)
class StudyOption:
    """A `study create` option that is the study's own, not a RunSettings field: the CLI's flag
    (tui/cli/study.py) and the app's field (the new-study form's advanced section) are built from it."""

    name: str  # create_study's keyword
    flag: str
    help: str
    default: object  # create_study's default
    choices: tuple[str, ...] = ()
    parse: Optional[Callable[[str, str], object]] = None  # typed text, flag -> value (None: parse_count)
    default_text: str = ""  # what a blank field means, where the default says nothing (None)


def parse_seeds(text: str | None, label: str = "--seeds") -> tuple[int, ...] | None:
    """`0,1,2` -> (0, 1, 2): the seeds every cell of a grid study runs under; blank: None (--seed)."""
    if text is None or not str(text).strip():
        return None
    try:
        seeds = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise UnlearnError(f"{label} takes whole numbers separated by commas, e.g. 0,1,2, not {str(text).strip()!r}") from None
    if not seeds or any(x < 0 for x in seeds):
        raise UnlearnError(f"{label} takes whole numbers of 0 or more, e.g. 0,1,2")
    return seeds


STUDY_OPTIONS = (
    StudyOption("max_attempts", "--max-attempts", "attempts per run before it is failed", 2),
    StudyOption("trust_remote_code", "--trust-remote-code", "allow the model repo's own Python code", False),
    StudyOption("gpus_per_run", "--gpus-per-run", "devices one run takes (N processes under accelerate launch, data "
                "parallel: each holds the whole model and trains 1/N of every batch)", 1),
    StudyOption("eval_tasks_at", "--eval-tasks-at", "best: the --eval-tasks (lm-eval) at each method's best cell, once "
                "the runs are done; every: at every cell, with the runs", "best", ("best", "every")),
    StudyOption("seeds", "--seeds", "run every cell under each of these seeds (e.g. 0,1,2): a cell is then their mean "
                "with a 95 % interval, and succeeds only if the interval is inside the band", None,
                parse=parse_seeds, default_text="one seed (--seed)"),
)


@dataclass(frozen=True)
class LearningRates:
    """A grid's list (`values`) or TPE's log-uniform range (`low`, `high`): exactly one of them."""

    values: tuple[float, ...] | None = None
    low: float | None = None
    high: float | None = None

    @property
    def range(self) -> tuple[float, float] | None:
        return (self.low, self.high) if self.low is not None else None


def parse_learning_rate(text: str, label: str = "--lr") -> float:
    """One positive, finite learning rate (`unlearn run --lr`)."""
    try:
        x = float(text)
    except (TypeError, ValueError):
        raise UnlearnError(f"{label} {str(text).strip()!r} is not a number") from None
    if not (math.isfinite(x) and x > 0):
        raise UnlearnError(f"{label} {str(text).strip()!r} must be a positive number")
    return x


def parse_learning_rates(text: str, label: str = "learning rate") -> LearningRates:
    """Any of the module's learning-rate forms → a list or a range."""
    text = (text or "").strip()
    if not text:
        raise UnlearnError(f"give learning rates: {LR_FORMS}")
    m = _RANGE.match(text)
    if m is None:
        values = tuple(parse_learning_rate(x, label) for x in text.split(",") if x.strip())
        if not values:
            raise UnlearnError(f"{label} {text!r}: no number in it; give {LR_FORMS}")
        return LearningRates(values=values)
    lo, hi = parse_learning_rate(m["lo"], label), parse_learning_rate(m["hi"], label)
    if not lo < hi:
        raise UnlearnError(f"{label} {text!r}: the low end must be below the high end")
    if m["n"] is None:
        return LearningRates(low=lo, high=hi)
    return LearningRates(values=log_spaced(lo, hi, m["n"], f"{label} {text!r}"))


def log_spaced(lo: float, hi: float, count: str, where: str) -> tuple[float, ...]:
    """`count` values evenly spaced in log from lo to hi, rounded to 3 significant digits (what a
    person would type) except the ends, which stay exactly as given."""
    try:
        n = int(count)
    except ValueError:
        raise UnlearnError(f"{where}: xN takes a whole number, not {count!r}") from None
    if not 2 <= n <= MAX_SPACED:
        raise UnlearnError(f"{where}: xN takes 2 to {MAX_SPACED} values")
    step = (math.log10(hi) - math.log10(lo)) / (n - 1)
    values = [float(f"{10 ** (math.log10(lo) + i * step):.3g}") for i in range(n)]
    values[0], values[-1] = lo, hi
    return tuple(values)


@dataclass(frozen=True)
class SearchSpace:
    """The sampler and its learning rates, as `create_study` takes them (lrs for grid, lr_range for tpe)."""

    sampler: str
    lrs: list[float] | None
    lr_range: tuple[float, float] | None


def study_sampler(rates: LearningRates | None, asked: str | None) -> str:
    """The one rule: a range is sampled, so it means TPE (also over the CLI's default `--sampler
    grid`); a list is a grid, and asking TPE for one is an error. No rates: what was asked."""
    asked = (asked or "grid").strip()
    if asked not in SAMPLERS:
        raise UnlearnError(f"--sampler must be one of {', '.join(SAMPLERS)}, not {asked!r}")
    if rates is None:
        return asked
    if rates.range is not None:
        return "tpe"
    if asked == "tpe":
        raise UnlearnError("the tpe sampler draws learning rates from a range: give LOW:HIGH (or LOW..HIGH), "
                           "e.g. 1e-5:1e-3, not a list")
    return "grid"


def search_space(lr: str | None, lr_range: str | None = None, sampler: str | None = None,
                 lr_label: str = "--lr", range_label: str = "--lr-range", required: bool = False) -> SearchSpace:
    """`--lr`, `--lr-range` and `--sampler` (the app: its one field as `lr`, its sampler choice) →
    what `create_study` takes. `--lr-range` is the range form by its older name. Neither given: an
    error if `required` (the app's field), else left to the spec, which says what its sampler needs."""
    lr, lr_range = (lr or "").strip(), (lr_range or "").strip()
    if required and not (lr or lr_range):
        raise UnlearnError(f"give learning rates: {LR_FORMS}")
    if lr and lr_range:
        raise UnlearnError(f"give {lr_label} (grid) or {range_label} (tpe), not both")
    rates = None
    if lr:
        rates = parse_learning_rates(lr, lr_label)
    elif lr_range:
        # `--lr-range LOW,HIGH` was read as LOW:HIGH before the grammar was shared, and still is
        rates = parse_learning_rates(lr_range.replace(",", ":") if "," in lr_range else lr_range, range_label)
        if rates.range is None:
            raise UnlearnError(f"{range_label} takes LOW:HIGH (or LOW..HIGH), not {lr_range!r}")
    chosen = study_sampler(rates, sampler)
    return SearchSpace(chosen, list(rates.values) if rates and rates.values else None, rates.range if rates else None)


def parse_milestones(text: str, label: str = "--steps") -> list[int]:
    """`5,10,20,40` → sorted unique positive step counts."""
    try:
        steps = [int(s) for s in (text or "").split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or any(s <= 0 for s in steps):
        raise UnlearnError(f"{label} must be comma-separated positive integers, not {text!r}")
    return sorted(set(steps))


def parse_count(text: str | int | None, label: str, minimum: int = 1) -> int | None:
    """A whole number of at least `minimum` typed in a field (`--trials`, CPU workers); blank: None."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    try:
        n = int(text)
    except ValueError:
        raise UnlearnError(f"{label} must be a whole number, not {str(text).strip()!r}") from None
    if n < minimum:
        raise UnlearnError(f"{label} must be at least {minimum}")
    return n


def device_slots(gpus: str | Iterable[int] | None, workers: str | int | None,
                 visible_gpus: Callable[[], int] | None = None,
                 gpus_label: str = "--gpus", workers_label: str = "--workers") -> list[str]:
    """The worker pool's slots: one per GPU given (`0,1` or indices, in the order given: `0,0` is two
    workers on GPU 0), else `workers` CPU slots, else one per GPU `visible_gpus()` counts (the CLI
    asks torch; the app never does, so it must say) or one CPU slot when there is none."""
    if isinstance(gpus, str):
        try:
            ids = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise UnlearnError(f"{gpus_label} takes comma-separated GPU indices, not {gpus!r}") from None
    else:
        ids = list(gpus or ())
    if ids:
        return [f"cuda:{i}" for i in ids]
    count = parse_count(workers, workers_label)
    if count is not None:
        return ["cpu"] * count
    if visible_gpus is None:
        raise UnlearnError(f"choose a GPU or give {workers_label} (at least 1)")
    return [f"cuda:{i}" for i in range(visible_gpus())] or ["cpu"]


def setting_type(field) -> type:
    """A RunSettings field's value type as its flag takes it: int, str or bool, else float (the
    Optional[float] fields among them). The CLI's options and the app's advanced fields use this."""
    name = field.type if isinstance(field.type, str) else field.type.__name__
    return {"int": int, "str": str, "bool": bool}.get(name, float)


def setting_default_text(field) -> str:
    """What a RunSettings field is when not given, in words: the CLI's `[default: ...]` and the
    app's placeholder."""
    if field.default is None:
        return field.metadata.get("default_text") or "the method's own"
    return "none" if field.default == "" else repr(field.default)


def setting_value(field, text: str | bool | None):
    """A RunSettings field's typed value → what its CLI flag hands `create_study`: int and float
    fields converted as click converts them (int(), float()), text as typed, a ticked box True.
    Blank (or an unticked box) is None: not given, so the default applies as when the flag is left
    out (seq_len: the forget set's). Checking the value is RunSettings.validate's job, as on the CLI."""
    flag, kind = field.metadata["flag"], setting_type(field)
    if isinstance(text, bool) or text is None:
        return True if text else None
    if not text.strip():
        return None
    if kind is bool:
        raise UnlearnError(f"{flag} is on or off, not {text!r}")
    if kind is str:
        return text
    what = "an integer" if kind is int else "a number"
    try:
        return kind(text.strip())
    except ValueError:
        raise UnlearnError(f"{flag} must be {what}, not {text.strip()!r}") from None
