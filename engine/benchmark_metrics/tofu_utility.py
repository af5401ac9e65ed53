"""TOFU's model utility (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", §2.5.1;
code: github.com/locuslab/tofu, evaluate_util.py and aggregate_eval_stat.py `get_model_utility`;
open-unlearning: configs/eval/tofu_metrics/model_utility.yaml, src/evals/metrics/memorization.py,
utility.py `hm_aggregate`).

Three figures on each of three sets of questions the model should still answer: the retain
questions (retain_perturbed), real authors (real_authors_perturbed) and world facts
(world_facts_perturbed); model utility is their harmonic mean (scipy.stats.hmean: 0 when any is 0).
With p(x) = P(x|q)^(1/|x|), the answer's probability normalised by its length in tokens:

    prob         retain: mean_q p(a)
                 real authors, world facts: mean_q p(a) / (p(a) + Σ_j p(â_j))   (the perturbed answers
                 as the wrong options of a multiple choice)
    rouge        mean_q ROUGE-L recall(greedy answer to q, a)
    truth_ratio  mean_q max(0, 1 − R), R = geomean_j p(â_j) / p(b) with b the paraphrased answer on
                 retain and the answer itself on real authors and world facts (TOFU's
                 eval_everything.yaml `base_answer_key`; those rows have no paraphrase)

a the true answer, â_j the perturbed ones. Both references agree on all of it (open-unlearning adds
1e-10 to the denominators; the truth ratio's mean over the perturbed answers is geometric in both,
a mean of their per-token losses; the paper writes an arithmetic one).

What differs: the prompt (QA_TEMPLATE) and the tokens scored, as in tofu.answer_logprob; generation
starts from the template's text before the answer with its trailing space removed (TOFU's phi
prompt drops the "Answer: " tag by a split, open-unlearning's keeps it) and stops at EOS or
MAX_NEW_TOKENS new tokens (open-unlearning's max_new_tokens; TOFU's max_length = 200 counts the
prompt); ROUGE-L has no stemmer (rouge.py; both references stem).
"""
from __future__ import annotations

import math
from typing import Sequence

from engine.benchmark_metrics.tofu import QA_TEMPLATE
from engine.errors import UnlearnError

MAX_NEW_TOKENS = 200
# (name, the forget set's extras key, the truth ratio's correct answer): TOFU's eval_everything.yaml
UTILITY_SETS = (("retain", "retain_perturbed", "paraphrased_answer"),
                ("real_authors", "real_authors_perturbed", "answer"),
                ("world_facts", "world_facts_perturbed", "answer"))
PARTS = ("prob", "rouge", "truth_ratio")
HEADLINE = "tofu_model_utility"  # the bench.* keys: HEADLINE and part_key(set, part)


def part_key(set_name: str, part: str) -> str:
    return f"tofu_mu_{set_name}_{part}"


def harmonic_mean(values: Sequence[float]) -> float:
    """n / Σ 1/x over non-negative numbers; 0 when any is 0 (scipy.stats.hmean's convention)."""
    values = list(values)
    if not values:
        raise UnlearnError("model utility: no figures to average")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise UnlearnError(f"model utility: the harmonic mean needs finite non-negative figures, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / math.fsum(1 / v for v in values)


def _perturbed(row: dict) -> list[str]:
    answers = row.get("perturbed_answer")
    answers = [answers] if isinstance(answers, str) else list(answers or [])
    if not answers:
        raise UnlearnError(f"model utility: the question {row.get('question')!r} has no perturbed answers")
    return answers


def utility_set_parts(model, tokenizer, rows: Sequence[dict], base_key: str, options: bool,
                      template: str = QA_TEMPLATE, max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, float]:
    """{"prob", "rouge", "truth_ratio"} of one utility set's rows (question, answer,
    perturbed_answer, and `base_key`: the truth ratio's correct answer). `options`: prob as the true
    answer's share among it and the perturbed ones (real authors, world facts) rather than p(a)."""
    from engine.benchmark_metrics.lm import greedy_continuation
    from engine.benchmark_metrics.rouge import rouge_l
    from engine.benchmark_metrics.tofu import answer_logprob

    def log_p(q: str, x: str) -> float:  # log p(x): mean log-prob of the answer's tokens
        total, n = answer_logprob(model, tokenizer, q, x, template)
        return total / n

    if not rows:
        raise UnlearnError("model utility: a set has no questions")
    prompt_of = template.partition("{answer}")[0]
    probs, rouges, ratios = [], [], []
    for row in rows:
        q, a = row["question"], row["answer"]
        if not isinstance(row.get(base_key), str):
            raise UnlearnError(f"model utility: the question {q!r} has no {base_key}")
        # in logs: an unlearned model's p of a long answer can underflow a float
        lp_true = log_p(q, a)
        lp_wrong = [log_p(q, x) for x in _perturbed(row)]
        # options: p(a) / (p(a) + Σ p(â_j)) = 1 / (1 + Σ exp(log p(â_j) − log p(a)))
        probs.append(1 / (1 + math.fsum(math.exp(lp - lp_true) for lp in lp_wrong)) if options else math.exp(lp_true))
        generated = greedy_continuation(model, tokenizer, prompt_of.format(question=q).rstrip(), max_new_tokens)
        rouges.append(rouge_l(generated, a, "recall"))
        lp_base = lp_true if row[base_key] == a else log_p(q, row[base_key])
        # geometric mean over the perturbed answers, as both references' mean of per-token losses
        r = math.exp(math.fsum(lp_wrong) / len(lp_wrong) - lp_base)
        ratios.append(max(0.0, 1.0 - r))
    n = len(rows)
    return {"prob": math.fsum(probs) / n, "rouge": math.fsum(rouges) / n, "truth_ratio": math.fsum(ratios) / n}


def model_utility_parts(model, tokenizer, extras: dict, samples: int = 0, template: str = QA_TEMPLATE,
                        max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, float]:
    """The nine figures, {part_key(set, part): value}, from a TOFU preset's extras (each list cut to
    its first `samples` rows; 0: all)."""
    out = {}
    for name, key, base in UTILITY_SETS:
        if not extras.get(key):
            raise UnlearnError(f"model utility: the forget set has no {key} rows")
        rows = extras[key][:samples] if samples else extras[key]
        parts = utility_set_parts(model, tokenizer, rows, base, options=name != "retain", template=template,
                                  max_new_tokens=max_new_tokens)
        out.update({part_key(name, p): v for p, v in parts.items()})
    return out


def model_utility(parts: dict[str, float]) -> float:
    """The harmonic mean of the nine figures of model_utility_parts."""
    return harmonic_mean([parts[part_key(name, p)] for name, _, _ in UTILITY_SETS for p in PARTS])
