"""NPO — negative preference optimization (Zhang et al. 2024, "Negative Preference Optimization:
From Catastrophic Collapse to Effective Unlearning").

    L_f = −(2/β) · mean_i log σ(−β · (log π_θ(y_i) − log π_ref(y_i))),   β = 0.1

log π(y_i) is summed over the predicted tokens of forget chunk i. π_ref is the original model θ0;
it never changes, so its log-probs are one number per forget chunk, computed once in `prepare`
(no live copy of the model is kept). At θ = θ0 the loss is (2/β)·log 2 and its gradient is that
of ascent on the chunks' summed log-likelihood; as log π_θ(y) falls below log π_ref(y) the
weight 2σ(β·Δ) of each chunk fades towards 0, which is what keeps NPO from the collapse of plain
ascent.

β's scale is the sequence, not the token. The published β = 0.1 was set for short answers (TOFU's
QA: tens of tokens). Δ is summed over a chunk's predicted tokens, so reaching the target — ln
ppl_forget up by g nats a token — means Δ ≈ −g·T for T tokens: over 128-token chunks with g ≈ 1,
βΔ ≈ −13 and the weight 2σ(βΔ) ≈ 4e-6, so the push fades long before the target (with g ≈ 1.1 over
128 tokens, 2σ ≈ 1e-6). On long chunks the default cannot reach the target; a study should sweep
β on the scale 1/T (`--param beta=0.1,0.01,0.001`), as docs/science.md does.
"""
from __future__ import annotations

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import ForgetTerm, Method, PrepareContext, causal_labels, chunk_batches, sequence_logprob
from engine.methods.retain_terms import RetainDescent, RetainKL

NPO_BETA = 0.1


def reference_logprobs(input_ids, attention_mask, ctx: PrepareContext, labels):
    """log π_θ0(y) of every chunk, summed over its predicted (labelled) tokens, [N] float32."""
    import torch

    out = []
    for sl, ids, mask in chunk_batches(input_ids, attention_mask, ctx, trim=True):  # the training batches' trim
        with torch.no_grad(), ctx.autocast():
            logits = ctx.reference(input_ids=ids, attention_mask=mask).logits
        out.append(sequence_logprob(logits, labels[sl, :ids.shape[1]].to(ids.device)).float().cpu())
    return torch.cat(out)


def predicted_tokens(labels):
    """How many tokens of each row are predicted (labels after position 0 that are not ignored), ≥ 1."""
    from engine.methods.base import IGNORE

    return (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)


class NPOForget(ForgetTerm):
    id = "npo"
    formula = "−(2/β)·mean log σ(−β·(log π_θ(y) − log π_θ0(y))); U, β=0.1"
    knobs = ("beta",)  # hyperparameters a study may sweep (`--param NAME=V1,V2`)
    prepare_reads_reference = True
    mean_over_chunks = True  # a mean of per-chunk σ terms

    def __init__(self, beta: float = NPO_BETA):
        if not beta > 0:
            raise UnlearnError(f"npo: beta must be above 0, not {beta:g}")
        self.beta = beta

    def prepare(self, input_ids, attention_mask, ctx, loss_mask=None):
        labels = causal_labels(input_ids, attention_mask, loss_mask)
        return {"labels": labels, "ref_logprob": reference_logprobs(input_ids, attention_mask, ctx, labels)}

    def loss(self, logits, batch, reference_logits=None):
        import torch.nn.functional as F

        ratio = sequence_logprob(logits, batch["labels"]) - batch["ref_logprob"]
        return -(2.0 / self.beta) * F.logsigmoid(-self.beta * ratio).mean()


register(Method("npo", "Negative preference optimization: ascent whose push fades once a chunk is less likely than under θ0.",
                NPOForget()))
register(Method("npo_gd", "NPO on forget + descent on in-domain retain data.", NPOForget(), RetainDescent(), "retain"))
register(Method("npo_kl", "NPO on forget + KL to the original on in-domain retain data.", NPOForget(), RetainKL(), "retain"))
