"""PDU — primal-dual unlearning (Entesari et al. 2025, "Constrained Entropic Unlearning: A Primal-Dual
Framework for Large Language Models", arXiv:2506.05314), as open-unlearning's `PDU` trainer runs it.

    minimize L_f  subject to  L_r ≤ ε,  through the Lagrangian  γ·L_f + λ·(L_r − ε),  λ ≥ 0
    L_f = mean_t (max_v z_t,v − mean_v z_t,v)²     z_t: the logits that predict scored token t of U
    L_r = CE(θ; R)
    primal: one optimizer step on the Lagrangian at λ_k
    dual:   λ_{k+1} = max(0, λ_k + η·(L_r,k − ε))   (projected ascent, on the step's own retain loss)
    γ (forget_weight) = 1, λ_0 (retain_weight) = 1, η (dual_step) = 1, ε (eps) = 0.3,
    λ held at λ_0 for the first 5 passes over U (warmup_epochs)

The forget loss ("logit-margin flattening") is 0 exactly where all logits of a position are equal,
the uniform next-token distribution, and it cannot run away below 0 as ascent can. Retention is a
constraint, not a weight: while the retain loss stays above ε, λ grows every step until the retain
term wins; once below, λ shrinks towards 0 and the forget term has the step to itself.

ε must sit above θ0's own retain loss (the authors' advice: look at it and choose a larger value),
and the forget loss is a squared logit gap, large (their README starts λ at 50-100). The config sets
no ε (`???`); 0.3 is their TOFU setting (run.sh; MUSE: 0.1-1.5). For another model and data set
set it a little above θ0's ln ppl_retain (the run's baseline shows it): `--param eps=...`.

Source: open-unlearning src/trainer/unlearn/pdu.py (`PDU(GradDiff)`: forget loss (max − mean of the
logits)² averaged over the positions whose label is scored; `final_loss_value`: preferences
[gamma, alpha] times [forget, retain − retain_loss_eps], then, when `primal_dual` and past the warm-up,
preferences[1] = max(0, preferences[1] + dual_step_size·(retain − eps).item()); the retain loss is
GradDiff's NLL), `DualOptimizationCallback` (updates allowed from the end of epoch dual_warmup_epochs
on); defaults from configs/trainer/PDU.yaml: primal_dual true, dual_step_size 1.0, dual_update_upon
"step", dual_warmup_epochs 5, gamma 1.0, alpha 1.0; retain_loss_eps has no default (run.sh: TOFU 0.3).

Where λ lives: in the run (`_Run.update_state`, a `Dual` made by `start` for each run; the Method is
shared and frozen), a Python float updated after each step's backward: a run to step j passes through
exactly the λ of the run to step k < j. Runs are never checkpointed midway, so nothing else saves it.

What differs, and why:
- The forget loss reads the logits that predict each scored token (position t − 1 for label t), the
  positions every other loss here reads; the reference masks the unshifted logits with the labels, one
  position later (it includes the last scored position, which predicts what follows the answer, and
  leaves out the one that predicts the first answer token).
- An epoch of the warm-up is len(U) / the global batch steps (the batch stream here has no short last
  batch; the reference's epochs round up to whole batches).
- Under several processes the retain loss of the dual step is averaged over them first, so every
  process holds the same λ (the reference's `.item()` reads each process's own loss).
- Only the per-step dual update ("step"); the reference's "epoch" mode (a pass over the retain data
  at each epoch's end) is not offered. The dual update is always on (its `primal_dual: true`).
- The reported train_loss is the Lagrangian at λ_k, as the reference's loss.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import IGNORE, ForgetTerm, Method, UpdateContext, UpdateRule, shift
from engine.methods.retain_terms import RetainDescent

PDU_EPS = 0.3  # retain_loss_eps: no default in configs/trainer/PDU.yaml; its TOFU setting in run.sh
PDU_DUAL_STEP = 1.0  # dual_step_size
PDU_WARMUP_EPOCHS = 5.0  # dual_warmup_epochs
PDU_FORGET_WEIGHT = 1.0  # gamma
PDU_RETAIN_WEIGHT = 1.0  # alpha: λ_0


class LogitMarginFlattening(ForgetTerm):
    """mean over scored tokens of (max_v z_v − mean_v z_v)², z the logits that predict the token."""

    id = "logit_margin"
    formula = "mean_t (max_v z_t,v − mean_v z_t,v)²; U"

    def loss(self, logits, batch, reference_logits=None):
        import torch

        lg, lb = shift(logits, batch["labels"])
        lg = lg.float()
        mask = lb != IGNORE
        margin = (lg.max(-1).values - lg.mean(-1)) ** 2
        return torch.where(mask, margin, torch.zeros_like(margin)).sum() / mask.sum().clamp(min=1)


@dataclass
class Dual:
    """PDU's state in one run."""

    lam: float  # λ of the next step
    steps: int = 0  # optimizer steps taken


class PrimalDualUpdate(UpdateRule):
    id = "pdu"
    formula = "∇(γ·L_f + λ·(L_r − ε)); then λ ← max(0, λ + η·(L_r − ε)) after a 5-pass warm-up; ε=0.3, η=1"
    knobs = ("eps", "dual_step", "warmup_epochs")

    def __init__(self, eps: float = PDU_EPS, dual_step: float = PDU_DUAL_STEP,
                 warmup_epochs: float = PDU_WARMUP_EPOCHS):
        for name, value in (("dual_step", dual_step), ("warmup_epochs", warmup_epochs)):
            if not value >= 0:
                raise UnlearnError(f"pdu: {name} must be 0 or more, not {value:g}")
        self.eps, self.dual_step, self.warmup_epochs = eps, dual_step, warmup_epochs

    def start(self, ctx: UpdateContext) -> Dual:
        return Dual(lam=float(ctx.retain_weight))  # λ_0 is the retain weight (the reference's alpha)

    def loss(self, forget, retain, ctx: UpdateContext, state: Dual):
        return ctx.forget_weight * forget + state.lam * (retain - self.eps)

    def backward(self, loss, forget, retain, ctx: UpdateContext, state: Dual) -> None:
        ctx.accelerator.backward(loss)
        # past the warm-up: this step began after warmup_epochs whole passes over U
        if state.steps * ctx.global_batch >= self.warmup_epochs * ctx.forget_chunks:
            r = retain.detach()
            if ctx.world > 1:  # one λ for every process
                r = ctx.accelerator.reduce(r, reduction="mean")
            state.lam = max(0.0, state.lam + self.dual_step * (float(r) - self.eps))
        state.steps += 1


register(Method("pdu", "PDU: flatten the logits on U (their top-minus-mean gap squared) under the constraint "
                       "CE(θ; R) ≤ ε, held by a dual weight λ that grows while the retain loss is above ε.",
                LogitMarginFlattening(), RetainDescent(), "retain", retain_weight=PDU_RETAIN_WEIGHT,
                forget_weight=PDU_FORGET_WEIGHT, update=PrimalDualUpdate()))
