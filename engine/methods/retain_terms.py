"""Retain terms: keep the model where it was on in-domain (or general) text."""
from __future__ import annotations

from engine.methods.base import IGNORE, RetainTerm, shift, token_ce


class RetainDescent(RetainTerm):
    """Plain language-model loss on the retain source (the "GD" of GA+GD)."""

    id = "descent"
    formula = "CE(θ; R)"

    def loss(self, logits, batch, reference_logits=None):
        return token_ce(logits, batch["labels"])


class RetainKL(RetainTerm):
    """KL(p_θ0 ‖ p_θ) of the next-token distributions, averaged over predicted (non-pad) tokens."""

    id = "kl"
    formula = "KL(p_θ0 ‖ p_θ; R)"
    needs_reference_logits = True

    def loss(self, logits, batch, reference_logits=None):
        import torch

        lg, lb = shift(logits, batch["labels"])
        ref, _ = shift(reference_logits, batch["labels"])
        mask = (lb != IGNORE).float()
        logp = torch.log_softmax(lg.float(), -1)
        logp0 = torch.log_softmax(ref.float(), -1)
        kl = (logp0.exp() * (logp0 - logp)).sum(-1)
        return (kl * mask).sum() / mask.sum().clamp(min=1)
