"""One forward pass per set -> every metric of docs/concepts.md#metrics.

From one pass we keep, per predicted token, log p(token) and the mean/std of log p under the
model's own next-token distribution; per-chunk MIA scores and set perplexities all derive from
those, so adding an attack never adds a forward pass. The one exception is opt-in: the gradient-norm
attack (--mia-gradnorm) needs a backward per chunk, and runs in its own pass (gradient_norms).
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from engine.data import Chunks, ForgetSetChunks
from engine.metric_registry import (
    EVAL_SCORE,
    EXACT_MEMORIZATION,
    EXTRACTION_STRENGTH,
    FORGET_GAP,
    MEMORIZATION_ROLES,
    MIA_AUC,
    MIA_AUC_HI,
    MIA_AUC_LO,
    RETAIN_DRIFT,
    ROLES,
    TRAINED_ON_SCORE,
    UTILITY_DRIFT,
    ppl,
)
from engine.metric_registry import GRADNORM_ATTACK as GRADNORM  # scored where asked for (a backward per chunk)
from engine.metric_registry import MIA_ATTACKS as ATTACKS  # the attacks scored below, each an mia_auc.<attack>
from engine.metric_registry import REFERENCE_ATTACK as REFERENCE  # scored where a reference model's losses are given
from engine.verdict import auc_interval, bands, forget_noise, log_ppl_half_width


@dataclass
class SetScores:
    """Per-chunk statistics of one set under one model."""

    nll_sum: np.ndarray  # [n] Σ NLL of predicted tokens (a question–answer chunk: its answer's)
    n_tokens: np.ndarray  # [n] predicted tokens
    mia: dict[str, np.ndarray]  # attack -> [n] membership score (higher = more member-like)
    exact: np.ndarray | None = None  # [n] exact memorization of each chunk's answer (memorization())
    extraction: np.ndarray | None = None  # [n] extraction strength of each chunk's answer

    @property
    def ppl(self) -> float:
        mean_nll = float(self.nll_sum.sum() / max(1, self.n_tokens.sum()))
        return math.exp(mean_nll) if mean_nll < 700 else math.inf  # a blown-up model: inf (-> None), not OverflowError


def memorization(hits: np.ndarray) -> tuple[float, float]:
    """(exact memorization, extraction strength) of one answer from `hits`, whether the model's greedy
    next token was the answer's own at each of its positions, teacher-forced (one forward pass).

    Exact memorization: the share of hits. Extraction strength: 1 − k/n for the smallest k such that,
    given the answer's first k tokens, greedy decoding writes the other n − k exactly; greedy decoding
    from a true prefix follows the teacher-forced predictions for as long as they hit, so k is one past
    the last miss (0 when nothing is missed: 1; n when the last token is missed: 0)."""
    n = len(hits)
    if n == 0:
        return math.nan, math.nan
    misses = np.flatnonzero(~hits)
    k = int(misses[-1]) + 1 if len(misses) else 0
    return float(hits.mean()), 1.0 - k / n


def min_k_mean(values: np.ndarray, k: float) -> float:
    """Mean of the lowest k-fraction of values (at least one)."""
    n = max(1, int(len(values) * k))
    return float(np.sort(values)[:n].mean())


# Rows scored together: their [rows, T, V] log-softmax statistics stay under this many elements
# (256 MiB of fp32 per tensor), so a large vocabulary on a GPU never holds a whole batch's worth.
STATS_ELEMENTS = 1 << 26


@torch.no_grad()
def score_chunks(model, chunks: Chunks, batch_size: int = 8, device=None, autocast=None, min_k: float = 0.2,
                 attacks: bool = True) -> SetScores:
    """Per-chunk NLL and token counts; with `attacks`, the MIA scores too (their statistics over the
    vocabulary cost as much again: evaluate asks for them only on the sets the attacks compare)."""
    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    nll_sum, n_tok, exact, extraction = [], [], [], []
    mia = {a: [] for a in ATTACKS}
    for start in range(0, len(chunks), batch_size):
        mask = chunks.attention_mask[start : start + batch_size]
        width = int(mask.sum(1).max())  # trim all-pad columns: less work, same numbers
        ids = chunks.input_ids[start : start + batch_size, :width].to(device)
        mask = mask[:, :width].to(device)
        scored = chunks.loss_mask[start : start + batch_size, 1:width]  # a QA chunk's answer tokens only
        # a question–answer chunk scores part of its tokens: its answer is what memorization reads; a
        # plain chunk's "answer" is its second half, the first half its prompt
        qa = (chunks.loss_mask[start : start + batch_size, 1:] != chunks.attention_mask[start : start + batch_size, 1:]).any(1)
        with autocast():
            logits = model(input_ids=ids, attention_mask=mask).logits
        # Per position, log p(token) and the mean/std of log p under the model's own distribution,
        # for a group of rows at once (each position's statistics read only its own logits, so the
        # figures are the per-row loop's); pad (and prompt) positions are computed and then left out.
        rows = max(1, STATS_ELEMENTS // max(1, (width - 1) * logits.size(-1)))
        valid = scored.bool().cpu().numpy()
        for g in range(0, ids.size(0), rows):
            logp_all = torch.log_softmax(logits[g : g + rows, :-1].float(), dim=-1)  # [r, T, V]
            tok_logp = logp_all.gather(-1, ids[g : g + rows, 1:].unsqueeze(-1)).squeeze(-1)
            tok_all = tok_logp.double().cpu().numpy()
            hit_all = (logits[g : g + rows, :-1].argmax(-1) == ids[g : g + rows, 1:]).cpu().numpy()
            z_all = None
            if attacks:
                p = logp_all.exp()
                mu = (p * logp_all).sum(-1)
                sigma = ((p * logp_all.square()).sum(-1) - mu.square()).clamp(min=1e-12).sqrt()
                z_all = ((tok_logp - mu) / sigma).double().cpu().numpy()
                del p
            del logp_all
            for r in range(tok_all.shape[0]):
                keep = valid[g + r]
                tok_logp_np = tok_all[r][keep]
                nll = -tok_logp_np.sum()
                n = len(tok_logp_np)
                nll_sum.append(nll)
                n_tok.append(n)
                hits = hit_all[r][keep]
                em, es = memorization(hits if qa[g + r] else hits[len(hits) // 2:])
                exact.append(em)
                extraction.append(es)
                if z_all is None:
                    continue
                z = z_all[r][keep]
                text = chunks.texts[start + g + r]
                mia["loss"].append(-nll / n)
                mia["zlib"].append(-(nll / n) / max(1, len(zlib.compress(text.encode("utf-8")))))
                mia["min_k"].append(min_k_mean(tok_logp_np, min_k))
                mia["min_k_pp"].append(min_k_mean(z, min_k))
    if was_training:
        model.train()
    return SetScores(np.array(nll_sum), np.array(n_tok), {a: np.array(v) for a, v in mia.items()},
                     np.array(exact), np.array(extraction))


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney statistic: the chance that a positive outscores a negative, ties
    counting one half (what sklearn's roc_auc_score computes; tests hold the two together).

    Computed here with numpy ranks because importing sklearn.metrics (scipy.stats, pandas) costs
    every run process 1.5-2 s before its first step."""
    n_pos, n_neg = len(positives), len(negatives)
    if not n_pos or not n_neg:
        return None
    scores = np.concatenate([positives, negatives]).astype(np.float64)
    _, which, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of each distinct value's last occurrence
    mean_rank = last - (counts - 1) / 2.0  # tied scores share the mean of their ranks
    rank_sum = mean_rank[which.reshape(-1)[:n_pos]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mia_auc(members: SetScores, nonmembers: SetScores) -> dict[str, float | None]:
    """ROC AUC, raw orientation: 1.0 = U clearly remembered, 0.5 = U looks unseen, < 0.5 = over-unlearned.
    Every attack both sets were scored by (the reference and gradient-norm attacks only where asked for)."""
    out = {}
    for a in [a for a in (*ATTACKS, REFERENCE, GRADNORM) if a in members.mia and a in nonmembers.mia]:
        s = np.concatenate([members.mia[a], nonmembers.mia[a]])
        out[a] = roc_auc(members.mia[a], nonmembers.mia[a]) if np.isfinite(s).all() else None
    return out


def evaluate(model, sets: ForgetSetChunks, batch_size: int = 8, device=None, autocast=None, min_k: float = 0.2,
             noise: bool = False, reference: dict[str, np.ndarray] | None = None,
             gradnorm: bool = False) -> tuple[dict, int]:
    """The metrics M of one model: ppl per set, the MIA AUCs and the loss AUC's bootstrap interval.
    With `noise` (θ0's baseline), also the noise the verdict's bands are made of (engine.verdict).
    With `reference` (reference_losses of a reference model: θ0, or a retrained one), the reference
    attack too: mia_auc.reference. With `gradnorm`, the gradient-norm attack (gradient_norms, a
    backward per chunk of forget and unseen): mia_auc.gradnorm. Returns (M, eval tokens)."""
    scores = {role: score_chunks(model, ch, batch_size, device, autocast, min_k, attacks=role in ("forget", "unseen"))
              for role, ch in sets.items()}
    if reference is not None:  # a chunk is more member-like the less its loss is above the reference model's
        for role in ("forget", "unseen"):  # the loss attack's score is already −(the model's mean NLL)
            scores[role].mia[REFERENCE] = reference[role] + scores[role].mia["loss"]
    gradnorm_tokens = 0
    if gradnorm:  # members sit where the loss is flat: the smaller the gradient, the more member-like
        for role in ("forget", "unseen"):
            scores[role].mia[GRADNORM] = -gradient_norms(model, getattr(sets, role), device, autocast)
            # a forward and a backward cost 6·N per token: three forward passes' worth of eval tokens
            gradnorm_tokens += 3 * getattr(sets, role).n_tokens
    metrics = {ppl(role): _finite(scores[role].ppl) if role in scores else None for role in ROLES}
    metrics[MIA_AUC] = mia_auc(scores["forget"], scores["unseen"])
    for path, part in ((EXACT_MEMORIZATION, "exact"), (EXTRACTION_STRENGTH, "extraction")):
        metrics[path] = {role: _mean(getattr(scores[role], part)) if role in scores else None
                         for role in MEMORIZATION_ROLES}
    metrics[MIA_AUC_LO], metrics[MIA_AUC_HI] = auc_interval(scores["forget"].mia["loss"], scores["unseen"].mia["loss"])
    if noise:
        u, r = scores["unseen"], scores.get("retain_eval")
        metrics["noise"] = {
            "forget": _finite(forget_noise(u.nll_sum, u.n_tokens, sets.unseen.doc_index,
                                           len(set(sets.forget.doc_index)))),
            "utility": _finite(log_ppl_half_width(r.nll_sum, r.n_tokens, sets.retain_eval.doc_index)) if r else None,
        }
    eval_tokens = int(sum(ch.n_tokens for _, ch in sets.items())) + gradnorm_tokens
    return metrics, eval_tokens


def gradient_norms(model, chunks: Chunks, device=None, autocast=None) -> np.ndarray:
    """Per chunk, ‖∇θ L‖₂: the L2 norm, over every weight of the model at once, of the gradient of
    the chunk's mean NLL over its scored tokens (loss_mask: the loss attack's tokens, so L = −mia.loss).
    The gradient-norm attack scores −‖∇θ L‖ (a model's loss is flatter around what it trained on).

    Source: open-unlearning's GradNormAttack (src/evals/metrics/mia/gradnorm.py; Wang et al. 2024,
    arXiv 2402.17012), whose score is +‖∇‖ with members labelled 0: the same AUC as −‖∇‖ with
    members labelled 1, the orientation of every attack here. What differs, and why:
    - the norm: one L2 norm of the whole gradient; open-unlearning averages the p-norms (p = 2) of
      each parameter tensor, a figure that changes with how a model splits its weights into tensors
      (fused or separate q/k/v) and weighs a norm layer's vector as much as the embedding matrix;
    - the mode: eval (no dropout), as every other attack's forward pass; open-unlearning switches to
      train mode, which makes the score random for a model with dropout;
    - the weights: every one of the model's own weights, whichever the run trains (--params,
      saliency, a frozen copy). With LoRA, the base weights and not the adapter's: the gradient of a
      base weight W is that of the merged weight W + s·BA (the layer reads them only as that sum),
      so the figure is the merged model's, comparable with θ0's baseline and with full fine-tuning;
    - the model is left as it was: open-unlearning leaves the last sample's gradients in .grad.

    The backward runs on detached aliases of the weights (torch.func.functional_call), not the
    weights themselves: nothing of the model (.grad, requires_grad, its hooks, e.g. a saliency
    mask's) takes part, and an optimizer holding the weights sees nothing. Each alias's gradient is
    read and dropped as soon as it is accumulated, so at most one weight's gradient is held at a time
    (a LoRA run on a large model has no room for a full gradient). One chunk per forward pass, on its
    own tokens (no padding); under the run's autocast, norms summed in fp32 or better."""
    from engine.lora import is_adapter_weight

    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    aliases = {name: p.detach() if is_adapter_weight(model, name) else p.detach().requires_grad_(True)
               for name, p in model.named_parameters()}
    square_sum: list[torch.Tensor] = []

    def read_and_drop(alias: torch.Tensor) -> None:
        g = alias.grad
        square_sum.append(torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).square())
        alias.grad = None

    handles = [a.register_post_accumulate_grad_hook(read_and_drop) for a in aliases.values() if a.requires_grad]
    was_training = model.training
    model.eval()
    norms = []
    try:
        with torch.enable_grad():
            for b in range(len(chunks)):
                n = int(chunks.attention_mask[b].sum())
                ids = chunks.input_ids[b : b + 1, :n].to(device)
                scored = chunks.loss_mask[b, 1:n].bool().to(device)
                if not scored.any():
                    norms.append(math.nan)
                    continue
                with autocast():
                    logits = torch.func.functional_call(model, aliases, (), {"input_ids": ids, "use_cache": False}).logits
                loss = torch.nn.functional.cross_entropy(logits[0, :-1][scored].float(), ids[0, 1:][scored])
                del logits
                square_sum.clear()
                loss.backward()
                norms.append(math.sqrt(float(sum(square_sum))))  # one host read per chunk
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return np.array(norms, dtype=np.float64)


def reference_losses(model, sets: ForgetSetChunks, batch_size: int = 8, device=None, autocast=None) -> dict[str, np.ndarray]:
    """A reference model's mean NLL per chunk of forget and unseen: what the reference attack compares
    a model's own losses with (Carlini et al.'s likelihood ratio: the loss against a model that
    calibrates how hard each text is). One pass over the two sets."""
    out = {}
    for role in ("forget", "unseen"):
        s = score_chunks(model, getattr(sets, role), batch_size, device, autocast, attacks=False)
        out[role] = s.nll_sum / np.maximum(1, s.n_tokens)
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _mean(values: np.ndarray | None) -> float | None:
    """The mean over chunks (each answer counts once, as the reference framework averages its samples)."""
    kept = values[np.isfinite(values)] if values is not None else np.array([])
    return float(kept.mean()) if len(kept) else None


VERDICT_PARTS = ("forget", "mia", "utility")


def not_compared() -> dict:
    """What `compare` gives a model that blew up (and a cell a divergence cut off): no figure, no success."""
    return {FORGET_GAP: None, UTILITY_DRIFT: None, EVAL_SCORE: None, RETAIN_DRIFT: None, TRAINED_ON_SCORE: None,
            "verdict": {p: False for p in VERDICT_PARTS}, "success": False}


def compare(metrics: dict, baseline: dict, tol_forget: float | None = None, tol_retain: float | None = None,
            target_spread: float = 0.0) -> dict:
    """Distance to the approximate-retraining target, utility lost on retain_eval, and the verdict
    (engine.verdict): each part, and success when all three hold.

    retain_drift and score are the figures of the same names before retain_eval existed (utility on
    the retain documents the retain terms train on), kept under their names and meaning."""
    pf, pr, pe = metrics.get("ppl_forget"), metrics.get("ppl_retain"), metrics.get("ppl_retain_eval")
    if pf is None or pr is None:  # non-finite: the model blew up
        return not_compared()
    b = bands(baseline, tol_forget, tol_retain, target_spread)
    forget_gap = abs(math.log(pf) - math.log(baseline["ppl_unseen"]))
    retain_drift = math.log(pr) - math.log(baseline["ppl_retain"])
    p0 = baseline.get("ppl_retain_eval")
    utility = math.log(pe) - math.log(p0) if pe is not None and p0 else None
    lo, hi = metrics.get(MIA_AUC_LO), metrics.get(MIA_AUC_HI)
    verdict = {"forget": forget_gap <= b["forget"]["band"],
               "mia": lo is not None and hi is not None and lo <= 0.5 <= hi,
               "utility": utility is not None and utility <= b["utility"]["band"]}
    return {
        FORGET_GAP: forget_gap,
        UTILITY_DRIFT: utility,
        EVAL_SCORE: forget_gap + max(0.0, utility) if utility is not None else None,
        RETAIN_DRIFT: retain_drift,
        TRAINED_ON_SCORE: forget_gap + max(0.0, retain_drift),
        "verdict": verdict,
        "success": all(verdict.values()),
        # what the verdict was judged against, so a reader can judge a mean over seeds the same way
        "bands": {"forget": b["forget"]["band"], "utility": b["utility"]["band"]},
    }
