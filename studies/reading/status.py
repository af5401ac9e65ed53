"""Where a study stands, as one plain dict (for `unlearn status --json`, the CLI summary and the app).

Read-only: a few queries (study, forget set, runs, milestones), never one per run or cell. The list
of every study (`list_studies`) reads counts that SQL aggregates, never the cells' metrics, so it
stays fast on a store of many studies and trials."""
from __future__ import annotations

from typing import Optional

from sqlalchemy import and_, case, func
from sqlmodel import select

from studies.lifecycle.spec import StudySpec, study_spec
from studies.reading.grid import (
    best,
    cells_from_rows,
    count_status,
    fetch_rows,
    grids,
    load_cells,
    original_note,
    robustness,
)
from studies.reading.listing import fold_at_target, list_row
from studies.store.clock import age_s
from studies.store.db import CellRow, ForgetSet, Run, Store, Study
from studies.store.states import REAL_RUN_STATES, RunState

RUN_STATES = tuple(str(s) for s in RunState if s in REAL_RUN_STATES)


def _total_runs(spec: StudySpec, runs: list[Run]) -> int:
    if spec.sampler == "grid" and spec.seeds:
        return len({(m, float(lr), seed) for m, lr, seed in spec.grid_seeded_runs}
                   | {(r.method, float(r.lr), r.seed) for r in runs})
    if spec.sampler == "grid":
        return len({(m, float(lr)) for m, lr in spec.grid_runs} | {(r.method, float(r.lr)) for r in runs})
    return max(int(spec.trials or 0), len(runs))


def _summarize(study: Study, fs: Optional[ForgetSet], runs: list[Run], cells: list) -> dict:
    spec = study_spec(study)
    steps = sorted({c.steps for c in cells}) or list(spec.steps)
    total_runs = _total_runs(spec, runs)
    run_counts = {s: sum(1 for r in runs if r.state == s) for s in RUN_STATES}
    run_counts[RunState.PENDING] += max(0, total_runs - len(runs))  # grid runs not created yet / TPE trials not asked yet
    counts = count_status(cells)
    total_cells = total_runs // len(spec.run_seeds) * len(steps)  # a cell is a row's, over its seeds
    cell_counts = {"total": total_cells, "done": counts["done"], "diverged": counts["diverged"],
                   "failed": counts["failed"], "running": counts["running"], "cancelled": counts["cancelled"]}
    cell_counts["pending"] = max(0, total_cells - sum(v for k, v in cell_counts.items() if k != "total"))
    return {
        "name": study.name,
        "state": study.state,
        "model": study.model,
        "forget_set": {"name": fs.name if fs else spec.forget_set, "hash": fs.hash if fs else spec.forget_set_hash},
        "sampler": spec.sampler,
        "methods": list(spec.methods),
        "steps": steps,
        "lrs": list(spec.lrs) if spec.lrs else None,
        "lr_range": list(spec.lr_range) if spec.lr_range else None,
        "cells": cell_counts,
        "runs": {"total": total_runs, **run_counts, "attempts": sum(r.attempts or 0 for r in runs)},
        "robustness": robustness(cells),
        "best": best(cells),
        "created_at": study.created_at.isoformat() if study.created_at else None,
    }


def study_status(store: Store, name: str) -> dict:
    """Counts of cells and runs, the running runs, robustness and best cell per method, the
    worker pool's liveness and the errors of failed or retried runs."""
    study = store.study(name)
    with store.read() as s:
        fs = s.get(ForgetSet, study.forgetset_id)
    runs, milestones = fetch_rows(store, [study.id])
    cells = cells_from_rows(study, runs, milestones)
    out = _summarize(study, fs, runs, cells)
    now = store.now()  # the clock heartbeats are written on
    from studies.reading.views import running_runs

    out["running"] = running_runs(study, runs, now)
    out["slurm"] = slurm_status(store, study)
    out["scheduler"] = {"pid": study.scheduler_pid, "host": study.scheduler_host,
                        "alive_s_ago": age_s(study.scheduler_heartbeat, now)}
    out["errors"] = [
        {"run_id": r.id, "method": r.method, "lr": r.lr, "state": r.state, "attempts": r.attempts, "error": r.last_error}
        for r in sorted(runs, key=lambda r: (r.method, r.lr))
        if r.last_error and (r.state == RunState.FAILED or (r.attempts or 0) > 1)
    ]
    # θ0's figures as the runs measured them: the target ± its band, and a line when θ0 itself passes
    # a part of the verdict (grid.original_note), as `study heatmap` and the demo print
    base = next((b for r in sorted(runs, key=lambda r: r.id or 0)
                 if "verdict" in (b := (r.result or {}).get("baseline") or {})), None)
    out["target"] = (base or {}).get("target")
    out["original_note"] = original_note(base)
    out["seeds"] = list(study_spec(study).run_seeds)
    out["grids"] = {m: {"lrs": g.lrs, "steps": g.steps, "successes": g.successes, "size": g.size}
                    for m, g in grids(cells).items()}
    return out


def slurm_status(store: Store, study) -> dict:
    """The job arrays submitted for the study and what `squeue` says of each (none: {"arrays": []})."""
    from studies.running.slurm import array_queue, study_arrays

    arrays = study_arrays(store, study)
    queue = array_queue(arrays)
    return {"arrays": [{"array": a, "queue": queue.get(a)} for a in arrays]}


def list_studies(store: Store, now=None) -> list[dict]:
    """Every study, oldest first: name, state, model, forget set, methods, cells done/total,
    robustness per method, best score, the worker pool's last heartbeat. Three queries in all."""
    with store.read() as s:
        studies = list(s.exec(select(Study).order_by(Study.created_at, Study.id)).all())
        sets = {f.id: f for f in s.exec(select(ForgetSet)).all()}
        ok = and_(CellRow.id.is_not(None), CellRow.diverged.is_(False))
        # a run's at-target cell in a row of its own, with its step (listing.fold_at_target)
        at_step = case((CellRow.metrics["at_target"].as_boolean(), CellRow.step), else_=None)
        per_run = s.exec(
            select(Run.id, Run.study_id, Run.method, Run.state, func.count(CellRow.id),
                   func.sum(case((CellRow.diverged.is_(True), 1), else_=0)),
                   func.sum(case((and_(ok, CellRow.success.is_(True)), 1), else_=0)),
                   func.min(case((ok, CellRow.score), else_=None)), at_step)
            .outerjoin(CellRow, CellRow.run_id == Run.id)
            .where(Run.state.in_(REAL_RUN_STATES))
            .group_by(Run.id, at_step)).all()
    by_study: dict[int, list] = {}
    for row in per_run:
        by_study.setdefault(row[1], []).append(row)
    now = now or store.now()
    out = []
    for st in studies:
        spec = study_spec(st)
        row = list_row(st, spec, sets.get(st.forgetset_id), fold_at_target(by_study.get(st.id, []), spec.steps), now)
        out.append(seeded_list_row(row, load_cells(store, st)) if spec.seeds else row)
    return out


def seeded_list_row(row: dict, cells: list) -> dict:
    """A study with --seeds: its line's cells, robustness and best score are those of its cells as
    means over the seeds (studies.reading.seeds), which per-run aggregates cannot give."""
    counts = count_status(cells)
    scores = [c.score for c in cells if c.computed and c.score is not None]
    return {**row, "cells": {"done": counts["done"], "diverged": counts["diverged"], "total": len(cells)},
            "robustness": robustness(cells), "best_score": min(scores) if scores else None}
