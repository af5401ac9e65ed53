"""ROUGE-L between two strings, as Google's rouge_score computes it (no new dependency).

Tokenization (rouge_score/tokenize.py): lowercase, every run of characters outside [a-z0-9]
becomes a space, split on whitespace, empty tokens dropped; no stemming (MUSE builds its scorer with
use_stemmer=False, muse_bench metrics/logger.py; TOFU stems, which is not done here).

Score (rouge_score/rouge_scorer.py, _score_lcs): with L = |LCS(prediction, reference)| in tokens,
    precision = L / |prediction|,  recall = L / |reference|,  F1 = 2·P·R / (P + R)
and all three are 0 when either side has no tokens.
"""
from __future__ import annotations

import re

MEASURES = ("precision", "recall", "f1")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokens: lowercase alphanumeric runs."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_scores(prediction: str, reference: str) -> dict[str, float]:
    """{"precision", "recall", "f1"} of ROUGE-L of `prediction` against `reference`."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return {m: 0.0 for m in MEASURES}
    lcs = lcs_length(pred, ref)
    p, r = lcs / len(pred), lcs / len(ref)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0}


def rouge_l(prediction: str, reference: str, measure: str = "f1") -> float:
    """One ROUGE-L figure: "f1" (MUSE's reported `mean_rougeL`), "recall" (TOFU's `rougeL_recall`)
    or "precision"."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, not {measure!r}")
    return rouge_l_scores(prediction, reference)[measure]
