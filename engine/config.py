"""The settings of a run, declared once.

`RunSettings` holds every hyperparameter of a run except the three a study sweeps (method, lr,
milestones). Everything else derives from it: `RunConfig` (what the loop takes) extends it, a
study's spec stores one, the CLI builds one `--flag` per field from the metadata below, and an
export writes the same flags into the command that reproduces a cell. A new knob is one new field
here, and it appears in all four places.

Torch-free on purpose: the CLI's read-only commands import this module.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from engine.attack_recipes import QUANT_BACKENDS, RELEARN_RECIPES, RELEARN_SOURCES
from engine.errors import UnlearnError
from engine.metric_registry import MIA_ATTACKS, ROBUSTNESS_ATTACKS  # --attacks: engine.recovery runs them


def knob(default: Any, flag: str, help: str, parse: Any = None, default_text: str | None = None) -> Any:
    """A RunSettings field with its command-line flag and help text; a text field also names the
    function that checks and normalizes its value (raising UnlearnError); `default_text` says what
    an unset (None) value means, where that is not "the method's own"."""
    return field(default=default, metadata={"flag": flag, "help": help, "parse": parse, "default_text": default_text})


@dataclass(frozen=True)
class RunSettings:
    batch_size: int = knob(4, "--batch-size", "forget (and retain) chunks per optimizer step")
    seq_len: int = knob(512, "--seq-len", "tokens per chunk")
    seed: int = knob(0, "--seed", "seed of the batch order, random labels and the run")
    warmup_steps: int = knob(0, "--warmup", "linear warm-up steps, then constant lr (keeps prefix sharing)")
    retain_weight: Optional[float] = knob(None, "--retain-weight", "weight of the retain term")
    eval_batch_size: int = knob(8, "--eval-batch-size", "chunks per forward pass when evaluating")
    min_k: float = knob(0.2, "--min-k", "k of the Min-K% and Min-K%++ attacks, in (0, 1]")
    tol_forget: Optional[float] = knob(None, "--tol-forget", "success needs forget_gap ≤ ln(1 + tol); auto: the "
                                       "larger of ln 1.10, the target's bootstrap noise and --target-spread",
                                       default_text="auto")
    tol_retain: Optional[float] = knob(None, "--tol-retain", "success needs retain_eval_drift ≤ ln(1 + tol); auto: the "
                                       "larger of ln 1.05 and the bootstrap noise of ln ppl_retain_eval(θ0)",
                                       default_text="auto")
    target_spread: float = knob(0.0, "--target-spread", "how far other estimates of the target (a retrained twin, "
                                "other seeds) lie from ln ppl_unseen(θ0), in nats: an auto forget band is no tighter")
    watch_every: int = knob(1, "--watch-every", "score the forget set alone every N steps (no full evaluation) to "
                            "find where ln ppl_forget first reaches the target: a full cell is evaluated there, the "
                            "at-target cell (0: off)")
    stop_at_target: bool = knob(False, "--stop-at-target", "end the run at its at-target cell (Yao et al.'s stopping "
                                "rule), saving the steps after it; the milestones after it are recorded as stopped")
    divergence_factor: float = knob(1e4, "--divergence-factor",
                                    "stop a run when ppl_forget or ppl_retain exceeds factor × the original's")
    attacks: str = knob("", "--attacks", "at every milestone, test whether forgetting holds: relearn, quant4, "
                        "quant8 (comma-separated; each costs a model copy and an evaluation)",
                        parse=lambda v: ",".join(parse_attacks(v)))
    relearn_recipe: str = knob("quick", "--relearn-recipe", "how the relearn attack fine-tunes: "
                               + "; ".join(f"{r.name}: {r.about}" for r in RELEARN_RECIPES.values()),
                               parse=lambda v: check_choice(v, "--relearn-recipe", tuple(RELEARN_RECIPES)))
    relearn_from: str = knob("forget", "--relearn-from", "where the relearn attack draws its chunks: forget, or "
                             "retain (data unrelated to the forget set: what comes back was never shown)",
                             parse=lambda v: check_choice(v, "--relearn-from", RELEARN_SOURCES))
    quant_backend: str = knob("auto", "--quant-backend", "how quant4/quant8 quantize: bitsandbytes (NF4, LLM.int8, "
                              "as the published attack; pip install 'unlearn-lab[gpu]'), rtn (round-to-nearest per "
                              "channel, runs anywhere) or auto (bitsandbytes on CUDA where installed, else rtn)",
                              parse=lambda v: check_choice(v, "--quant-backend", QUANT_BACKENDS))
    params: str = knob("", "--params", "train only these parameters: a regex searched in each parameter's name, "
                       "or saliency:P for the P % of weights whose gradient on U is largest relative to the "
                       "retain set's (default: the method's own choice, usually all)",
                       parse=lambda v: check_params(v))
    # Memory options (engine/precision.py, engine/lora.py; `unlearn plan` sizes each of them).
    dtype: str = knob("auto", "--dtype", "the weights' dtype: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32; "
                      "bf16 weights are updated through an fp32 master copy, so small learning rates still move them",
                      parse=lambda v: check_choice(v, "--dtype", DTYPES))
    gradient_checkpointing: bool = knob(False, "--gradient-checkpointing",
                                        "recompute each block's activations in the backward pass (non-reentrant): "
                                        "less memory, about a third more compute")
    optim: str = knob("adamw", "--optim", "adamw, adamw8bit or paged_adamw8bit (8-bit states: bitsandbytes, CUDA only; "
                      "pip install 'unlearn-lab[gpu]')", parse=lambda v: check_choice(v, "--optim", OPTIMIZERS))
    lora: int = knob(0, "--lora", "train a LoRA adapter of this rank instead of the weights (0: off); the reference "
                     "model is the same model with the adapter disabled, so no second copy")
    lora_alpha: Optional[float] = knob(None, "--lora-alpha", "LoRA's alpha (the adapter's scale is alpha/rank)",
                                       default_text="2 × rank")
    lora_targets: str = knob("", "--lora-targets", "modules that get an adapter: comma-separated names (q_proj,v_proj) "
                             "(default: every linear layer of the blocks)", parse=lambda v: v.strip())
    fsdp: bool = knob(False, "--fsdp", "shard weights, gradients and optimizer states over the run's processes "
                      "(FSDP2 full shard; with study create --gpus-per-run N, or under torchrun)")
    # Benchmark metrics at each milestone, where the forget set is a TOFU or MUSE preset
    # (engine/benchmark_metrics/milestone.py, docs/benchmark-metrics.md).
    bench_samples: int = knob(100, "--bench-samples", "benchmark metrics (TOFU, MUSE presets) score the first N items "
                              "of each of their lists at each milestone (0: all)")
    tofu_retain_truth_ratios: str = knob("", "--tofu-retain-truth-ratios", "a JSON file of a retain-only model's truth "
                                         "ratios on the forget questions: adds TOFU's forget quality (KS p-value)",
                                         parse=lambda v: check_file(v, "--tofu-retain-truth-ratios"))
    muse_retrained_auc: Optional[float] = knob(None, "--muse-retrained-auc", "a retrained model's forget-vs-holdout "
                                               "Min-40% AUC: adds MUSE's PrivLeak", default_text="none: no PrivLeak")
    # privleak on any forget set (MUSE's formula, docs/concepts.md#metrics)
    retrained_auc: Optional[float] = knob(None, "--retrained-auc", "a retrained model's (never trained on the forget "
                                          "set) mia_auc.<--privleak-attack> on this forget set, as `unlearn run --json` "
                                          "reports it for that model: adds privleak", default_text="none: no privleak")
    privleak_attack: str = knob("min_k", "--privleak-attack", "the membership attack privleak reads: "
                                + ", ".join(MIA_ATTACKS), parse=lambda v: check_choice(v, "--privleak-attack", MIA_ATTACKS))
    reference_model: str = knob("", "--reference-model", "the reference attack's model (mia_auc.reference): a local "
                                "folder or Hugging Face id of a model that never saw the forget set, with the same "
                                "tokenizer, e.g. one retrained without it (default: θ0, the model being unlearned)",
                                parse=lambda v: v.strip())
    mia_gradnorm: bool = knob(False, "--mia-gradnorm", "add the gradient-norm membership attack (mia_auc.gradnorm): "
                              "costs a backward pass per chunk of forget and unseen at every evaluation (the "
                              "baseline, each milestone, each --attacks copy)")
    # Downstream tasks through lm-eval (engine/downstream.py; pip install 'unlearn-lab[eval]').
    eval_tasks: str = knob("", "--eval-tasks", "lm-eval tasks evaluated at every milestone, comma-separated "
                           "(arc_easy,piqa); reported as downstream.TASK", parse=lambda v: ",".join(parse_eval_tasks(v)))
    eval_tasks_dir: str = knob("", "--eval-tasks-dir", "a folder of lm-eval task YAML files (tasks on local disk)",
                               parse=lambda v: check_file(v, "--eval-tasks-dir", folder=True))
    eval_tasks_limit: int = knob(0, "--eval-tasks-limit", "the first N examples of each --eval-tasks task (0: all)")

    def validate(self) -> "RunSettings":
        """A checked copy with plain int/float values; raises UnlearnError naming the flag at fault."""
        values = {}
        for f in fields(RunSettings):
            v = getattr(self, f.name)
            flag = f.metadata["flag"]
            if f.name in ("retain_weight", "lora_alpha", "muse_retrained_auc", "retrained_auc", "tol_forget",
                          "tol_retain") and v is None:
                values[f.name] = None
                continue
            if f.type in ("bool", bool):
                if not isinstance(v, bool):
                    raise UnlearnError(f"{flag} is on or off, not {v!r}")
                values[f.name] = v
                continue
            if f.type in ("str", str):
                if not isinstance(v, str):
                    raise UnlearnError(f"{flag} must be text, not {v!r}")
                values[f.name] = f.metadata["parse"](v)
                continue
            want = int if f.type in ("int", int) else float
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (want is int and int(v) != v):
                raise UnlearnError(f"{flag} must be {'an integer' if want is int else 'a number'}, not {v!r}")
            if not math.isfinite(v):
                raise UnlearnError(f"{flag} must be finite, not {v}")
            values[f.name] = want(v)
        s = replace(self, **values)
        for name in ("batch_size", "eval_batch_size"):
            if getattr(s, name) < 1:
                raise UnlearnError(f"{flag_of(name)} must be at least 1")
        if s.seq_len < 16:
            raise UnlearnError("--seq-len must be at least 16")
        if s.warmup_steps < 0:
            raise UnlearnError("--warmup must be 0 or more")
        if s.watch_every < 0:
            raise UnlearnError("--watch-every must be 0 (off) or more")
        if s.stop_at_target and not s.watch_every:
            raise UnlearnError("--stop-at-target needs the forget set watched (--watch-every 1 or more)")
        if s.retain_weight is not None and s.retain_weight < 0:
            raise UnlearnError("--retain-weight must be 0 or more")
        if not 0 < s.min_k <= 1:
            raise UnlearnError("--min-k must be in (0, 1]")
        if any(t is not None and t < 0 for t in (s.tol_forget, s.tol_retain)):
            raise UnlearnError("--tol-forget and --tol-retain must be 0 or more (or auto)")
        if s.target_spread < 0:
            raise UnlearnError("--target-spread must be 0 or more")
        if s.divergence_factor <= 1:
            raise UnlearnError("--divergence-factor must be above 1")
        if s.lora < 0:
            raise UnlearnError("--lora must be a rank of 1 or more (0: off)")
        if s.lora_alpha is not None and s.lora_alpha <= 0:
            raise UnlearnError("--lora-alpha must be above 0")
        if not s.lora and (s.lora_alpha is not None or s.lora_targets):
            raise UnlearnError("--lora-alpha and --lora-targets need --lora R")
        if s.lora and s.params:
            raise UnlearnError("--params chooses weights to train, --lora trains an adapter instead: give one of them")
        if s.fsdp:
            clash = [flag for flag, on in (("--attacks", s.attacks), ("--params", s.params),
                                           ("--optim " + s.optim, s.optim != "adamw"),
                                           ("--mia-gradnorm", s.mia_gradnorm)) if on]
            if clash:
                raise UnlearnError(f"--fsdp does not run with {clash[0]} yet: it needs the whole model in one process")
        if s.bench_samples < 0 or s.eval_tasks_limit < 0:
            raise UnlearnError(f"{'--bench-samples' if s.bench_samples < 0 else '--eval-tasks-limit'} must be 0 (all) or more")
        if s.muse_retrained_auc is not None and not 0 < s.muse_retrained_auc <= 1:
            raise UnlearnError("--muse-retrained-auc must be an AUC in (0, 1]")
        if s.retrained_auc is not None and not 0 < s.retrained_auc <= 1:
            raise UnlearnError("--retrained-auc must be an AUC in (0, 1]")
        if (s.eval_tasks_dir or s.eval_tasks_limit) and not s.eval_tasks:
            raise UnlearnError("--eval-tasks-dir and --eval-tasks-limit need --eval-tasks (which tasks to evaluate)")
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        """From a stored or exported dict; unknown keys are ignored, missing ones take the default."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_flags(self) -> list[str]:
        """`--flag value` for every field that has a value: the tail of a reproducing command."""
        out = []
        for f in fields(RunSettings):
            v = getattr(self, f.name)
            if isinstance(v, bool):
                out += [f.metadata["flag"]] if v else []
            elif v is not None and v != "":
                out += [f.metadata["flag"], repr(float(v)) if isinstance(v, float) else str(v)]
        return out


DTYPES = ("auto", "bf16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


def check_choice(text: str, flag: str, choices: tuple[str, ...]) -> str:
    text = (text or "").strip()
    if text not in choices:
        raise UnlearnError(f"{flag} must be one of {', '.join(choices)}, not {text!r}")
    return text


def parse_attacks(text: str) -> tuple[str, ...]:
    """'quant4, relearn' -> ('relearn', 'quant4'): known names, each once, in a fixed order."""
    names = {a.strip() for a in (text or "").split(",") if a.strip()}
    unknown = sorted(names - set(ROBUSTNESS_ATTACKS))
    if unknown:
        raise UnlearnError(f"--attacks: unknown attack {unknown[0]!r}; known: {', '.join(ROBUSTNESS_ATTACKS)}")
    return tuple(a for a in ROBUSTNESS_ATTACKS if a in names)


def check_params(text: str) -> str:
    """'' (the method's choice), 'saliency:P' with 0 < P ≤ 100, or a regex that compiles."""
    import re

    text = (text or "").strip()
    if text.startswith("saliency:"):
        try:
            share = float(text.split(":", 1)[1])
        except ValueError:
            raise UnlearnError(f"--params {text}: the share after saliency: must be a number (percent)") from None
        if not 0 < share <= 100:
            raise UnlearnError(f"--params {text}: the share must be in (0, 100] percent")
        return f"saliency:{share:g}"
    try:
        re.compile(text)
    except re.error as exc:
        raise UnlearnError(f"--params: not a regular expression: {text!r} ({exc})") from None
    return text


def parse_eval_tasks(text: str) -> tuple[str, ...]:
    """'arc_easy, piqa' -> ('arc_easy', 'piqa'): lm-eval task names, each once, in the order given."""
    from engine.downstream import parse_tasks  # torch-free

    return parse_tasks(text)


def check_file(text: str, flag: str, folder: bool = False) -> str:
    """'' or an existing file (folder) as an absolute path, so an exported command works anywhere."""
    import os

    text = (text or "").strip()
    if not text:
        return ""
    path = os.path.abspath(os.path.expanduser(text))
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise UnlearnError(f"{flag} {text}: no such {'folder' if folder else 'file'}")
    return path


def flag_of(name: str) -> str:
    return next(f.metadata["flag"] for f in fields(RunSettings) if f.name == name)


def settings_fields() -> tuple:
    """The dataclass fields of RunSettings, each with metadata {"flag", "help"}."""
    return fields(RunSettings)


@dataclass(frozen=True, kw_only=True)
class RunConfig(RunSettings):
    """One run: a method at one learning rate, trained to the last milestone, evaluated at each."""

    method: str
    lr: float
    milestones: tuple[int, ...]

    def validate(self) -> "RunConfig":
        """A checked, normalized copy (milestones sorted and unique). Checks once: the copy it returns
        is marked valid and validating it again returns it as it is."""
        if self.__dict__.get("_valid"):
            return self
        from engine.methods import get_method
        from engine.methods.base import parse_variant

        method = get_method(self.method)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise UnlearnError(f"--lr must be a positive number, not {lr}")
        steps = list(self.milestones or ())
        if not steps or any(isinstance(s, bool) or not isinstance(s, (int, float)) or int(s) != s or s <= 0
                            for s in steps):
            raise UnlearnError(f"--steps must be positive integers, not {steps}")
        if self.retain_weight is not None and method.retain is None:
            raise UnlearnError(f"method {method.id} has no retain term: --retain-weight does not apply")
        if self.retain_weight is not None and "retain_weight" in parse_variant(self.method)[1]:
            raise UnlearnError(f"method {method.id} sets retain_weight as a knob: leave out --retain-weight")
        if self.params and method.saliency:
            raise UnlearnError(f"method {method.id} sets the saliency share as a knob: leave out --params")
        if self.lora and method.saliency:
            raise UnlearnError(f"method {method.id} chooses weights by saliency, --lora trains an adapter instead")
        if self.lora and method.forget.edits_weights:
            raise UnlearnError(f"method {method.id} negates the change of the full weights: it does not run with --lora")
        if self.fsdp and (method.forget.edits_weights or method.saliency or method.trains is not None):
            raise UnlearnError(f"method {method.id} does not run with --fsdp yet: it reads or chooses full weights")
        base = RunSettings.validate(self)
        cfg = replace(self, **{f.name: getattr(base, f.name) for f in fields(RunSettings)},
                      lr=float(lr), milestones=tuple(sorted({int(s) for s in steps})))
        object.__setattr__(cfg, "_valid", True)  # a plain attribute: not a field, so not in asdict() or ==
        return cfg

    @property
    def settings(self) -> RunSettings:
        return RunSettings(**{f.name: getattr(self, f.name) for f in fields(RunSettings)})

    @classmethod
    def of(cls, method: str, lr: float, milestones, settings: RunSettings | None = None) -> "RunConfig":
        """A config from a sweep point and the settings every point of the sweep shares."""
        return cls(method=method, lr=lr, milestones=tuple(milestones), **(settings or RunSettings()).to_dict())
