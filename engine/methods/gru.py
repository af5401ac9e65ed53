"""GRU — gradient rectified unlearning (Wang et al. 2025, "GRU: Mitigating the Trade-off between
Unlearning and Retention for LLMs", arXiv:2503.09117), as open-unlearning's `GRU` trainer runs it.

    g   = ∇(w_f·L_f + w_r·L_r),   L_f = −CE(θ; U) (gradient ascent),   L_r = CE(θ; R)
    r_t = γ·∇L_r + (1 − γ)·r_{t−1},   r_0 = 0                      (a running estimate of the retain gradient)
    the step's gradient:  g − (⟨g, r_t⟩ / ‖r_t‖²)·r_t   where ⟨g, r_t⟩ < 0,   else g
    γ = 0.8, w_f (forget_weight) = 1, w_r (retain_weight) = 0

Where the unlearning gradient g conflicts with retention (a step along −g would raise the retain loss
to first order) its component along r is removed, so the step is orthogonal to r; where they agree
g is left whole. The retain set enters the step only through that projection: with w_r = 0 the
optimizer steps on the rectified ascent gradient alone. The inner products run over every trained
weight at once (one global ⟨·,·⟩, not one per tensor), as the reference's sum of per-tensor dots does.
Sign convention: the loop minimizes, so g is the gradient of −CE on U; a conflict is ⟨g, ∇L_r⟩ < 0.

Source: open-unlearning src/trainer/unlearn/gru.py (`GRU`: forget_loss_type "GradAscent" by default,
−CE on the forget batch and the NLL of the retain batch backpropagated one at a time and stored;
`training_step`: flattened_retain = gamma_gru·g_r + (1 − gamma_gru)·previous, the dot product summed
over every tensor, `orthogonal_component` when it is below 0, and only the rectified forget gradient
restored for the optimizer; the Trainer then clips to 1.0 and steps); gamma_gru = 0.8 from the
trainer's signature and its configs/trainer/GRU.yaml.

What differs, and why:
- `retain_weight` (0 by default: the reference) adds w_r·∇L_r to g *before* the projection, which
  makes the unlearning objective GA + GD; the reference's GradAscent branch has no such term.
- The NPO forget loss the reference also offers is not registered here (its branch never advances the
  accumulation counter); GRU on ascent is the default it documents.
- Both forward passes of a step come before either backward (the loop's shape), so under data
  parallel DDP's one reduction per backward is switched off (`no_sync`) and each gradient is averaged
  over the processes here, as DDP would; under --fsdp the gradients are already reduce-scattered
  shards, and the partial inner products are summed over the processes (all_reduce).
- The reference copies both gradients to the CPU, flattened, every step; here they stay where they
  are, r is kept in the gradients' dtype, and each tensor's inner product is taken in float32 and
  the sum over tensors in float64. r costs one more gradient-sized buffer per run.
- The reported train_loss is w_f·L_f + w_r·L_r (the reference logs the forget loss: the same at w_r = 0).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import Method, UpdateContext, UpdateRule
from engine.methods.forget_terms import GradientAscent
from engine.methods.retain_terms import RetainDescent

GRU_GAMMA = 0.8  # open-unlearning's gamma_gru: the weight of the newest retain gradient in r


@dataclass
class RunningRetain:
    """GRU's state in one run: r, one tensor per trained parameter (its local shard under --fsdp)."""

    r: list | None = None
    projected: int = 0  # steps whose gradient conflicted with r and was projected


def local_gradients(ctx: UpdateContext) -> list:
    """Each trained parameter's gradient as a plain tensor that *is* its `.grad` (writing one writes
    the other; a missing gradient becomes zeros, as in the reference), averaged over the processes
    under data parallel. Under --fsdp the local shard: FSDP has already averaged it."""
    import torch

    out = []
    for p in ctx.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)
    if ctx.world > 1 and not ctx.sharded:
        import torch.distributed as dist

        for work in [dist.all_reduce(g, async_op=True) for g in out]:
            work.wait()
        for g in out:
            g.div_(ctx.world)
    return out


def inner(a: list, b: list, ctx: UpdateContext) -> float:
    """⟨a, b⟩ over every trained weight: float32 per tensor, float64 over tensors and (--fsdp) over
    the processes' shards."""
    import torch

    total = torch.stack([torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(a, b)]).double().sum()
    if ctx.sharded and ctx.world > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    return float(total)


class RectifiedUpdate(UpdateRule):
    id = "gru"
    formula = "g − (⟨g,r⟩/‖r‖²)·r where ⟨g,r⟩ < 0, g = ∇(w_f·L_f + w_r·L_r), r ← γ·∇L_r + (1−γ)·r; γ=0.8"
    knobs = ("gamma",)
    gradient_copies = 2  # r, kept across steps; with w_r > 0 the retain gradient, held while the forget one is made

    def __init__(self, gamma: float = GRU_GAMMA):
        if not 0 < gamma <= 1:
            raise UnlearnError(f"gru: gamma (the newest retain gradient's weight in its running mean) must be in "
                               f"(0, 1], not {gamma:g}")
        self.gamma = gamma

    def start(self, ctx: UpdateContext) -> RunningRetain:
        return RunningRetain()

    def forward_context(self, ctx: UpdateContext):
        # Two backward passes follow; DDP would reduce only the first (docstring). FSDP reduces each.
        if ctx.world > 1 and not ctx.sharded:
            return ctx.accelerator.no_sync(ctx.model)
        return contextlib.nullcontext()

    def backward(self, loss, forget, retain, ctx: UpdateContext, state: RunningRetain) -> None:
        import torch

        ctx.accelerator.backward(retain)
        with torch.no_grad():
            g_r = local_gradients(ctx)
            if state.r is None:  # r_0 = 0
                state.r = [self.gamma * g for g in g_r]
            else:
                for r, g in zip(state.r, g_r):
                    r.mul_(1.0 - self.gamma).add_(g, alpha=self.gamma)
            kept = [g.mul_(ctx.retain_weight) for g in g_r] if ctx.retain_weight else None
        for p in ctx.params:
            p.grad = None
        del g_r
        ctx.accelerator.backward(forget if ctx.forget_weight == 1.0 else ctx.forget_weight * forget)
        with torch.no_grad():
            g = local_gradients(ctx)
            if kept is not None:
                for x, y in zip(g, kept):
                    x.add_(y)
            dot = inner(g, state.r, ctx)
            if dot < 0:  # conflict: so r ≠ 0, and ‖r‖² > 0
                coef = dot / inner(state.r, state.r, ctx)
                for x, r in zip(g, state.r):
                    x.sub_(r, alpha=coef)
                state.projected += 1


register(Method("gru", "GRU: ascent whose gradient, where it conflicts with retention, is projected off a running "
                       "mean of the retain gradient (the retain set enters only through that projection).",
                GradientAscent(), RetainDescent(), "retain", retain_weight=0.0, update=RectifiedUpdate()))
