"""Prefix sharing, measured: one run to the last milestone vs one run per (lr, steps) cell.

    python bench/prefix_sharing.py [--workspace unlearn-demo-quick] [--method ga_gd] [--steps 5,10,20,40]

Builds (or reuses) the quick demo workspace, then times, side by side in one process:
  shared: one run that trains to max(steps) and evaluates at every milestone (what a study does);
  naive:  one fresh run per milestone, each trained from θ0 to that step.
It prints both wall times, their ratio and train-token counts, and checks that every cell's
score is identical both ways (the prefix property that makes sharing exact on CPU).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from engine.data import chunk_forget_set, load_forget_set
from engine.demo import QUICK, build_workspace, demo_sources
from engine.models import load_tokenizer
from engine.run import RunConfig, run_unlearning


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, default=Path("unlearn-demo-quick"))
    p.add_argument("--method", default="ga_gd")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--steps", default="5,10,20,40")
    a = p.parse_args()
    steps = [int(s) for s in a.steps.split(",")]
    ws = a.workspace.resolve()
    build_workspace(ws, QUICK)
    src = demo_sources(ws)
    texts = load_forget_set(src["forget"], src["retain"], src["unseen"], src["general"])
    sets = chunk_forget_set(texts, load_tokenizer(str(ws / "model")), QUICK.seq_len)
    cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))

    def run(milestones):
        cfg = RunConfig(method=a.method, lr=a.lr, milestones=milestones, batch_size=QUICK.run_batch_size, seq_len=QUICK.seq_len)
        return run_unlearning(str(ws / "model"), texts, cfg, device="cpu", cache_dir=cache, sets=sets)

    run([1])  # warm the baseline cache and the allocator so neither side pays for them
    t0 = time.perf_counter()
    shared = run(steps)
    t_shared = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = [run([s]) for s in steps]
    t_naive = time.perf_counter() - t0

    same = all(n["milestones"][0]["score"] == c["score"] for n, c in zip(naive, shared["milestones"]))
    tok_shared = shared["cost"]["train_tokens"]
    tok_naive = sum(n["cost"]["train_tokens"] for n in naive)
    print(f"{a.method} lr={a.lr:g} milestones {steps} on the quick demo model (CPU)")
    print(f"  shared (one run):       {t_shared:7.2f} s  {tok_shared:>9} train tokens  {max(steps)} steps")
    print(f"  naive (run per cell):   {t_naive:7.2f} s  {tok_naive:>9} train tokens  {sum(steps)} steps")
    print(f"  speed-up {t_naive / t_shared:.2f}x, train tokens {tok_naive / tok_shared:.2f}x; identical scores: {same}")


if __name__ == "__main__":
    main()
