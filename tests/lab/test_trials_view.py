"""studies.reading.trials: the detail of one trial and cells compared side by side, read from a real store
(tests/app/app_stores.py: real SQLite, real Optuna trials, synthetic metrics)."""
from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from sqlmodel import select

from engine.errors import UnlearnError
from studies.reading.grid import load_cells
from studies.reading.trials import compare_cells, trial_detail
from studies.store.db import Run
from studies.store.states import RunState
from tests.app.app_stores import BASELINE, make_study
from tests.studies_helpers import make_forget_set

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(sweeps_store):
    """Not the lab's store (tests/lab/conftest.py): app_store's two sweeps, one for the module."""
    return sweeps_store


@dataclass(frozen=True)
class Ref:
    """CellRef-like, without the app's import: compare_cells reads attributes."""

    study: str
    method: str
    lr: float
    steps: int


def cell_of(store, study, method, lr, steps):
    return next(c for c in load_cells(store, study) if (c.method, c.lr, c.steps) == (method, lr, steps))


# ---------------------------------------------------------------- trial_detail

def test_detail_of_a_finished_cell(store):
    d = trial_detail(store, "sweep-done", "ga", 1e-4, 10)
    assert (d["study"], d["method"], d["lr"], d["steps"]) == ("sweep-done", "ga", 1e-4, 10)
    assert d["params"]["method"] == "ga" and d["params"]["lr"] == 1e-4 and d["params"]["steps"] == 10
    assert d["params"]["batch_size"] == 4 and d["params"]["seq_len"] == 128  # the study's run settings
    assert d["state"] == RunState.DONE and d["status"] == "done" and d["attempts"] == 1
    assert [m["step"] for m in d["milestones"]] == [5, 10, 20]
    cell = cell_of(store, "sweep-done", "ga", 1e-4, 10)
    mid = d["milestones"][1]
    assert mid["score"] == pytest.approx(cell.value("score")) and mid["mia_auc"] == cell.metrics["mia_auc"]
    assert d["cell"]["forget_gap"] == pytest.approx(cell.value("forget_gap"))
    assert d["trial_number"] == cell.trial_number is not None
    assert d["baseline"] == BASELINE
    assert len(d["losses"]) == 20 and d["cost"]["train_tokens"] == 20000
    assert set(d["cost"]) >= {"flops", "wall_seconds", "retraining_flops_ratio"}


def test_the_target_is_the_one_forget_gap_measures_against(store):
    """Approximate retraining: forget_gap is the distance of ln ppl_forget to ln of the target."""
    d = trial_detail(store, "sweep-done", "ga_gd", 1e-4, 20)
    assert d["target"] == {"ppl_forget": BASELINE["ppl_unseen"], "mia_auc": 0.5}
    for m in d["milestones"]:
        assert abs(math.log(m["ppl_forget"]) - math.log(d["target"]["ppl_forget"])) == pytest.approx(m["forget_gap"])


def test_trial_number_is_the_optuna_trial_of_the_cell(store):
    d = trial_detail(store, "sweep-done", "ga_gd", 1e-3, 5)
    trial = optuna.load_study(study_name="sweep-done", storage=store.optuna).trials[d["trial_number"]]
    assert trial.params == {"method": "ga_gd", "lr": 1e-3, "steps": 5}


def test_reproduce_command_names_the_cell(store):
    args = shlex.split(trial_detail(store, "sweep-done", "ga", 1e-3, 20)["command"])
    assert args[:2] == ["unlearn", "run"]
    assert args[args.index("--method") + 1] == "ga" and float(args[args.index("--lr") + 1]) == 1e-3
    assert args[args.index("--steps") + 1] == "20"  # the cell's steps, not the run's last milestone


def test_detail_of_a_diverged_cell(store):
    d = trial_detail(store, "sweep-done", "ga_gd", 1e-3, 20)
    assert d["status"] == "diverged" and d["state"] == RunState.DIVERGED
    assert [m["diverged"] for m in d["milestones"]] == [False, False, True]


def test_detail_of_a_running_cell_borrows_the_studys_baseline(store):
    d = trial_detail(store, "sweep-live", "ga_kl", 1e-4, 20)
    assert d["state"] == RunState.RUNNING and d["status"] == "running"
    assert [m["step"] for m in d["milestones"]] == [5]
    assert d["losses"] == [] and d["cost"] == {}
    assert d["baseline"] == BASELINE and d["baseline_run"] is not None  # from the study's finished run
    assert d["target"]["ppl_forget"] == BASELINE["ppl_unseen"]


def test_lr_is_matched_as_a_number(store):
    d = trial_detail(store, "sweep-done", "ga", 0.1 * 1e-3, 5)  # 1.0000000000000002e-04
    assert d["lr"] == 1e-4


def test_failures_are_the_runs_failure_events(store, tiny_model_dir):
    make_study(store, "sweep-failing", str(tiny_model_dir), "people", methods=("ga",), lrs=(1e-4,), steps=(5,), fill=0.0)
    study = store.study("sweep-failing")
    with store.write() as s:
        run = s.exec(select(Run).where(Run.study_id == study.id)).one()
        run.state, run.attempts, run.last_error = RunState.FAILED, 2, "attempt 2: out of memory: CUDA"
        run_id = run.id
        s.add(run)
    store.log("started", "ga lr=0.0001 attempt 1 on cuda:0", study.id, run_id)
    store.log("retry", "ga lr=0.0001: attempt 1: killed by SIGKILL", study.id, run_id)
    store.log("failed", "ga lr=0.0001: attempt 2: out of memory: CUDA", study.id, run_id)
    store.log("created", "another study's event", None, None)
    d = trial_detail(store, "sweep-failing", "ga", 1e-4, 5)
    assert d["state"] == RunState.FAILED and d["status"] == "failed" and d["attempts"] == 2
    assert d["last_error"] == "attempt 2: out of memory: CUDA"
    assert [e["kind"] for e in d["events"]] == ["started", "retry", "failed"]
    assert [f["kind"] for f in d["failures"]] == ["retry", "failed"]
    assert "SIGKILL" in d["failures"][0]["message"]
    assert d["milestones"] == [] and d["baseline"] is None and d["target"]["ppl_forget"] is None


@pytest.mark.parametrize("args, needle", [
    (("nope", "ga", 1e-4, 5), "no study named 'nope'"),
    (("sweep-done", "ga_kl", 1e-4, 5), "no method 'ga_kl'"),
    (("sweep-done", "ga", 3e-4, 5), "no run at lr 0.0003"),
    (("sweep-done", "ga", 1e-4, 7), "no milestone at 7 steps"),
])
def test_unknown_cells_are_one_line_errors(store, args, needle):
    with pytest.raises(UnlearnError) as exc:
        trial_detail(store, *args)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_detail_is_plain_json(store):
    json.dumps(trial_detail(store, "sweep-done", "ga", 1e-4, 10), allow_nan=False)


# ---------------------------------------------------------------- compare_cells

def test_compare_puts_cells_side_by_side(store):
    refs = [Ref("sweep-done", "ga", 1e-4, 10), ("sweep-done", "ga_gd", 1e-3, 20), Ref("sweep-live", "ga_kl", 1e-5, 5)]
    out = compare_cells(store, refs)
    assert [(c["study"], c["method"], c["steps"]) for c in out["cells"]] == [
        ("sweep-done", "ga", 10), ("sweep-done", "ga_gd", 20), ("sweep-live", "ga_kl", 5)]
    first = cell_of(store, "sweep-done", "ga", 1e-4, 10)
    assert out["cells"][0]["values"]["score"] == pytest.approx(first.value("score"))
    assert out["cells"][0]["values"]["mia_auc.zlib"] == pytest.approx(first.metrics["mia_auc"]["zlib"])
    assert out["cells"][1]["status"] == "diverged" and set(out["cells"][1]["values"].values()) == {None}
    assert out["forget_set"]["name"] == "people"


def front_study(store) -> list[tuple]:
    """A study of its own (utility held out, unlike the sweeps' synthetic cells): one run, six steps,
    the cells' (forget_gap, retain_eval_drift) and their retain_drift chosen so that the front on the
    held-out drift and the one on the trained-on drift differ; step 6 diverged."""
    from studies.lifecycle.study import create_study, study_spec
    from studies.running.recorder import record_cell

    if "front" not in {s.name for s in _studies(store)}:
        create_study(store, "front", "EleutherAI/pythia-14m", "people", methods=["ga"], lrs=[1e-4], steps=[1, 2, 3, 4, 5, 6])
        spec = study_spec(store.study("front"))
        with store.read() as s:
            run = s.exec(select(Run).where(Run.study_id == store.study("front").id)).one()
        # step: (forget_gap, retain_eval_drift, retain_drift)
        points = {1: (0.1, 0.4, 0.0), 2: (0.2, 0.2, 0.3), 3: (0.3, 0.3, 0.0), 4: (0.4, 0.1, 0.5), 5: (0.5, 0.1, 0.5)}
        for step, (gap, drift, trained) in points.items():
            record_cell(store, "front", spec, run, {
                "step": step, "forget_gap": gap, "retain_eval_drift": drift, "eval_score": gap + drift,
                "retain_drift": trained, "score": gap + trained, "success": False, "diverged": False})
        record_cell(store, "front", spec, run, {"step": 6, "forget_gap": None, "retain_eval_drift": None,
                                                "eval_score": None, "success": False, "diverged": True})
        with store.write() as s:
            row = s.get(Run, run.id)
            row.state = RunState.DONE
            s.add(row)
    return [("front", "ga", 1e-4, s) for s in range(1, 7)]


def _studies(store):
    from studies.store.db import Study

    with store.read() as s:
        return list(s.exec(select(Study)).all())


def test_compare_front_is_the_pareto_front_of_the_cells(store):
    """The front is taken on forget_gap × retain_eval_drift, the utility held out from every retain term."""
    refs = front_study(store)
    out = compare_cells(store, refs)
    pts = {i: (c["values"]["forget_gap"], c["values"]["retain_eval_drift"]) for i, c in enumerate(out["cells"])
           if c["values"]["forget_gap"] is not None}
    brute = {i for i, (g, d) in pts.items()
             if not any(g2 <= g and d2 <= d and (g2, d2) != (g, d) for g2, d2 in pts.values())}
    assert set(out["front"]) == brute == {0, 1, 3}  # steps 1, 2, 4; step 3 is dominated by 2, step 5 by 4
    assert [c["pareto"] for c in out["cells"]] == [i in brute for i in range(len(out["cells"]))]
    # on the trained-on retain_drift, step 1 (gap .1, drift 0) alone would dominate every other
    trained = {i: (c["values"]["forget_gap"], c["values"]["retain_drift"]) for i, c in enumerate(out["cells"])
               if c["values"]["forget_gap"] is not None}
    assert {i for i, (g, d) in trained.items()
            if not any(g2 <= g and d2 <= d and (g2, d2) != (g, d) for g2, d2 in trained.values())} == {0}
    diverged = next(i for i, c in enumerate(out["cells"]) if c["status"] == "diverged")
    assert diverged == 5 and diverged not in out["front"]
    gaps = [pts[i][0] for i in out["front"]]
    assert gaps == sorted(gaps)


def test_compare_refuses_cells_on_different_forget_sets(store, tiny_model_dir, forget_set_files):
    make_forget_set(store, "people-no-general", forget_set_files, general=False)
    make_study(store, "sweep-other", str(tiny_model_dir), "people-no-general", methods=("ga",), lrs=(1e-4,), steps=(5,))
    assert store.forget_set("people-no-general").hash != store.forget_set("people").hash
    with pytest.raises(UnlearnError, match="different forget sets"):
        compare_cells(store, [("sweep-done", "ga", 1e-4, 5), ("sweep-other", "ga", 1e-4, 5)])


@pytest.mark.parametrize("refs, needle", [
    ([("sweep-done", "ga", 1e-4, 5)], "at least two"),
    ([("sweep-done", "ga", 1e-4, 5), ("sweep-done", "ga", 1e-4, 5)], "at least two"),
    ([("sweep-done", "ga", 1e-4, 5), ("sweep-done", "ga", 1e-4, 7)], "no cell ga lr=0.0001 steps=7"),
    ([("sweep-done", "ga", 1e-4, 5), ("nope", "ga", 1e-4, 5)], "no study named 'nope'"),
])
def test_compare_needs_two_known_cells(store, refs, needle):
    with pytest.raises(UnlearnError, match=needle):
        compare_cells(store, refs)


def test_trials_module_imports_no_ui_and_no_training_library():
    probe = "import sys, studies.reading.trials; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
            "('textual', 'tui', 'torch', 'transformers', 'accelerate', 'datasets', 'sklearn')))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
