"""The quantization attack through bitsandbytes, as the published attack runs it (Zhang et al., ICLR
2025, "Catastrophic Failure of LLM Unlearning via Quantization": the unlearned model loaded in 4 bits
(NF4) or 8 bits (LLM.int8) by bitsandbytes, then evaluated).

A copy of the model whose linear layers (every one but the output embedding, as engine.recovery picks
them) are bitsandbytes modules built from the layer's weights:

    quant4  bnb.nn.Linear4bit, quant_type "nf4", blocksize 64, compute in the model's dtype
            (transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`; the
            paper's 4-bit setting; no double quantization, which changes only the scales' storage)
    quant8  bnb.nn.Linear8bitLt, threshold 6.0, int8 weights (`load_in_8bit=True`: LLM.int8,
            outlier features above the threshold computed in 16 bits)

The modules quantize their weights when moved to the device (bitsandbytes' own path, so the stored
codes are exactly what a loader would keep). The forward then runs bitsandbytes' kernels: on CUDA
its own, on CPU (bitsandbytes ≥ 0.48) its portable ones. engine.recovery runs this on CUDA by default
and keeps its round-to-nearest as the CPU and reference path (`--quant-backend`).
"""
from __future__ import annotations

import copy

import torch

NF4_BLOCKSIZE = 64
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold, bitsandbytes' and transformers' default


def available() -> bool:
    """Whether bitsandbytes imports here (it is the `gpu` extra)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken install (no CUDA libraries it expects) is as good as none
        return False
    return True


def bitsandbytes_copy(model, bits: int, layers) -> torch.nn.Module:
    """A copy of `model` with each of `layers` ((name, module, output-channel dim), from
    engine.recovery.quantized_layers) replaced by a bitsandbytes module of `bits` (4: NF4, 8: LLM.int8)."""
    import bitsandbytes as bnb

    if bits not in (4, 8):
        raise ValueError(f"bitsandbytes quantizes to 4 or 8 bits, not {bits}")
    names = {name for name, _, _ in layers}
    channel_dim = {name: dim for name, _, dim in layers}
    q = copy.deepcopy(model).eval()
    for name, module in list(q.named_modules()):
        if name not in names:
            continue
        device, dtype = module.weight.device, module.weight.dtype
        # [out, in], as bitsandbytes wants it (GPT-2's Conv1D keeps [in, out]); through the CPU so the
        # parameter quantizes on its way to the device, as a loader's does
        weight = module.weight.detach().float()
        weight = (weight if channel_dim[name] == 0 else weight.t()).contiguous().cpu().to(dtype)
        out_features, in_features = weight.shape
        if bits == 4 and device.type == "cpu" and in_features % NF4_BLOCKSIZE:
            # bitsandbytes' portable kernels (0.50) dequantize such a weight's blocks out of order (the
            # float64 reference in tests/engine/test_attack_recipes.py caught it); CUDA's are right
            from engine.errors import UnlearnError

            raise UnlearnError(f"--quant-backend bitsandbytes on CPU: layer {name} has {in_features} inputs, not a "
                               f"multiple of {NF4_BLOCKSIZE}, which bitsandbytes' CPU NF4 gets wrong; use --quant-backend rtn")
        bias = getattr(module, "bias", None)
        if bits == 4:
            new = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                                    quant_type="nf4", device="cpu")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE,
                                              compress_statistics=False)  # no double quantization, as the loader's default
        else:
            new = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                      threshold=INT8_THRESHOLD, device="cpu")
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            new.bias = torch.nn.Parameter(bias.detach().cpu().clone(), requires_grad=False)
        new = new.to(device)
        parent_name, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent_name) if parent_name else q, child, new)
    return q.requires_grad_(False)

