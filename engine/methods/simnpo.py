"""SimNPO — NPO without the reference model, length-normalized (Fan et al. 2024, "Simplicity
Prevails: Rethinking Negative Preference Optimization for LLM Unlearning").

    L_f = −(2/β) · mean_i log σ(−β · ℓ̄_θ(y_i) − β·δ),   ℓ̄_θ(y) = (1/|y|) Σ_t log π_θ(y_t | y_<t)
    β = 4.5, δ = 0

The sign convention, spelled out: ℓ̄ is a mean log-probability, so ℓ̄ ≤ 0 and −β·ℓ̄ ≥ 0. Making the
forget text less likely lowers ℓ̄, raises the argument of σ and lowers the loss: minimizing L_f
forgets. δ shifts the margin (δ > 0 asks for lower likelihood before the push fades). The
paper's recipe weighs the forget term 0.125 against the retain term's 1 (simnpo_gd); alone,
Adam is nearly invariant to a constant weight, so simnpo keeps 1.

δ on the target's scale: the push on a chunk is weighted σ(−β·(NLL̄ − δ)), with NLL̄ = −ℓ̄ the chunk's
mean NLL. With the published δ = 0 it is already below 0.5 once NLL̄ > 0 and fades as the forget
text gets less likely, wherever the target is; with δ = ln ppl_unseen(θ0) (the target's mean NLL a
token) the weight is 0.5 at the target and fades past it, so the method is pushed towards the
target rather than merely away from θ0. A study passes it as a knob (`--param delta=0,D` with D
read off the study's `target ± band` line); docs/science.md sweeps both.
"""
from __future__ import annotations

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import ForgetTerm, Method, sequence_logprob
from engine.methods.npo import predicted_tokens
from engine.methods.retain_terms import RetainDescent

SIMNPO_BETA = 4.5
SIMNPO_DELTA = 0.0
SIMNPO_FORGET_WEIGHT = 0.125


class SimNPOForget(ForgetTerm):
    id = "simnpo"
    formula = "−(2/β)·mean log σ(−β·mean_t log π_θ(y_t) − β·δ); U, β=4.5, δ=0"
    knobs = ("beta", "delta")  # hyperparameters a study may sweep (`--param NAME=V1,V2`)
    mean_over_chunks = True  # a mean of per-chunk σ terms

    def __init__(self, beta: float = SIMNPO_BETA, delta: float = SIMNPO_DELTA):
        if not beta > 0:
            raise UnlearnError(f"simnpo: beta must be above 0, not {beta:g}")
        self.beta, self.delta = beta, delta

    def loss(self, logits, batch, reference_logits=None):
        import torch.nn.functional as F

        labels = batch["labels"]
        mean_logp = sequence_logprob(logits, labels) / predicted_tokens(labels)
        return -(2.0 / self.beta) * F.logsigmoid(-self.beta * mean_logp - self.beta * self.delta).mean()


register(Method("simnpo", "SimNPO: NPO with no reference model, on the length-normalized log-likelihood.", SimNPOForget()))
register(Method("simnpo_gd", "SimNPO on forget (weight 0.125) + descent on in-domain retain data (weight 1).",
                SimNPOForget(), RetainDescent(), "retain", retain_weight=1.0, forget_weight=SIMNPO_FORGET_WEIGHT))
