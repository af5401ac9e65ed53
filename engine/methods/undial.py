"""UNDIAL — unlearning by self-distillation with adjusted logits (Dong et al. 2024, "UNDIAL:
Self-Distillation with Adjusted Logits for Robust Unlearning in Large Language Models").

    q_t = softmax(z_θ0,t − β · onehot(y_t)),   L_f = mean_t KL(q_t ‖ p_θ,t),   β = 10

The student is pulled towards the original model's own next-token law with the true token's
logit lowered by β: a fixed target that never runs off like ascent does. The teacher's logits
are a whole vocabulary per token, too large to cache, so a run keeps a live frozen copy of θ0.
"""
from __future__ import annotations

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import IGNORE, ForgetTerm, Method, shift

UNDIAL_BETA = 10.0


class AdjustedSelfDistillation(ForgetTerm):
    id = "undial"
    formula = "KL(softmax(z_θ0 − β·onehot(y)) ‖ p_θ); U, β=10"
    knobs = ("beta",)  # hyperparameters a study may sweep (`--param NAME=V1,V2`)
    needs_reference_logits = True

    def __init__(self, beta: float = UNDIAL_BETA):
        if not beta >= 0:
            raise UnlearnError(f"undial: beta must be 0 or more, not {beta:g}")
        self.beta = beta

    def loss(self, logits, batch, reference_logits=None):
        import torch

        lg, lb = shift(logits, batch["labels"])
        ref, _ = shift(reference_logits, batch["labels"])
        mask = (lb != IGNORE).float()
        adjusted = ref.float().scatter_add(-1, lb.clamp(min=0).unsqueeze(-1),
                                           torch.full_like(lb, -self.beta, dtype=torch.float32).unsqueeze(-1))
        logq = torch.log_softmax(adjusted, -1)
        logp = torch.log_softmax(lg.float(), -1)
        kl = (logq.exp() * (logq - logp)).sum(-1)
        return (kl * mask).sum() / mask.sum().clamp(min=1)


register(Method("undial", "Self-distillation towards θ0's logits with the true token's logit lowered by β.",
                AdjustedSelfDistillation()))
