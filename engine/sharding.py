"""FSDP: a run's weights, gradients and optimizer states sharded over its processes (`--fsdp`, with
`study create --gpus-per-run N` or any torchrun / accelerate launch of `unlearn run`).

PyTorch's FSDP2 (`fully_shard`, called here: accelerate's FSDP plugin is for GPUs only, and on CPU
it silently replicates instead), full shard, one unit per decoder block (the model's own
`_no_split_modules`) and the root. With bf16 on CUDA the sharded parameters stay fp32
and the blocks compute in bf16 (FSDP's mixed-precision policy): the fp32 master copy is FSDP's own,
so no `MasterAdamW` is needed. A live reference θ0 (KL, UNDIAL) is sharded the same way.

Every process holds 1/N of each tensor, so a forward pass needs them all: under FSDP every process
evaluates each milestone (the main one reports), where data parallel runs evaluate on the main
process alone. With LoRA the frozen base and the adapter are sharded alike (FSDP2 takes frozen and
trained parameters in one unit); `--save-model` gathers the shards (engine/saving.py). What needs
the whole model in one process is refused with `--fsdp` for now: the robustness attacks (a model
copy each), task_vector (θ0's full weights), saliency masks, 8-bit optimizers (bitsandbytes does
not update sharded tensors), a preset's benchmark metrics and --eval-tasks. FSDP2 runs on CPU too
(gloo), which is how the tests run it.
"""
from __future__ import annotations

import torch


def block_classes(model) -> list[str]:
    """The class names FSDP wraps one by one: the model's decoder blocks."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        from engine.errors import UnlearnError

        raise UnlearnError(f"--fsdp: {type(model).__name__} does not name its decoder blocks (_no_split_modules)")
    return names


def shard(model, bf16: bool):
    """The model sharded in place over the process group: each decoder block, then the root (so
    the embeddings and the head are one more unit). The trained model and the reference θ0 alike."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    wanted = set(block_classes(model))
    for module in model.modules():
        if type(module).__name__ in wanted:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
