"""MUSE's VerbMem, KnowMem and PrivLeak (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way
Evaluation for Language Models", §3; code: github.com/swj0419/muse_bench, eval.py, constants.py,
metrics/verbmem.py, knowmem.py, privleak.py, logger.py).

VerbMem = mean over forget excerpts of ROUGE-L(greedy continuation of the prompt, the true
continuation cut to max_new_tokens tokens); MUSE: 128 new tokens.
KnowMem = mean over questions of ROUGE-L(greedy answer, true answer), the question preceded by
few-shot examples, the output cut before "\\n\\n", "\\nQuestion" or "Question:"; MUSE: 32 new tokens.
Both report ROUGE-L F1 by default (eval.py's agg key `mean_rougeL` is rouge_score's fmeasure,
use_stemmer=False); measure="recall" gives rougeL recall.

PrivLeak = (AUC_unlearned - AUC_retrained) / AUC_retrained × 100 (eval.py), AUC being MUSE's
`forget_holdout_Min-40%`: the ROC AUC of the Min-40% statistic with the holdout texts as the
"member" class and the forget texts as "non-members" (privleak.py, sweep: roc_curve(y, -ppl) with
y = 1 on holdout). A retrained model gives ~0 (AUC ≈ 0.5); a model that still remembers the forget
set scores it higher than holdout, its AUC falls towards 0 and PrivLeak towards -100%; an
over-unlearned model gives a positive PrivLeak.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from engine.benchmark_metrics.rouge import rouge_l
from engine.errors import UnlearnError

VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_TEMPLATE = "Question: {question}\nAnswer: "  # each few-shot example: template + answer + "\n\n"
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")
PRIVLEAK_MIN_K = 0.4


def verbmem(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
            max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS, measure: str = "f1") -> float:
    """Mean ROUGE-L of the model's greedy continuation of each prompt against the true
    continuation, cut (like MUSE) to its first max_new_tokens tokens."""
    from engine.benchmark_metrics.lm import greedy_continuation

    _same_length(prompts, continuations, "prompts", "continuations")
    scores = []
    for prompt, truth in zip(prompts, continuations):
        ids = tokenizer(truth, add_special_tokens=False)["input_ids"][:max_new_tokens]
        truth = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        scores.append(rouge_l(greedy_continuation(model, tokenizer, prompt, max_new_tokens), truth, measure))
    return float(np.mean(scores))


def knowmem_prompt(question: str, few_shot: Sequence[tuple[str, str]] = (), template: str = KNOWMEM_TEMPLATE) -> str:
    """MUSE's few-shot prompt: each example as template(q) + a + "\\n\\n", then template(question)."""
    shots = "".join(template.format(question=q) + a + "\n\n" for q, a in few_shot)
    return shots + template.format(question=question)


def cut_at_stops(text: str, stops: Sequence[str] = KNOWMEM_STOPS) -> str:
    """The text before the first occurrence of each stop string, in turn (MUSE's
    get_prefix_before_words_occur)."""
    for s in stops:
        text = text.split(s)[0]
    return text


def knowmem(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
            max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS, few_shot: Sequence[tuple[str, str]] = (),
            template: str = KNOWMEM_TEMPLATE, measure: str = "f1") -> float:
    """Mean ROUGE-L of the model's greedy answer (cut at the stop strings) against the true answer.
    `few_shot`: (question, answer) examples put before each question (MUSE: its *_qa_icl.json)."""
    from engine.benchmark_metrics.lm import greedy_continuation

    _same_length(questions, answers, "questions", "answers")
    scores = [rouge_l(cut_at_stops(greedy_continuation(model, tokenizer, knowmem_prompt(q, few_shot, template), max_new_tokens)),
                      a, measure)
              for q, a in zip(questions, answers)]
    return float(np.mean(scores))


def min_k_scores(model, tokenizer, texts: Sequence[str], k: float = PRIVLEAK_MIN_K, max_tokens: int | None = None,
                 batch_size: int = 8) -> np.ndarray:
    """Per text, the Min-K% statistic of engine/evaluate.py (mean of the lowest k-fraction of the
    token log-probs; higher = more member-like) over its first max_tokens tokens (default: the
    model's max_position_embeddings). Texts under engine.data.MIN_CHUNK_TOKENS tokens are left out."""
    from engine.data import chunk_texts
    from engine.evaluate import score_chunks

    max_tokens = max_tokens or getattr(model.config, "max_position_embeddings", 2048)
    chunks = chunk_texts(list(texts), tokenizer, max_tokens, role="privleak")
    first = [i for i, d in enumerate(chunks.doc_index) if i == 0 or chunks.doc_index[i - 1] != d]
    return score_chunks(model, chunks.subset(first), batch_size=batch_size, min_k=k).mia["min_k"]


def min_k_auc(model, tokenizer, forget_texts: Sequence[str], holdout_texts: Sequence[str], k: float = PRIVLEAK_MIN_K,
              max_tokens: int | None = None, batch_size: int = 8) -> float:
    """MUSE's forget_holdout_Min-K% AUC: the chance that a holdout text outscores a forget text on
    Min-K% (ties ½), i.e. 1 − engine.evaluate's forget-vs-unseen orientation."""
    from engine.evaluate import roc_auc

    forget = min_k_scores(model, tokenizer, forget_texts, k, max_tokens, batch_size)
    holdout = min_k_scores(model, tokenizer, holdout_texts, k, max_tokens, batch_size)
    auc = roc_auc(holdout, forget) if np.isfinite(np.concatenate([forget, holdout])).all() else None
    if auc is None:
        raise UnlearnError("Min-K% AUC: no finite scores on the forget or the holdout texts")
    return auc


def privleak(auc_unlearned: float, auc_retrained: float) -> float:
    """(AUC_unlearned − AUC_retrained) / AUC_retrained × 100, in percent (MUSE eval.py)."""
    if not auc_retrained:
        raise UnlearnError("PrivLeak: the retrained model's AUC is 0, it cannot normalise")
    return (auc_unlearned - auc_retrained) / auc_retrained * 100.0


def _same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise UnlearnError(f"{len(a)} {name_a} but {len(b)} {name_b}")
    if not a:
        raise UnlearnError(f"no {name_a} to score")
