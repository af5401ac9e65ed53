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
from typing import TYPE_CHECKING, Any, ClassVar

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


@dataclass
class PrepareContext:
    """What a term may use once, before the first step: the frozen original model θ0, the
    tokenizer, a seeded generator (so prepared labels are identical across runs) and a device."""

    reference: Any  # the frozen θ0 (a causal LM), or None when no term needs it
    tokenizer: Any
    generator: torch.Generator
    device: torch.device
    batch_size: int = 8
    autocast: Any = field(default=contextlib.nullcontext)  # a context-manager factory for the reference forward


class ForgetTerm:
    """Loss on a forget batch. `prepare` runs once over all forget chunks and returns per-chunk
    tensors (indexed along dim 0) that `loss` later receives in its batch dict."""

    id: ClassVar[str]
    formula: ClassVar[str]
    needs_reference: ClassVar[bool] = False

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ctx: PrepareContext) -> dict[str, torch.Tensor]:
        return {"labels": causal_labels(input_ids, attention_mask)}

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class RetainTerm:
    """Loss on a retain-source batch. `reference_logits` is given when needs_reference_logits."""

    id: ClassVar[str]
    formula: ClassVar[str]
    needs_reference_logits: ClassVar[bool] = False

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], reference_logits: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Method:
    id: str
    description: str
    forget: ForgetTerm
    retain: RetainTerm | None = None
    retain_source: str | None = None  # "retain" or "general"
    retain_weight: float = 1.0

    @property
    def needs_reference(self) -> bool:
        return self.forget.needs_reference or bool(self.retain and self.retain.needs_reference_logits)

    def describe(self) -> dict:
        return {
            "id": self.id,
            "forget_term": self.forget.formula,
            "retain_term": (self.retain.formula.replace("; R)", "; G)") if self.retain_source == "general" else self.retain.formula) if self.retain else None,
            "retain_source": self.retain_source,
            "retain_weight": self.retain_weight if self.retain else None,
            "description": self.description,
        }
