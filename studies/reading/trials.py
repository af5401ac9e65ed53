"""One cell seen whole, and cells compared side by side: what the app's trial and compare screens
show, as plain dicts (headless: no textual, no torch).

A trial is one cell (method, lr, steps) of a study; its run is the (method, lr) run that passes
through every milestone, so the detail of a cell also shows the curves of the whole run.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterable, Optional

from sqlmodel import select

from engine.errors import UnlearnError
from engine.metric_registry import MIA_AUC, PPL_FORGET, PPL_UNSEEN, every_run_paths
from studies.lifecycle.spec import StudySpec, study_spec
from studies.reading.export import reproduce_command
from studies.reading.grid import Cell, cells_from_rows, load_cells, pareto
from studies.store.db import CellRow, Event, ForgetSet, Run, Store, Study
from studies.store.states import REAL_RUN_STATES

# The approximate-retraining target of the membership attacks: members indistinguishable from non-members.
MIA_TARGET = 0.5
# Event kinds (written by the worker pool and the worker) that say why a run did not simply finish.
FAILURE_KINDS = ("retry", "failed", "cancelled", "diverged")


def _same_lr(a: float, b: float) -> bool:
    # lrs come back from JSON and SQLite as floats; a value typed by hand may differ in the last bit.
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def _iso(when) -> Optional[str]:
    return when.isoformat() if when is not None else None


def _study_and_forget_set(store: Store, name: str) -> tuple[Study, StudySpec, ForgetSet]:
    study = store.study(name)
    with store.read() as s:
        fs = s.get(ForgetSet, study.forgetset_id)
    if fs is None:
        raise UnlearnError(f"study {name!r}: its forget set (id {study.forgetset_id}) is missing from the store")
    return study, study_spec(study), fs


def _baseline(runs: list[Run], run: Run) -> tuple[Optional[dict], Optional[int]]:
    """The original model's metrics: the run's own, else those of a finished run of the same study
    (same model, forget set and evaluation settings, so the same numbers) while this one still runs."""
    for r in [run, *runs]:
        base = (r.result or {}).get("baseline")
        if base:
            return dict(base), r.id
    return None, None


def _target(baseline: Optional[dict]) -> dict:
    """Approximate retraining: the forget set looks like text never seen (forget_gap measures the
    distance of ln ppl_forget to ln ppl_unseen of the original model), and the attacks guess."""
    return {PPL_FORGET: (baseline or {}).get(PPL_UNSEEN), MIA_AUC: MIA_TARGET}


def trial_detail(store: Store, study: str, method: str, lr: float, steps: int, seed: int | None = None) -> dict:
    """Everything about one cell of a study: params, run state and failures, every milestone of its
    run, the original model's metrics and the retraining target, losses, cost and the command that
    reproduces it. Raises UnlearnError (one line) for an unknown study, method, lr or steps.

    In a study with --seeds, "cell" is the mean over the seeds (with its spread) and "per_seed"
    each seed's own; the run shown is `seed`'s (default: the first seed's)."""
    st, spec, fs = _study_and_forget_set(store, study)
    if method not in spec.methods:
        raise UnlearnError(f"study {study!r} has no method {method!r}; its methods: {', '.join(spec.methods)}")
    with store.read() as s:
        runs = list(s.exec(select(Run).where(Run.study_id == st.id, Run.state.in_(REAL_RUN_STATES))).all())
    row_runs = sorted((r for r in runs if r.method == method and _same_lr(r.lr, lr)), key=lambda r: r.seed or 0)
    run = next((r for r in row_runs if seed is None or r.seed == seed), None)
    if run is None and row_runs:
        raise UnlearnError(f"study {study!r}: {method} at lr {lr:g} has no run with seed {seed}; its seeds: "
                           + ", ".join(str(r.seed) for r in row_runs))
    if run is None:
        known = sorted({r.lr for r in runs if r.method == method} | {x for m, x in spec.grid_runs if m == method})
        raise UnlearnError(f"study {study!r}: method {method} has no run at lr {lr:g}"
                           + (f"; its lrs: {', '.join(f'{x:g}' for x in known)}" if known else ""))
    with store.read() as s:
        row_milestones = list(s.exec(select(CellRow).where(CellRow.run_id.in_([r.id for r in row_runs]))
                                     .order_by(CellRow.step)).all())
        events = list(s.exec(select(Event).where(Event.run_id == run.id).order_by(Event.at, Event.id)).all())
    milestones = [m for m in row_milestones if m.run_id == run.id]
    cells = {c.steps: c for c in cells_from_rows(st, row_runs, row_milestones)
             if c.method == method and c.lr == float(run.lr)}
    per_seed = ([{"seed": r.seed, **{k: v for k, v in c.summary().items() if k not in ("lr", "steps")},
                  "status": str(c.status)}
                 for r in row_runs for c in cells_from_rows(st, [r], row_milestones)
                 if c.method == method and c.lr == float(run.lr) and c.steps == int(steps)]
                if len(row_runs) > 1 else None)
    if int(steps) != steps or int(steps) not in cells:
        raise UnlearnError(f"study {study!r} has no milestone at {steps} steps; its steps: "
                           f"{', '.join(str(k) for k in sorted(cells))}")
    cell = cells[int(steps)]
    baseline, baseline_run = _baseline(runs, run)
    result = run.result or {}
    return {
        "study": st.name,
        "model": st.model,
        "forget_set": {"name": fs.name, "hash": fs.hash},
        "method": method,
        "lr": float(run.lr),
        "steps": int(steps),
        "params": {"method": method, "lr": float(run.lr), "steps": int(steps),
                   **spec.run_config(method, run.lr, run.seed).settings.to_dict()},
        "status": str(cell.status),
        "cell": {**cell.summary(), "status": str(cell.status)},
        "seed": run.seed,
        "per_seed": per_seed,
        "trial_number": cell.trial_number,
        "state": str(run.state),
        "attempts": int(run.attempts or 0),
        "max_attempts": int(spec.max_attempts),
        "last_error": run.last_error,
        "device": run.device,
        "host": run.host,
        "run_step": int(run.step or 0),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "reason": result.get("reason"),
        "events": [{"at": _iso(e.at), "kind": e.kind, "message": e.message} for e in events],
        "failures": [{"at": _iso(e.at), "kind": e.kind, "message": e.message} for e in events
                     if e.kind in FAILURE_KINDS],
        "milestones": [{**dict(m.metrics or {}), "step": m.step, "trial_number": m.trial_number,
                        "success": bool(m.success), "diverged": bool(m.diverged or (m.metrics or {}).get("diverged"))}
                       for m in milestones],
        "study_steps": sorted(cells),
        "baseline": baseline,
        "baseline_run": baseline_run,
        "target": _target(baseline),
        "losses": list(result.get("losses") or []),
        "cost": dict(result.get("cost") or {}),
        "command": reproduce_command(st.model, fs, spec, method, run.lr, int(steps), run.seed),
    }


# ---------------------------------------------------------------- compare

def _ref(c: Any) -> tuple[str, str, float, int]:
    """(study, method, lr, steps) of a CellRef-like object or a 4-tuple."""
    if isinstance(c, (tuple, list)):
        study, method, lr, steps = c
    else:
        study, method, lr, steps = c.study, c.method, c.lr, c.steps
    return str(study), str(method), float(lr), int(steps)


def _find(cells: list[Cell], method: str, lr: float, steps: int) -> Optional[Cell]:
    return next((c for c in cells if c.method == method and c.steps == steps and _same_lr(c.lr, lr)), None)


def compare_cells(store: Store, cells: Iterable[Any]) -> dict:
    """Cells (CellRef-like: study, method, lr, steps) side by side, and the Pareto front of
    forget_gap against retain_drift over them. Cells of studies on different forget sets are refused:
    their metrics measure different things."""
    refs = list(dict.fromkeys(_ref(c) for c in cells))  # in order, each once
    if len(refs) < 2:
        raise UnlearnError("compare needs at least two different cells")
    studies: dict[str, tuple[Study, ForgetSet, list[Cell]]] = {}
    for name in dict.fromkeys(r[0] for r in refs):
        st, _spec, fs = _study_and_forget_set(store, name)
        studies[name] = (st, fs, load_cells(store, st))
    hashes = {fs.hash: (name, fs.name) for name, (_st, fs, _cells) in studies.items()}
    if len(hashes) > 1:
        (h1, (s1, f1)), (h2, (s2, f2)) = list(hashes.items())[:2]
        raise UnlearnError(f"cannot compare cells on different forget sets: study {s1} uses {f1} ({h1[:12]}), "
                           f"study {s2} uses {f2} ({h2[:12]})")
    found: list[Cell] = []
    for study, method, lr, steps in refs:
        cell = _find(studies[study][2], method, lr, steps)
        if cell is None:
            raise UnlearnError(f"study {study!r} has no cell {method} lr={lr:g} steps={steps}")
        found.append(cell)
    # studies.reading.grid.pareto works within one method: the compared cells become one pseudo-method.
    pooled = [replace(c, method="compare") for c in found]
    index = {id(c): i for i, c in enumerate(pooled)}
    front = [index[id(c)] for c in pareto(pooled, "compare")]
    fs = next(iter(studies.values()))[1]
    shown = every_run_paths()  # the compare table's rows, in order
    rows = []
    for i, ((study, method, _lr, steps), cell) in enumerate(zip(refs, found)):
        rows.append({"study": study, "method": method, "lr": float(cell.lr), "steps": int(steps),
                     "status": str(cell.status), "success": bool(cell.success), "trial_number": cell.trial_number,
                     "values": {m: cell.value(m) for m in shown}, "pareto": i in front})
    return {"forget_set": {"name": fs.name, "hash": fs.hash}, "metrics": list(shown),
            "cells": rows, "front": front}
