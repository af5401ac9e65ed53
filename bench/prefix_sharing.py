"""Prefix sharing, measured: one run to the last milestone vs one run per (lr, steps) cell.

    python bench/prefix_sharing.py [--workspace unlearn-demo-quick] [--method ga_gd] [--steps 5,10,20,40] [--json]

Builds (or reuses) the quick demo workspace, then times, side by side in one process:
  shared: one run that trains to max(steps) and evaluates at every milestone (what a study does);
  naive:  one fresh run per milestone, each trained from θ0 to that step.
It passes when every cell has a score (the objective, eval_score) both ways and the scores are identical
(the prefix property, exact on CPU), when each naive run's losses are the shared run's first steps, bit
for bit (so the shared run computed no step twice and skipped none), and when the at-target cell (where
the forget perplexity first reaches the target; no milestone, and never compared as one) is found at the
same step with the same score by every naive run long enough to reach it, and by none shorter. Every run
watches the forget perplexity each step, so the naive side also pays for a watch per run. It prints both
wall times and their ratio; with --json its last line is {"name", "ratio", "target", "pass", ...}. It exits
1 when it does not pass.
"""
from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from engine.metric_registry import SCORE


def compare_cells(steps: list[int], shared: list[dict], naive: dict[int, dict]) -> list[str]:
    """The problems that stop the check passing (empty: it passes). Cells are matched by step, so
    the order of --steps does not matter; a cell without a score on either side (diverged) is a
    problem, never "identical". An at-target cell between milestones is no milestone: left out."""
    problems = []
    milestones = set(steps)
    by_step = {c["step"]: c for c in shared if c["step"] in milestones or not c.get("at_target")}
    for step in sorted(set(steps)):
        a, b = by_step.get(step), naive.get(step)
        if a is None or b is None:
            problems.append(f"step {step}: missing from the {'shared' if a is None else 'naive'} run")
        elif a.get(SCORE) is None or b.get(SCORE) is None:
            problems.append(f"step {step}: no score to compare (diverged: shared {a.get('diverged')}, naive {b.get('diverged')})")
        elif a[SCORE] != b[SCORE]:
            problems.append(f"step {step}: scores differ, shared {a[SCORE]!r} vs naive {b[SCORE]!r}")
    return problems


def compare_at_target(shared: dict | None, naive: dict[int, dict | None]) -> list[str]:
    """The problems with the at-target cells: the shared run's (None: it never reached the target)
    against each naive run's, keyed by the step that run trained to. A naive run trained at least to
    the shared run's at-target step finds it there with the same score; one shorter finds none."""
    problems = []
    for s, cell in sorted(naive.items()):
        want = shared if shared is not None and shared["step"] <= s else None
        if want is None and cell is not None:
            problems.append(f"run to {s}: an at-target cell at step {cell['step']}, the shared run "
                            + ("has none" if shared is None else f"has it at step {shared['step']}"))
        elif want is not None and cell is None:
            problems.append(f"run to {s}: no at-target cell, the shared run has it at step {want['step']}")
        elif want is not None and (cell["step"] != want["step"] or cell.get(SCORE) is None
                                   or cell.get(SCORE) != want.get(SCORE)):
            problems.append(f"run to {s}: at-target cell at step {cell['step']} score {cell.get(SCORE)!r}, "
                            f"shared at step {want['step']} score {want.get(SCORE)!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, default=Path("unlearn-demo-quick"))
    p.add_argument("--method", default="ga_gd")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--steps", default="5,10,20,40")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    a = p.parse_args(argv)
    steps = sorted({int(s) for s in a.steps.split(",") if s.strip()})

    from engine.config import RunConfig
    from engine.data import chunk_forget_set, load_forget_set
    from engine.demo import QUICK, build_workspace, demo_sources
    from engine.models import load_tokenizer
    from engine.run import run_unlearning

    ws = a.workspace.resolve()
    build_workspace(ws, QUICK)
    src = demo_sources(ws)
    texts = load_forget_set(src["forget"], src["retain"], src["unseen"], src["general"])
    sets = chunk_forget_set(texts, load_tokenizer(str(ws / "model")), QUICK.seq_len)
    cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    atexit.register(shutil.rmtree, cache, True)  # a bench leaves nothing behind

    def run(milestones):
        cfg = RunConfig(method=a.method, lr=a.lr, milestones=tuple(milestones), batch_size=QUICK.run_batch_size,
                        seq_len=QUICK.seq_len)
        return run_unlearning(str(ws / "model"), texts, cfg, device="cpu", cache_dir=cache, sets=sets)

    run([1])  # warm the baseline cache and the allocator so neither side pays for them
    t0 = time.perf_counter()
    shared = run(steps)
    t_shared = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = {s: run([s]) for s in steps}
    t_naive = time.perf_counter() - t0

    problems = compare_cells(steps, shared["milestones"], {s: r["milestones"][0] for s, r in naive.items()})
    problems += compare_at_target(shared["at_target"], {s: r["at_target"] for s, r in naive.items()})
    for s, r in naive.items():  # the naive run to s took exactly the shared run's first s steps
        if r["losses"] != shared["losses"][:s]:
            problems.append(f"step {s}: the run to {s} steps did not retrace the shared run's first {s} losses")
    tok_shared = shared["cost"]["train_tokens"]
    tok_naive = sum(r["cost"]["train_tokens"] for r in naive.values())
    theory = sum(steps) / max(steps)  # optimizer steps of the naive side over the shared side's
    ok = not problems
    print(f"{a.method} lr={a.lr:g} milestones {steps} on the quick demo model (CPU)")
    print(f"  shared (one run):       {t_shared:7.2f} s  {tok_shared:>9} train tokens  {max(steps)} steps")
    print(f"  naive (run per cell):   {t_naive:7.2f} s  {tok_naive:>9} train tokens  {sum(steps)} steps")
    reached = shared["at_target"]["step"] if shared["at_target"] else None
    print(f"  speed-up {t_naive / t_shared:.2f}x (optimizer steps {theory:.2f}x; one evaluation per milestone both "
          f"ways, and a watch per run), train tokens {tok_naive / tok_shared:.2f}x; at target: "
          f"{'step ' + str(reached) if reached else 'not reached'}; identical cells: {ok}")
    for line in problems:
        print(f"  FAIL {line}")
    if a.json:
        print(json.dumps({"name": "prefix_sharing", "ratio": t_naive / t_shared, "target": None, "pass": ok,
                          "token_ratio": tok_naive / tok_shared, "step_ratio": theory,
                          "seconds_shared": t_shared, "seconds_naive": t_naive, "steps": steps,
                          "at_target_step": reached,
                          "method": a.method, "lr": a.lr, "problems": problems}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
