"""Start-up, measured: `unlearn study ls` (on a store of 1,000 trials) and `unlearn --help`, as whole
processes, against a bare `python -c pass`.

    python bench/startup.py [--trials 1000] [--repeat 7] [--json] [--quick]

The store is written through the studies API (a forget set, a grid study, and one cell per trial
recorded as the pool records it: the cell's row plus its Optuna trial), with synthetic
metrics: no model is trained, since only reading it is timed. The three commands run alternately,
`--repeat` times each, and the medians are compared. Target: `unlearn study ls` within 0.5 s of the
bare interpreter. With --json the last line is {"name", "ratio", "target", "pass", ...}; it exits 1
when the target is missed.
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_ABOVE_S = 0.5


def write_store(url: str, trials: int, workdir: Path) -> int:
    """A grid study of `trials` cells (2 methods × lrs × 5 milestones), recorded cell by cell."""
    from sqlmodel import select

    from engine import metric_registry as M
    from studies.lifecycle.spec import StudySpec
    from studies.lifecycle.study import create_study
    from studies.running.recorder import record_cell
    from studies.store.db import Run, Store
    from studies.store.forgetsets import create_forget_set
    from studies.store.states import RunState

    for role in ("forget", "retain", "retain_eval", "unseen"):
        (workdir / f"{role}.txt").write_text(f"a {role} document, synthetic and long enough to be one " * 4)
    store = Store(url)
    create_forget_set(store, "fs", *([str(workdir / f"{r}.txt")] for r in ("forget", "retain", "unseen")),
                      retain_eval=[str(workdir / "retain_eval.txt")])  # one retain document: none to hold out
    steps = [5, 10, 20, 40, 80]
    n_lrs = math.ceil(trials / (2 * len(steps)))
    lrs = [1e-6 * 10 ** (3 * i / max(1, n_lrs - 1)) for i in range(n_lrs)]
    create_study(store, "bench", "EleutherAI/pythia-14m", "fs", methods=["ga", "ga_gd"], lrs=lrs, steps=steps)
    spec = StudySpec.from_dict(store.study("bench").spec)
    with store.read() as s:
        runs = list(s.exec(select(Run).order_by(Run.id)).all())
    written = 0
    for i, run in enumerate(runs):
        for step in steps:
            if written == trials:
                break
            gap = abs(math.sin(i * 7 + step))  # synthetic, deterministic numbers: only their reading is timed
            verdict = {"forget": gap < 0.09, "mia": True, "utility": True}
            cell = {"step": step, M.PPL_FORGET: 10 * math.exp(gap), M.PPL_RETAIN: 5.0, M.PPL_RETAIN_EVAL: 5.6,
                    M.PPL_UNSEEN: 10.0, M.PPL_GENERAL: None,
                    M.MIA_AUC: {a: 0.5 + gap / 2 if a == "loss" else 0.5 for a in M.MIA_ATTACKS},
                    M.MIA_AUC_LO: 0.45, M.MIA_AUC_HI: 0.55 + gap / 2,
                    M.FORGET_GAP: gap, M.UTILITY_DRIFT: 0.02, M.EVAL_SCORE: gap + 0.02,
                    M.RETAIN_DRIFT: 0.01, M.TRAINED_ON_SCORE: gap + 0.01, "verdict": verdict,
                    "success": all(verdict.values()), "at_target": False, "diverged": False, "train_loss": -1.0}
            record_cell(store, "bench", spec, run, cell)
            written += 1
        with store.write() as s:
            row = s.get(Run, run.id)
            row.state = RunState.DONE
            s.add(row)
    return written


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="100 trials, 3 repeats")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    a = p.parse_args(argv)
    trials, repeat = (100, 3) if a.quick else (a.trials, a.repeat)

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    atexit.register(shutil.rmtree, work, True)  # a bench leaves nothing behind
    url = f"sqlite:///{work / 'lab.db'}"
    t0 = time.perf_counter()
    written = write_store(url, trials, work)
    print(f"store: {written} trials written through the studies API in {time.perf_counter() - t0:.1f} s ({url})")

    script = Path(sys.executable).parent / "unlearn"
    unlearn = [str(script)] if script.is_file() else [sys.executable, "-c", "from tui.cli import main; main()"]
    commands = {"python -c pass": [sys.executable, "-c", "pass"],
                "unlearn --help": [*unlearn, "--help"],
                "unlearn study ls": [*unlearn, "study", "ls", "--storage", url]}
    for cmd in commands.values():  # warm the file cache once; not counted
        timed(cmd, work)
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(repeat):  # alternating, so a busy moment of the machine hits every command alike
        for name, cmd in commands.items():
            times[name].append(timed(cmd, work))
    med = {k: statistics.median(v) for k, v in times.items()}
    above = med["unlearn study ls"] - med["python -c pass"]
    ok = above <= TARGET_ABOVE_S
    for name, m in med.items():
        print(f"  {name:<18} median {m:6.3f} s  (min {min(times[name]):.3f}, max {max(times[name]):.3f}, n={repeat})")
    print(f"  unlearn study ls: {above:.3f} s above the bare interpreter (target ≤ {TARGET_ABOVE_S} s): "
          f"{'pass' if ok else 'MISSED'}")
    if a.json:
        print(json.dumps({"name": "startup", "ratio": med["unlearn study ls"] / med["python -c pass"],
                          "target": TARGET_ABOVE_S, "target_is": "seconds of `unlearn study ls` above `python -c pass`",
                          "pass": ok, "above_s": above, "trials": written, "repeat": repeat,
                          "median_s": med}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
