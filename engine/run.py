"""One run: one method at one learning rate, trained to the last milestone, evaluated at each.

`train_to_milestones` is the whole loop, batch to optimizer step, in one readable function.
The schedule is constant after a fixed warm-up and the batch at step s depends only on
(seed, s), so the run to 40 steps passes through exactly the model of the run to 10 steps:
one run yields every (lr, steps) cell (prefix sharing, design §3).
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
from typing import Callable

import torch

from engine.data import Chunks, ForgetSetChunks, ForgetSetTexts, chunk_forget_set
from engine.errors import UnlearnError
from engine.evaluate import compare, evaluate
from engine.methods import get_method
from engine.methods.base import Method, PrepareContext, causal_labels
from engine.models import count_parameters, load_model, load_tokenizer, model_key, read_pretraining_tokens, resolve_device


@dataclass
class RunConfig:
    method: str
    lr: float
    milestones: list[int]
    batch_size: int = 4
    seq_len: int = 512
    seed: int = 0
    warmup_steps: int = 0
    retain_weight: float | None = None  # None: the method's own weight
    eval_batch_size: int = 8
    min_k: float = 0.2
    tol_forget: float = 0.10
    tol_retain: float = 0.05
    divergence_factor: float = 1e4  # a forget/retain ppl beyond factor × baseline stops the run

    def validate(self) -> Method:
        method = get_method(self.method)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UnlearnError(f"--lr must be a positive number, not {self.lr}")
        if not self.milestones or any(int(s) != s or s <= 0 for s in self.milestones):
            raise UnlearnError(f"--steps must be positive integers, not {self.milestones}")
        self.milestones = sorted(set(int(s) for s in self.milestones))
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UnlearnError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seq_len < 16:
            raise UnlearnError("--seq-len must be at least 16")
        if self.warmup_steps < 0:
            raise UnlearnError("--warmup must be 0 or more")
        if not 0 < self.min_k <= 1:
            raise UnlearnError("--min-k must be in (0, 1]")
        return method


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


def _shard(idx: torch.Tensor, rank: int, per_device: int) -> torch.Tensor:
    return idx[rank * per_device : (rank + 1) * per_device]


def _batch(chunks: Chunks, extra: dict[str, torch.Tensor], idx: torch.Tensor, device) -> dict[str, torch.Tensor]:
    mask = chunks.attention_mask[idx]
    width = int(mask.sum(1).max())  # trim all-pad columns
    out = {"input_ids": chunks.input_ids[idx, :width], "attention_mask": mask[:, :width]}
    out.update({k: v[idx, :width] for k, v in extra.items()})
    return {k: v.to(device) for k, v in out.items()}


def _beyond_bound(metrics: dict, baseline: dict, factor: float) -> str | None:
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
    so an embedding program keeps its own setting."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train_to_milestones(
    model,
    tokenizer,
    sets: ForgetSetChunks,
    cfg: RunConfig,
    baseline: dict,
    on_step: Callable[[int, float], None] | None = None,
    on_milestone: Callable[[dict], None] | None = None,
) -> dict:
    """The loop. Returns {"milestones", "diverged", "reason", "losses", "train_tokens", "eval_tokens", "model"}."""
    with _deterministic(next(model.parameters()).device.type == "cpu"):
        return _train(model, tokenizer, sets, cfg, baseline, on_step, on_milestone)


def _train(model, tokenizer, sets, cfg, baseline, on_step, on_milestone) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    method = cfg.validate()
    device = next(model.parameters()).device
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    set_seed(cfg.seed)
    autocast = accelerator.autocast if device.type == "cuda" else contextlib.nullcontext

    reference = None
    if method.needs_reference:  # the frozen original θ0, for adversarial labels and KL
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    ctx = PrepareContext(reference, tokenizer, torch.Generator().manual_seed(cfg.seed), device, cfg.eval_batch_size, autocast)
    forget_extra = method.forget.prepare(sets.forget.input_ids, sets.forget.attention_mask, ctx)
    retain_chunks = None
    if method.retain is not None:
        retain_chunks = getattr(sets, method.retain_source)
        if retain_chunks is None:
            raise UnlearnError(f"method {method.id} needs a {method.retain_source} set (--{method.retain_source})")
        retain_extra = {"labels": causal_labels(retain_chunks.input_ids, retain_chunks.attention_mask)}
    weight = method.retain_weight if cfg.retain_weight is None else cfg.retain_weight

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    # Under `accelerate launch`, each process takes its slice of one global batch (batch_size per device).
    world, rank = accelerator.num_processes, accelerator.process_index

    milestones, losses = [], []
    train_tokens = eval_tokens = 0
    diverged, reason = False, None
    for step in range(1, cfg.milestones[-1] + 1):
        batch = _batch(sets.forget, forget_extra, _shard(batch_indices(len(sets.forget), cfg.batch_size * world, cfg.seed, step), rank, cfg.batch_size), device)
        with autocast():
            loss = method.forget.loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
        train_tokens += int(batch["attention_mask"].sum())
        if retain_chunks is not None:
            rb = _batch(retain_chunks, retain_extra, _shard(batch_indices(len(retain_chunks), cfg.batch_size * world, cfg.seed + 1, step), rank, cfg.batch_size), device)
            ref_logits = None
            if method.retain.needs_reference_logits:
                with torch.no_grad(), autocast():
                    ref_logits = reference(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits
            with autocast():
                loss = loss + weight * method.retain.loss(model(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"]).logits, rb, ref_logits)
            train_tokens += int(rb["attention_mask"].sum())
        if not torch.isfinite(loss):
            diverged, reason = True, f"non-finite loss at step {step}"
            break
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
        if step in cfg.milestones:
            metrics, n = evaluate(accelerator.unwrap_model(model), sets, cfg.eval_batch_size, device, autocast, cfg.min_k)
            eval_tokens += n
            bound = _beyond_bound(metrics, baseline, cfg.divergence_factor)
            cell = {"step": step, **metrics, **compare(metrics, baseline, cfg.tol_forget, cfg.tol_retain),
                    "diverged": bound is not None, "train_loss": losses[-1]}
            milestones.append(cell)
            if on_milestone:
                on_milestone(cell)
            if bound is not None:
                diverged, reason = True, f"{bound} at step {step}"
                break
    # Cells past a divergence are recorded as diverged, never as missing.
    done = {c["step"] for c in milestones}
    for step in cfg.milestones:
        if step not in done:
            cell = {"step": step, **empty_metrics(), "forget_gap": None, "retain_drift": None, "score": None,
                    "success": False, "diverged": True, "train_loss": None}
            milestones.append(cell)
            if on_milestone:
                on_milestone(cell)
    return {"milestones": milestones, "diverged": diverged, "reason": reason, "losses": losses,
            "train_tokens": train_tokens, "eval_tokens": eval_tokens, "model": accelerator.unwrap_model(model)}


def empty_metrics() -> dict:
    return {"ppl_forget": None, "ppl_retain": None, "ppl_unseen": None, "ppl_general": None,
            "mia_auc": {"loss": None, "zlib": None, "min_k": None, "min_k_pp": None}}


def baseline_metrics(model, model_name: str, sets: ForgetSetChunks, fs_hash: str, cfg: RunConfig, cache_dir: Path | None, autocast=contextlib.nullcontext) -> tuple[dict, int]:
    """θ0's metrics, cached per (model, forget-set hash, seq_len, min_k). Returns (M, eval tokens spent)."""
    key = f"{model_key(model_name)}-{fs_hash[:16]}-{cfg.seq_len}-{cfg.min_k}-{'g' if sets.general is not None else 'n'}"
    path = cache_dir / f"{key}.json" if cache_dir else None
    if path and path.is_file():
        return json.loads(path.read_text()), 0
    metrics, n = evaluate(model, sets, cfg.eval_batch_size, None, autocast, cfg.min_k)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics))
        tmp.replace(path)  # atomic: a crash never leaves half a cache entry
    return metrics, n


def run_unlearning(
    model_name: str,
    texts: ForgetSetTexts,
    cfg: RunConfig,
    device: str = "auto",
    cache_dir: Path | None = None,
    trust_remote_code: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    on_milestone: Callable[[dict], None] | None = None,
    save_to: Path | None = None,
    sets: ForgetSetChunks | None = None,
) -> dict:
    """Load, chunk, baseline, train, evaluate: the result object of `unlearn run --json`."""
    method = cfg.validate()
    if method.retain_source == "general" and not texts.general:
        raise UnlearnError(f"method {method.id} needs a general set (--general)")
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per `accelerate launch` process
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model_name, trust_remote_code)
    if sets is None:
        sets = chunk_forget_set(texts, tokenizer, cfg.seq_len)
    torch.manual_seed(cfg.seed)
    model = load_model(model_name, dev, trust_remote_code)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext
    baseline, baseline_tokens = baseline_metrics(model, model_name, sets, texts.hash, cfg, cache_dir, autocast)
    out = train_to_milestones(model, tokenizer, sets, cfg, baseline, on_step, on_milestone)
    wall = time.perf_counter() - t0
    if save_to is not None:
        out["model"].save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
    n_params = count_parameters(out["model"])
    eval_tokens = out["eval_tokens"] + baseline_tokens
    flops = 6 * n_params * out["train_tokens"] + 2 * n_params * eval_tokens
    pretrain = read_pretraining_tokens(model_name)
    return {
        "model": model_name,
        "method": cfg.method,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "forget_set": {"hash": texts.hash, "seq_len": cfg.seq_len, "documents": texts.counts(),
                       "chunks": {role: len(ch) for role, ch in sets.items()}},
        "config": asdict(cfg),
        "baseline": baseline,
        "milestones": out["milestones"],
        "diverged": out["diverged"],
        "reason": out["reason"],
        "losses": out["losses"],
        "cost": {
            "train_tokens": out["train_tokens"],
            "eval_tokens": eval_tokens,
            "wall_seconds": wall,
            "parameters": n_params,
            "flops": flops,
            "pretraining_tokens": pretrain,
            "retraining_flops_ratio": (6 * n_params * pretrain / flops) if pretrain and flops else None,
        },
    }
