"""WGA — weighted gradient ascent (Wang et al. 2025, "Rethinking LLM Unlearning Objectives: A
Gradient Perspective and Go Beyond").

    L_f = mean_t  w_t · log p_θ(y_t | y_<t),   w_t = stop_gradient(p_θ(y_t | y_<t))^β,   β = 1

Plain ascent (β = 0) pushes hardest on tokens that are already unlikely, whose log-probability
runs off to −∞ and drags the whole model with it; weighting each token by its own (detached)
probability spends the push on tokens the model still knows and lets forgotten ones rest.
"""
from __future__ import annotations

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import IGNORE, ForgetTerm, Method, shift

WGA_BETA = 1.0


class WeightedAscent(ForgetTerm):
    id = "wga"
    formula = "mean_t sg(p_θ(y_t))^β · log p_θ(y_t); U, β=1"
    knobs = ("beta",)  # hyperparameters a study may sweep (`--param NAME=V1,V2`)

    def __init__(self, beta: float = WGA_BETA):
        if not beta >= 0:
            raise UnlearnError(f"wga: beta must be 0 or more, not {beta:g}")
        self.beta = beta

    def loss(self, logits, batch, reference_logits=None):
        import torch

        lg, lb = shift(logits, batch["labels"])
        mask = lb != IGNORE
        logp = torch.log_softmax(lg.float(), -1).gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        weight = torch.exp(self.beta * logp.detach())
        return (weight * logp * mask).sum() / mask.sum().clamp(min=1)


register(Method("wga", "Weighted gradient ascent: each token's ascent weighted by its own probability.", WeightedAscent()))
