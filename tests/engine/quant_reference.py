"""Float64 references of the two bitsandbytes formats the quantization attack loads (NF4, LLM.int8),
written from their definitions, and a reading of the weight a layer computes with: shared by
tests/engine/test_attack_recipes.py (CPU) and bench/quant_attack_device.py (CUDA). No pytest here:
the device machine runs the latter without it."""
from __future__ import annotations

import torch

# The 16 levels of 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA", appendix E).
NF4_LEVELS = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float64)


def ref_nf4(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Blocks of `blocksize` consecutive weights (row-major), each scaled by its absmax and rounded
    to the nearest NF4 level, in float64."""
    flat = w.double().flatten()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        absmax = float(block.abs().max()) or 1.0
        nearest = (block.unsqueeze(1) / absmax - NF4_LEVELS).abs().argmin(1)
        out[start:start + blocksize] = NF4_LEVELS[nearest] * absmax
    return out.view_as(w)


def ref_int8(w: torch.Tensor) -> torch.Tensor:
    """Per output row: q = round(127 · w / max|w|), back as q · max|w| / 127, in float64, from the
    weight in float16 (LLM.int8 is a float16 scheme: bitsandbytes' Int8Params rounds to it first)."""
    w = w.half().double()
    absmax = w.abs().amax(1, keepdim=True)
    return torch.round(w * 127 / absmax) * absmax / 127


def computed_weight(layer) -> torch.Tensor:
    """The weight a layer computes with, read through its forward: eye(in) @ Wᵀ = Wᵀ (the identity's
    rows quantize exactly as LLM.int8's activations, and bitsandbytes may keep its codes in a layout
    of its own kernels, so its forward is the one reading that holds on every backend)."""
    with torch.no_grad():
        return layer(torch.eye(layer.in_features, device=layer.weight.device)).t().double().cpu()
