"""The demo's study: the offline workspace (engine/demo.py) registered as a forget set and swept
over the seven methods × a small lr grid × the recipe's milestones by 2 CPU workers.

Before any method runs, θ0's regime and the verdict's two controls are measured (engine/controls.py)
and handed to `on_regime`: the study's figures mean something only if θ0 is in a pre-trained model's
regime, the retrained twin passes the verdict and θ0 fails it.

It lives in the workspace's own store (`W/unlearn.db`), named after the recipe, so a second
`unlearn demo` reuses the finished study instead of recomputing it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from sqlmodel import select

from engine.demo import DEMO_LRS, DEMO_METHODS, DemoRecipe, build_workspace, demo_controls, demo_sources
from engine.errors import UnlearnError
from studies.lifecycle.spec import study_spec
from studies.lifecycle.study import create_study, resume_study
from studies.reading.grid import best_cell, load_at_target, load_cells, robustness
from studies.running.pool import WorkerPool
from studies.store.db import CellRow, Run, Store, Study
from studies.store.forgetsets import create_forget_set
from studies.store.states import REAL_RUN_STATES, StudyState


def demo_store(workspace: Path) -> Store:
    return Store(f"sqlite:///{workspace / 'unlearn.db'}")


def run_demo(workspace: Path, recipe: DemoRecipe, workers: int = 2,
             on_build: Callable[[str, int, int], None] | None = None,
             on_tick: Callable[[dict], None] | None = None,
             on_regime: Callable[[dict], None] | None = None) -> dict:
    manifest = build_workspace(workspace, recipe, on_build)
    refs = demo_controls(workspace, recipe, manifest)
    if on_regime:  # printed before any method runs
        on_regime(refs)
    store = demo_store(workspace)
    name = f"demo-{recipe.name}-{recipe.fingerprint}"
    with store.read() as s:
        study_exists = s.exec(select(Study).where(Study.name == name)).first() is not None
    if not study_exists:
        src = demo_sources(workspace)
        qa = manifest.get("qa") or {}
        fs_name = f"{name}-{refs['forget_set_hash'][:8]}"
        try:
            store.forget_set(fs_name)
        except UnlearnError:  # not there yet
            create_forget_set(store, fs_name, src["forget"], src["retain"], src["unseen"], src["general"],
                              seq_len=recipe.seq_len, tokenizer=str(workspace / "model"),
                              prompt_field=qa.get("prompt_field"), answer_field=qa.get("answer_field"),
                              retain_eval=src["retain_eval"])
        # The twin's spread enters the forget band (engine.controls): the bands of the controls are the study's.
        create_study(store, name, str(workspace / "model"), fs_name, methods=list(DEMO_METHODS),
                     lrs=list(DEMO_LRS[recipe.name]), steps=list(recipe.milestones),
                     batch_size=recipe.run_batch_size, seed=recipe.seed, target_spread=refs["target_spread"])
    study = store.study(name)
    reused = study.state == StudyState.DONE
    if not reused:
        resume_study(store, name, retry_failed=True)
        WorkerPool(store, ["cpu"] * workers, [name], on_tick=on_tick).serve()
    cells = load_cells(store, name)
    at_target = load_at_target(store, name)
    rob = robustness(cells)
    methods = {m: {"robustness": rob.get(m, 0.0),
                   "at_target": [at_target_summary(c) for c in sorted(at_target, key=lambda c: c.lr) if c.method == m]}
               for m in DEMO_METHODS}
    runs = best_runs(store, name, cells)
    for r in runs:
        r.update(methods.get(r["method"], {}))
    return {"workspace": str(workspace), "recipe": manifest["recipe_config"], "cached": manifest.get("cached", False),
            "build_seconds": manifest.get("build_seconds"), "study": name, "study_reused": reused,
            "storage": store.safe_url, "forget_set": refs["forget_set_hash"],
            "regime": refs["regime"], "target": refs["target"], "bands": refs["bands"],
            "controls": refs["controls"], "original": refs["original_metrics"], "retrained": refs["retrained_metrics"],
            "target_error": refs["target_spread"], "methods": methods, "runs": runs, "cells": len(cells)}


def at_target_summary(c) -> dict:
    """An at-target cell as the demo reports it: where, and the verdict there."""
    m = c.metrics or {}
    return {"lr": c.lr, "step": c.steps, "success": bool(c.success), "verdict": m.get("verdict"),
            **{k: m.get(k) for k in ("forget_gap", "retain_eval_drift", "eval_score", "ppl_forget", "mia_auc_lo",
                                     "mia_auc_hi")}}


def best_runs(store: Store, name: str, cells) -> list[dict]:
    """Per method, the run (one lr, every milestone) holding the method's best cell (grid.best_cell),
    and that cell's step as "best_step" (None when every cell of the method diverged or failed)."""
    study = store.study(name)
    spec = study_spec(study)
    with store.read() as s:
        runs = {r.id: r for r in s.exec(select(Run).where(Run.study_id == study.id,
                                                          Run.state.in_(REAL_RUN_STATES))).all()}
        rows = s.exec(select(CellRow).where(CellRow.run_id.in_(list(runs)))).all()  # the cells
    by_run: dict[int, list[dict]] = {}
    for m in rows:
        by_run.setdefault(m.run_id, []).append(m.metrics)
    out = []
    for method in spec.methods:
        cell = best_cell(cells, method)
        run = runs.get(cell.run_id) if cell else None
        if run is None:  # every cell of the method diverged or failed: show its first run
            run = next((r for r in runs.values() if r.method == method), None)
        if run is None:
            continue
        result = run.result or {}
        out.append({"method": method, "lr": run.lr, "seed": spec.run.seed, "state": run.state,
                    "best_step": cell.steps if cell else None,
                    "attempts": run.attempts, "baseline": result.get("baseline"),
                    "milestones": sorted(by_run.get(run.id, []), key=lambda c: c["step"]),
                    "diverged": bool(result.get("diverged")), "reason": result.get("reason"),
                    "cost": result.get("cost"), "device": result.get("device")})
    return out
