"""A 3 lr × 5 steps grid, measured: prefix sharing (one run per lr to the last milestone, evaluated
at every milestone: what a study does) against one independent run per cell, in optimizer steps and
wall time.

    python bench/grid_cost.py [--workspace DIR] [--lrs 1e-4,2e-4,5e-4] [--steps 5,10,20,40,80] [--repeat 3] [--json] [--quick]

The theoretical cost ratio shared / independent is max(steps) / Σ(steps) (0.516 for 5..80): the
independent runs train every prefix again. Target: the measured ratios, of optimizer steps and of
wall time, each within 10 % of it. The sides are timed in pairs, one per lr: that lr's shared run
and its independent runs back to back (which goes first alternates), --repeat times over the lrs,
after one uncounted pair; the wall ratio is the median of the pairs' ratios (the process's CPU time
and the whole grid's medians are printed beside it). It also checks what makes the comparison fair
(bench/prefix_sharing.py's check): every cell has the same score both ways. θ0's baseline metrics
are cached before timing, as in a study.

Default: the quick demo model (built once under the temp folder, about a minute); --quick: a
random-weight Llama of the demo's size, steps 2,4,6,8,10, one repeat. With --json the last line is
{"name", "ratio", "target", "pass", ...}; it exits 1 when it does not pass.
"""
from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, demo_workspace, finish, medians, spread, tiny_workspace  # noqa: E402
from prefix_sharing import compare_cells  # noqa: E402

TOLERANCE = 0.10


def theoretical_ratio(steps: list[int]) -> float:
    """Optimizer steps of the shared side over the independent side's, for one lr (and so for all)."""
    return max(steps) / sum(steps)


def within(measured: float, theory: float, tolerance: float = TOLERANCE) -> bool:
    """Whether a measured cost ratio is within `tolerance` (relative) of the theoretical one."""
    return abs(measured - theory) <= tolerance * theory


def measure_pairs(lrs: list[float], shared: Callable[[float], None], independent: Callable[[float], None],
                  repeat: int, clocks: dict[str, Callable[[], float]] | None = None) -> list[dict]:
    """For each repetition and each lr, the pair: the shared run of that lr and its independent runs,
    back to back (which goes first alternates), timed by the wall clock and the process's CPU time.
    A pair takes seconds, so a busy stretch of the machine falls on both of its sides; the whole
    grid's sides, a minute apart, moved the ratio by ±0.07 from one bench run to the next. One pair
    first, uncounted (a process's first runs pay one-time costs). Returns one dict per pair:
    {"lr", "shared_s", "independent_s", "wall" (ratio), "cpu" (ratio)}."""
    clocks = clocks or {"wall": time.perf_counter, "cpu": time.process_time}

    def clocked(fn, lr) -> dict[str, float]:
        start = {k: c() for k, c in clocks.items()}
        fn(lr)
        return {k: c() - start[k] for k, c in clocks.items()}

    shared(lrs[0])
    independent(lrs[0])
    out, turn = [], 0
    for _ in range(repeat):
        for lr in lrs:
            if turn % 2 == 0:
                a = clocked(shared, lr)
                b = clocked(independent, lr)
            else:
                b = clocked(independent, lr)
                a = clocked(shared, lr)
            turn += 1
            out.append({"lr": lr, "shared_s": a["wall"], "independent_s": b["wall"],
                        "wall": a["wall"] / b["wall"], "cpu": a["cpu"] / b["cpu"]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, help="the quick demo workspace (default: one under the temp folder)")
    p.add_argument("--method", default="ga_gd")
    p.add_argument("--lrs", default="1e-4,2e-4,5e-4")
    p.add_argument("--steps", default="5,10,20,40,80")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a random-weight model of the demo's size, steps 2..10, 1 repeat")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    a = p.parse_args(argv)
    import torch

    from engine.config import RunConfig
    from engine.demo import QUICK
    from engine.models import quiet_transformers
    from engine.run import run_unlearning

    quiet_transformers()
    torch.set_num_threads(a.threads)
    lrs = [float(x) for x in a.lrs.split(",") if x.strip()]
    steps = sorted({int(s) for s in a.steps.split(",") if s.strip()})
    repeat = a.repeat
    if a.quick:
        steps, repeat = [2, 4, 6, 8, 10], 1
        model_dir, texts, sets = tiny_workspace(CACHE / "grid-cost", hidden=QUICK.hidden, layers=QUICK.layers,
                                                heads=QUICK.heads, seq_len=QUICK.seq_len)
    else:
        model_dir, texts, sets = demo_workspace(a.workspace)
    cache = Path(tempfile.mkdtemp(prefix="bench-grid-cache-"))
    atexit.register(shutil.rmtree, cache, True)  # a bench leaves nothing behind

    def run(lr, milestones):
        cfg = RunConfig(method=a.method, lr=lr, milestones=tuple(milestones), batch_size=QUICK.run_batch_size,
                        seq_len=QUICK.seq_len)
        return run_unlearning(str(model_dir), texts, cfg, device="cpu", cache_dir=cache, sets=sets)

    last: dict[str, dict] = {"shared": {}, "independent": {}}

    def shared(lr):
        last["shared"][lr] = run(lr, steps)

    def independent(lr):
        for s in steps:
            last["independent"][(lr, s)] = run(lr, [s])

    run(lrs[0], [1])  # the baseline cache, as a study fills it once
    pairs = measure_pairs(lrs, shared, independent, repeat)
    wall_ratio = statistics.median(p["wall"] for p in pairs)
    cpu_ratio = statistics.median(p["cpu"] for p in pairs)
    totals = {side: [sum(p[side] for p in pairs[i:i + len(lrs)]) for i in range(0, len(pairs), len(lrs))]
              for side in ("shared_s", "independent_s")}
    times = {"shared (a run per lr)": totals["shared_s"], "independent (a run per cell)": totals["independent_s"]}
    med = medians(times)
    steps_shared = sum(len(r["losses"]) for r in last["shared"].values())
    steps_indep = sum(len(r["losses"]) for r in last["independent"].values())
    step_ratio = steps_shared / steps_indep
    theory = theoretical_ratio(steps)
    problems = []
    for lr in lrs:
        naive = {s: last["independent"][(lr, s)]["milestones"][0] for s in steps}
        problems += [f"lr {lr:g}: {x}" for x in compare_cells(steps, last["shared"][lr]["milestones"], naive)]
    ok = not problems and within(step_ratio, theory) and within(wall_ratio, theory)
    print(f"{a.method}, lrs {lrs} × steps {steps}, {'random-weight demo-size model' if a.quick else 'quick demo model'}, "
          f"{torch.get_num_threads()} thread(s), CPU")
    for name, values in times.items():
        print(spread(name + ", whole grid", values))
    print(spread("shared / independent, per lr (wall)", [p["wall"] for p in pairs], "", 1))
    print(f"    (the grid's medians: {med['shared (a run per lr)'] / med['independent (a run per cell)']:.3f}; "
          f"per lr, CPU time: {cpu_ratio:.3f})")
    print(f"  optimizer steps {steps_shared} vs {steps_indep}: ratio {step_ratio:.3f}; wall ratio {wall_ratio:.3f}; "
          f"theory max/Σ {theory:.3f} (target: each within {TOLERANCE:.0%} of it, so ≤ {theory * (1 + TOLERANCE):.3f})")
    for line in problems:
        print(f"  FAIL {line}")
    print("pass" if ok else "MISSED")
    return finish({"name": "grid_cost", "ratio": wall_ratio, "target": theory,
                   "target_is": f"shared / independent cost within {TOLERANCE:.0%} of max(steps)/sum(steps)",
                   "tolerance": TOLERANCE, "pass": ok, "step_ratio": step_ratio, "optimizer_steps":
                   {"shared": steps_shared, "independent": steps_indep}, "median_s": med, "cpu_ratio": cpu_ratio,
                   "grid_medians_ratio": med["shared (a run per lr)"] / med["independent (a run per cell)"],
                   "pairs": pairs, "lrs": lrs,
                   "steps": steps, "method": a.method, "problems": problems, "repeat": repeat, "quick": a.quick}, a.json)


if __name__ == "__main__":
    sys.exit(main())
