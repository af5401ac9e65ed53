"""Stores for the app's tests, made through the studies API with no training: a real SQLite
file, real Optuna trials, real forget sets; the metrics of each cell come from a fixed formula,
so snapshots and timings do not depend on floating-point training on the machine at hand.

A plain module (the fixtures that use it live in the test files and conftest.py)."""
from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

from sqlmodel import select

BASELINE = {"ppl_forget": 4.0, "ppl_retain": 5.0, "ppl_retain_eval": 6.0, "ppl_unseen": 20.0, "ppl_general": 30.0,
            "mia_auc": {"loss": 0.9, "zlib": 0.88, "min_k": 0.91, "min_k_pp": 0.86}}
FIXED_TIME = dt.datetime(2026, 11, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
# The verdict's bands for these cells (engine.verdict): fixed, as --tol-forget 0.5 --tol-retain 0.1 would make them.
FORGET_BAND, UTILITY_BAND = math.log1p(0.5), math.log1p(0.1)
MIA_HALF_WIDTH = 0.32  # the loss AUC's bootstrap interval: wide, as on a small forget set


def synthetic_cell(method_index: int, lr_index: int, step: int, diverge_after: int | None = None) -> dict:
    """An engine-shaped cell dict whose numbers vary smoothly with (method, lr, step): the objective
    eval_score on held-out retain_eval (which drifts a little more than the trained-on retain set),
    the old score and retain_drift beside it, the loss AUC's interval and the verdict."""
    if diverge_after is not None and step > diverge_after:
        return {"step": step, "ppl_forget": None, "ppl_retain": None, "ppl_retain_eval": None, "ppl_unseen": None,
                "ppl_general": None, "mia_auc": {}, "mia_auc_lo": None, "mia_auc_hi": None, "forget_gap": None,
                "retain_eval_drift": None, "eval_score": None, "retain_drift": None, "score": None,
                "verdict": {"forget": False, "mia": False, "utility": False}, "success": False,
                "diverged": True, "train_loss": None}
    strength = (1 + lr_index) * step / 40.0 * (1 + 0.3 * method_index)
    ppl_forget = BASELINE["ppl_forget"] * math.exp(strength)
    forget_gap = abs(math.log(ppl_forget) - math.log(BASELINE["ppl_unseen"]))
    retain_drift = max(0.0, 0.02 * strength ** 2 - 0.01 * method_index)
    retain_eval_drift = retain_drift + 0.01 * strength
    auc = max(0.5, 0.9 - 0.08 * strength)
    lo, hi = auc - MIA_HALF_WIDTH, min(1.0, auc + MIA_HALF_WIDTH)
    verdict = {"forget": forget_gap <= FORGET_BAND, "mia": lo <= 0.5 <= hi, "utility": retain_eval_drift <= UTILITY_BAND}
    return {"step": step, "ppl_forget": ppl_forget, "ppl_retain": BASELINE["ppl_retain"] * math.exp(retain_drift),
            "ppl_retain_eval": BASELINE["ppl_retain_eval"] * math.exp(retain_eval_drift),
            "ppl_unseen": BASELINE["ppl_unseen"] * math.exp(0.01 * strength), "ppl_general": 30.0 + strength,
            "mia_auc": {"loss": auc, "zlib": auc - 0.01, "min_k": auc + 0.01, "min_k_pp": auc - 0.02},
            "mia_auc_lo": lo, "mia_auc_hi": hi, "forget_gap": forget_gap,
            "retain_eval_drift": retain_eval_drift, "eval_score": forget_gap + retain_eval_drift,
            "retain_drift": retain_drift, "score": forget_gap + retain_drift,
            "verdict": verdict, "success": all(verdict.values()), "diverged": False, "train_loss": 3.0 - 0.1 * strength}


def make_study(store, name: str, model_dir: str, forget_set: str, methods=("ga", "ga_gd"), lrs=(1e-5, 1e-4, 1e-3),
               steps=(5, 10, 20), fill: float = 1.0, running: int = 0, state: str | None = None,
               diverge: dict | None = None):
    """A grid study with the first `fill` share of its runs finished (synthetic metrics), the next
    `running` runs marked running (with half their milestones written), the rest pending.
    `diverge` maps (method, lr) to the last step before a divergence."""
    from studies.lifecycle.spec import StudySpec
    from studies.lifecycle.study import create_study
    from studies.running.recorder import record_cell
    from studies.store.db import Run, Study
    from studies.store.states import RunState, StudyState

    study = create_study(store, name, model_dir, forget_set, methods=list(methods), lrs=list(lrs), steps=list(steps))
    spec = StudySpec.from_dict(study.spec)
    with store.read() as s:
        runs = list(s.exec(select(Run).where(Run.study_id == study.id).order_by(Run.id)).all())
    n_done = round(fill * len(runs))
    diverge = diverge or {}
    for i, run in enumerate(runs[:n_done + running]):
        m_i, lr_i = list(methods).index(run.method), sorted(lrs).index(run.lr)
        last = diverge.get((run.method, run.lr))
        finished = i < n_done
        written = steps if finished else steps[: max(1, len(steps) // 2)]
        for step in written:
            record_cell(store, name, spec, run, synthetic_cell(m_i, lr_i, step, last))
        with store.write() as s:
            r = s.get(Run, run.id)
            r.attempts, r.device = 1, "cpu"
            r.started_at = FIXED_TIME
            if finished:
                r.state = RunState.DIVERGED if last is not None and last < max(steps) else RunState.DONE
                r.step = max(written)
                r.finished_at = FIXED_TIME
                r.result = {"baseline": BASELINE, "diverged": r.state == RunState.DIVERGED, "device": "cpu",
                            "reason": None, "losses": [3.0 - 0.01 * k for k in range(max(steps))],
                            "cost": {"train_tokens": 1000 * max(steps), "eval_tokens": 5000, "wall_seconds": 1.5,
                                     "parameters": 20000, "flops": 6 * 20000 * 1000 * max(steps),
                                     "pretraining_tokens": None, "retraining_flops_ratio": None}}
            else:
                r.state, r.step, r.pid, r.host = RunState.RUNNING, max(written), None, "testhost"
                r.heartbeat = dt.datetime.now(dt.timezone.utc)
            s.add(r)
    with store.write() as s:
        st = s.get(Study, study.id)
        st.state = state or (StudyState.DONE if n_done == len(runs) else StudyState.RUNNING)
        s.add(st)
    return store.study(name)


def app_store(path: Path, model_dir, forget_set_files: dict[str, str], model: str | None = None):
    """The store the app's snapshot and pilot tests open: a finished two-method study (one run
    diverged) and a running one, on one forget set. `model` (a hub-style id) replaces the model
    folder's path where a snapshot must not show a temporary path."""
    from studies.store.db import Store
    from tests.studies_helpers import make_forget_set

    store = Store(f"sqlite:///{path}")
    make_forget_set(store, "people", forget_set_files)
    model = model or str(model_dir)
    make_study(store, "sweep-done", model, "people", diverge={("ga_gd", 1e-3): 10})
    make_study(store, "sweep-live", model, "people", methods=("ga_kl",), fill=0.34, running=1)
    return store
