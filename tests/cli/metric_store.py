"""A small real store for the metric tests: study `s`, method ga at one lr, two written cells that
carry every kind of metric (the plain ones, robustness recoveries, TOFU/MUSE figures, a downstream
task), written the way a worker writes them (studies.running.recorder.record_cell).

A plain module: the test files that use it make their own fixtures."""
from __future__ import annotations

from pathlib import Path

from sqlmodel import select

CELL = {"ppl_forget": 20.0, "ppl_retain": 5.0, "ppl_retain_eval": 5.5, "ppl_unseen": 21.0, "ppl_general": 40.0,
        "mia_auc": {"loss": 0.6, "zlib": 0.55, "min_k": 0.58, "min_k_pp": 0.57}, "mia_auc_lo": 0.52, "mia_auc_hi": 0.68,
        "relearn_recovery": 0.1, "quant4_recovery": 0.05, "quant8_recovery": 0.0,
        "bench": {"tofu_truth_ratio": 0.7, "tofu_forget_quality": 0.2, "muse_verbmem_f": 0.3, "muse_knowmem_f": 0.4,
                  "muse_knowmem_r": 0.5, "muse_auc": 0.6, "muse_privleak": -3.0},
        "downstream": {"hellaswag": 0.31},
        "verdict": {"forget": False, "mia": False, "utility": True}, "success": False, "at_target": False,
        "diverged": False, "train_loss": -1.0}


def cell(step: int, **extra) -> dict:
    """An engine-shaped cell at `step` (gap 0.1 × step / 5; drift on the retain documents 0.01 × step / 5,
    on the held-out retain_eval 0.03 × step / 5) plus `extra` keys."""
    gap, drift, eval_drift = 0.1 * step / 5, 0.01 * step / 5, 0.03 * step / 5
    return {"step": step, **CELL, "forget_gap": gap, "retain_eval_drift": eval_drift, "eval_score": gap + eval_drift,
            "retain_drift": drift, "score": gap + drift, **extra}


def metric_store(path: Path, **extra) -> str:
    """The store's URL; `extra`: keys added to both cells (a metric a test registered)."""
    from studies.lifecycle.spec import StudySpec
    from studies.lifecycle.study import create_study
    from studies.running.recorder import record_cell
    from studies.store.db import Run, Store
    from studies.store.forgetsets import create_forget_set
    from studies.store.states import RunState

    data = path.parent / "data"
    data.mkdir(exist_ok=True)
    for role in ("forget", "retain", "retain_eval", "unseen"):
        (data / f"{role}.txt").write_text(f"a {role} document, synthetic and long enough to be one " * 4)
    store = Store(f"sqlite:///{path}")
    create_forget_set(store, "fs", *([str(data / f"{r}.txt")] for r in ("forget", "retain", "unseen")),
                      retain_eval=[str(data / "retain_eval.txt")])  # one retain document: none to hold out
    create_study(store, "s", "EleutherAI/pythia-14m", "fs", methods=["ga"], lrs=[1e-4], steps=[5, 10],
                 attacks="relearn,quant4,quant8", eval_tasks="hellaswag")
    spec = StudySpec.from_dict(store.study("s").spec)
    with store.read() as s:
        run = s.exec(select(Run)).one()
    for step in (5, 10):
        record_cell(store, "s", spec, run, cell(step, **extra))
    with store.write() as s:
        row = s.get(Run, run.id)
        row.state = RunState.DONE
        s.add(row)
    return store.url
