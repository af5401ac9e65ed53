"""Benchmark metrics and downstream tasks at a run's milestones (and once at θ0).

A forget set built by `unlearn forgetset preset` carries the rows its benchmark's own metrics need
(ForgetSetTexts.extras). When it does, every cell gets a `bench` dict, and with
`--eval-tasks` a `downstream` dict:

    bench.tofu_truth_ratio      TOFU preset: mean over the forget questions of min(R, 1/R), R the
                                truth ratio (paraphrased vs perturbed answers; TOFU's reported
                                forget "Truth Ratio": 1 = cannot tell right from wrong)
    bench.tofu_forget_quality   with --tofu-retain-truth-ratios FILE: KS p-value of the R against the
                                retain-only model's
    bench.tofu_model_utility    TOFU preset: harmonic mean of the nine bench.tofu_mu_<set>_<part>
                                (prob, rouge, truth_ratio on retain, real authors, world facts;
                                engine/benchmark_metrics/tofu_utility.py)
    bench.muse_verbmem_f        MUSE preset: ROUGE-L F1 of greedy continuations of the forget excerpts
    bench.muse_knowmem_f        MUSE preset: ROUGE-L F1 of greedy answers to the forget QA
    bench.muse_knowmem_r        MUSE preset: the same on the retain QA
    bench.muse_auc              MUSE preset: forget-vs-holdout Min-40% AUC (the forget and unseen roles)
    bench.muse_privleak         with --muse-retrained-auc X: (auc - X) / X × 100
    downstream.TASK             with --eval-tasks: the lm-eval task's acc_norm, else acc

(engine/metric_registry.py declares them: how each is labelled, coloured and offered.)

Each list is cut to its first --bench-samples items (default 100), so a milestone's evaluation on a 7B
model is not all generation. θ0's figures go in the result's baseline (with the per-question truth ratios,
`baseline.bench.tofu_truth_ratios`: the file --tofu-retain-truth-ratios reads, when θ0 is a
retain-only model), cached like the baseline. docs/benchmark-metrics.md has the details.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

TOFU_MEAN = "geometric"  # TOFU's code (aggregate_eval_stat.py), so its published retain-model ratios compare
# Part of the θ0 cache key: a cached file measured by an older version lacks what this one measures
# (2: TOFU's model utility).
EXTRAS_VERSION = 2


@dataclass
class MilestoneExtras:
    """What a run measures beyond engine.evaluate at θ0 and at each milestone."""

    extras: dict  # the forget set's extras (name -> rows)
    forget: list[str]  # plain forget / unseen texts (MUSE's raw forget and holdout), for the Min-K AUC
    unseen: list[str]
    tokenizer: object
    samples: int
    seq_len: int
    batch_size: int
    retain_truth_ratios: list[float] | None
    retrained_auc: float | None
    tasks: tuple[str, ...]
    tasks_dir: str
    tasks_limit: int

    @classmethod
    def of(cls, texts, tokenizer, cfg) -> "MilestoneExtras | None":
        """None when the run has nothing to measure here (no preset extras, no --eval-tasks)."""
        from engine.benchmark_metrics.tofu import load_truth_ratios
        from engine.downstream import parse_tasks, require_lm_eval

        extras = dict(getattr(texts, "extras", None) or {})
        tasks = parse_tasks(cfg.eval_tasks)
        if tasks:
            require_lm_eval()  # before any training: one line naming the extra
        if not _is_tofu(extras) and not _is_muse(extras) and not tasks:
            return None
        plain = not texts.is_qa
        return cls(extras, list(texts.forget) if plain else [], list(texts.unseen) if plain else [], tokenizer,
                   cfg.bench_samples, cfg.seq_len, cfg.eval_batch_size,
                   load_truth_ratios(cfg.tofu_retain_truth_ratios) if cfg.tofu_retain_truth_ratios and _is_tofu(extras) else None,
                   cfg.muse_retrained_auc if _is_muse(extras) else None, tasks, cfg.eval_tasks_dir, cfg.eval_tasks_limit)

    def _first(self, rows: list) -> list:
        return rows[: self.samples] if self.samples else rows

    def measure(self, model) -> dict:
        """The raw figures of `model`: {"bench": {...}, "downstream": {...}} (only what applies);
        the bench dict also holds the per-question truth ratios (a list)."""
        out: dict = {}
        bench: dict = {}
        if _is_tofu(self.extras):
            bench["tofu_truth_ratios"] = tofu_truth_ratios(model, self.tokenizer, self._first(self.extras["forget_perturbed"]))
        if _has_tofu_utility(self.extras):
            from engine.benchmark_metrics.tofu_utility import HEADLINE, model_utility, model_utility_parts

            parts = model_utility_parts(model, self.tokenizer, self.extras, self.samples)
            bench |= {HEADLINE: model_utility(parts), **parts}
        if "verbmem_forget" in self.extras:
            from engine.benchmark_metrics.muse import verbmem

            rows = self._first(self.extras["verbmem_forget"])
            bench["muse_verbmem_f"] = verbmem(model, self.tokenizer, [r["prompt"] for r in rows], [r["gt"] for r in rows])
        for role, short in (("forget", "f"), ("retain", "r")):
            if f"knowmem_{role}_qa" in self.extras:
                from engine.benchmark_metrics.muse import knowmem

                rows = self._first(self.extras[f"knowmem_{role}_qa"])
                shots = [(r["question"], r["answer"]) for r in self.extras.get(f"knowmem_{role}_qa_icl", [])]
                bench[f"muse_knowmem_{short}"] = knowmem(model, self.tokenizer, [r["question"] for r in rows],
                                                         [r["answer"] for r in rows], few_shot=shots)
        if _is_muse(self.extras) and self.forget and self.unseen:
            from engine.benchmark_metrics.muse import min_k_auc

            bench["muse_auc"] = min_k_auc(model, self.tokenizer, self._first(self.forget), self._first(self.unseen),
                                          max_tokens=self.seq_len, batch_size=self.batch_size)
        if bench:
            out["bench"] = bench
        if self.tasks:
            from engine.downstream import evaluate_tasks

            out["downstream"] = evaluate_tasks(model, self.tokenizer, self.tasks, self.tasks_dir, self.tasks_limit,
                                               self.batch_size)
        return out

    def cell_fields(self, raw: dict) -> dict:
        """A cell's fields from measure()'s figures: the scalars, with forget quality and PrivLeak
        derived where their reference is given."""
        from engine.benchmark_metrics.muse import privleak
        from engine.benchmark_metrics.tofu import forget_quality

        out = {k: dict(v) for k, v in raw.items()}
        bench = out.get("bench")
        if bench is not None:
            ratios = bench.pop("tofu_truth_ratios", None)
            if ratios is not None:
                bench["tofu_truth_ratio"] = _finite(sum(min(r, 1 / r) if r > 0 else 0.0 for r in ratios) / len(ratios))
                if self.retain_truth_ratios is not None:
                    bench["tofu_forget_quality"] = forget_quality(ratios, self.retain_truth_ratios)
            if bench.get("muse_auc") is not None and self.retrained_auc is not None:
                bench["muse_privleak"] = privleak(bench["muse_auc"], self.retrained_auc)
        return out

    def baseline_fields(self, model, cache: Path | None) -> dict:
        """θ0's fields (and its per-question truth ratios), measured once per cache key; `cache`:
        the path prefix of the cached file (the baseline cache's folder / model-set-dtype key)."""
        path = cache.parent / f"{cache.name}-extras-{self.cache_key()}.json" if cache else None
        if path is not None and path.is_file():
            raw = json.loads(path.read_text())
        else:
            raw = self.measure(model)
            if path is not None:
                from engine.files import write_json_atomic

                write_json_atomic(path, raw)
        out = self.cell_fields(raw)
        if "tofu_truth_ratios" in raw.get("bench", {}):
            out["bench"]["tofu_truth_ratios"] = raw["bench"]["tofu_truth_ratios"]
        return out

    def cache_key(self) -> str:
        """What θ0's raw figures depend on beyond the model and forget set (their part of the key)."""
        what = [EXTRAS_VERSION, self.samples, self.seq_len, sorted(self.extras), self.tasks, self.tasks_dir,
                self.tasks_limit]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def tofu_truth_ratios(model, tokenizer, rows: list[dict]) -> list[float]:
    """TOFU's truth ratio of each forget question (geometric mean over its perturbed answers, as in
    TOFU's code), from the rows of forgetXX_perturbed."""
    from engine.benchmark_metrics.tofu import truth_ratio

    out = []
    for row in rows:
        perturbed = row["perturbed_answer"]
        perturbed = [perturbed] if isinstance(perturbed, str) else list(perturbed)
        out.append(truth_ratio(model, tokenizer, row["question"], row["paraphrased_answer"], perturbed, mean=TOFU_MEAN))
    return out


def _is_tofu(extras: dict) -> bool:
    return "forget_perturbed" in extras


def _has_tofu_utility(extras: dict) -> bool:
    """A TOFU preset with the three utility sets (every one built by this version has them)."""
    from engine.benchmark_metrics.tofu_utility import UTILITY_SETS

    return _is_tofu(extras) and all(extras.get(key) for _, key, _ in UTILITY_SETS)


def _is_muse(extras: dict) -> bool:
    return "verbmem_forget" in extras or "knowmem_forget_qa" in extras


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
