"""A study: model + forget set + methods + search space (lr × steps) + sampler + budget, and the
run settings every run of it shares (`engine.config.RunSettings`, the one place they are declared).

The spec is stored whole (JSON) with the study, so a worker on any node rebuilds exactly the
RunConfig of every run from the store alone. Torch-free: every read of a study goes through here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from engine.config import RunConfig, RunSettings
from engine.errors import UnlearnError
from engine.methods import get_method
from studies.lifecycle.inputs import SAMPLERS

ATTACKS_AT = ("every", "best")  # where a study's --attacks run: at every cell, or at each method's best cell


def parse_knob_options(options: list[str] | None) -> dict | None:
    """`--param beta=0.05,0.1 --param retain_weight=2` -> {"beta": [0.05, 0.1], "retain_weight": [2.0]};
    a range for TPE, `--param beta=0.01:1:log` (or LOW:HIGH, uniform) -> {"beta": {"low", "high", "log"}}."""
    if not options:
        return None
    out: dict = {}
    for opt in options:
        name, eq, values = opt.partition("=")
        name = name.strip()
        if name in out:
            raise UnlearnError(f"--param {name} is given twice")
        if ":" in values:
            parts = [v.strip() for v in values.split(":")]
            log = len(parts) == 3 and parts[2] == "log"
            try:
                lo, hi = (float(v) for v in parts[:2]) if len(parts) in (2, 3) and (len(parts) == 2 or log) else (None, None)
            except ValueError:
                lo = hi = None
            if not eq or not name or lo is None:
                raise UnlearnError(f"--param {opt}: a range is NAME=LOW:HIGH or NAME=LOW:HIGH:log, e.g. --param beta=0.01:1:log")
            out[name] = {"low": lo, "high": hi, "log": log}
            continue
        try:
            nums = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            nums = []
        if not eq or not name or not nums:
            raise UnlearnError(f"--param {opt}: give NAME=V1,V2,... with numbers, e.g. --param beta=0.05,0.1")
        out[name] = nums
    return out


def check_knob_ranges(ranges: dict | None) -> dict | None:
    """TPE's knob ranges {name: {"low", "high", "log"}}, checked; None when there is none."""
    if not ranges:
        return None
    out = {}
    for name, r in ranges.items():
        lo, hi, log = r.get("low"), r.get("high"), bool(r.get("log", False))
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in (lo, hi)) or not lo < hi:
            raise UnlearnError(f"--param {name}: a range must be LOW:HIGH with LOW < HIGH, not {lo}:{hi}")
        if log and lo <= 0:
            raise UnlearnError(f"--param {name}: a log range needs LOW > 0")
        out[str(name)] = {"low": float(lo), "high": float(hi), "log": log}
    return dict(sorted(out.items()))


def without_ranged_knobs(method: str, ranges: dict | None) -> str:
    """A TPE run's method with the knobs it sampled from ranges taken out: the value of its "method"
    trial param (one of the study's methods), the sampled knobs being params of their own."""
    from engine.methods.base import parse_variant, variant_id

    if not ranges:
        return method
    base, knobs = parse_variant(method)
    return variant_id(base, {k: v for k, v in knobs.items() if k not in ranges})


def check_knobs(knobs: dict | None) -> dict | None:
    """{name: values} with each list sorted, unique and finite; None when there is none."""
    if not knobs:
        return None
    out = {}
    for name, values in knobs.items():
        vals = list(values) if isinstance(values, (list, tuple)) else [values]
        if not vals or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals):
            raise UnlearnError(f"--param {name}: values must be finite numbers, not {values!r}")
        out[str(name)] = sorted({float(v) for v in vals})
    return dict(sorted(out.items()))


def expand_knobs(methods, knobs: dict | None) -> tuple[str, ...]:
    """Each method × every combination of the knobs it has: its variants (`npo[beta=0.2]`). A method
    with none of the knobs stays as it is; a knob no method has is an error. Variants already
    expanded are kept, so expanding twice changes nothing."""
    from itertools import product

    from engine.methods.base import parse_variant, variant_id

    out, used = [], set()
    for m in methods:
        if "[" in m or not knobs:  # already a variant: its knobs count as used
            out.append(m)
            used |= set(parse_variant(m)[1])
            continue
        own = {k: v for k, v in knobs.items() if k in get_method(m).knob_values()}
        used |= set(own)
        names = sorted(own)
        out += [variant_id(m, dict(zip(names, combo))) for combo in product(*(own[k] for k in names))] if own else [m]
    if knobs:
        unused = sorted(set(knobs) - used)
        if unused:
            raise UnlearnError(f"--param {unused[0]}: none of the methods has this knob "
                               f"(`unlearn methods --json` lists each method's knobs)")
    return tuple(out)


@dataclass(frozen=True)
class StudySpec:
    model: str
    forget_set: str
    forget_set_hash: str
    methods: tuple[str, ...]
    steps: tuple[int, ...]
    lrs: tuple[float, ...] | None = None  # grid over these
    lr_range: tuple[float, float] | None = None  # log-uniform range for TPE
    sampler: str = "grid"
    trials: int | None = None  # TPE: how many (method, lr) runs to sample; each yields one trial per milestone
    run: RunSettings = field(default_factory=RunSettings)
    knobs: dict | None = None  # method hyperparameters swept: {name: [values]}; methods holds the expanded variants
    knob_ranges: dict | None = None  # TPE: knobs sampled per run, {name: {"low", "high", "log"}}
    attacks_at: str = "every"  # run.attacks at every cell, or only at each method's best cell once the runs are done
    eval_tasks_at: str = "best"  # run.eval_tasks (lm-eval) at each method's best cell once the runs are done, or every cell
    gpus_per_run: int = 1  # devices (worker slots) one run takes: N processes under `accelerate launch`
    max_attempts: int = 2
    trust_remote_code: bool = False
    has_general: bool = False
    seeds: tuple[int, ...] | None = None  # each grid cell run under every seed (None: the one seed run.seed)

    def validate(self) -> "StudySpec":
        """A checked, normalized copy (sorted unique steps and lrs); raises UnlearnError."""
        if not self.methods:
            raise UnlearnError("--methods needs at least one method id")
        if len(set(self.methods)) != len(self.methods):
            raise UnlearnError("--methods lists a method twice")
        knobs = check_knobs(self.knobs)
        if knobs and "retain_weight" in knobs and self.run.retain_weight is not None:
            raise UnlearnError("give the retain weight as --retain-weight or as --param retain_weight, not both")
        methods = expand_knobs(self.methods, knobs)
        for m in methods:
            method = get_method(m)
            if method.retain_source == "general" and not self.has_general:
                raise UnlearnError(f"method {m} needs a general set, and forget set {self.forget_set!r} has none")
        if not self.steps or any(isinstance(s, bool) or int(s) != s or s <= 0 for s in self.steps):
            raise UnlearnError("--steps must be positive integers")
        if self.sampler not in SAMPLERS:
            raise UnlearnError(f"--sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")
        ranges = check_knob_ranges(self.knob_ranges)
        if ranges:
            if self.sampler != "tpe":
                raise UnlearnError(f"--param {next(iter(ranges))}: a LOW:HIGH range is sampled by TPE (--lr-range); "
                                   "the grid takes a list of values")
            both = sorted(set(ranges) & set(knobs or {}))
            if both:
                raise UnlearnError(f"--param {both[0]} is given as a list and as a range")
            for name, r in ranges.items():
                having = [m for m in methods if name in get_method(m).knob_values()]
                if not having:
                    raise UnlearnError(f"--param {name}: none of the methods has this knob "
                                       f"(`unlearn methods --json` lists each method's knobs)")
                for m in having:  # both ends must make a valid method (e.g. β > 0)
                    for end in (r["low"], r["high"]):
                        get_method(m).with_knobs({name: end})
        if self.attacks_at not in ATTACKS_AT:
            raise UnlearnError(f"--attacks-at must be one of {', '.join(ATTACKS_AT)}, not {self.attacks_at!r}")
        if self.attacks_at == "best" and not self.run.attacks:
            raise UnlearnError("--attacks-at best needs --attacks (which attacks to run at the best cells)")
        if self.eval_tasks_at not in ATTACKS_AT:
            raise UnlearnError(f"--eval-tasks-at must be one of {', '.join(ATTACKS_AT)}, not {self.eval_tasks_at!r}")
        lrs, lr_range, trials = None, None, None
        if self.sampler == "grid":
            if not self.lrs:
                raise UnlearnError("the grid sampler needs --lr (a list of learning rates)")
            if any(not (math.isfinite(x) and x > 0) for x in self.lrs):
                raise UnlearnError("--lr values must be positive numbers")
            lrs = tuple(sorted({float(x) for x in self.lrs}))
        else:
            if not self.lr_range:
                raise UnlearnError("the tpe sampler needs --lr-range LOW:HIGH")
            lo, hi = (float(x) for x in self.lr_range)
            if not (0 < lo < hi and math.isfinite(hi)):
                raise UnlearnError("--lr-range must be LOW:HIGH with 0 < LOW < HIGH")
            if not self.trials or self.trials < 1:
                raise UnlearnError("the tpe sampler needs --trials N (N ≥ 1)")
            lr_range, trials = (lo, hi), int(self.trials)
        seeds = None
        if self.seeds is not None:
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.seeds) or not self.seeds:
                raise UnlearnError(f"--seeds must be whole numbers of 0 or more, e.g. --seeds 0,1,2, not {self.seeds!r}")
            if len(set(self.seeds)) != len(self.seeds):
                raise UnlearnError("--seeds lists a seed twice")
            if self.sampler != "grid" and len(self.seeds) > 1:
                raise UnlearnError("--seeds averages a grid's cells over seeds; the tpe sampler runs one seed (--seed)")
            seeds = tuple(sorted(int(x) for x in self.seeds)) if len(self.seeds) > 1 else None
        if self.max_attempts < 1:
            raise UnlearnError("--max-attempts must be at least 1")
        if isinstance(self.gpus_per_run, bool) or not isinstance(self.gpus_per_run, int) or self.gpus_per_run < 1:
            raise UnlearnError(f"--gpus-per-run must be a whole number of 1 or more, not {self.gpus_per_run!r}")
        if self.run.retain_weight is not None and not any(get_method(m).retain for m in methods):
            raise UnlearnError("--retain-weight is given, but none of the methods has a retain term")
        spec = replace(self, methods=methods, steps=tuple(sorted({int(s) for s in self.steps})),
                       lrs=lrs, lr_range=lr_range, trials=trials, run=self.run.validate(), knobs=knobs,
                       knob_ranges=ranges, seeds=seeds)
        if self.seeds is not None and len(self.seeds) == 1:  # one seed is --seed
            spec = replace(spec, run=replace(spec.run, seed=int(self.seeds[0])))
        for m in spec.methods:  # what every run of the study will be checked against, checked now
            spec.run_config(m, (lrs or lr_range)[0]).validate()
        return spec

    def run_config(self, method: str, lr: float, seed: int | None = None) -> RunConfig:
        """The RunConfig of the run (method, lr, seed; None: the study's --seed). A retain weight
        applies to methods with a retain term; attacks saved for the best cells (`attacks_at="best"`)
        are not run with the runs."""
        settings = self.run if seed is None else replace(self.run, seed=int(seed))
        if settings.retain_weight is not None and get_method(method).retain is None:
            settings = replace(settings, retain_weight=None)
        if self.attacks_at == "best":
            settings = replace(settings, attacks="")
        if self.eval_tasks_at == "best":  # downstream tasks, likewise
            settings = replace(settings, eval_tasks="", eval_tasks_dir="", eval_tasks_limit=0)
        return RunConfig.of(method, lr, self.steps, settings)

    @property
    def remote_code(self) -> list[str]:
        """What in this study would run code that came with the study, not with unlearn-lab: the model
        repo's own Python (--trust-remote-code) and lm-eval task files (--eval-tasks-dir). A worker
        that joins a shared store runs neither unless started with --allow-remote-code."""
        return ((["--trust-remote-code (the model repo's own Python)"] if self.trust_remote_code else [])
                + ([f"--eval-tasks-dir {self.run.eval_tasks_dir} (lm-eval task code)"] if self.run.eval_tasks_dir else []))

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds every cell is run under: --seeds, or the one --seed."""
        return self.seeds or (int(self.run.seed),)

    @property
    def grid_runs(self) -> list[tuple[str, float]]:
        """Every (method, lr) row of a grid study; TPE studies grow their runs as they go."""
        return [(m, lr) for m in self.methods for lr in (self.lrs or ())] if self.sampler == "grid" else []

    @property
    def grid_seeded_runs(self) -> list[tuple[str, float, int]]:
        """Every (method, lr, seed) run of a grid study: one per row and seed."""
        return [(m, lr, seed) for m, lr in self.grid_runs for seed in self.run_seeds]

    @property
    def total_runs(self) -> int:
        return len(self.grid_seeded_runs) if self.sampler == "grid" else int(self.trials or 0)

    @property
    def wants_best_cell_attacks(self) -> bool:
        """Whether the study has a best-cell job once its runs are done: its attacks at each method's
        best cell (--attacks-at best), its --eval-tasks there (--eval-tasks-at best), or both."""
        return self.attacks_at == "best" and bool(self.run.attacks) or self.wants_best_cell_tasks

    @property
    def wants_best_cell_tasks(self) -> bool:
        """Whether the study evaluates its --eval-tasks at each method's best cell (the same job as
        the best-cell attacks: `wants_best_cell_attacks` is true for either)."""
        return self.eval_tasks_at == "best" and bool(self.run.eval_tasks)

    def optuna_distributions(self) -> dict:
        """The trial parameters: method, lr, steps, and the knobs swept (a list: categorical; a
        TPE range: float)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        lr = (CategoricalDistribution(list(self.lrs)) if self.sampler == "grid"
              else FloatDistribution(self.lr_range[0], self.lr_range[1], log=True))
        return {"method": CategoricalDistribution(list(self.methods)), "lr": lr,
                "steps": CategoricalDistribution(list(self.steps)),
                **({"seed": CategoricalDistribution(list(self.seeds))} if self.seeds else {}),
                **{k: CategoricalDistribution(v) for k, v in self._knob_choices().items()},
                **{k: FloatDistribution(r["low"], r["high"], log=r["log"]) for k, r in (self.knob_ranges or {}).items()}}

    def _knob_choices(self) -> dict[str, list]:
        """Each listed knob's values: the swept ones (`knobs`), and those of the variants the study
        names among its methods (`npo[beta=0.01]`), which are trial params too. From the spec alone,
        in its order, so every trial of the study gets the same distribution."""
        from engine.methods.base import parse_variant

        out: dict[str, list] = {k: list(v) for k, v in (self.knobs or {}).items()}
        for m in self.methods:
            for k, v in parse_variant(m)[1].items():
                if k not in (self.knob_ranges or {}) and v not in out.setdefault(k, []):
                    out[k].append(v)
        return out

    def trial_params(self, method: str, lr: float, steps: int, seed: int | None = None) -> dict:
        """The Optuna params of a cell: method (as the study lists it), lr, steps, the seed (a study
        with --seeds: one trial per seed), and every knob of the run's variant."""
        from engine.methods.base import parse_variant

        return {"method": without_ranged_knobs(method, self.knob_ranges), "lr": lr, "steps": steps,
                **({"seed": int(seed if seed is not None else self.run.seed)} if self.seeds else {}),
                **parse_variant(method)[1]}

    def to_dict(self) -> dict:
        """Plain JSON: lists for tuples, the run settings under "run"."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "run"}
        for k in ("methods", "steps", "lrs", "lr_range", "seeds"):
            d[k] = list(d[k]) if d[k] is not None else None
        return {**d, "run": self.run.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "StudySpec":
        """From a stored spec. Specs written before the run settings had their own key kept them
        at the top level (and could not hold all of them): those are read the same way."""
        names = {f.name for f in fields(cls)} - {"run"}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("methods", "steps", "lrs", "lr_range", "seeds"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw, run=RunSettings.from_dict(d.get("run", d)))


def study_spec(study) -> StudySpec:
    """The spec a study (a studies.store.db.Study row) was created with, parsed: the one way every
    module reads `Study.spec`, which the store keeps as plain JSON."""
    return StudySpec.from_dict(study.spec)
