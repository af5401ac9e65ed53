"""Every metric a cell carries, declared once: the metric registry.

A metric is a dotted path into a cell, the dict the engine returns per milestone and the lab stores
as it is (CellRow.metrics): "score", "mia_auc.loss", "bench.muse_auc", "downstream.hellaswag".
Each entry says how to show it: a short label, its unit, which direction is better (the heatmap's
colours), log scale or not, its group, a help line and which runs have it. The heatmap's metric
picker and colours, `--metric` and its help, the trial, compare and dashboard tables and the
export's model card all read this registry: a new metric is one `register(Metric(...))` below, plus
the code that computes it (engine/evaluate.py, engine/recovery.py, engine/benchmark_metrics/).

docs/concepts.md defines the figures. Never imports torch: the app process reads it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, TypedDict

from engine.errors import UnlearnError

# Which direction is better: the heatmap colours green → red along it.
LOWER, HIGHER = "lower", "higher"
CLOSER = "closer"  # closer to the metric's `target` (an AUC to 0.5, a drift to 0)
NEUTRAL = "neutral"  # neither: a neutral blue scale (a forget perplexity is not better lower or higher)

# Groups (tables show the metrics in the order they are registered below). TRAINED_ON: the figures
# utility was judged by before retain_eval existed (on the documents the retain terms train on).
OBJECTIVE, PERPLEXITY, MIA, MEMORIZATION, TRAINED_ON, RECOVERY, BENCH, DOWNSTREAM = (
    "objective", "perplexity", "mia", "memorization", "trained_on", "recovery", "bench", "downstream")

EVERY_RUN = "every run"  # `runs` of a metric every computed cell has

# How prominently a metric every run has is shown (`tier`).
HEADLINE = 1  # in every table, and the dashboard's trial table sorts by it
LISTED = 2  # in the dashboard's trial table too
DETAIL = 3  # only in the full tables: the trial screen, compare, the export's model card

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")  # engine.evaluate scores each: mia_auc.<attack>
REFERENCE_ATTACK = "reference"  # the loss against a reference model's (θ0, or --reference-model): mia_auc.reference
GRADNORM_ATTACK = "gradnorm"  # −‖∇θ loss‖₂ per chunk, a backward each (--mia-gradnorm): mia_auc.gradnorm
ROBUSTNESS_ATTACKS = ("relearn", "quant4", "quant8")  # --attacks; engine.recovery runs them: <attack>_recovery
ROLES = ("forget", "retain", "retain_eval", "unseen", "general")  # the forget set's roles: ppl_<role>
DOWNSTREAM_PREFIX = DOWNSTREAM + "."  # + an lm-eval task name (--eval-tasks): any task is a metric path

# The paths the code reads by name: the study objective and its parts. Utility is judged on
# retain_eval, held out from every retain term; the figures of the same kind on the retain documents
# the terms train on keep their old names (score, retain_drift), so a store written before reads as it did.
EVAL_SCORE, FORGET_GAP, UTILITY_DRIFT = "eval_score", "forget_gap", "retain_eval_drift"
SCORE = EVAL_SCORE  # the study objective: the Optuna trial value, the heatmap's default
TRAINED_ON_SCORE, RETAIN_DRIFT = "score", "retain_drift"
MIA_AUC = "mia_auc"
MIA_AUC_LO, MIA_AUC_HI = "mia_auc_lo", "mia_auc_hi"  # the loss AUC's bootstrap interval (engine.verdict)
PRIVLEAK = "privleak"  # MUSE's PrivLeak on any forget set, with --retrained-auc
ATTACK_ROBUSTNESS = "attack_robustness"  # relearn and quantization recoveries in one figure (engine.recovery)
QUANT_ATTACKS = ("quant4", "quant8")


def wants_robustness(attacks) -> bool:
    """Whether these attacks give attack_robustness: relearn and a quantization attack."""
    return "relearn" in attacks and any(a in attacks for a in QUANT_ATTACKS)
# open-unlearning's two greedy-decoding memorization figures, per set (engine.evaluate.memorization)
EXACT_MEMORIZATION, EXTRACTION_STRENGTH = "exact_memorization", "extraction_strength"
MEMORIZATION_ROLES = ("forget", "retain_eval", "unseen")


def ppl(role: str) -> str:
    return f"ppl_{role}"


PPL_FORGET, PPL_RETAIN, PPL_RETAIN_EVAL, PPL_UNSEEN, PPL_GENERAL = (ppl(role) for role in ROLES)


def mia_auc(attack: str) -> str:
    return f"{MIA_AUC}.{attack}"


MIA_LOSS = mia_auc("loss")  # the plainest attack's AUC: the one a compact table or a θ0 line shows


def recovery(attack: str) -> str:
    return f"{attack}_recovery"


@dataclass(frozen=True)
class Metric:
    path: str  # dotted path into a cell
    label: str  # a short column header
    unit: str  # what a value counts: "nats", "perplexity", "AUC", "share", "%", ...
    better: str  # LOWER, HIGHER, CLOSER (to `target`) or NEUTRAL
    group: str
    help: str
    runs: str = EVERY_RUN  # which runs have it: EVERY_RUN, or the flag or preset that adds it
    log: bool = False  # coloured on a log scale
    target: Optional[float] = None  # what CLOSER is closer to
    tier: int = DETAIL  # HEADLINE, LISTED or DETAIL

    def badness(self, x: float) -> Optional[float]:
        """The quantity a colour scale runs over, lower = better (NEUTRAL: only the position)."""
        if self.log:
            return math.log(x) if x > 0 else None
        if self.better == CLOSER:
            return abs(x - self.target)
        return -x if self.better == HIGHER else x

    @property
    def good_bad(self) -> bool:
        """True where one direction is better (a green → red scale); False for a neutral one."""
        return self.better != NEUTRAL

    @property
    def scale(self) -> str:
        """The heatmap legend's words for the colour scale."""
        if self.log:
            return "log scale, lower = greener" if self.better == LOWER else "log scale"
        if self.better == CLOSER:
            return f"|{self.label}| lower = greener" if self.target == 0 else f"closer to {self.target:g} = greener"
        return {HIGHER: "higher = greener", LOWER: "lower = greener"}.get(self.better, "neutral scale")


_REGISTRY: dict[str, Metric] = {}


def register(m: Metric) -> Metric:
    if m.path in _REGISTRY or m.path.startswith(DOWNSTREAM_PREFIX):
        raise ValueError(f"metric {m.path!r} is already known")
    _REGISTRY[m.path] = m
    return m


def unregister(path: str) -> None:
    """For tests that register a metric for a while."""
    del _REGISTRY[path]


def every() -> tuple[Metric, ...]:
    """Every registered metric, in table order (downstream.TASK is open: see `get`)."""
    return tuple(_REGISTRY.values())


def paths(group: Optional[str] = None) -> tuple[str, ...]:
    return tuple(m.path for m in _REGISTRY.values() if group is None or m.group == group)


def every_run(max_tier: int = DETAIL) -> tuple[Metric, ...]:
    """The metrics every computed cell has, in table order; `max_tier` keeps the more important ones."""
    return tuple(m for m in _REGISTRY.values() if m.runs == EVERY_RUN and m.tier <= max_tier)


def every_run_paths(max_tier: int = DETAIL) -> tuple[str, ...]:
    return tuple(m.path for m in every_run(max_tier))


def objective() -> tuple[Metric, ...]:
    """The study objective and its parts (score, forget_gap, retain_drift): what a best cell is shown by."""
    return tuple(m for m in every_run() if m.group == OBJECTIVE)


def _downstream(path: str) -> Metric:
    task = path[len(DOWNSTREAM_PREFIX):]
    return Metric(path, task, "accuracy", HIGHER, DOWNSTREAM, f"the lm-eval task {task}'s acc_norm, else acc",
                  runs="--eval-tasks")


def find(path: str) -> Optional[Metric]:
    """The metric at a path, or None."""
    m = _REGISTRY.get(path)
    if m is None and path.startswith(DOWNSTREAM_PREFIX) and len(path) > len(DOWNSTREAM_PREFIX):
        return _downstream(path)
    return m


def get(path: str) -> Metric:
    """The metric at a path; an unknown one is one line naming the known ones."""
    m = find(path)
    if m is None:
        raise UnlearnError(f"unknown metric {path!r}; known: {', '.join(_REGISTRY)}, {DOWNSTREAM_PREFIX}TASK")
    return m


def read(cell: Optional[dict], path: str):
    """The value at a dotted path of a cell (None where a part is missing); not checked for finiteness."""
    node = cell
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def blank(*groups: str) -> dict:
    """A cell's metrics of these groups that every run has, every value None, nested as a cell nests
    them (what a diverged cell records: every field present, none measured)."""
    out: dict = {}
    for m in _REGISTRY.values():
        if m.group in groups and m.runs == EVERY_RUN:
            *parents, leaf = m.path.split(".")
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = None
    return out


# Families written as one entry in `--metric`'s help.
_FAMILY_HELP = {RECOVERY: "*_recovery, attack_robustness (--attacks)", BENCH: "bench.* (TOFU/MUSE presets)"}


def metric_help() -> str:
    """`--metric`'s help: every plain metric by name, the families by pattern."""
    families = list(dict.fromkeys(_FAMILY_HELP[m.group] for m in every() if m.group in _FAMILY_HELP))
    return " | ".join([*every_run_paths(), *families, f"{DOWNSTREAM_PREFIX}TASK (--eval-tasks)"])


# ---------------------------------------------------------------- the metrics

_GAP_HELP = "|ln ppl_forget(θ) − ln ppl_unseen(θ0)|: distance from the approximate-retraining target"
register(Metric(EVAL_SCORE, "score", "nats", LOWER, OBJECTIVE,
                "forget_gap + max(0, retain_eval_drift): the study objective (utility on held-out retain_eval)",
                tier=HEADLINE))
register(Metric(FORGET_GAP, "gap", "nats", LOWER, OBJECTIVE, _GAP_HELP, tier=HEADLINE))
register(Metric(UTILITY_DRIFT, "drift", "nats", CLOSER, OBJECTIVE,  # coloured by |drift|
                "ln ppl_retain_eval(θ) − ln ppl_retain_eval(θ0): utility lost on documents no retain term "
                "trains on (negative = improved)", target=0.0, tier=HEADLINE))
_PPL_TIER = {"forget": HEADLINE, "retain_eval": HEADLINE, "retain": LISTED}
for _role in ROLES:
    # Only the retain perplexities are better lower; the forget (and unseen, general) ones are judged
    # against a target, so their heatmap is a neutral scale.
    _what = {"retain": "the retain set the retain terms train on",
             "retain_eval": "retain_eval, held out from every retain term"}.get(_role, f"the {_role} set")
    register(Metric(ppl(_role), _role, "perplexity", LOWER if _role.startswith("retain") else NEUTRAL, PERPLEXITY,
                    f"perplexity of {_what} (token-weighted)", log=True, tier=_PPL_TIER.get(_role, LISTED)))
for _attack in MIA_ATTACKS:
    register(Metric(mia_auc(_attack), f"mia.{_attack}", "AUC", CLOSER, MIA,
                    f"ROC AUC of the {_attack} attack, forget vs unseen: 1 = remembered, 0.5 = looks unseen, "
                    "< 0.5 over-unlearned", target=0.5,
                    tier=HEADLINE if _attack in ("loss", "min_k") else DETAIL))
register(Metric(mia_auc(REFERENCE_ATTACK), "mia.reference", "AUC", CLOSER, MIA,
                "ROC AUC of the reference attack (a chunk's loss against a reference model's: θ0, or "
                "--reference-model), forget vs unseen", target=0.5))
register(Metric(mia_auc(GRADNORM_ATTACK), "mia.gradnorm", "AUC", CLOSER, MIA,
                "ROC AUC of the gradient-norm attack (−‖∇θ of a chunk's mean NLL‖₂: members sit where the loss "
                "is flat), forget vs unseen", runs="--mia-gradnorm", target=0.5))
register(Metric(MIA_AUC_LO, "mia lo", "AUC", CLOSER, MIA, "low end of the loss AUC's 95 % bootstrap interval "
                "(the verdict needs the interval to hold 0.5)", target=0.5))
register(Metric(MIA_AUC_HI, "mia hi", "AUC", CLOSER, MIA, "high end of the loss AUC's 95 % bootstrap interval",
                target=0.5))
for _path, _short, _what in (
    (EXACT_MEMORIZATION, "EM", "share of the answer's tokens the model's greedy prediction gets right, "
     "teacher-forced"),
    (EXTRACTION_STRENGTH, "ES", "1 − k/n for the shortest prefix k of the answer from which greedy decoding "
     "writes the rest exactly"),
):
    for _role in MEMORIZATION_ROLES:
        # forget and unseen are read against each other (a retrained model has the unseen figure),
        # so neutral; on retain_eval more is kept utility
        register(Metric(f"{_path}.{_role}", f"{_short} {_role}", "share", HIGHER if _role == "retain_eval" else NEUTRAL,
                        MEMORIZATION, f"{_what}, on {_role} (a question–answer set: its answers; plain text: "
                        "each chunk's second half), mean over chunks"))
register(Metric(PRIVLEAK, "privleak", "%", CLOSER, MIA, "(mia_auc.<--privleak-attack> − the retrained model's) / the "
                "retrained model's × 100: 0 = as a model that never saw U; > 0 under-unlearned, < 0 over-unlearned",
                runs="--retrained-auc", target=0.0))
register(Metric(TRAINED_ON_SCORE, "score (retain)", "nats", LOWER, TRAINED_ON,
                "forget_gap + max(0, retain_drift): the objective before retain_eval existed"))
register(Metric(RETAIN_DRIFT, "drift (retain)", "nats", CLOSER, TRAINED_ON,
                "ln ppl_retain(θ) − ln ppl_retain(θ0), on the documents the retain terms train on", target=0.0))
for _attack in ROBUSTNESS_ATTACKS:
    register(Metric(recovery(_attack), f"{_attack} rec.", "share", LOWER, RECOVERY,
                    f"share of the forgetting the {_attack} attack undoes (0 = none, 1 = all)",
                    runs=f"--attacks {_attack}"))
register(Metric(ATTACK_ROBUSTNESS, "atk robust", "share", HIGHER, RECOVERY,
                "harmonic mean of (1 − relearn recovery) and (1 − quantization recovery), each in [0, 1]: "
                "1 = neither attack brings anything back", runs="--attacks relearn and quant4 or quant8"))
for _name, _label, _better, _help, _runs in (
    ("tofu_truth_ratio", "truth ratio", HIGHER, "mean min(R, 1/R) of the forget questions' truth ratios", "TOFU"),
    ("tofu_forget_quality", "forget quality", HIGHER, "KS p-value of the truth ratios against the retain-only "
     "model's", "TOFU with --tofu-retain-truth-ratios"),
    ("muse_verbmem_f", "VerbMem", LOWER, "ROUGE-L F1 of continuations of the forget excerpts", "MUSE"),
    ("muse_knowmem_f", "KnowMem forget", LOWER, "ROUGE-L F1 of answers to the forget QA", "MUSE"),
    ("muse_knowmem_r", "KnowMem retain", HIGHER, "ROUGE-L F1 of answers to the retain QA", "MUSE"),
):
    register(Metric(f"{BENCH}.{_name}", _label, "", _better, BENCH, _help, runs=f"a {_runs} preset"))
# TOFU's model utility and its nine parts (the key names live with the code that computes them)
from engine.benchmark_metrics import tofu_utility as _mu  # noqa: E402  (light: no torch)

register(Metric(f"{BENCH}.{_mu.HEADLINE}", "model utility", "", HIGHER, BENCH,
                "harmonic mean of prob, ROUGE-L recall and 1 − truth ratio on TOFU's retain, real-authors and "
                "world-facts questions: TOFU's Model Utility", runs="a TOFU preset"))
for _set, _, _base in _mu.UTILITY_SETS:
    _what = {"prob": "mean P(answer)^(1/|answer|)" if _set == "retain" else
             "mean share of the answer's P^(1/len) among it and the perturbed answers'",
             "rouge": "mean ROUGE-L recall of the greedy answer against the answer",
             "truth_ratio": f"mean max(0, 1 − R), R = perturbed over {_base.replace('_', ' ')} (per-token probs)"}
    for _part in _mu.PARTS:
        _short = {"prob": "prob", "rouge": "ROUGE", "truth_ratio": "TR"}[_part]
        register(Metric(f"{BENCH}.{_mu.part_key(_set, _part)}", f"MU {_set.replace('_', ' ')} {_short}", "", HIGHER,
                        BENCH, f"model utility part, TOFU {_set.replace('_', ' ')}: {_what[_part]}",
                        runs="a TOFU preset"))
register(Metric(f"{BENCH}.muse_auc", "MUSE AUC", "AUC", CLOSER, BENCH, "forget-vs-holdout Min-40% AUC",
                runs="a MUSE preset", target=0.5))
register(Metric(f"{BENCH}.muse_privleak", "PrivLeak", "%", CLOSER, BENCH,
                "(auc − retrained auc) / retrained auc × 100", runs="a MUSE preset with --muse-retrained-auc",
                target=0.0))


# ---------------------------------------------------------------- the cell

def cell_fields() -> dict[str, object]:
    """A cell's keys and their types: the registry's metrics (a dotted path's first part
    holds a dict), then what every cell records besides."""
    fields: dict[str, object] = {"step": int}
    for m in every():
        top = m.path.split(".")[0]
        fields[top] = dict[str, Optional[float]] if "." in m.path else Optional[float]
    fields[DOWNSTREAM] = dict[str, Optional[float]]
    fields.update(verdict=dict[str, bool], success=bool, diverged=bool, train_loss=Optional[float],
                  at_target=bool, noise=dict[str, Optional[float]],
                  bands=dict[str, float],  # the forget and utility bands the verdict used (engine.verdict)
                  attacks=dict[str, dict])  # per --attacks name: the attacked model's metrics and its recovery
    return fields


# The engine's cell, as stored (CellRow.metrics) and as every screen reads it. Keys outside
# EVERY_RUN are there only in the runs that have them (total=False).
CellMetrics = TypedDict("CellMetrics", cell_fields(), total=False)  # type: ignore[misc]


@contextmanager
def registered(m: Metric) -> Iterator[Metric]:
    """`m` registered for the duration of a `with`: a test's metric, gone afterwards."""
    register(m)
    try:
        yield m
    finally:
        unregister(m.path)
