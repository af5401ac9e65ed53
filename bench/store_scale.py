"""The read commands on studies of 1,000, 10,000 and 100,000 trials: `unlearn study status`,
`unlearn study heatmap`, `unlearn study ls` and `unlearn export`, as whole processes, and the
heatmap's aggregation in process.

    python bench/store_scale.py [--sizes 1000,10000,100000] [--repeat 3] [--workdir DIR] [--json] [--quick]

Each size is its own store holding one grid study (4 methods × lrs × 25 milestones; 11, 101 and
1,001 lrs: room for 100 cells more, which bench/tui_scale.py records), made through the studies API: the forget set, the study and its runs by
`create_study`, every cell a finished run's row at one milestone with its Optuna trial, synthetic metrics
(tests/app/app_stores.synthetic_cell, with the held-out figures a cell carries since retain_eval where it
lacks them; some runs diverge), and each run's at-target cell, the row of its own a run records where its
forget perplexity first reaches the target (no trial where that step is no milestone; `trials` counts
trials, so these rows come on top). `studies.running.recorder.record_cell` takes 40 ms a
cell here (Optuna's ORM: one INSERT and one SELECT per user attribute), so 100,000 cells would take
over an hour; the cells are written instead by `write_cells`, which inserts in bulk the very rows
record_cell writes (tests/bench/test_bench.py holds the two stores equal, table by table, row by row, but
for timestamps). Built stores are kept under --workdir (default: the temp folder) by size and by a
hash of this file, the schemas and Optuna's version, so a second run does not build them again.

Each command runs `--repeat` times per size, alternating over commands and sizes; medians are
compared. Targets: no command grows faster than the trials (its time at 100k over its time at 1k
at most 100×, and so for every pair of sizes), and the heatmap's aggregation, `grids(cells)` and
every method's lr × steps values, status and robustness, at most 200 ms at 100,000 trials (loading
the cells from the store, `load_cells`, is reported beside it). --quick: 1,000 and 10,000 trials,
1 repeat (a smoke run: its ratios are one sample each). With --json the last line is
{"name", "ratio", "target", "pass", ...}; exit 1 on a miss.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, ROOT, finish, medians, spread, timed  # noqa: E402
from engine import metric_registry as M  # noqa: E402
from engine.metric_registry import SCORE  # noqa: E402

METHODS = ("ga", "ga_gd", "ga_kl", "npo")
STEPS = tuple(range(5, 130, 5))  # 25 milestones
STUDY = "scale"
ROOM = 100  # cells the grid has beyond those written (bench/tui_scale.py records them in its refresh)
AGG_TARGET_S = 0.2
COMMANDS = ("study status", "study heatmap", "study ls", "export")


def grid_lrs(trials: int) -> list[float]:
    n = max(1, math.ceil(trials / (len(METHODS) * len(STEPS))))
    return [float(f"{1e-6 * 10 ** (3 * i / max(1, n - 1)):.6g}") for i in range(n)]


def diverge_after(run_index: int) -> int | None:
    """Every 9th run diverges after its 12th milestone (the rest of its cells: diverged)."""
    return STEPS[11] if run_index % 9 == 4 else None


RETAIN_EVAL_0 = 5.5  # θ0's ppl_retain_eval in the synthetic cells
HELD_OUT_FACTOR = 1.5  # utility on held-out documents suffers more than on those the retain terms train on


def held_out(cell: dict) -> dict:
    """A synthetic cell with what a cell carries since retain_eval, where it lacks it: utility on
    retain_eval (retain_eval_drift, ppl_retain_eval), the objective eval_score, the loss AUC's
    interval, the verdict (success = all three parts) and at_target. The cell's own keys win."""
    if cell.get("diverged"):
        extra = {M.UTILITY_DRIFT: None, M.EVAL_SCORE: None, M.PPL_RETAIN_EVAL: None, M.MIA_AUC_LO: None,
                 M.MIA_AUC_HI: None, "verdict": {"forget": False, "mia": False, "utility": False}, "success": False}
        return {**extra, **cell} if "verdict" not in cell else cell
    drift = HELD_OUT_FACTOR * cell[M.RETAIN_DRIFT]
    auc = cell[M.MIA_AUC]["loss"]
    lo, hi = auc - 0.05, auc + 0.05
    extra = {M.PPL_RETAIN_EVAL: RETAIN_EVAL_0 * math.exp(drift), M.UTILITY_DRIFT: drift,
             M.EVAL_SCORE: cell[M.FORGET_GAP] + max(0.0, drift), M.MIA_AUC_LO: lo, M.MIA_AUC_HI: hi,
             "at_target": False}
    out = {**extra, **cell}
    if "verdict" not in cell:
        verdict = {"forget": cell[M.FORGET_GAP] <= math.log1p(0.5), "mia": lo <= 0.5 <= hi,
                   "utility": out[M.UTILITY_DRIFT] <= math.log1p(0.1)}
        out.update(verdict=verdict, success=all(verdict.values()))
    return out


def at_target_step(method_index: int, lr_index: int) -> int:
    """The first step at which synthetic_cell's forget perplexity reaches the target, ppl_unseen(θ0)
    (its strength, (1 + lr_index) · step / 40 · (1 + 0.3 · method_index), reaches ln of their ratio)."""
    from tests.app.app_stores import BASELINE

    reach = math.log(BASELINE["ppl_unseen"] / BASELINE["ppl_forget"])
    return math.ceil(round(reach * 40.0 / ((1 + lr_index) * (1 + 0.3 * method_index)), 9))


def is_trial(cell: dict) -> bool:
    """Whether record_cell gives the cell an Optuna trial: every cell but an at-target one between milestones."""
    return not (cell.get("at_target") and cell["step"] not in STEPS)


def planned_cells(runs, trials: int, skip: int = 0) -> list[tuple]:
    """(run, cell) for the first `trials` trial cells, run by run in id order, step by step, with
    each run's at-target cell where its forget perplexity first reaches the target (a milestone's
    cell marked at_target, or a row of its own just before the next milestone's); without the
    cells of the first `skip` trials (those written already)."""
    from tests.app.app_stores import synthetic_cell

    out, n = [], 0
    for i, run in enumerate(runs):
        m, lr_index, cut = METHODS.index(run.method), i % 10, diverge_after(i)
        reach = at_target_step(m, lr_index)
        for step in STEPS:
            if n == trials:
                return out
            cells = []
            if step - 5 < reach < step and (cut is None or reach <= cut):
                cells.append({**held_out(synthetic_cell(m, lr_index, reach)), "at_target": True})
            cell = held_out(synthetic_cell(m, lr_index, step, cut))
            if step == reach and not cell["diverged"]:
                cell["at_target"] = True
            cells.append(cell)
            if n >= skip:
                out += [(run, c) for c in cells]
            n += 1
    return out


# ---------------------------------------------------------------- writing cells in bulk

def _stamp(t: dt.datetime) -> str:
    """A datetime as SQLAlchemy stores it in SQLite."""
    return t.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def write_cells(store, study_name: str, spec, cells: list[tuple]) -> None:
    """The rows `studies.running.recorder.record_cell` writes for each (run, cell) of a fresh study, every cell
    new: the cell's row and its Optuna trial (params method, lr, steps; the value; the user
    attributes), or the row alone for an at-target cell between milestones, inserted in one transaction. The trial itself is built as record_cell builds it
    (optuna.trial.create_trial), so its states, params and attributes are Optuna's own."""
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb.models import TrialValueModel
    from optuna.trial import TrialState, create_trial

    from engine.methods.base import parse_variant
    from studies.running.recorder import _user_attrs
    from studies.store.clock import utcnow
    from studies.store.sqlite_file import sqlite_path

    db = sqlite3.connect(sqlite_path(store.url))
    try:
        study_id = db.execute("SELECT study_id FROM studies WHERE study_name = ?", (study_name,)).fetchone()[0]
        number = db.execute("SELECT COUNT(*) FROM trials WHERE study_id = ?", (study_id,)).fetchone()[0]
        trial_id = db.execute("SELECT COALESCE(MAX(trial_id), 0) FROM trials").fetchone()[0]
        distributions = spec.optuna_distributions()
        trials, params, values, attrs, milestones = [], [], [], [], []
        for run, cell in cells:
            value = cell.get(SCORE)
            if not is_trial(cell):  # an at-target cell between milestones: its row, no trial
                milestones.append((run.id, cell["step"], json.dumps(cell), value, bool(cell.get("success")),
                                   bool(cell.get("diverged")), None, _stamp(utcnow())))
                continue
            trial_id += 1
            p = {"method": run.method, "lr": run.lr, "steps": cell["step"], **parse_variant(run.method)[1]}
            frozen = create_trial(params=p, distributions={k: d for k, d in distributions.items() if k in p},
                                  value=value, state=TrialState.COMPLETE if value is not None else TrialState.FAIL,
                                  user_attrs=_user_attrs(run, cell))
            trials.append((trial_id, number, study_id, frozen.state.name, _stamp(frozen.datetime_start),
                           _stamp(frozen.datetime_complete)))
            for name, v in frozen.params.items():
                d = frozen.distributions[name]
                params.append((trial_id, name, d.to_internal_repr(v), distribution_to_json(d)))
            if value is not None:
                stored, kind = TrialValueModel.value_to_stored_repr(value)
                values.append((trial_id, 0, stored, kind.name))
            attrs += [(trial_id, k, json.dumps(v)) for k, v in frozen.user_attrs.items()]
            milestones.append((run.id, cell["step"], json.dumps(cell), value, bool(cell.get("success")),
                               bool(cell.get("diverged")), number, _stamp(utcnow())))
            number += 1
        with db:
            db.executemany("INSERT INTO trials (trial_id, number, study_id, state, datetime_start, datetime_complete) "
                           "VALUES (?, ?, ?, ?, ?, ?)", trials)
            db.executemany("INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json) "
                           "VALUES (?, ?, ?, ?)", params)
            db.executemany("INSERT INTO trial_values (trial_id, objective, value, value_type) VALUES (?, ?, ?, ?)",
                           values)
            db.executemany("INSERT INTO trial_user_attributes (trial_id, key, value_json) VALUES (?, ?, ?)", attrs)
            db.executemany("INSERT INTO ul_milestone (run_id, step, metrics, score, success, diverged, trial_number, "
                           "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", milestones)
    finally:
        db.close()


def finish_runs(store, cells: list[tuple]) -> None:
    """Every run with a cell marked done (diverged when its last cell is), as the pool leaves it."""
    from studies.store.db import Run
    from studies.store.states import RunState

    last: dict[int, dict] = {}
    for run, cell in cells:
        last[run.id] = cell
    with store.write() as s:
        for run_id, cell in last.items():
            row = s.get(Run, run_id)
            row.state = RunState.DIVERGED if cell.get("diverged") else RunState.DONE
            row.step = cell["step"]
            s.add(row)


def make_store(path: Path, trials: int, inputs: Path, bulk: bool = True, capacity: int | None = None) -> dict:
    """A store at `path` with one grid study of `trials` cells (its grid sized for `capacity` cells,
    default `trials`), the cells written by `write_cells` (bulk) or by record_cell one by one (what
    the bulk writer is held to)."""
    from sqlmodel import select

    from studies.lifecycle.spec import StudySpec
    from studies.lifecycle.study import create_study
    from studies.running.recorder import record_cell
    from studies.store.db import Run, Store
    from studies.store.forgetsets import create_forget_set

    inputs.mkdir(parents=True, exist_ok=True)
    for role in ("forget", "retain", "retain_eval", "unseen"):
        (inputs / f"{role}.txt").write_text(f"a {role} document, synthetic and long enough to be one " * 4)
    t0 = time.perf_counter()
    store = Store(f"sqlite:///{path}")
    create_forget_set(store, "fs", *([str(inputs / f"{r}.txt")] for r in ("forget", "retain", "unseen")),
                      retain_eval=[str(inputs / "retain_eval.txt")])  # one retain document: none to hold out
    create_study(store, STUDY, "EleutherAI/pythia-14m", "fs", methods=list(METHODS), lrs=grid_lrs(capacity or trials),
                 steps=list(STEPS))
    spec = StudySpec.from_dict(store.study(STUDY).spec)
    with store.read() as s:
        runs = list(s.exec(select(Run).order_by(Run.id)).all())
    cells = planned_cells(runs, trials)
    if bulk:
        write_cells(store, STUDY, spec, cells)
    else:
        for run, cell in cells:
            record_cell(store, STUDY, spec, run, cell)
    finish_runs(store, cells)
    store.engine.dispose()
    store.write_engine.dispose()
    if store._optuna is not None:
        store._optuna.engine.dispose()
    return {"trials": sum(is_trial(c) for _, c in cells), "at_target_rows": sum(not is_trial(c) for _, c in cells),
            "build_s": time.perf_counter() - t0}


def cache_key() -> str:
    import optuna
    from optuna.storages._rdb.models import SCHEMA_VERSION as OPTUNA_SCHEMA

    from studies.store.db import SCHEMA_VERSION

    h = hashlib.sha256(f"{SCHEMA_VERSION} {OPTUNA_SCHEMA} {optuna.__version__}".encode())
    h.update(Path(__file__).read_bytes())
    h.update((ROOT / "tests" / "app" / "app_stores.py").read_bytes())
    return h.hexdigest()[:12]


def cached_store(workdir: Path, trials: int) -> tuple[Path, dict]:
    """The store of `trials` cells (its grid ROOM cells larger) under `workdir`, built when it is not there."""
    path = workdir / f"scale-{trials}-{cache_key()}.db"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        return path, {**json.loads(meta.read_text()), "cached": True}
    for stale in workdir.glob(f"scale-{trials}-*"):
        stale.unlink()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    info = make_store(tmp, trials, workdir / "inputs", capacity=trials + ROOM)
    os.replace(tmp, path)
    meta.write_text(json.dumps(info))
    return path, {**info, "cached": False}


# ---------------------------------------------------------------- the verdict

def growth_problems(med: dict[int, dict[str, float]]) -> list[str]:
    """Every (command, smaller size, larger size) whose time grew more than the trials did."""
    sizes = sorted(med)
    problems = []
    for i, small in enumerate(sizes):
        for big in sizes[i + 1:]:
            for cmd in med[small]:
                growth = med[big][cmd] / med[small][cmd]
                if growth > big / small:
                    problems.append(f"{cmd}: {growth:.1f}x from {small:,} to {big:,} trials (> {big / small:.0f}x)")
    return problems


def aggregate(cells, metric: str = SCORE) -> dict:
    """What the heatmap computes from the cells: per method, its grid's values, status and robustness."""
    from studies.reading.grid import grids

    return {m: (g.value(metric), g.status(), g.robustness) for m, g in grids(cells).items()}


def in_process(url: str, repeat: int) -> dict[str, list[float]]:
    """Seconds of load_cells (the store's rows to cells) and of the aggregation, `repeat` times each."""
    from studies.reading.grid import load_cells
    from studies.store.db import Store

    store = Store(url, create=False)
    out: dict[str, list[float]] = {"load_cells": [], "aggregate": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        cells = load_cells(store, STUDY)
        t1 = time.perf_counter()
        aggregate(cells)
        out["aggregate"].append(time.perf_counter() - t1)
        out["load_cells"].append(t1 - t0)
    store.engine.dispose()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=CACHE / "store-scale")
    p.add_argument("--quick", action="store_true", help="1,000 and 10,000 trials, 1 repeat")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    a = p.parse_args(argv)
    sizes = [1000, 10000] if a.quick else sorted({int(s) for s in a.sizes.split(",") if s.strip()})
    repeat = 1 if a.quick else a.repeat
    a.workdir.mkdir(parents=True, exist_ok=True)
    urls = {}
    for n in sizes:
        path, info = cached_store(a.workdir, n)
        urls[n] = f"sqlite:///{path}"
        print(f"store of {info['trials']:,} trials: {'cached' if info['cached'] else 'built'} "
              f"({info['build_s']:.1f} s to build) {path}")

    script = Path(sys.executable).parent / "unlearn"
    unlearn = [str(script)] if script.is_file() else [sys.executable, "-m", "tui.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARN_")}
    env["UNLEARN_HOME"] = str(a.workdir / "home")

    def command(n: int, cmd: str) -> list[str]:
        name = [] if cmd == "study ls" else [STUDY]
        return [*unlearn, *cmd.split(), *name, "--storage", urls[n]]

    def run(n: int, cmd: str) -> float:
        return timed(lambda: subprocess.run(command(n, cmd), check=True, env=env, cwd=a.workdir,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    for n in sizes:  # warm the file cache once; not counted
        for cmd in COMMANDS:
            run(n, cmd)
    times = {n: {cmd: [] for cmd in COMMANDS} for n in sizes}
    for _ in range(repeat):  # alternating over sizes and commands
        for n in sizes:
            for cmd in COMMANDS:
                times[n][cmd].append(run(n, cmd))
    med = {n: medians(t) for n, t in times.items()}
    print("medians (s):", json.dumps({str(n): m for n, m in med.items()}), flush=True)
    inproc = {n: in_process(urls[n], repeat + 2) for n in sizes}
    inmed = {n: medians(t) for n, t in inproc.items()}
    problems = growth_problems(med)
    biggest = max(sizes)
    agg = inmed[biggest]["aggregate"]
    agg_ok = biggest < 100_000 or agg <= AGG_TARGET_S
    if agg > AGG_TARGET_S and biggest >= 100_000:
        problems.append(f"heatmap aggregation {agg * 1000:.0f} ms at {biggest:,} trials (> {AGG_TARGET_S * 1000:.0f} ms)")
    ok = not problems and agg_ok
    for n in sizes:
        print(f"{n:,} trials:")
        for cmd in COMMANDS:
            print(spread(f"unlearn {cmd}", times[n][cmd]))
        for k, v in inproc[n].items():
            print(spread(f"in process: {k}", v, "ms", 1000))
    small = min(sizes)
    growth = {cmd: med[biggest][cmd] / med[small][cmd] for cmd in COMMANDS}
    print(f"growth {small:,} -> {biggest:,} trials ({biggest / small:.0f}x): "
          + ", ".join(f"{cmd} {g:.1f}x" for cmd, g in growth.items()))
    print(f"heatmap aggregation at {biggest:,} trials: {agg * 1000:.1f} ms (target ≤ {AGG_TARGET_S * 1000:.0f} ms at 100,000)")
    for line in problems:
        print(f"  FAIL {line}")
    print("pass" if ok else "MISSED")
    return finish({"name": "store_scale", "ratio": max(growth.values()), "target": biggest / small,
                   "target_is": "each command's time ratio largest/smallest store at most the trials' ratio; "
                                "heatmap aggregation ≤ 0.2 s at 100,000 trials",
                   "pass": ok, "growth": growth, "aggregate_s": agg, "aggregate_target_s": AGG_TARGET_S,
                   "median_s": {str(n): m for n, m in med.items()},
                   "in_process_median_s": {str(n): m for n, m in inmed.items()},
                   "sizes": sizes, "problems": problems, "repeat": repeat, "quick": a.quick}, a.json)


if __name__ == "__main__":
    sys.exit(main())
