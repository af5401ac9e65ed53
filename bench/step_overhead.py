"""The engine's cost per optimizer step, measured against a minimal hand-written PyTorch loop and a
`transformers.Trainer` subclass overriding `compute_loss` (the usual way peer tools do it).

    python bench/step_overhead.py [--methods ga_gd,ga_kl] [--steps 30] [--repeat 5] [--json] [--quick]

All three train the same model (a random-weight tiny Llama built from a config, saved and loaded
with from_pretrained; no key/value cache, as the Trainer and the engine train) on the same batch
stream (engine.finetune.batch_indices: forget rows with the run's seed, retain rows with seed + 1,
all-pad columns trimmed) with the same loss (gradient ascent on forget plus descent, or KL to a
frozen θ0, on retain), AdamW (weight decay 0, constant lr), gradients clipped to 1.0. Per side, the
time per step is the time from the end of step 1 to the end of the last step over the steps between
(model loading, set-up and the engine's evaluation at the milestone are outside it), read from the
process's CPU time (`--clock cpu`, the default: one torch thread, so it is the step's work, whatever
else the machine runs) or the wall clock (`--clock wall`). The sides run alternately, --repeat
times; medians are compared.

First the losses: the plain loop and the Trainer must compute the engine's losses at the first steps
(|Δ| ≤ 1e-5 × max(1, |loss|)), or the comparison is not of the same work and the bench fails.
Targets: engine / plain ≤ 1.05 and engine / Trainer ≤ 1.0 for every method. With --json the last
line is {"name", "ratio" (the worst engine / plain), "target", "pass", ...}; it exits 1 on a miss.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, alternate, finish, medians, ratio_pass, spread, tiny_workspace  # noqa: E402

TARGET_PLAIN = 1.05
TARGET_TRAINER = 1.0
LOSS_RTOL = 1e-5
BASELINE = {"ppl_forget": 1.0, "ppl_retain": 1.0, "ppl_unseen": 1.0}  # compare() needs one; never timed
# What a step's time is read from (--clock): the process's CPU time by default. The sides train on
# the CPU with one torch thread, so a step's CPU time is its work; the wall clock also counts the
# time the process waited for a core, which on a shared 2-core box swings a side by 20 % from one
# repetition to the next (docs/benchmarks.md). On a GPU the wall clock would be the one to read.
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


def verdict(per_method: dict[str, dict[str, float]], losses_ok: bool) -> dict:
    """The worst ratios over the methods and whether both targets hold (and the losses agreed).
    `per_method` maps a method to its median seconds per step: {"engine", "plain", "trainer"}."""
    plain = max(m["engine"] / m["plain"] for m in per_method.values())
    trainer = max(m["engine"] / m["trainer"] for m in per_method.values())
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
               device: str = "cpu") -> tuple[float, list[float]]:
    """engine.run.train_to_milestones to one milestone at the last step (its evaluation comes after
    the last stamp). A folder without a tokenizer gets None (ga_gd and ga_kl never read it)."""
    from engine.config import RunConfig
    from engine.models import load_model, load_tokenizer
    from engine.run import train_to_milestones

    model = load_model(str(model_dir), device)
    tok = load_tokenizer(str(model_dir)) if (model_dir / "tokenizer.json").is_file() else None
    stamps: list[float] = []
    cfg = RunConfig(method=method, lr=lr, milestones=(steps,), batch_size=bs, seq_len=sets.forget.input_ids.shape[1],
                    seed=seed)
    out = train_to_milestones(model, tok, sets, cfg, BASELINE, on_step=lambda s, loss: stamps.append(CLOCK()))
    return per_step(stamps), out.losses


def run_plain(model_dir: Path, sets, method: str, lr: float, steps: int, bs: int, seed: int) -> tuple[float, list[float]]:
    import torch

    from engine.models import load_model

    term = retain_term(method)
    torch.manual_seed(seed)
    model = load_model(str(model_dir), "cpu")
    model.config.use_cache = False  # no key/value cache, as the engine and the Trainer train; θ0 too
    reference = copy.deepcopy(model).eval().requires_grad_(False) if term == "kl" else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    stamps, losses = [], []
    for step in range(1, steps + 1):
        loss = hand_loss(model, reference, stream_batch(sets.forget, bs, seed, step),
                         stream_batch(sets.retain, bs, seed + 1, step), term)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        stamps.append(CLOCK())
    return per_step(stamps), losses


def run_trainer(model_dir: Path, sets, method: str, lr: float, steps: int, bs: int, seed: int,
                device: str = "cpu") -> tuple[float, list[float]]:
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
    stamps: list[float] = []

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

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(CLOCK())

    torch.manual_seed(seed)
    model = load_model(str(model_dir), device)
    model.config.use_cache = False  # the Trainer sets it on the model it trains; θ0's copy is made before
    reference = copy.deepcopy(model).eval().requires_grad_(False) if term == "kl" else None
    on_cpu = torch.device(device).type == "cpu"
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-trainer-"), per_device_train_batch_size=bs,
                             max_steps=steps, learning_rate=lr, weight_decay=0.0, lr_scheduler_type="constant",
                             warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch", logging_strategy="no",
                             save_strategy="no", report_to=[], use_cpu=on_cpu, bf16=not on_cpu, dataloader_num_workers=0, seed=seed,
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = UnlearnTrainer(model=model, args=args, train_dataset=Stream(), data_collator=collate,
                             callbacks=[Stamp()], reference=reference)
    trainer.remove_callback(PrinterCallback)  # its end-of-training line would land on stdout, after nothing timed
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return per_step(stamps), losses


SIDES = {"engine": run_engine, "plain": run_plain, "trainer": run_trainer}


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
    loss_check: dict[str, dict] = {}
    n_check = min(5, a.steps)
    for method in methods:
        last_losses: dict[str, list[float]] = {}

        def side(name, method=method, last_losses=last_losses):
            def go():
                seconds, losses = SIDES[name](model_dir, sets, method, a.lr, a.steps, a.batch_size, 0)
                last_losses[name] = losses
                return seconds
            return go

        times = alternate({name: side(name) for name in SIDES}, a.repeat)
        med = medians(times)
        per_method[method] = med
        checks = {name: losses_agree(last_losses["engine"], last_losses[name], n_check) for name in ("plain", "trainer")}
        loss_check[method] = {name: {"agree": ok, "max_abs_diff": worst} for name, (ok, worst) in checks.items()}
        loss_check[method]["engine_first_losses"] = last_losses["engine"][:n_check]
        print(f"{method}:")
        for name, values in times.items():
            print(spread(name, values, "ms/step", 1000))
        print(f"  engine / plain {med['engine'] / med['plain']:.3f} (target ≤ {TARGET_PLAIN}), "
              f"engine / Trainer {med['engine'] / med['trainer']:.3f} (target ≤ {TARGET_TRAINER})")
        for name, (ok, worst) in checks.items():
            print(f"  first {n_check} losses, {name} vs engine: {'agree' if ok else 'DIFFER'} (max |Δ| {worst:.2e})")
    losses_ok = all(c[n]["agree"] for c in loss_check.values() for n in ("plain", "trainer"))
    v = verdict(per_method, losses_ok)
    print(f"worst engine / plain {v['ratio']:.3f}, engine / Trainer {v['ratio_trainer']:.3f}; losses agree: "
          f"{losses_ok}: {'pass' if v['pass'] else 'MISSED'}")
    return finish({"name": "step_overhead", **v, "target": TARGET_PLAIN, "target_trainer": TARGET_TRAINER,
                   "target_is": "engine / plain seconds per step ≤ 1.05 and engine / Trainer ≤ 1.0, every method",
                   "seconds_per_step": per_method, "losses": loss_check, "losses_agree": losses_ok,
                   "parameters": n_params, "steps": a.steps, "batch_size": a.batch_size, "repeat": a.repeat,
                   "threads": a.threads, "clock": a.clock, "quick": a.quick}, a.json)


if __name__ == "__main__":
    sys.exit(main())
