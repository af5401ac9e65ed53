"""Where a study stands, as one plain dict (for `unlearn status --json`, the CLI summary and the app).

Read-only: a few queries (study, forget set, runs, milestones), never one per run or cell."""
from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlmodel import select

from studies.grid import best, cells_from_rows, count_status, fetch_rows, grids, robustness
from studies.spec import StudySpec
from studies.store import ForgetSet, Run, Store, Study, utcnow

RUN_STATES = ("pending", "running", "done", "diverged", "failed", "cancelled")


def age_s(when: Optional[dt.datetime], now: Optional[dt.datetime] = None) -> Optional[float]:
    """Seconds since `when` (SQLite gives naive datetimes back: they are UTC)."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, ((now or utcnow()) - when).total_seconds())


def _total_runs(spec: StudySpec, runs: list[Run]) -> int:
    if spec.sampler == "grid":
        return len({(m, float(lr)) for m, lr in spec.grid_runs} | {(r.method, float(r.lr)) for r in runs})
    return max(int(spec.trials or 0), len(runs))


def _summarize(study: Study, fs: Optional[ForgetSet], runs: list[Run], milestones: list) -> dict:
    spec = StudySpec.from_dict(study.spec)
    runs = [r for r in runs if r.study_id == study.id]
    cells = cells_from_rows(study, runs, milestones)
    steps = sorted({c.steps for c in cells}) or list(spec.steps)
    total_runs = _total_runs(spec, runs)
    run_counts = {s: sum(1 for r in runs if r.state == s) for s in RUN_STATES}
    run_counts["pending"] += max(0, total_runs - len(runs))  # grid runs not created yet / TPE trials not asked yet
    counts = count_status(cells)
    total_cells = total_runs * len(steps)
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
        "_cells": cells,
        "_runs": runs,
    }


def study_status(store: Store, name: str) -> dict:
    """Counts of cells and runs, the running runs, robustness and best cell per method, the
    scheduler's liveness and the errors of failed or retried runs."""
    study = store.study(name)
    with store.read() as s:
        fs = s.get(ForgetSet, study.forgetset_id)
    runs, milestones = fetch_rows(store, [study.id])
    out = _summarize(study, fs, runs, milestones)
    cells, runs = out.pop("_cells"), out.pop("_runs")
    now = utcnow()
    out["running"] = [
        {"method": r.method, "lr": r.lr, "step": r.step, "device": r.device, "pid": r.pid, "host": r.host,
         "heartbeat_age_s": age_s(r.heartbeat, now), "attempts": r.attempts}
        for r in sorted(runs, key=lambda r: (out["methods"].index(r.method) if r.method in out["methods"] else 99, r.lr))
        if r.state == "running"
    ]
    out["scheduler"] = {"pid": study.scheduler_pid, "host": study.scheduler_host,
                        "alive_s_ago": age_s(study.scheduler_heartbeat, now)}
    out["errors"] = [
        {"method": r.method, "lr": r.lr, "state": r.state, "attempts": r.attempts, "error": r.last_error}
        for r in sorted(runs, key=lambda r: (r.method, r.lr))
        if r.last_error and (r.state == "failed" or (r.attempts or 0) > 1)
    ]
    out["grids"] = {m: {"lrs": g.lrs, "steps": g.steps, "successes": g.successes, "size": g.size}
                    for m, g in grids(cells).items()}
    return out


def list_studies(store: Store) -> list[dict]:
    """Every study, oldest first: name, state, model, forget set, methods, cells done/total, robustness."""
    with store.read() as s:
        studies = list(s.exec(select(Study).order_by(Study.created_at, Study.id)).all())
        sets = {f.id: f for f in s.exec(select(ForgetSet)).all()}
    runs, milestones = fetch_rows(store, [st.id for st in studies])
    out = []
    for st in studies:
        d = _summarize(st, sets.get(st.forgetset_id), runs, milestones)
        d.pop("_cells"), d.pop("_runs")
        out.append({"name": d["name"], "state": d["state"], "model": d["model"], "forget_set": d["forget_set"],
                    "sampler": d["sampler"], "methods": d["methods"], "steps": d["steps"],
                    "cells": {"done": d["cells"]["done"], "diverged": d["cells"]["diverged"],
                              "total": d["cells"]["total"]},
                    "robustness": d["robustness"], "created_at": d["created_at"]})
    return out
