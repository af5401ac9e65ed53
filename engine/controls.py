"""The demo's controls and regime: is θ0 where a pre-trained LLM is, and can the verdict tell?

Before any method runs, the demo measures θ0 on its forget set and checks the regime bands below,
fixed before any recipe was tried: θ0 generalizes (unseen records are not much harder than the
held-out retain records it was trained on), and it remembers the forget set the way a model
fine-tuned a few epochs does (a measurable but modest perplexity gap, a loss-MIA AUC between chance
and certainty), not by rote. Then the two controls of the verdict (engine.verdict), with the bands
the study uses: the exactly retrained twin must succeed (positive control) and θ0 must fail
(negative control). A verdict that fails either tells nothing about the methods.

The twin is a second estimate of the target: its ln ppl_forget lies `target_spread` from ln
ppl_unseen(θ0), and the study's forget band is no tighter than that spread (so the twin's forget part
holds by construction; its MIA and utility parts are the test).
"""
from __future__ import annotations

import math
from pathlib import Path

from engine.evaluate import compare
from engine.metric_registry import MIA_AUC, PPL_FORGET, PPL_RETAIN_EVAL, PPL_UNSEEN
from engine.verdict import bands, target

# name -> (low, high): None is open. Fixed in advance (issue 19), from where real pre-trained models sit.
REGIME_BANDS = {
    "ppl_unseen_over_retain_eval": (None, 3.0),  # θ0 generalizes
    "ln_unseen_over_forget": (0.05, 1.5),  # memorized, not rote
    "mia_auc_loss": (0.65, 0.95),  # membership is visible, not certain
}


def regime(original: dict) -> dict:
    """θ0's regime figures from its metrics (engine.evaluate), and whether each is inside its band."""
    pu, pe, pf = original[PPL_UNSEEN], original.get(PPL_RETAIN_EVAL), original[PPL_FORGET]
    figures = {"ppl_unseen_over_retain_eval": pu / pe if pe else None,
               "ln_unseen_over_forget": math.log(pu / pf),
               "mia_auc_loss": (original.get(MIA_AUC) or {}).get("loss")}
    inside = {k: v is not None and (lo is None or v >= lo) and (hi is None or v <= hi)
              for k, v in figures.items() for lo, hi in [REGIME_BANDS[k]]}
    return {**figures, "bands": {k: list(b) for k, b in REGIME_BANDS.items()}, "inside": inside,
            "ok": all(inside.values())}


def verdict_of(metrics: dict, baseline: dict, spread: float) -> dict:
    """A model's figures and verdict against θ0's baseline, as a cell carries them."""
    keys = (PPL_FORGET, PPL_RETAIN_EVAL, PPL_UNSEEN, "mia_auc_lo", "mia_auc_hi")
    return {**{k: metrics.get(k) for k in keys}, "mia_auc_loss": (metrics.get(MIA_AUC) or {}).get("loss"),
            **compare(metrics, baseline, target_spread=spread)}


def controls(model_dir: Path, twin_dir: Path, sets, eval_batch_size: int = 16) -> dict:
    """θ0 and its retrained twin on `sets` (chunks): the regime, the target with its band, and both
    controls' verdicts."""
    from engine.evaluate import evaluate
    from engine.models import load_model

    original, _ = evaluate(load_model(str(model_dir)), sets, eval_batch_size, noise=True)
    retrained, _ = evaluate(load_model(str(twin_dir)), sets, eval_batch_size)
    spread = abs(math.log(original[PPL_UNSEEN]) - math.log(retrained[PPL_FORGET]))
    return {"regime": regime(original), "target": target(original, None, spread), "bands": bands(original, None, None, spread),
            "target_spread": spread, "original_metrics": original, "retrained_metrics": retrained,
            "controls": {"retrained": verdict_of(retrained, original, spread),
                         "original": verdict_of(original, original, spread)}}
