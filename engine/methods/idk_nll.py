"""IdkNLL — fine-tune the forget prompts towards "I don't know" (Maini et al. 2024, "TOFU: A Task of
Fictitious Unlearning for LLMs", its "preference optimization" baseline; later benchmarks name it IdkNLL,
beside IdkDPO).

    L   = L_f + α · CE(θ; R)
    L_f = CE(θ; idk) = −mean_t log p_θ(idk_t | prompt, idk_<t)
    α (retain_weight) = 1, forget_weight 1, the retain term NLL on the retain set

idk is a refusal ("I don't know." and 39 variants, engine/methods/refusals.txt) drawn once per forget
chunk with the run's seeded generator and put after the chunk's prompt: a question–answer chunk's
question, a plain-text chunk's first half (the sides of engine/methods/dpo.py: `idk_dpo`'s chosen side is
this sequence). The mean runs over the refusal's tokens alone. The forget answer is never scored: the
method only teaches another answer. The sign convention: minimizing L_f raises the refusal's likelihood
after each forget prompt, which moves probability away from the forget answers — lowering their
likelihood relative to the chosen refusal's, never pushing on them directly (unlike ascent, it has
nothing to run away with: its loss is bounded below by 0).

Source: TOFU's own code (locuslab/tofu, dataloader.py `CustomTrainerForgetting.compute_loss`, loss_type
"idk": the idk batch and the retain batch concatenated, one `outputs.loss`; data_module.py: a refusal
drawn from data/idontknow.jsonl each time a forget row is read). open-unlearning's code (its snapshot of
December 2025) has no IdkNLL trainer, only IdkDPO (`DPO` on TOFU_QA_forget_idk); this is their GradDiff
shape — γ·forget + α·retain NLL, γ = α = 1 — with descent on the refusal in place of ascent on the answer.

What differs, and why: TOFU's single `outputs.loss` over the concatenated batch is one token mean, so the
refusal and the retain text weigh by their token counts (short refusals beside long retain answers weigh
little); here each term is its own token mean and they add 1 : 1, as every retain term in this tool does
(retain_weight sets the ratio). The refusal is drawn once per chunk, seeded, not at each read (a run is a
function of its seed: the prefix property holds). Our own refusal list, not TOFU's or open-unlearning's.
"""
from __future__ import annotations

from engine.methods import register
from engine.methods.base import ForgetTerm, Method, token_ce
from engine.methods.dpo import CHOSEN, refusal_sides
from engine.methods.retain_terms import RetainDescent

IDK_NLL_RETAIN_WEIGHT = 1.0


class IdkDescent(ForgetTerm):
    id = "idk_nll"
    formula = "CE(θ; prompt of U + idk), idk a refusal, scored on its tokens"

    def prepare(self, input_ids, attention_mask, ctx, loss_mask=None):
        # `labels` (the forget answer, unscored here) keep every forget term's shape; the loss reads chosen_*
        return refusal_sides(input_ids, attention_mask, ctx, loss_mask)

    def model_inputs(self, batch):
        return {"input_ids": batch[f"{CHOSEN}_input_ids"], "attention_mask": batch[f"{CHOSEN}_attention_mask"],
                "labels": batch[f"{CHOSEN}_labels"]}

    def mean_count(self, batch):
        return super().mean_count(self.model_inputs(batch))  # the refusals' tokens, which token_ce averages

    def loss(self, logits, batch, reference_logits=None):
        return token_ce(logits, batch[f"{CHOSEN}_labels"])


register(Method("idk_nll", "IdkNLL: descent on an \"I don't know\" after each forget prompt + descent on in-domain retain data.",
                IdkDescent(), RetainDescent(), "retain", retain_weight=IDK_NLL_RETAIN_WEIGHT))
