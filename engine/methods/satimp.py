"""SatImp — saturation × importance token reweighting (Yang et al. 2025, "Exploring Criteria of Loss
Reweighting to Enhance LLM Unlearning", arXiv:2505.11953, ICML 2025), as open-unlearning's `SatImp` trainer runs it.

    L = γ · L_f + α · CE(θ; R)
    L_f = mean_t  w_t · log p_θ(y_t | y_<t),   w_t = sg(p_t)^β1 · sg(1 − p_t)^β2,   p_t = p_θ(y_t | y_<t)
    β1 = 5, β2 = 1, γ (forget_weight) = 0.1, α (retain_weight) = 1, retain term NLL on the retain set

The mean runs over the scored tokens (labels ≠ −100). The weights are detached: the gradient of token
t is w_t · ∇log p_t, a weighted gradient ascent, so the sign convention is WGA's — minimizing L_f lowers
the forget likelihood (w_t ≥ 0). The saturation factor p^β1 spends the push on tokens the model still
knows and lets forgotten ones rest (WGA's weight, β1 its β); the importance factor (1 − p)^β2 leans the
other way, more weight to less likely tokens and none to certain ones. The paper finds saturation the
stronger criterion and the product better than either. β1 = β2 = 0 is plain gradient ascent; β2 = 0 is
WGA with β = β1.

Source: open-unlearning src/trainer/utils.py `compute_satimp_loss` (weight_sat = exp(−CE)^β1,
weight_imp = (1 − exp(−CE))^β2, both detached; forget loss −mean over valid tokens of w·CE) and
src/trainer/unlearn/satimp.py (`SatImp(GradDiff)`: loss = gamma·forget + alpha·retain, retain NLL);
defaults from configs/trainer/SatImp.yaml: beta1 5.0, beta2 1.0, gamma 0.1, alpha 1.0,
retain_loss_type NLL. (The trainer's constructor defaults read gamma 1.0, alpha 0.1; the config, which
is what a run uses, sets them the other way round, and it is the config's values that are kept here.)

What differs: 1 − p_t is computed as −expm1(log p_t), equal to their 1 − exp(log p_t) up to rounding
and exact near p = 1, where the importance weight matters most. Logits are read in float32.
"""
from __future__ import annotations

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import IGNORE, ForgetTerm, Method, shift
from engine.methods.retain_terms import RetainDescent

SATIMP_BETA1 = 5.0
SATIMP_BETA2 = 1.0
SATIMP_FORGET_WEIGHT = 0.1  # open-unlearning's gamma
SATIMP_RETAIN_WEIGHT = 1.0  # open-unlearning's alpha


class SaturationImportanceAscent(ForgetTerm):
    id = "satimp"
    formula = "mean_t sg(p_θ(y_t))^β1 · sg(1 − p_θ(y_t))^β2 · log p_θ(y_t); U, β1=5, β2=1"
    knobs = ("beta1", "beta2")  # hyperparameters a study may sweep (`--param NAME=V1,V2`)

    def __init__(self, beta1: float = SATIMP_BETA1, beta2: float = SATIMP_BETA2):
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not value >= 0:
                raise UnlearnError(f"satimp: {name} must be 0 or more, not {value:g}")
        self.beta1, self.beta2 = beta1, beta2

    def loss(self, logits, batch, reference_logits=None):
        import torch

        lg, lb = shift(logits, batch["labels"])
        mask = lb != IGNORE
        logp = torch.log_softmax(lg.float(), -1).gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sg = logp.detach()
        weight = torch.exp(self.beta1 * sg) * (-torch.expm1(sg)) ** self.beta2
        return torch.where(mask, weight * logp, torch.zeros_like(logp)).sum() / mask.sum().clamp(min=1)


register(Method("satimp", "SatImp: token-weighted ascent (weight p^β1·(1−p)^β2, detached) at 0.1 + descent on in-domain retain data.",
                SaturationImportanceAscent(), RetainDescent(), "retain",
                retain_weight=SATIMP_RETAIN_WEIGHT, forget_weight=SATIMP_FORGET_WEIGHT))
