"""The parts a method is made of: a forget term, an optional retain term, and a retain source.

A method = forget term + weight × retain term (design §3). Terms are small objects, so a new
method is a new composition in one file, never a branch in the training loop.

Conventions shared by every term: `labels` are aligned with `input_ids` (HF style: labels[t]
is the token predicted from positions < t), -100 where nothing is predicted (pad, position 0).

Importing a method costs no torch: `unlearn methods` and the study spec read the registry on the
CLI's light read path, so the few functions that need torch's own functions import it inside.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    import torch

IGNORE = -100


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Plain next-token labels: the input itself, pad positions ignored."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE)


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at t predict labels at t+1."""
    return logits[:, :-1, :], labels[:, 1:]


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every predicted (non-ignored) token of the batch."""
    import torch.nn.functional as F

    lg, lb = shift(logits, labels)
    return F.cross_entropy(lg.reshape(-1, lg.size(-1)).float(), lb.reshape(-1), ignore_index=IGNORE)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) per sequence, [batch]."""
    import torch

    lg, lb = shift(logits, labels)
    logp = torch.log_softmax(lg.float(), dim=-1)
    mask = lb != IGNORE
    tok = logp.gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def special_ids(tokenizer) -> list[int]:
    return sorted({int(i) for i in tokenizer.all_special_ids if i is not None})


def model_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@dataclass
class PrepareContext:
    """What a term may use once, before the first step: the original model θ0 (the model itself,
    before any step, in eval mode), the tokenizer, a seeded generator (so prepared labels are
    identical across runs) and a device."""

    reference: Any  # θ0, a causal LM: read under no_grad, never trained here
    tokenizer: Any
    generator: torch.Generator
    device: torch.device
    batch_size: int = 8
    autocast: Any = field(default=contextlib.nullcontext)  # a context-manager factory for the reference forward


class Term:
    """What forget and retain terms share: the data they prepare once and how they reach a loss.

    `prepare` runs once over all chunks of the term's set and returns per-chunk tensors (dim 0 is
    the chunk; a tensor of two or more dims is token-aligned, dim 1 the position, and is trimmed
    with the batch's padding); a batch dict then carries those rows. `constants` are run-level
    tensors (not per chunk) put whole into every batch. `forward_loss` is what the training loop
    calls; most terms only need the logits and define `loss`, a term that reads hidden states
    (RMU) overrides `forward_loss` itself."""

    id: ClassVar[str]
    formula: ClassVar[str]
    # The training loop keeps a live frozen copy of θ0 for terms whose loss reads its logits at
    # every step (a copy of the whole model: it costs memory; `prepare` needs no copy).
    needs_reference_logits: ClassVar[bool] = False

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ctx: PrepareContext) -> dict[str, torch.Tensor]:
        return {"labels": causal_labels(input_ids, attention_mask)}

    def constants(self, ctx: PrepareContext) -> dict[str, torch.Tensor]:
        return {}

    def forward_loss(self, model, batch: dict[str, torch.Tensor], reference=None) -> torch.Tensor:
        reference_logits = None
        if self.needs_reference_logits:
            import torch

            with torch.no_grad():
                reference_logits = model_logits(reference, batch)
        return self.loss(model_logits(model, batch), batch, reference_logits)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], reference_logits: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class ForgetTerm(Term):
    """Loss on a forget batch."""

    needs_reference: ClassVar[bool] = False  # `prepare` reads θ0 (labels or log-probs computed once)


class RetainTerm(Term):
    """Loss on a retain-source batch."""


@dataclass(frozen=True)
class Method:
    """forget_weight × forget term + retain_weight × retain term on the retain source; `trains`
    names the parameters a method may change (None: all of them)."""

    id: str
    description: str
    forget: ForgetTerm
    retain: RetainTerm | None = None
    retain_source: str | None = None  # "retain" or "general"
    retain_weight: float = 1.0
    forget_weight: float = 1.0
    trains: Callable[[Any], Callable[[str], bool]] | None = None  # model -> is this parameter name trained?
    trains_text: str | None = None  # what `trains` selects, in words

    @property
    def needs_reference(self) -> bool:
        """Whether a run keeps a live frozen copy of θ0 beside the model it trains."""
        return self.forget.needs_reference_logits or bool(self.retain and self.retain.needs_reference_logits)

    def describe(self) -> dict:
        return {
            "id": self.id,
            "forget_term": self.forget.formula,
            "retain_term": (self.retain.formula.replace("; R)", "; G)") if self.retain_source == "general" else self.retain.formula) if self.retain else None,
            "retain_source": self.retain_source,
            "retain_weight": self.retain_weight if self.retain else None,
            "forget_weight": self.forget_weight,
            "trains": self.trains_text or "all parameters",
            "description": self.description,
        }
