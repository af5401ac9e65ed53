"""Forget terms of the paper's methods (Yao et al. 2024): ascent, random labels, adversarial labels."""
from __future__ import annotations

from engine.methods.base import IGNORE, ForgetTerm, PrepareContext, causal_labels, chunk_batches, special_ids, token_ce


class GradientAscent(ForgetTerm):
    """Push the likelihood of the forget tokens down: maximize CE on U."""

    id = "gradient_ascent"
    formula = "-CE(θ; U)"

    def loss(self, logits, batch, reference_logits=None):
        return -token_ce(logits, batch["labels"])


class RandomLabelDescent(ForgetTerm):
    """Descend on U whose every non-special label is a uniform random (non-special) token id.

    The labels are drawn once, from the run's seeded generator, so every step and every run
    with the same seed sees the same relabelled U (prefix sharing needs that)."""

    id = "random_label"
    formula = "CE(θ; U with random labels)"

    def prepare(self, input_ids, attention_mask, ctx: PrepareContext, loss_mask=None):
        import torch

        labels = causal_labels(input_ids, attention_mask, loss_mask)
        specials = torch.tensor(special_ids(ctx.tokenizer), dtype=torch.long)
        vocab = len(ctx.tokenizer)
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[specials[specials < vocab]] = False
        pool = allowed.nonzero().squeeze(-1)
        draws = pool[torch.randint(len(pool), labels.shape, generator=ctx.generator)]
        replace = (labels != IGNORE) & ~torch.isin(input_ids, specials)
        return {"labels": torch.where(replace, draws, labels)}

    def loss(self, logits, batch, reference_logits=None):
        return token_ce(logits, batch["labels"])


class AdversarialDescent(ForgetTerm):
    """Descend on U whose label y_t is the original model's most likely *wrong* next token,
    argmax_{a ≠ y_t} p_θ0(a | x_<t), computed once with the frozen original.

    The study's published code excluded the input token x_t instead of the label y_t (an
    off-by-one after the label shift), so its "adversarial" label could equal the true one.
    Here the excluded token is the label itself, so an adversarial label never equals y_t."""

    id = "adversarial"
    formula = "CE(θ; U with argmax_{a≠y} p_θ0 labels)"
    prepare_reads_reference = True

    def prepare(self, input_ids, attention_mask, ctx: PrepareContext, loss_mask=None):
        import torch

        labels = causal_labels(input_ids, attention_mask, loss_mask)
        out = labels.clone()
        ref = ctx.reference
        for sl, ids, mask in chunk_batches(input_ids, attention_mask, ctx):
            with torch.no_grad(), ctx.autocast():
                logits = ref(input_ids=ids, attention_mask=mask).logits.float()
            pred = logits[:, :-1, :]  # predicts positions 1..L-1
            true = ids[:, 1:]
            pred = pred.scatter(-1, true.unsqueeze(-1), float("-inf"))
            adv = pred.argmax(-1).cpu()
            keep = labels[sl, 1:] != IGNORE
            out[sl, 1:] = torch.where(keep, adv, labels[sl, 1:])
        return {"labels": out}

    def loss(self, logits, batch, reference_logits=None):
        return token_ce(logits, batch["labels"])
