"""The engine's cost per optimizer step, measured against a minimal hand-written PyTorch loop and a
`transformers.Trainer` subclass overriding `compute_loss` (the usual way peer tools do it).

    python bench/step_overhead.py [--methods ga_gd,ga_kl] [--steps 20] [--repeat 5] [--mode lockstep|runs]
                                  [--clock cpu|wall] [--json] [--quick]

All three train the same model (a random-weight tiny Llama built from a config, saved and loaded
with from_pretrained; no key/value cache, as the Trainer and the engine train) on the same batch
stream (engine.finetune.batch_indices: forget rows with the run's seed, retain rows with seed + 1,
all-pad columns trimmed) with the same loss (gradient ascent on forget plus descent, or KL to a
frozen θ0, on retain), AdamW (weight decay 0, constant lr), gradients clipped to 1.0. Each side's
AdamW is its own default: the plain loop's `torch.optim.AdamW()` (on CPU torch's per-parameter loop),
the Trainer's `optim` default (`adamw_torch_fused` from torch 2.8 on), the engine's (fused). Model loading,
set-up and the engine's evaluation at its milestone are never timed. Step times are read from the
process's CPU time (`--clock cpu`, the default: one torch thread, so it is the step's work, whatever
else the machine runs) or the wall clock (`--clock wall`).

Two ways to alternate the sides (`--mode`):
- lockstep (default): the three run in lockstep, one optimizer step each in turn, the order rotating
  every round (bench/_lockstep.py); each step is timed on its own turn and divided by the other
  sides' same step, and the ratios are the medians of those step-by-step ratios over --repeat runs
  (step 1, which loads, left out), printed with a bootstrap 95 % interval. Neighbouring steps share
  the machine's moment, so a busy second hits both sides of a ratio alike.
- runs: whole runs alternate, --repeat times after one uncounted run each; each side's time per step
  is (end of last step - end of step 1) / steps between, and the sides' medians are compared. On a
  shared machine a side's runs spread by 10-20 %, wider than the differences measured here.

First the losses: the plain loop and the Trainer must compute the engine's loss at every step
(|Δ| ≤ 1e-5 × max(1, |loss|)), or the comparison is not of the same work (a skipped optimizer step
would show at the next step's loss) and the bench fails. Targets: engine / plain ≤ 1.05 and
engine / Trainer ≤ 1.0 for every method. With --json the last line is {"name", "ratio" (the worst
engine / plain), "ratio_trainer", "target", "pass", ...}; it exits 1 on a miss.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, alternate, finish, medians, ratio_pass, spread, tiny_workspace  # noqa: E402
from _lockstep import Lockstep, median_interval, paired_ratios  # noqa: E402
from _lockstep import median as lockstep_median  # noqa: E402
from engine.metric_registry import PPL_FORGET, PPL_RETAIN, PPL_UNSEEN  # noqa: E402

TARGET_PLAIN = 1.05
TARGET_TRAINER = 1.0
LOSS_RTOL = 1e-5
BASELINE = dict.fromkeys((PPL_FORGET, PPL_RETAIN, PPL_UNSEEN), 1.0)  # compare() needs one; never timed
# What a step's time is read from (--clock): the process's CPU time by default. The sides train on
# the CPU with one torch thread, so a step's CPU time is its work; the wall clock also counts the
# time the process waited for a core, which on a shared 2-core box swings a side by 20 % from one
# repetition to the next (docs/bench.md). On a GPU the wall clock would be the one to read.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
CLOCK = CLOCKS["cpu"]


def losses_agree(reference: list[float], other: list[float], n: int, rtol: float = LOSS_RTOL) -> tuple[bool, float]:
    """Whether the first `n` losses of `other` are `reference`'s (|Δ| ≤ rtol × max(1, |loss|)), and the
    largest |Δ|. Fewer than `n` losses on either side never agree."""
    if len(reference) < n or len(other) < n or n <= 0:
        return False, float("inf")
    worst = max(abs(a - b) for a, b in zip(reference[:n], other[:n]))
    ok = all(abs(a - b) <= rtol * max(1.0, abs(a)) for a, b in zip(reference[:n], other[:n]))
    return ok, worst


def per_step(stamps: list[float]) -> float:
    """Seconds per step from the end-of-step times: (last - first) / (steps between)."""
    if len(stamps) < 2:
        raise ValueError("a per-step time needs at least two steps")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def ratios_of_medians(seconds: dict[str, float]) -> dict[str, float]:
    """Whole-run mode: engine / plain and engine / Trainer from each side's median seconds per step."""
    return {"plain": seconds["engine"] / seconds["plain"], "trainer": seconds["engine"] / seconds["trainer"]}


def verdict(per_method: dict[str, dict[str, float]], losses_ok: bool) -> dict:
    """The worst ratios over the methods and whether both targets hold (and the losses agreed).
    `per_method` maps a method to its ratios {"plain": engine / plain, "trainer": engine / Trainer}."""
    plain = max(m["plain"] for m in per_method.values())
    trainer = max(m["trainer"] for m in per_method.values())
    ok = losses_ok and ratio_pass(plain, TARGET_PLAIN) and ratio_pass(trainer, TARGET_TRAINER)
    return {"ratio": plain, "ratio_trainer": trainer, "pass": ok}


# ---------------------------------------------------------------- the three sides

def retain_term(method: str) -> str:
    if method not in ("ga_gd", "ga_kl"):
        raise SystemExit(f"this bench writes the loss of ga_gd and ga_kl by hand, not {method}")
    return method.split("_")[1]


def hand_loss(model, reference, forget: dict, retain: dict, term: str):
    """−CE(θ; forget batch) + CE(θ; retain batch) (gd), or + KL(p_θ0 ‖ p_θ) on the retain batch (kl),
    written out as a peer's loop would (mean over predicted, non-pad tokens)."""
    import torch
    import torch.nn.functional as F

    def ce(logits, ids, mask):
        labels = ids.masked_fill(mask == 0, -100)[:, 1:]
        lg = logits[:, :-1].float()
        return F.cross_entropy(lg.reshape(-1, lg.size(-1)), labels.reshape(-1), ignore_index=-100)

    fl = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    loss = -ce(fl, forget["input_ids"], forget["attention_mask"])
    rl = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
    if term == "gd":
        return loss + ce(rl, retain["input_ids"], retain["attention_mask"])
    with torch.no_grad():
        r0 = reference(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
    mask = retain["attention_mask"][:, 1:].float()
    logp = torch.log_softmax(rl[:, :-1].float(), -1)
    logp0 = torch.log_softmax(r0[:, :-1].float(), -1)
    kl = (logp0.exp() * (logp0 - logp)).sum(-1)
    return loss + (kl * mask).sum() / mask.sum().clamp(min=1)


def stream_batch(chunks, bs: int, seed: int, step: int) -> dict:
    from engine.finetune import batch_indices

    idx = batch_indices(len(chunks), bs, seed, step)
    mask = chunks.attention_mask[idx]
    width = int(mask.sum(1).max())
    return {"input_ids": chunks.input_ids[idx, :width], "attention_mask": mask[:, :width]}


def run_engine(model_dir: Path, sets, method: str, lr: float, steps: int, bs: int, seed: int,
               tick: Callable[[], None], device: str = "cpu") -> list[float]:
    """engine.run.train_to_milestones to one milestone at the last step (its evaluation comes after
    the last tick). A folder without a tokenizer gets None (ga_gd and ga_kl never read it)."""
    from engine.config import RunConfig
    from engine.models import load_model, load_tokenizer
    from engine.run import train_to_milestones

    model = load_model(str(model_dir), device)
    tok = load_tokenizer(str(model_dir)) if (model_dir / "tokenizer.json").is_file() else None
    cfg = RunConfig(method=method, lr=lr, milestones=(steps,), batch_size=bs, seq_len=sets.forget.input_ids.shape[1],
                    seed=seed)
    return train_to_milestones(model, tok, sets, cfg, BASELINE, on_step=lambda s, loss: tick()).losses


def run_plain(model_dir: Path, sets, method: str, lr: float, steps: int, bs: int, seed: int,
              tick: Callable[[], None]) -> list[float]:
    import torch

    from engine.models import load_model

    term = retain_term(method)
    torch.manual_seed(seed)
    model = load_model(str(model_dir), "cpu")
    model.config.use_cache = False  # no key/value cache, as the engine and the Trainer train; θ0 too
    reference = copy.deepcopy(model).eval().requires_grad_(False) if term == "kl" else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = hand_loss(model, reference, stream_batch(sets.forget, bs, seed, step),
                         stream_batch(sets.retain, bs, seed + 1, step), term)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tick()
    return losses


def run_trainer(model_dir: Path, sets, method: str, lr: float, steps: int, bs: int, seed: int,
                tick: Callable[[], None], device: str = "cpu") -> list[float]:
    """A Trainer subclass whose compute_loss takes a forget and a retain batch, the dataset the batch
    stream unrolled row by row (read in order), and a callback stamping each step's end. On CUDA it
    trains as the engine does: fp32 master weights, bf16 autocast (bf16=True)."""
    import torch
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from engine.finetune import batch_indices
    from engine.models import load_model

    term = retain_term(method)

    class Stream(Dataset):
        def __init__(self):
            self.rows = [(int(f), int(r)) for s in range(1, steps + 1)
                         for f, r in zip(batch_indices(len(sets.forget), bs, seed, s),
                                         batch_indices(len(sets.retain), bs, seed + 1, s))]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    def collate(rows):
        out = {}
        for role, chunks, idx in (("forget", sets.forget, [f for f, _ in rows]), ("retain", sets.retain, [r for _, r in rows])):
            mask = chunks.attention_mask[idx]
            width = int(mask.sum(1).max())
            out[role] = {"input_ids": chunks.input_ids[idx, :width], "attention_mask": mask[:, :width]}
        return out

    losses: list[float] = []

    class UnlearnTrainer(Trainer):
        def __init__(self, *a, reference=None, **k):
            super().__init__(*a, **k)
            self.reference = reference

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {role: {k: v.to(self.args.device) for k, v in batch.items()} for role, batch in inputs.items()}
            loss = hand_loss(model, self.reference, inputs["forget"], inputs["retain"], term)
            losses.append(float(loss.detach()))
            return loss

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            tick()

    torch.manual_seed(seed)
    model = load_model(str(model_dir), device)
    model.config.use_cache = False  # the Trainer sets it on the model it trains; θ0's copy is made before
    reference = copy.deepcopy(model).eval().requires_grad_(False) if term == "kl" else None
    on_cpu = torch.device(device).type == "cpu"
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-trainer-"), per_device_train_batch_size=bs,
                             max_steps=steps, learning_rate=lr, weight_decay=0.0, lr_scheduler_type="constant",
                             warmup_steps=0, max_grad_norm=1.0, logging_strategy="no",
                             save_strategy="no", report_to=[], use_cpu=on_cpu, bf16=not on_cpu, dataloader_num_workers=0, seed=seed,
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = UnlearnTrainer(model=model, args=args, train_dataset=Stream(), data_collator=collate,
                             callbacks=[Tick()], reference=reference)
    trainer.remove_callback(PrinterCallback)  # its end-of-training line would land on stdout, after nothing timed
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return losses


SIDES = {"engine": run_engine, "plain": run_plain, "trainer": run_trainer}


def timed_run(side: Callable[..., list[float]], *args, clock: Callable[[], float] | None = None,
              **kwargs) -> tuple[float, list[float]]:
    """One whole run of a side, its steps stamped with `clock` (default: --clock's): (seconds per
    step from the end of step 1 to the end of the last, its losses)."""
    clock = clock or CLOCK
    stamps: list[float] = []
    losses = side(*args, tick=lambda: stamps.append(clock()), **kwargs)
    return per_step(stamps), losses


class Measured(NamedTuple):
    """One method's measurement: engine / plain and engine / Trainer ("plain", "trainer"), each
    side's seconds per step, the losses of its last run, and (lockstep) each ratio's 95 % interval."""

    ratios: dict[str, float]
    seconds: dict[str, float]
    losses: dict[str, list[float]]
    intervals: dict[str, tuple[float, float]] | None = None


def measure_runs(model_dir: Path, sets, method: str, a) -> Measured:
    """--mode runs: whole runs of the sides alternating, --repeat times (after one uncounted run of
    each); the ratios are those of the medians."""
    last_losses: dict[str, list[float]] = {}

    def side(name):
        def go():
            seconds, losses = timed_run(SIDES[name], model_dir, sets, method, a.lr, a.steps, a.batch_size, 0)
            last_losses[name] = losses
            return seconds
        return go

    times = alternate({name: side(name) for name in SIDES}, a.repeat)
    for name, values in times.items():
        print(spread(name, values, "ms/step", 1000))
    med = medians(times)
    return Measured(ratios_of_medians(med), med, last_losses)


def measure_lockstep(model_dir: Path, sets, method: str, a) -> Measured:
    """--mode lockstep: the three sides in lockstep (bench/_lockstep.py), --repeat times, the first
    side of each repetition rotating, after a short uncounted one. A step's time is its turn's clock;
    the ratios are the medians of the step-by-step ratios (step 1, which loads, left out), pooled
    over the repetitions; each side's seconds per step are its steps' median."""
    names = list(SIDES)

    def once(order: list[str], steps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        lock = Lockstep(order, CLOCK)
        losses = lock.run({n: (lambda tick, n=n: SIDES[n](model_dir, sets, method, a.lr, steps, a.batch_size, 0,
                                                         tick=tick)) for n in order})
        return lock.times, losses

    once(names, 3)  # warm-up, uncounted
    paired: dict[str, list[float]] = {"plain": [], "trainer": []}
    per_side: dict[str, list[float]] = {n: [] for n in names}
    last_losses: dict[str, list[float]] = {}
    for r in range(a.repeat):
        times, last_losses = once(names[r % len(names):] + names[:r % len(names)], a.steps)
        paired["plain"] += paired_ratios(times, "engine", "plain")
        paired["trainer"] += paired_ratios(times, "engine", "trainer")
        for n in names:
            per_side[n] += times[n][1:]
    for name, values in per_side.items():
        print(spread(name, values, "ms/step", 1000))
    intervals = {k: median_interval(v) for k, v in paired.items()}
    for other, values in paired.items():
        print(spread(f"engine / {other}, step by step", values, "", 1))
        print(f"    95 % interval of that median (bootstrap): {intervals[other][0]:.3f} – {intervals[other][1]:.3f}")
    return Measured({k: lockstep_median(v) for k, v in paired.items()}, {n: lockstep_median(v) for n, v in per_side.items()},
                    last_losses, intervals)


MODES = {"lockstep": measure_lockstep, "runs": measure_runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ga_gd,ga_kl")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two shared cores time steadily)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                   help="read step times from the process's CPU time (default) or the wall clock")
    p.add_argument("--mode", choices=tuple(MODES), default="lockstep",
                   help="lockstep (default): the sides take turns step by step and each step's time is paired "
                        "with the other sides' same step; runs: whole runs alternate and their medians are compared")
    p.add_argument("--workdir", type=Path, default=CACHE / "step-overhead")
    p.add_argument("--quick", action="store_true", help="hidden 64, 2 layers, 10 steps, 3 repeats")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.layers, a.steps, a.repeat = 64, 2, 10, 3
    global CLOCK
    CLOCK = CLOCKS[a.clock]
    import torch

    from engine.models import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    model_dir, _, sets = tiny_workspace(a.workdir, hidden=a.hidden, layers=a.layers, seq_len=a.seq_len)
    n_params = sum(t.numel() for t in __import__("safetensors.torch").torch.load_file(
        str(model_dir / "model.safetensors")).values())
    print(f"model: random-weight Llama, hidden {a.hidden}, {a.layers} layers, {n_params:,} parameters; "
          f"batch {a.batch_size}+{a.batch_size} chunks of ≤ {a.seq_len} tokens, {a.steps} steps, "
          f"{torch.get_num_threads()} thread(s), CPU; step times from the {a.clock} clock")

    per_method: dict[str, dict[str, float]] = {}
    seconds: dict[str, dict[str, float]] = {}
    loss_check: dict[str, dict] = {}
    intervals: dict[str, dict] = {}  # lockstep: method -> {"plain"/"trainer": the paired median's interval}
    for method in methods:
        print(f"{method}:")
        measured = MODES[a.mode](model_dir, sets, method, a)
        ratios, seconds[method], last_losses = measured.ratios, measured.seconds, measured.losses
        per_method[method] = ratios
        if measured.intervals:
            intervals[method] = measured.intervals
        # Every step's loss, not only the first: a side that skipped an optimizer step would read
        # a different loss at the next one.
        checks = {name: losses_agree(last_losses["engine"], last_losses[name], a.steps) for name in ("plain", "trainer")}
        loss_check[method] = {name: {"agree": ok, "max_abs_diff": worst} for name, (ok, worst) in checks.items()}
        loss_check[method]["engine_first_losses"] = last_losses["engine"][:5]
        print(f"  engine / plain {ratios['plain']:.3f} (target ≤ {TARGET_PLAIN}), "
              f"engine / Trainer {ratios['trainer']:.3f} (target ≤ {TARGET_TRAINER})")
        for name, (ok, worst) in checks.items():
            print(f"  all {a.steps} losses, {name} vs engine: {'agree' if ok else 'DIFFER'} (max |Δ| {worst:.2e})")
    losses_ok = all(c[n]["agree"] for c in loss_check.values() for n in ("plain", "trainer"))
    v = verdict(per_method, losses_ok)
    print(f"worst engine / plain {v['ratio']:.3f}, engine / Trainer {v['ratio_trainer']:.3f}; losses agree: "
          f"{losses_ok}: {'pass' if v['pass'] else 'MISSED'}")
    return finish({"name": "step_overhead", **v, "target": TARGET_PLAIN, "target_trainer": TARGET_TRAINER,
                   "target_is": "engine / plain seconds per step ≤ 1.05 and engine / Trainer ≤ 1.0, every method",
                   "mode": a.mode, "ratios": per_method, "ratio_intervals_95": intervals or None, "seconds_per_step": seconds, "losses": loss_check, "losses_agree": losses_ok,
                   "parameters": n_params, "steps": a.steps, "batch_size": a.batch_size, "repeat": a.repeat,
                   "threads": a.threads, "clock": a.clock, "quick": a.quick}, a.json)


if __name__ == "__main__":
    sys.exit(main())
