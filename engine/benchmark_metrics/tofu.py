"""TOFU's truth ratio and forget quality (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning
for LLMs", §2.5; code: github.com/locuslab/tofu, data_module.py and aggregate_eval_stat.py).

Truth ratio of a question q with a paraphrased correct answer ã and perturbed (wrong) answers â_j,
each probability normalised by its length in tokens:

    R_truth = mean_j P(â_j | q)^(1/|â_j|)  /  P(ã | q)^(1/|ã|)            (paper, arithmetic mean)

TOFU's code averages the perturbed answers' per-token losses instead, i.e. a geometric mean of the
P(â_j|q)^(1/|â_j|) (aggregate_eval_stat.py: exp(mean_j avg_loss_j - avg_loss_para), which is the
reciprocal of the ratio; the KS test below is unchanged by taking reciprocals of both samples):
`mean="geometric"` reproduces it.

Forget quality: the p-value of the two-sample Kolmogorov-Smirnov test between the unlearned
model's truth ratios on the forget questions and a retain-only (never saw the forget set) model's
(aggregate_eval_stat.py, get_forget_quality: scipy.stats.ks_2samp(...).pvalue). High p: the two
distributions cannot be told apart.

Prompt: QA_TEMPLATE is TOFU's format for its non-chat models (model_config.yaml: "Question: ",
"\\n", "Answer: "). TOFU masks only the question, so its loss also counts the "Answer: " tag and
an EOS after the answer; here only the answer's own tokens are scored.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from engine.errors import UnlearnError

QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"


def answer_logprob(model, tokenizer, question: str, answer: str, template: str = QA_TEMPLATE) -> tuple[float, int]:
    """(Σ log p, number of tokens) over the answer's tokens of template(question, answer), given
    everything before them (see lm.continuation_logprobs for where the answer's tokens start)."""
    from engine.benchmark_metrics.lm import continuation_logprobs

    prompt, _, tail = template.partition("{answer}")
    prompt = prompt.format(question=question)
    logps = continuation_logprobs(model, tokenizer, prompt, answer + tail.format(question=question))
    if not logps:
        raise UnlearnError(f"the answer {answer!r} has no tokens to score")
    return math.fsum(logps), len(logps)


def normalized_prob(model, tokenizer, question: str, answer: str, template: str = QA_TEMPLATE) -> float:
    """P(answer | question)^(1/|answer|) = exp(mean log p of the answer's tokens)."""
    total, n = answer_logprob(model, tokenizer, question, answer, template)
    return math.exp(total / n)


def truth_ratio(model, tokenizer, question: str, paraphrased_answer: str, perturbed_answers: Sequence[str],
                template: str = QA_TEMPLATE, mean: str = "arithmetic") -> float:
    """mean_j P(â_j|q)^(1/|â_j|) / P(ã|q)^(1/|ã|): near 1 when the model cannot tell the correct
    answer from the wrong ones, small when it prefers the correct one. `mean`: "arithmetic" (the
    paper) or "geometric" (TOFU's code)."""
    if not perturbed_answers:
        raise UnlearnError("truth ratio: the question has no perturbed answers")
    if mean not in ("arithmetic", "geometric"):
        raise ValueError(f"mean must be 'arithmetic' or 'geometric', not {mean!r}")
    log_pert = [math.log(normalized_prob(model, tokenizer, question, a, template)) for a in perturbed_answers]
    log_para = math.log(normalized_prob(model, tokenizer, question, paraphrased_answer, template))
    if mean == "geometric":
        return math.exp(math.fsum(log_pert) / len(log_pert) - log_para)
    return math.fsum(math.exp(lp - log_para) for lp in log_pert) / len(log_pert)


def forget_quality(truth_ratios_unlearned: Sequence[float], truth_ratios_retain_model: Sequence[float]) -> float:
    """p-value of the two-sample KS test (scipy.stats.ks_2samp, two-sided, its default method)
    between the unlearned model's truth ratios and the retain-only model's."""
    from scipy.stats import ks_2samp

    a, b = _ratios(truth_ratios_unlearned, "unlearned"), _ratios(truth_ratios_retain_model, "retain-only")
    return float(ks_2samp(a, b).pvalue)


def load_truth_ratios(path: str | Path) -> list[float]:
    """A retain-only model's truth ratios from a JSON file: a list of numbers, or an object
    {"truth_ratios": [numbers]}. Raises UnlearnError (one line) for a missing or invalid file."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnlearnError(f"truth ratios: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UnlearnError(f"truth ratios: cannot read {path}: {e.__class__.__name__}") from None
    except json.JSONDecodeError as e:
        raise UnlearnError(f"truth ratios: {path} is not JSON (line {e.lineno}: {e.msg})") from None
    if isinstance(data, dict):
        if "truth_ratios" not in data:
            raise UnlearnError(f'truth ratios: {path} is an object without a "truth_ratios" key')
        data = data["truth_ratios"]
    return _ratios(data, str(path))


def _ratios(values, what: str) -> list[float]:
    """A non-empty list of finite, non-negative numbers, or one UnlearnError line."""
    if not isinstance(values, (list, tuple)) and not hasattr(values, "tolist"):
        raise UnlearnError(f"truth ratios ({what}): expected a list of numbers, got {type(values).__name__}")
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if not values:
        raise UnlearnError(f"truth ratios ({what}): the list is empty")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UnlearnError(f"truth ratios ({what}): item {i} is {v!r}, not a finite non-negative number")
    return [float(v) for v in values]
