"""One run: one method at one learning rate, trained to the last milestone, evaluated at each.

`train_to_milestones` is the loop, and reads top to bottom: set up, then per step the step's loss
and one optimizer step, at a milestone the evaluation, and at the end the cells a divergence cut
off, marked diverged. The schedule (`constant_after_warmup`) does not depend on the total step
count and the batch at step s depends only on (seed, s), so the run to 40 steps passes through
exactly the model of the run to 10 steps: one run yields every (lr, steps) cell (prefix sharing).

Under torchrun (or `accelerate launch` on GPUs) every process trains its slice of each global batch;
only the main process evaluates, reports and saves, and tells the others when a divergence stops
the run.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.benchmark_metrics.muse import privleak
from engine.config import RunConfig, parse_attacks
from engine.data import Chunks, ForgetSetChunks, ForgetSetTexts, chunk_forget_set
from engine.errors import UnlearnError
from engine.evaluate import compare, evaluate, not_compared, reference_losses, score_chunks
from engine.files import write_json_atomic
from engine.finetune import batch_indices
from engine.lora import AdapterOff, apply_lora
from engine.methods import get_method
from engine.methods.base import Method, PrepareContext, UpdateContext
from engine.metric_registry import MEMORIZATION, MIA, MIA_AUC, PERPLEXITY, PRIVLEAK, QUANT_ATTACKS, CellMetrics, blank
from engine.models import (
    count_parameters,
    load_model,
    load_tokenizer,
    model_key,
    read_pretraining_tokens,
    resolve_device,
)
from engine.precision import make_optimizer, resolve_dtype
from engine.recovery import attack_milestone
from engine.saving import save_model
from engine.selection import trained_parameters
from engine.sharding import shard
from engine.verdict import bands, target

OnStep = Callable[[int, float], None]
OnMilestone = Callable[[CellMetrics], None]


@dataclass
class TrainResult:
    milestones: list[CellMetrics]  # one cell per milestone, in step order; cells after a divergence are diverged
    at_target: CellMetrics | None  # the cell where forgetting reached the target (a milestone's, or its own step)
    diverged: bool
    reason: str | None
    losses: list[float]  # the loss of every optimizer step taken
    train_tokens: int
    eval_tokens: int
    model: Any  # the unlearned model (unwrapped)


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The run's one autocast: bf16 on CUDA, none on CPU (fp32 there, deterministic)."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def constant_after_warmup(warmup_steps: int) -> Callable[[int], float]:
    """The lr multiplier of optimizer step i (0-based): a linear warm-up over `warmup_steps`,
    then 1. It never looks at the total step count, which is what keeps prefix sharing exact."""
    return lambda i: min(1.0, (i + 1) / warmup_steps) if warmup_steps else 1.0


def empty_metrics() -> dict:
    """What `evaluate` measures, every figure None (a cell a divergence cut off)."""
    return blank(PERPLEXITY, MIA, MEMORIZATION)


# ---------------------------------------------------------------- the loop

def train_to_milestones(model, tokenizer, sets: ForgetSetChunks, cfg: RunConfig, baseline: dict,
                        on_step: OnStep | None = None, on_milestone: OnMilestone | None = None,
                        cache: tuple[Path, str] | None = None, extras=None, mia_reference=None) -> TrainResult:
    """`cache` = (folder, key of this model and forget set) for what a method builds once and reuses
    across runs (WHP's reinforced model); None builds it in memory. `extras`: the benchmark metrics
    and downstream tasks measured at each milestone (engine.benchmark_metrics.milestone), or None.
    `mia_reference`: a reference model's losses per chunk (engine.evaluate.reference_losses), for
    the reference attack of every cell; None: no mia_auc.reference."""
    cfg = cfg.validate()
    use_cache = getattr(model.config, "use_cache", None)  # set_up turns it off; a saved model keeps its own
    try:
        with _deterministic(next(model.parameters()).device.type == "cpu"):
            return _train(model, tokenizer, sets, cfg, baseline, on_step, on_milestone, cache, extras, mia_reference)
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache


def _train(model, tokenizer, sets, cfg: RunConfig, baseline, on_step, on_milestone, cache=None, extras=None,
           mia_reference=None) -> TrainResult:
    run = _Run.set_up(model, tokenizer, sets, cfg, cache)
    run.extras, run.mia_reference = extras, mia_reference
    cells: list[CellMetrics] = []
    losses: list[float] = []
    train_tokens = eval_tokens = 0
    reason = stopped = target_cell = None
    watch = _TargetWatch.of(cfg, baseline) if run.is_main and run.world == 1 else None
    for step in range(1, cfg.milestones[-1] + 1):
        loss, tokens = run.step_loss(step)
        train_tokens += tokens
        value = run.step_value(loss)  # the step's one host read of the loss
        if not math.isfinite(value):
            reason = f"non-finite loss at step {step}"
            break
        run.optimizer_step(loss)
        losses.append(value)
        if on_step and run.is_main:
            on_step(step, losses[-1])
        at_target = watch is not None and watch.reached(run, step)
        if step in cfg.milestones or at_target:
            cell, bound, tokens = run.evaluate_milestone(step, baseline, losses[-1])
            eval_tokens += tokens
            if cell is not None:
                cell["at_target"] = at_target
                if at_target:
                    target_cell = cell
                if step in cfg.milestones:
                    cells.append(cell)
                if on_milestone:
                    on_milestone(cell)
            reason = run.agree_on(bound)
            if reason:
                break
        if at_target and cfg.stop_at_target:
            stopped = step
            break
    if watch is not None:
        eval_tokens += watch.tokens
    if run.is_main:
        for cell in stopped_cells(cfg.milestones, stopped):
            cells.append(cell)
            if on_milestone:
                on_milestone(cell)
        for cell in diverged_cells(cfg.milestones, done={c["step"] for c in cells}):
            cells.append(cell)
            if on_milestone:
                on_milestone(cell)
    return TrainResult(cells, target_cell, reason is not None, reason, losses, train_tokens, eval_tokens, run.reported())


def stopped_cells(milestones, stopped: int | None) -> list[CellMetrics]:
    """The milestones after a run stopped at its target (--stop-at-target): never trained to, so no
    figure and no success, and not diverged either."""
    if stopped is None:
        return []
    return [{"step": step, **empty_metrics(), **not_compared(), "diverged": False, "stopped_at_target": True,
             "train_loss": None} for step in milestones if step > stopped]


@dataclass
class _TargetWatch:
    """Where forgetting reaches the target: ln ppl_forget, from a cheap forward pass over the forget
    set alone every `every` steps, first at or above ln ppl_unseen(θ0) having started below it.
    A milestone grid samples the trajectory at doubling steps, between which the forget perplexity
    moves by a factor of 2-10; this finds the step the trajectory passes the target."""

    every: int
    target: float  # ln ppl_unseen(θ0)
    below: bool  # θ0 starts below the target (the usual case: it remembers U)
    done: bool = False
    tokens: int = 0

    @classmethod
    def of(cls, cfg: RunConfig, baseline: dict) -> "_TargetWatch | None":
        pu, pf = baseline.get("ppl_unseen"), baseline.get("ppl_forget")
        if not cfg.watch_every or not pu or not pf:
            return None
        return cls(cfg.watch_every, math.log(pu), math.log(pf) < math.log(pu))

    def reached(self, run: "_Run", step: int) -> bool:
        """True once, at the first watched step where the forget perplexity reaches the target."""
        if self.done or not self.below or step % self.every:
            return False
        scores = score_chunks(run.reported(), run.sets.forget, run.cfg.eval_batch_size, run.device, run.autocast,
                              attacks=False)
        self.tokens += run.sets.forget.n_tokens
        self.done = math.log(scores.ppl) >= self.target if math.isfinite(scores.ppl) else True
        return self.done


def diverged_cells(milestones, done: set[int]) -> list[CellMetrics]:
    """The cells a divergence cut off: recorded as diverged, never as missing."""
    return [{"step": step, **empty_metrics(), **not_compared(), "diverged": True, "train_loss": None}
            for step in milestones if step not in done]


@dataclass
class _Run:
    """What one run holds between steps: the method, the prepared data, the optimizer and the
    accelerator. Each method below is one named piece of the loop."""

    cfg: RunConfig
    sets: ForgetSetChunks
    method: Method
    device: torch.device
    accelerator: Any
    autocast: Callable[[], contextlib.AbstractContextManager]
    reference: Any  # a live frozen copy of θ0, when a term reads its logits at every step
    forget_extra: dict  # per-chunk tensors the forget term prepared (its labels, reference log-probs...)
    retain_chunks: Chunks | None
    retain_extra: dict
    constants: dict  # run-level tensors of each term ("forget", "retain"), put whole into its batches
    retain_weight: float
    model: Any  # as the accelerator prepared it
    optimizer: Any
    schedule: Any
    theta0: dict | None = None  # θ0's weights (name -> tensor), for a method whose milestones report an edit
    extras: Any = None  # engine.benchmark_metrics.milestone.MilestoneExtras: bench.* and downstream.* of each cell
    mia_reference: Any = None  # a reference model's losses per chunk (the reference attack), or None
    # The method's update rule (Method.update) reads the run through `update`; its state (PDU's dual
    # variable λ, GRU's running retain gradient) is `update_state`: made per run in set_up, so a run to
    # step j passes through exactly the state of the run to step k < j (prefix sharing). Runs are never
    # checkpointed midway (a retried run starts again from θ0), so there is no saved state to extend.
    update: UpdateContext | None = None
    update_state: Any = None
    step_losses: tuple | None = None  # (L_f, L_r or None) of the step whose loss step_loss returned

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @classmethod
    def set_up(cls, model, tokenizer, sets: ForgetSetChunks, cfg: RunConfig, cache=None) -> "_Run":
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        method: Method = get_method(cfg.method)
        device = next(model.parameters()).device
        check_attacks(cfg, sets, device)
        # No key/value cache: training and scoring read every position once, and building a cache
        # nobody reads cost ~8 % a step (bench/step_overhead.py). Logits are the same either way.
        model.config.use_cache = False
        bf16 = device.type == "cuda" and cfg.dtype in ("auto", "bf16")  # FSDP's compute dtype (engine/sharding.py)
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")  # autocast is ours, below
        set_seed(cfg.seed)
        autocast = autocast_for(device)
        reference = None
        if method.needs_reference_logits and not cfg.lora:  # a live frozen θ0 for terms that read its logits every step (KL, UNDIAL)
            reference = copy.deepcopy(model).eval().requires_grad_(False)
            if cfg.fsdp:
                reference = shard(reference, bf16)
        # Prepared data comes from θ0 too, but once, before the first step: the model itself will do.
        model.eval()
        ctx = PrepareContext(model, tokenizer, torch.Generator().manual_seed(cfg.seed), device,
                             cfg.eval_batch_size, autocast, cache[0] if cache else None, cache[1] if cache else "",
                             cfg.batch_size, cfg.seed, cfg.seq_len)
        forget_extra = method.forget.prepare(sets.forget.input_ids, sets.forget.attention_mask, ctx, sets.forget.loss_mask)
        constants = {"forget": method.forget.constants(ctx), "retain": {}}
        retain_chunks, retain_extra = None, {}
        if method.retain is not None:
            retain_chunks = getattr(sets, method.retain_source)
            if retain_chunks is None:
                raise UnlearnError(f"method {method.id} needs a {method.retain_source} set (--{method.retain_source})")
            retain_extra = method.retain.prepare(retain_chunks.input_ids, retain_chunks.attention_mask, ctx,
                                                 retain_chunks.loss_mask)
            constants["retain"] = method.retain.constants(ctx)
        if cfg.gradient_checkpointing:  # non-reentrant: works with frozen inputs, so with LoRA too
            if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2 on
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:  # an adapter trains; θ0 is the model with it disabled (no second copy)
            model = apply_lora(model, cfg.lora, cfg.lora_alpha, cfg.lora_targets)
            params = [p for p in model.parameters() if p.requires_grad]
            if method.needs_reference_logits:
                reference = AdapterOff(model)
        else:
            # Which weights may move: all, the method's own (RMU), --params REGEX or saliency:P (at θ0, once).
            params = trained_parameters(model, method, cfg, sets.forget, sets.retain, device, autocast)
        if cfg.fsdp:  # each process keeps 1/N of every tensor; the optimizer sees only its shards
            model = shard(model, bf16)  # (with LoRA the adapter's weights too; the frozen base is sharded alike)
            params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg.optim, params, cfg.lr, device)  # bf16 weights: through fp32 masters
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, constant_after_warmup(cfg.warmup_steps))
        theta0 = ({n: p.detach().clone() for n, p in model.named_parameters()}
                  if method.forget.edits_weights else None)
        if not cfg.fsdp:  # data parallel (DDP) when there are several processes; FSDP is already in place
            model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        run = cls(cfg, sets, method, device, accelerator, autocast, reference, forget_extra, retain_chunks,
                  retain_extra, constants, method.retain_weight if cfg.retain_weight is None else cfg.retain_weight,
                  model, optimizer, schedule, theta0)
        run.update = UpdateContext(accelerator, model, params, method.forget_weight, run.retain_weight, cfg.fsdp,
                                   len(sets.forget), cfg.batch_size * accelerator.num_processes)
        run.update_state = method.update.start(run.update)
        return run

    def _batch(self, chunks: Chunks, extra: dict, constants: dict, seed: int, step: int) -> dict[str, torch.Tensor]:
        """This process's slice of the global batch of `step` (batch_size rows per process): the
        chunks' rows, the term's prepared rows (token-aligned ones trimmed like the chunks, those of a
        second sequence `<name>_...` by its own `<name>_attention_mask`: base.Term) and its
        run-level constants."""
        bs = self.cfg.batch_size
        idx = batch_indices(len(chunks), bs * self.world, seed, step)[self.rank * bs:(self.rank + 1) * bs]
        mask = chunks.attention_mask[idx]
        width = int(mask.sum(1).max())  # trim all-pad columns
        out = {"input_ids": chunks.input_ids[idx, :width], "attention_mask": mask[:, :width]}
        own = {k[:-len("_attention_mask")]: max(1, int(v[idx].sum(1).max())) for k, v in extra.items()
               if k.endswith("_attention_mask") and len(k) > len("_attention_mask")}

        def width_of(key: str) -> int:  # the longest name that prefixes the key, else the chunks' width
            name = max((n for n in own if key.startswith(n + "_")), key=len, default=None)
            return width if name is None else own[name]

        out.update({k: v[idx, :width_of(k)] if v.dim() >= 2 else v[idx] for k, v in extra.items()})
        out.update(constants)
        return {k: v.to(self.device) for k, v in out.items()}

    def step_loss(self, step: int) -> tuple[torch.Tensor, int]:
        """The step's loss as the method's update rule reports it (by default forget weight × forget
        term + retain weight × retain term) on the batches of `step`; and the tokens it trained on.
        The two terms' own losses wait in `step_losses` for `optimizer_step`."""
        m, rule = self.method, self.method.update
        fb = self._batch(self.sets.forget, self.forget_extra, self.constants["forget"], self.cfg.seed, step)
        with self.autocast(), rule.forward_context(self.update):
            forget = self.balanced(m.forget.forward_loss(self.model, fb, self.reference), m.forget.mean_count(fb))
        tokens = int(m.forget.model_inputs(fb)["attention_mask"].sum())  # what the model read (DPO: both sides)
        retain = None
        if self.retain_chunks is not None:
            rb = self._batch(self.retain_chunks, self.retain_extra, self.constants["retain"], self.cfg.seed + 1, step)
            with self.autocast(), rule.forward_context(self.update):
                retain = self.balanced(m.retain.forward_loss(self.model, rb, self.reference), m.retain.mean_count(rb))
            tokens += int(rb["attention_mask"].sum())
        self.step_losses = (forget, retain)
        return rule.loss(forget, retain, self.update, self.update_state), tokens

    def balanced(self, loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """A term's loss on this process's share of the batch, weighed so that the mean over
        processes (what data parallel and FSDP average gradients by) is the term's mean over the whole
        batch: × N · count / Σ count. Each process's loss is a mean over its own `count` items (tokens,
        or chunks), and the processes' counts differ (chunks of different lengths), so without this
        the step — and every cell — would change with the number of processes. One process: as is."""
        if self.world == 1:
            return loss
        total = self.accelerator.reduce(count.detach().float().reshape(1).to(self.device), reduction="sum")
        return loss * (self.world * count.float() / total.clamp(min=1)).reshape(())

    def step_value(self, loss: torch.Tensor) -> float:
        """The step's loss over the whole batch (the mean over processes of their balanced losses),
        read once; every process gets the same number, so they agree on a non-finite one and stop together."""
        if self.world == 1:
            return float(loss.detach())
        return float(self.accelerator.reduce(loss.detach().float().reshape(1), reduction="mean").item())

    def optimizer_step(self, loss: torch.Tensor) -> None:
        if not loss.requires_grad:  # e.g. --params picked weights after the layer RMU reads
            raise UnlearnError(f"method {self.method.id}: the loss does not depend on any weight this run trains"
                               f"{f' (--params {self.cfg.params})' if self.cfg.params else ''}")
        forget, retain = self.step_losses
        self.step_losses = None  # the graphs go with the step
        self.method.update.backward(loss, forget, retain, self.update, self.update_state)
        self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate_milestone(self, step: int, baseline: dict,
                           loss: float) -> tuple[CellMetrics | None, str | None, int]:
        """(the cell at `step`, why it counts as diverged or None, the tokens evaluated), on the main
        process; (None, None, 0) on the others, which learn the verdict from `agree_on`."""
        if not self.is_main:
            if self.cfg.fsdp:  # each process holds a shard: every one takes part in the forward passes
                evaluate(self.reported(), self.sets, self.cfg.eval_batch_size, self.device, self.autocast, self.cfg.min_k)
            return None, None, 0
        cfg = self.cfg
        model = self.reported()
        metrics, tokens = evaluate(model, self.sets, cfg.eval_batch_size, self.device,
                                   self.autocast, cfg.min_k, reference=self.mia_reference, gradnorm=cfg.mia_gradnorm)
        bound = beyond_bound(metrics, baseline, cfg.divergence_factor)
        cell = {"step": step, **metrics, **compare(metrics, baseline, cfg.tol_forget, cfg.tol_retain, cfg.target_spread),
                "diverged": bound is not None, "train_loss": loss}
        if cfg.retrained_auc is not None:  # MUSE's PrivLeak, on this forget set's membership attack
            auc = (metrics.get(MIA_AUC) or {}).get(cfg.privleak_attack)
            cell[PRIVLEAK] = privleak(auc, cfg.retrained_auc) if auc is not None else None
        attacks = parse_attacks(cfg.attacks)
        if attacks and bound is None:  # on copies: the run goes on from this model as it is
            fields, n = attack_milestone(model, self.sets, attacks, metrics, baseline, lr=cfg.lr,
                                         batch_size=cfg.batch_size, seed=cfg.seed, eval_batch_size=cfg.eval_batch_size,
                                         min_k=cfg.min_k, device=self.device,
                                         tol_forget=math.expm1(bands(baseline, cfg.tol_forget, None,
                                                                     cfg.target_spread)["forget"]["band"]),
                                         autocast=self.autocast, reference=self.mia_reference,
                                         relearn_recipe=cfg.relearn_recipe, relearn_from=cfg.relearn_from,
                                         quant_backend_choice=cfg.quant_backend, gradnorm=cfg.mia_gradnorm)
            cell.update(fields)
            tokens += n
        if self.extras is not None and bound is None:  # benchmark metrics, downstream tasks
            cell.update(self.extras.cell_fields(self.extras.measure(model)))
        return cell, (f"{bound} at step {step}" if bound else None), tokens

    def agree_on(self, reason: str | None) -> str | None:
        """The main process's verdict (stop, and why), shared with every process."""
        if self.world == 1:
            return reason
        from accelerate.utils import broadcast_object_list

        box = [reason]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def reported(self):
        """The model a milestone stands for: the trained one, or the method's edit of it (task vector)."""
        if self.theta0 is None:
            return self.unwrapped()
        return self.method.forget.edited(self.unwrapped(), self.theta0)


def check_attacks(cfg: RunConfig, sets: ForgetSetChunks, device) -> None:
    """What the attacks need, checked before the first step rather than at the first milestone: a
    retain set to relearn from, bitsandbytes for --quant-backend bitsandbytes."""
    from engine.recovery import quant_backend

    attacks = parse_attacks(cfg.attacks)
    if "relearn" in attacks and cfg.relearn_from != "forget" and not len(getattr(sets, cfg.relearn_from) or ()):
        raise UnlearnError(f"--relearn-from {cfg.relearn_from}: this forget set has no {cfg.relearn_from} documents")
    if any(a in QUANT_ATTACKS for a in attacks):
        quant_backend(cfg.quant_backend, device)


def beyond_bound(metrics: dict, baseline: dict, factor: float) -> str | None:
    """Why these metrics count as diverged (non-finite, or beyond factor × the original), or None."""
    for role in ("forget", "retain"):
        p, p0 = metrics.get(f"ppl_{role}"), baseline.get(f"ppl_{role}")
        if p is None:
            return f"ppl_{role} is not finite"
        if p0 and p > factor * p0:
            return f"ppl_{role} {p:.3g} > {factor:g} × baseline {p0:.3g}"
    return None


@contextlib.contextmanager
def _deterministic(on: bool):
    """Deterministic kernels on CPU (the prefix property is exact there), restored afterwards
    so an embedding program keeps its own setting.

    Without torch's NaN-filling of fresh memory (`torch.utils.deterministic.fill_uninitialized_memory`,
    on by default with deterministic algorithms): it only shows up code that reads memory it never
    wrote, and a program that does not stays deterministic without it (torch's docs), so results are
    the same bit for bit. Filling cost ~300 extra fill_ calls (~12 MB written) per optimizer step of
    bench/step_overhead.py's quick model, work the Trainer and a plain loop never do."""
    import torch.utils.deterministic as det

    before, fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(on or before)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        det.fill_uninitialized_memory = fill


# ---------------------------------------------------------------- a whole run

def _read_cached(path: Path) -> dict | None:
    """A cached baseline, or None (and the file removed) when it cannot be read as one: a disk that
    filled up or a copy cut short must not fail every run on that key until someone deletes it."""
    try:
        value = json.loads(path.read_text())
        if isinstance(value, dict) and "ppl_forget" in value:
            return value
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def baseline_metrics(model, model_name: str, sets: ForgetSetChunks, fs_hash: str, cfg: RunConfig,
                     cache_dir: Path | None, autocast=contextlib.nullcontext) -> tuple[dict, int]:
    """θ0's metrics, cached per (model, forget-set hash, seq_len, min_k; v6: with exact memorization and
    extraction strength; with --mia-gradnorm or without). Returns (M, eval tokens spent)."""
    dtype = next(model.parameters()).dtype
    key = (f"v6-{model_key(model_name)}-{fs_hash[:16]}-{cfg.seq_len}-{cfg.min_k}-{'g' if sets.general is not None else 'n'}"
           + ("" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}")  # θ0 in bf16 is not θ0 in fp32
           + ("-gradnorm" if cfg.mia_gradnorm else ""))  # a baseline has mia_auc.gradnorm exactly when the run does
    path = cache_dir / f"{key}.json" if cache_dir else None
    if path and path.is_file():
        cached = _read_cached(path)
        if cached is not None:
            return cached, 0
    metrics, n = evaluate(model, sets, cfg.eval_batch_size, None, autocast, cfg.min_k, noise=True,
                          gradnorm=cfg.mia_gradnorm)
    if path:
        write_json_atomic(path, metrics)  # two workers missing the same entry both write it whole
    return metrics, n


def reference_for(model, model_name: str, sets: ForgetSetChunks, fs_hash: str, cfg: RunConfig, cache_dir: Path | None,
                  device, dtype, trust_remote_code: bool = False) -> dict:
    """The reference attack's losses per chunk of forget and unseen: θ0's (`model`, before training)
    or --reference-model's (loaded, scored, freed), cached beside the baseline per (model, reference,
    forget set, seq_len, dtype): one pass over the two sets, once."""
    import numpy as np

    ref_name = cfg.reference_model or model_name
    key = (f"ref-{model_key(model_name)}-{model_key(ref_name)}-{fs_hash[:16]}-{cfg.seq_len}"
           + ("" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}"))
    path = cache_dir / f"{key}.json" if cache_dir else None
    cached = _read_cached(path) if path and path.is_file() else None
    if cached is not None and all(len(cached.get(r, [])) == len(getattr(sets, r)) for r in ("forget", "unseen")):
        return {r: np.array(cached[r], dtype=np.float64) for r in ("forget", "unseen")}
    reference = model if not cfg.reference_model else load_model(cfg.reference_model, device, trust_remote_code,
                                                                    dtype=dtype)
    losses = reference_losses(reference, sets, cfg.eval_batch_size, None, autocast_for(device))
    del reference
    if path:
        write_json_atomic(path, {r: v.tolist() for r, v in losses.items()})
    return losses


def local_share(model) -> float:
    """The share of the model's parameters this process holds (1.0 unless sharded)."""
    total = sum(p.numel() for p in model.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    return local / total if total else 1.0


def _leave_process_group() -> None:
    """Under torchrun: wait for every process, then leave the process group before the interpreter
    exits. A process that exits with its gloo group still up can abort in the group's teardown
    ("terminate called without an active exception", SIGABRT: rank 0 of a two-process run, once,
    on a loaded CI machine), which fails a run that had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """False in the non-main processes of `accelerate launch` (torchrun sets RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def run_unlearning(
    model_name: str,
    texts: ForgetSetTexts,
    cfg: RunConfig,
    device: str = "auto",
    cache_dir: Path | None = None,
    trust_remote_code: bool = False,
    on_step: OnStep | None = None,
    on_milestone: OnMilestone | None = None,
    save_to: Path | None = None,
    sets: ForgetSetChunks | None = None,
    merge_lora: bool = False,
) -> dict:
    """Load, chunk, baseline, train, evaluate: the result object of `unlearn run --json`.
    In the non-main processes of `accelerate launch` it trains and returns no milestones."""
    cfg = cfg.validate()
    method = get_method(cfg.method)
    if method.retain_source == "general" and not texts.general:
        raise UnlearnError(f"method {method.id} needs a general set (--general)")
    if not texts.retain_eval:
        raise UnlearnError("this forget set has no retain_eval documents (it predates held-out utility): create it "
                           "again, and a seeded share of retain is held out as retain_eval")
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per `accelerate launch` process
    main = is_main_process()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_name, trust_remote_code)
    if sets is None:
        sets = chunk_forget_set(texts, tokenizer, cfg.seq_len)
    from engine.benchmark_metrics.milestone import MilestoneExtras

    extras = MilestoneExtras.of(texts, tokenizer, cfg)  # None: no preset metrics, no --eval-tasks
    if cfg.fsdp and extras is not None:  # they need the whole model in one process
        raise UnlearnError("--fsdp does not run with a preset's benchmark metrics or --eval-tasks yet")
    torch.manual_seed(cfg.seed)
    dtype = torch.float32 if cfg.fsdp else resolve_dtype(cfg.dtype, dev)  # FSDP keeps fp32 shards, computes in bf16
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model = load_model(model_name, dev, trust_remote_code, dtype=dtype)
    baseline, baseline_tokens = ({}, 0)
    if main:
        baseline, baseline_tokens = baseline_metrics(model, model_name, sets, texts.hash, cfg, cache_dir, autocast_for(dev))
        if extras is not None:  # θ0's, once (cached like the baseline)
            key = f"{model_key(model_name)}-{texts.hash[:16]}-{str(dtype).removeprefix('torch.')}"
            baseline = {**baseline, **extras.baseline_fields(model, cache_dir / key if cache_dir else None)}
    if main:  # θ0's own verdict, as every cell carries it: the negative control
        baseline = {**baseline, "step": 0, **compare(baseline, baseline, cfg.tol_forget, cfg.tol_retain, cfg.target_spread),
                    "target": target(baseline, cfg.tol_forget, cfg.target_spread),
                    "bands": bands(baseline, cfg.tol_forget, cfg.tol_retain, cfg.target_spread)}
    mia_reference = reference_for(model, model_name, sets, texts.hash, cfg, cache_dir, dev, dtype, trust_remote_code) \
        if main else None
    cache = ((cache_dir.parent / "prepared", f"{model_key(model_name)}-{texts.hash[:16]}-{cfg.seq_len}"
              + ("" if dtype == torch.float32 else "-bf16")) if cache_dir else None)
    out = train_to_milestones(model, tokenizer, sets, cfg, baseline, on_step, on_milestone, cache, extras, mia_reference)
    wall = time.perf_counter() - t0
    if save_to is not None:
        save_model(out.model, save_to, cfg, merge_lora, model_name, trust_remote_code, dev, main)
        if main:
            tokenizer.save_pretrained(save_to)
    n_params = count_parameters(out.model)
    eval_tokens = out.eval_tokens + baseline_tokens
    flops = 6 * n_params * out.train_tokens + 2 * n_params * eval_tokens
    pretrain = read_pretraining_tokens(model_name)
    _leave_process_group()
    return {
        "model": model_name,
        "method": cfg.method,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "processes": int(os.environ.get("WORLD_SIZE", "1")),  # > 1 under torchrun / accelerate launch
        "forget_set": {"hash": texts.hash, "seq_len": cfg.seq_len, "documents": texts.counts(),
                       "chunks": {role: len(ch) for role, ch in sets.items()}},
        "config": {**asdict(cfg), "milestones": list(cfg.milestones)},
        "memory": {"dtype": str(dtype).removeprefix("torch."), "master_copy": dtype != torch.float32 and cfg.optim == "adamw" and not cfg.lora,
                   "gradient_checkpointing": cfg.gradient_checkpointing, "optim": cfg.optim, "lora": cfg.lora,
                   "fsdp": cfg.fsdp, "local_parameter_share": local_share(out.model),
                   "peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None},
        "baseline": baseline,
        "milestones": out.milestones,
        "at_target": out.at_target,  # where forgetting reached the target (None: it never did)
        "diverged": out.diverged,
        "reason": out.reason,
        "losses": out.losses,
        "cost": {
            "train_tokens": out.train_tokens,
            "eval_tokens": eval_tokens,
            "wall_seconds": wall,
            "parameters": n_params,
            "flops": flops,
            "pretraining_tokens": pretrain,
            "retraining_flops_ratio": (6 * n_params * pretrain / flops) if pretrain and flops else None,
        },
    }
