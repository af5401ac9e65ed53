"""`--save-model`: the trained model written as a Hugging Face folder that `from_pretrained` loads.

One process, or data parallel: the main process writes the model it holds (with LoRA, the adapter
alone or, with `--merge`, the merged model). Under FSDP no process holds the whole model: every
process takes part in gathering the full state dict onto the main one's CPU (a collective), which
loads it into a fresh, unsharded copy of the same structure (the base model, and the adapter with
LoRA) and writes that the same way, in the dtype a one-process run of the same settings would have.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.config import RunConfig
from engine.lora import apply_lora, save_lora
from engine.models import load_model
from engine.precision import resolve_dtype


def save_model(model, path: Path, cfg: RunConfig, merge_lora: bool, model_name: str, trust_remote_code: bool,
               device: torch.device, main: bool) -> None:
    if cfg.fsdp:
        model = gathered_copy(model, cfg, model_name, trust_remote_code, device, main)
    if not main:
        return
    if cfg.lora:
        save_lora(model, path, merge_lora)
    else:
        model.save_pretrained(path)


def gathered_copy(model, cfg: RunConfig, model_name: str, trust_remote_code: bool, device: torch.device, main: bool):
    """On the main process, an unsharded CPU copy of an FSDP model's current weights; None elsewhere.
    Every process must call it (the gather is a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:  # (cpu_offload: only rank 0 receives the tensors)
        return None
    plain = load_model(model_name, torch.device("cpu"), trust_remote_code, dtype=resolve_dtype(cfg.dtype, device))
    if cfg.lora:
        plain = apply_lora(plain, cfg.lora, cfg.lora_alpha, cfg.lora_targets)
    plain.load_state_dict(state)  # strict: the same structure, every tensor accounted for
    plain.config.use_cache = getattr(model.config, "use_cache", plain.config.use_cache)
    return plain
