"""The seeded batch stream every loop here draws from, and plain fine-tuning of a model on chunks.

`batch_indices` is the run's own stream (engine.run): the batch at step s depends only on
(seed, s), which is what prefix sharing rests on. `fine_tune` is next-token descent on a set of
chunks for a fixed number of steps — the relearning attack (engine.recovery) and WHP's reinforced
copy (engine.methods.whp) are both that, on a copy of a model.
"""
from __future__ import annotations

import contextlib

import torch


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Rows of the batch for `step` (1-based): an endless stream of seeded permutations,
    so the batch never depends on how many steps the run will take."""
    start = (step - 1) * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


def fine_tune(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int, lr: float, batch_size: int,
              seed: int, device, autocast=contextlib.nullcontext, loss_mask: torch.Tensor | None = None) -> None:
    """`steps` steps of AdamW (weight decay 0, gradients clipped to 1.0) on the mean next-token
    cross-entropy of the chunks (rows of `input_ids`), batches from the seeded stream. Trains `model` in place, in whatever
    mode (train / eval) the caller left it. `loss_mask` (Chunks.loss_mask) limits the loss to a QA chunk's answers."""
    from engine.methods.base import causal_labels, token_ce
    from engine.precision import make_optimizer

    opt = make_optimizer("adamw", list(model.parameters()), lr, torch.device("cpu"))  # bf16 weights: fp32 masters
    for step in range(1, steps + 1):
        idx = batch_indices(len(input_ids), batch_size, seed, step)
        mask = attention_mask[idx]
        width = int(mask.sum(1).max())  # trim all-pad columns
        ids, mask = input_ids[idx, :width].to(device), mask[:, :width].to(device)
        scored = None if loss_mask is None else loss_mask[idx, :width].to(device)
        with autocast():
            loss = token_ce(model(input_ids=ids, attention_mask=mask).logits, causal_labels(ids, mask, scored))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
