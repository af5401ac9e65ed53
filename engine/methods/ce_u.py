"""CE-U — cross-entropy unlearning (Yang 2025, "CE-U: Cross Entropy Unlearning", arXiv:2503.01224).

    L_f = mean_t  CE(q_t, p_θ(· | y_<t)) = −mean_t Σ_v q_t(v) · log p_θ(v | y_<t)
    q_t = softmax(sg(z_t) with z_t[y_t] = −∞)      (the model's own law with the true token removed)

z_t are the logits that predict y_t; q_t is detached (a target, never differentiated). The mean runs
over the scored tokens (labels ≠ −100: a question–answer chunk's answer, a plain chunk's text).

The sign convention, spelled out: ∂L/∂z_t = (p_t − q_t)/N, and q_t(y_t) = 0, so the gradient on the
true token's logit is p_t(y_t)/N > 0 — a descent step lowers z_t[y_t] and the forget likelihood.
Unlike ascent, whose push on z_t[y_t] is 1 − p_t(y_t) and tends to 1 as the token is forgotten, the
push here is p_t(y_t) and fades with it; and the other tokens keep their relative odds: CE(q, p) = H(q) + KL(q ‖ p),
which with q held fixed is least at p = q — p(y_t) = 0, the rest in its current proportions.

Source: open-unlearning's `CEU` trainer (src/trainer/unlearn/ceu.py: `cross_entropy_unlearning_loss`,
the −∞ scatter on a detached copy, softmax, then soft-target F.cross_entropy averaged over the valid
positions; `compute_batch_ceu`, the skip of the first answer tokens) and configs/trainer/CEU.yaml
(`ignore_first_n_answer_tokens: 1`). The paper and the trainer use the forget set alone — "without
an extra oracle model or additional positive samples" — so there is no `ce_u_gd`.

Knob (theirs): `ignore_first_n` = 1 — the first n scored tokens of each chunk are not trained on (the
paper's footnote in its Training Settings; open-unlearning's `ignore_first_n_answer_tokens`).

What differs, and why: open-unlearning counts those n tokens from the first non-ignored label,
position 0 included. On a question–answer chunk position 0 is prompt, so both skip the first answer
token. On a plain chunk position 0 (never predicted) is labelled, so open-unlearning's skip of 1 is a
no-op there, whereas here the n are counted among the *predicted* labels (positions ≥ 1) and the first
predicted token of a plain chunk is skipped too. That keeps this tool's invariant that a plain chunk
and the same text as a question–answer chunk with an empty prompt train alike (tests/engine/test_qa.py).
The logits are read in float32, as every term here does.
"""
from __future__ import annotations

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import IGNORE, ForgetTerm, Method, causal_labels, shift

CEU_IGNORE_FIRST_N = 1


def skip_first_predicted(labels, n: int):
    """`labels` with the first `n` predicted labels of each row (positions ≥ 1 not ignored) ignored."""
    scored = labels != IGNORE
    scored[:, 0] = False  # position 0 is never predicted
    return labels.masked_fill(scored & (scored.cumsum(1) <= n), IGNORE)


class CrossEntropyUnlearning(ForgetTerm):
    id = "ce_u"
    formula = "mean_t CE(softmax(sg(z_t) with z_t[y_t] = −∞), p_θ); U, first 1 answer token skipped"
    knobs = ("ignore_first_n",)  # hyperparameters a study may sweep (`--param NAME=V1,V2`)

    def __init__(self, ignore_first_n: float = CEU_IGNORE_FIRST_N):
        if not (ignore_first_n >= 0 and float(ignore_first_n).is_integer()):
            raise UnlearnError(f"ce_u: ignore_first_n must be a whole number, 0 or more, not {ignore_first_n:g}")
        self.ignore_first_n = int(ignore_first_n)

    def prepare(self, input_ids, attention_mask, ctx, loss_mask=None):
        labels = causal_labels(input_ids, attention_mask, loss_mask)
        return {"labels": skip_first_predicted(labels, self.ignore_first_n) if self.ignore_first_n else labels}

    def loss(self, logits, batch, reference_logits=None):
        import torch

        lg, lb = shift(logits, batch["labels"])
        lg = lg.float()
        mask = lb != IGNORE
        logp = torch.log_softmax(lg, -1)
        target = lg.detach().scatter(-1, lb.clamp(min=0).unsqueeze(-1), float("-inf"))
        q = torch.softmax(target, -1)
        ce = -(q * logp).sum(-1)
        return torch.where(mask, ce, torch.zeros_like(ce)).sum() / mask.sum().clamp(min=1)


register(Method("ce_u", "Cross-entropy unlearning: descent towards the model's own next-token law with the true token removed.",
                CrossEntropyUnlearning()))
