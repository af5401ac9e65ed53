"""Which weights a run may change: all of them, the method's own choice (RMU's MLP projections),
a regex over parameter names (`--params`, PCGU/DEPN-style local edits), or the most salient share
(`--params saliency:P`, or the `saliency` knob every method has, so a study can sweep the share).

Every weight outside the selection stays bitwise θ0: a frozen tensor gets no gradient at all, and
inside a partly selected tensor a gradient hook zeroes the unselected entries, so AdamW (weight
decay 0) moves them by exactly 0.

Saliency, measured once at θ0 before the first step (so prefix sharing still holds): for each
weight w, s(w) = |∂L_U/∂w| / (|∂L_R/∂w| + ε), with L the mean next-token cross-entropy over all
chunks of the forget set U and of the retain source R, and ε the mean |∂L_R/∂w| over the model (a
floor on the scale of the gradients, so a weight the retain set happens not to touch does not win
by dividing by nothing). The P % of weights with the largest s are trained. It holds one score per
weight in memory: fine for the models of a CPU box, heavy for a 7B model.
"""
from __future__ import annotations

import contextlib
import math
import re

import torch

from engine.config import RunConfig
from engine.data import Chunks
from engine.errors import UnlearnError
from engine.methods.base import Method, token_ce


def trained_parameters(model, method: Method, cfg: RunConfig, forget: Chunks | None = None,
                       retain: Chunks | None = None, device=None, autocast=contextlib.nullcontext) -> list:
    """The parameters the optimizer updates; freezes (or masks) the rest as the module explains."""
    spec = cfg.params
    share = float(spec.split(":", 1)[1]) if spec.startswith("saliency:") else method.saliency  # flag or knob
    if share:
        if retain is None:
            raise UnlearnError("a saliency share (--params saliency:P or the saliency knob) needs the retain set")
        return _by_saliency(model, share, forget, retain, cfg.eval_batch_size,
                            device or next(model.parameters()).device, autocast)
    if spec:
        pattern = re.compile(spec)
        chosen, what = (lambda name: pattern.search(name) is not None), f"--params '{spec}'"
    elif method.trains is not None:
        chosen, what = method.trains(model), method.trains_text
    else:
        return list(model.parameters())
    params = []
    for name, p in model.named_parameters():
        if chosen(name):
            params.append(p)
        else:
            p.requires_grad_(False)
    if not params:
        raise UnlearnError(f"method {method.id}: no parameter of this model matches {what}")
    return params


def _mean_ce_gradients(model, chunks: Chunks, batch_size: int, device, autocast) -> dict[str, torch.Tensor]:
    """∂(mean next-token CE over every predicted token of `chunks`)/∂w, per parameter."""
    from engine.methods.base import causal_labels

    model.zero_grad(set_to_none=True)
    total = max(1, int((chunks.loss_mask[:, 1:] == 1).sum()))  # scored tokens: a QA chunk's answers
    for start in range(0, len(chunks), batch_size):
        ids = chunks.input_ids[start:start + batch_size]
        mask = chunks.attention_mask[start:start + batch_size]
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width].to(device), mask[:, :width].to(device)
        labels = causal_labels(ids, mask, chunks.loss_mask[start:start + batch_size, :width].to(device))
        n = int((labels[:, 1:] != -100).sum())
        if n == 0:
            continue
        with autocast():
            loss = token_ce(model(input_ids=ids, attention_mask=mask).logits, labels) * (n / total)
        loss.backward()
    grads = {name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def saliency_masks(model, share_pct: float, forget: Chunks, retain: Chunks, batch_size: int, device,
                   autocast=contextlib.nullcontext) -> dict[str, torch.Tensor]:
    """name -> bool mask of the weights to train: exactly ⌈P % of all weights⌉ of them."""
    g_u = _mean_ce_gradients(model, forget, batch_size, device, autocast)
    g_r = _mean_ce_gradients(model, retain, batch_size, device, autocast)
    names = list(g_u)
    floor = torch.cat([g_r[n].abs().flatten().float() for n in names]).mean()
    scores = torch.cat([(g_u[n].abs().float() / (g_r[n].abs().float() + floor)).flatten() for n in names])
    k = max(1, math.ceil(share_pct / 100 * scores.numel()))
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[torch.topk(scores, k, sorted=False).indices] = True
    masks, at = {}, 0
    for n in names:
        size = g_u[n].numel()
        masks[n] = flat[at:at + size].view_as(g_u[n])
        at += size
    return masks


def _by_saliency(model, share_pct, forget, retain, batch_size, device, autocast) -> list:
    was_training = model.training
    model.eval()
    masks = saliency_masks(model, share_pct, forget, retain, batch_size, device, autocast)
    model.train(was_training)
    params = []
    for name, p in model.named_parameters():
        mask = masks[name]
        if not mask.any():
            p.requires_grad_(False)
        elif mask.all():
            params.append(p)
        else:
            keep = mask.to(p.dtype)
            p.register_hook(lambda g, keep=keep: g * keep)
            params.append(p)
    return params
