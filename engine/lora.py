"""LoRA (Hu et al. 2021) through peft: every method trains a low-rank adapter instead of the weights.

The base weights stay bitwise θ0, so θ0 is the same model with its adapter disabled: a method that
reads θ0's logits at every step (KL, UNDIAL) reads them from `AdapterOff`, and no second copy of
the model is kept. peft starts the adapter's B matrix at zero, so before the first step the model
*is* θ0 (a test holds the two to the same logits, exactly). Adapters are kept in fp32 whatever the
base weights' dtype (peft's `autocast_adapter_dtype`), so they need no master copy.
"""
from __future__ import annotations

import torch

from engine.errors import UnlearnError


def apply_lora(model, rank: int, alpha: float | None, targets: str):
    """The model wrapped with a LoRA adapter on `targets` (comma-separated module names, or every
    linear layer of the blocks when empty: peft's "all-linear", which leaves the output head out);
    only the adapter trains."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UnlearnError("--lora needs peft: pip install peft") from None
    names = [t.strip() for t in targets.split(",") if t.strip()] if targets else "all-linear"
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else 2 * rank), lora_dropout=0.0,
                        target_modules=names, bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. no module of that name
        raise UnlearnError(f"--lora-targets {targets or 'all-linear'}: {str(exc).splitlines()[0]}") from None


def is_adapter_weight(model, name: str) -> bool:
    """Whether the parameter `name` of `model` is a peft adapter's, not one of the model's own weights
    (peft names them lora_A, lora_B, lora_embedding_A/B, lora_magnitude_vector)."""
    return hasattr(model, "peft_config") and "lora_" in name


class AdapterOff:
    """θ0 as a callable model: the LoRA model with its adapter disabled, under no_grad."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter(), torch.no_grad():
            return self.model(*args, **kwargs)


def save_lora(model, path, merge: bool) -> None:
    """The adapter alone (peft's files), or with `merge` the merged full model (save_pretrained)."""
    if merge:
        model.merge_and_unload().save_pretrained(path)
    else:
        model.save_pretrained(path)
