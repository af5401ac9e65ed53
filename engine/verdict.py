"""The verdict on a model: has it forgotten U as a retrained model would, and kept its utility?

Three parts, each judged against the target's own noise rather than a fixed figure:

- **forget**: forget_gap = |ln ppl_forget(θ) − ln ppl_unseen(θ0)| within the forget band. The band is
  the largest of the design's tolerance (ln 1.10), the gap that sampling alone gives a model to which
  U is exactly as unseen as `unseen` (a two-sample bootstrap over θ0's unseen documents, at the sizes
  of the forget and unseen sets), and the target's spread where a retrained twin or several seeds
  estimate it too (`--target-spread`).
- **mia**: the loss-MIA AUC of forget against unseen, with its bootstrap interval, consistent with
  0.5: U looks unseen. A gap inside its band is not enough: a model fine-tuned a few epochs on U may
  already sit within it while its MIA AUC is 0.8 (it plainly remembers), and far below 0.5 is
  over-unlearning, which leaks membership as well.
- **utility**: retain_eval_drift = ln ppl_retain_eval(θ) − ln ppl_retain_eval(θ0) within the utility
  band: the larger of the design's tolerance (ln 1.05) and the bootstrap half-width of ln
  ppl_retain_eval(θ0) over its documents. retain_eval is held out from every retain term.

`--tol-forget` / `--tol-retain` replace a band by ln(1 + tol) exactly. Bootstraps resample documents
(a document's chunks together), with a fixed seed: the same model gives the same verdict.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95
FORGET_FLOOR = math.log1p(0.10)  # the design's tolerances: the band is never tighter than these
UTILITY_FLOOR = math.log1p(0.05)
_SEED = 20240215  # fixed: a verdict is a function of the model and the data alone


def _doc_sums(nll_sum: np.ndarray, n_tokens: np.ndarray, doc_index: Optional[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-document NLL and token sums (chunks of one document resample together)."""
    if doc_index is None:
        return nll_sum.astype(np.float64), n_tokens.astype(np.float64)
    docs, which = np.unique(np.asarray(doc_index), return_inverse=True)
    nll = np.zeros(len(docs))
    tok = np.zeros(len(docs))
    np.add.at(nll, which, nll_sum)
    np.add.at(tok, which, n_tokens)
    return nll, tok


def _resampled_log_ppl(nll: np.ndarray, tok: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """ln ppl of BOOTSTRAP_SAMPLES resamples of `size` documents (with replacement)."""
    idx = rng.integers(0, len(nll), size=(BOOTSTRAP_SAMPLES, size))
    return nll[idx].sum(1) / np.maximum(1.0, tok[idx].sum(1))


def forget_noise(unseen_nll: np.ndarray, unseen_tokens: np.ndarray, unseen_docs: Optional[list[int]],
                 n_forget_docs: int) -> float:
    """The CONFIDENCE quantile of |ln ppl(A) − ln ppl(B)| for A (n_forget_docs documents) and B (every
    unseen document's count) drawn from θ0's unseen documents: the forget_gap that sampling alone
    shows for a model to which U is exactly as unseen as `unseen`."""
    nll, tok = _doc_sums(unseen_nll, unseen_tokens, unseen_docs)
    if len(nll) < 2 or n_forget_docs < 1:
        return math.inf
    rng = np.random.default_rng(_SEED)
    a = _resampled_log_ppl(nll, tok, n_forget_docs, rng)
    b = _resampled_log_ppl(nll, tok, len(nll), rng)
    return float(np.quantile(np.abs(a - b), CONFIDENCE))


def log_ppl_half_width(nll_sum: np.ndarray, n_tokens: np.ndarray, docs: Optional[list[int]]) -> float:
    """Half the width of the CONFIDENCE bootstrap interval of a set's ln ppl (documents resampled)."""
    nll, tok = _doc_sums(nll_sum, n_tokens, docs)
    if len(nll) < 2:
        return math.inf
    draws = _resampled_log_ppl(nll, tok, len(nll), np.random.default_rng(_SEED))
    lo, hi = np.quantile(draws, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(hi - lo) / 2


def auc_interval(members: np.ndarray, nonmembers: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    """The CONFIDENCE percentile interval of the ROC AUC (members above non-members), each group
    resampled on its own (a stratified bootstrap)."""
    members, nonmembers = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    if len(members) < 2 or len(nonmembers) < 2 or not (np.isfinite(members).all() and np.isfinite(nonmembers).all()):
        return None, None
    rng = np.random.default_rng(_SEED)
    m = members[rng.integers(0, len(members), (BOOTSTRAP_SAMPLES, len(members)))]
    n = nonmembers[rng.integers(0, len(nonmembers), (BOOTSTRAP_SAMPLES, len(nonmembers)))]
    # Mann-Whitney per resample: P(member > non-member) + ½ P(tie), by binary search in the sorted
    # non-members (memory stays rows × set size, whatever the sets' sizes).
    n.sort(axis=1)
    aucs = np.empty(BOOTSTRAP_SAMPLES)
    for r in range(BOOTSTRAP_SAMPLES):
        below = np.searchsorted(n[r], m[r], side="left")
        upto = np.searchsorted(n[r], m[r], side="right")
        aucs[r] = (below + upto).sum() / (2.0 * len(m[r]) * n.shape[1])
    lo, hi = np.quantile(aucs, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(lo), float(hi)


def bands(baseline: dict, tol_forget: Optional[float] = None, tol_retain: Optional[float] = None,
          target_spread: float = 0.0) -> dict:
    """The forget and utility bands for θ0's `baseline` (which carries the measured noise), each
    with what it is made of: {"forget": {...}, "utility": {...}}."""
    noise = baseline.get("noise") or {}

    def band(tol, floor, parts: dict) -> dict:
        if tol is not None:
            return {"band": math.log1p(tol), "source": "tolerance", **parts}
        finite = [v for v in parts.values() if v is not None and math.isfinite(v)]
        return {"band": max([floor, *finite]), "source": "auto", "floor": floor, **parts}

    forget = band(tol_forget, FORGET_FLOOR, {"noise": noise.get("forget"), "spread": target_spread or 0.0})
    utility = band(tol_retain, UTILITY_FLOOR, {"noise": noise.get("utility")})
    return {"forget": forget, "utility": utility}


def target(baseline: dict, tol_forget: Optional[float] = None, target_spread: float = 0.0) -> Optional[dict]:
    """`{value, band}`: the approximate-retraining target ln ppl_unseen(θ0) and its forget band."""
    pu = baseline.get("ppl_unseen")
    if not pu:
        return None
    b = bands(baseline, tol_forget, None, target_spread)["forget"]
    return {"value": math.log(pu), "band": b["band"], "ppl": pu, **{k: v for k, v in b.items() if k != "band"}}
