"""A study: model + forget set + methods + search space (lr × steps) + sampler + objective + budget + seed.

The spec is stored whole (JSON) with the study, so a worker on any node rebuilds exactly the
RunConfig of every run from the store alone."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from engine.errors import UnlearnError
from engine.methods import get_method
from engine.run import RunConfig

SAMPLERS = ("grid", "tpe")


@dataclass
class StudySpec:
    model: str
    forget_set: str
    forget_set_hash: str
    methods: list[str]
    steps: list[int]
    lrs: list[float] | None = None  # grid over these
    lr_range: tuple[float, float] | None = None  # log-uniform range for TPE
    sampler: str = "grid"
    trials: int | None = None  # TPE: how many (method, lr) runs to sample; each yields one trial per milestone
    seed: int = 0
    batch_size: int = 4
    seq_len: int = 512
    warmup_steps: int = 0
    eval_batch_size: int = 8
    min_k: float = 0.2
    tol_forget: float = 0.10
    tol_retain: float = 0.05
    max_attempts: int = 2
    trust_remote_code: bool = False
    has_general: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> "StudySpec":
        if not self.methods:
            raise UnlearnError("--methods needs at least one method id")
        for m in self.methods:
            method = get_method(m)
            if method.retain_source == "general" and not self.has_general:
                raise UnlearnError(f"method {m} needs a general set, and forget set {self.forget_set!r} has none")
        if len(set(self.methods)) != len(self.methods):
            raise UnlearnError("--methods lists a method twice")
        if not self.steps or any(s <= 0 for s in self.steps):
            raise UnlearnError("--steps must be positive integers")
        self.steps = sorted(set(int(s) for s in self.steps))
        if self.sampler not in SAMPLERS:
            raise UnlearnError(f"--sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")
        if self.sampler == "grid":
            if not self.lrs:
                raise UnlearnError("the grid sampler needs --lr (a list of learning rates)")
            if any(not (math.isfinite(x) and x > 0) for x in self.lrs):
                raise UnlearnError("--lr values must be positive numbers")
            self.lrs = sorted(set(float(x) for x in self.lrs))
        else:
            if not self.lr_range:
                raise UnlearnError("the tpe sampler needs --lr-range LOW:HIGH")
            lo, hi = self.lr_range
            if not (0 < lo < hi and math.isfinite(hi)):
                raise UnlearnError("--lr-range must be LOW:HIGH with 0 < LOW < HIGH")
            if not self.trials or self.trials < 1:
                raise UnlearnError("the tpe sampler needs --trials N (N ≥ 1)")
        if self.max_attempts < 1:
            raise UnlearnError("--max-attempts must be at least 1")
        self.run_config(self.methods[0], (self.lrs or [self.lr_range[0]])[0]).validate()
        return self

    def run_config(self, method: str, lr: float) -> RunConfig:
        return RunConfig(method=method, lr=lr, milestones=list(self.steps), batch_size=self.batch_size,
                         seq_len=self.seq_len, seed=self.seed, warmup_steps=self.warmup_steps,
                         eval_batch_size=self.eval_batch_size, min_k=self.min_k, tol_forget=self.tol_forget,
                         tol_retain=self.tol_retain)

    @property
    def grid_runs(self) -> list[tuple[str, float]]:
        """Every (method, lr) of a grid study; TPE studies grow their runs as they go."""
        return [(m, lr) for m in self.methods for lr in (self.lrs or [])] if self.sampler == "grid" else []

    @property
    def total_runs(self) -> int:
        return len(self.grid_runs) if self.sampler == "grid" else int(self.trials or 0)

    def optuna_distributions(self) -> dict:
        """The trial parameters: method, lr, steps."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        lr = (CategoricalDistribution(self.lrs) if self.sampler == "grid"
              else FloatDistribution(self.lr_range[0], self.lr_range[1], log=True))
        return {"method": CategoricalDistribution(self.methods), "lr": lr, "steps": CategoricalDistribution(self.steps)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudySpec":
        names = {f.name for f in fields(cls)}
        spec = cls(**{k: v for k, v in d.items() if k in names})
        if spec.lr_range is not None:
            spec.lr_range = tuple(spec.lr_range)
        return spec
