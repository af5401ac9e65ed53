"""Attacks and downstream tasks at each method's best cell, after a study: `unlearn study attack NAME
--attacks ...` (and the study's --eval-tasks, when it was created with --eval-tasks-at best).

Attacking every cell (`--attacks` on `study create`) costs a model copy and an evaluation per
attack per cell; most of the time a researcher wants to know whether the *best* forgetting a
method found holds. This reruns each method's best cell (the same run settings: on CPU the rerun
is bitwise the stored cell, which the result says) with the attacks, and writes what they found
into that cell's metrics in the store, so `study heatmap --metric relearn_recovery`, the app and
exports show it there. The cell's Optuna trial keeps what it recorded when it finished: Optuna
does not let a finished trial change, and this tool does not go around its API.

The same rerun evaluates the study's lm-eval tasks (`--eval-tasks ...`, at the best cells by default:
`--eval-tasks-at best`) and stores `downstream.{task}` in that cell, so one rerun per method serves
both.

A study created with `--attacks ... --attacks-at best` or `--eval-tasks ...` (at best) does this by
itself: once its runs are done,
the worker pool starts `python -m studies.running.attack --study NAME` in a free slot (its own process, like
a run), and marks the study done when it ends. Where that job stands is kept as events of the study
(studies/running/attack_job.py), so every pool on every node sees it and the job runs once.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Callable, Optional

from sqlmodel import select

from engine.config import parse_attacks, parse_eval_tasks
from engine.errors import UnlearnError
from engine.metric_registry import SCORE
from studies.lifecycle.spec import study_spec
from studies.reading.grid import best_cell, load_cells
from studies.store.db import CellRow, ForgetSet, Store


def attack_best_cells(store: Store, name: str, attacks: Optional[str] = None, method: Optional[str] = None, device: str = "auto",
                      on_cell: Optional[Callable[[dict], None]] = None, eval_tasks: Optional[str] = None,
                      on_step: Optional[Callable[[int, float], None]] = None) -> list[dict]:
    """Per method (or only `method`): {"method", "lr", "steps", "score", "rerun_score", "reproduced",
    "<attack>_recovery"..., "downstream.<task>"...}; each cell's stored metrics gain "attacks" and the
    recoveries, and "downstream". `attacks` None: the ones the study was created with; `eval_tasks`
    None: the study's --eval-tasks when it evaluates them at the best cells ("" : none). `on_step`
    is each rerun's step callback (the pool's job stops through it once another pool took it over)."""
    from engine.metric_registry import ATTACK_ROBUSTNESS, ROBUSTNESS_ATTACKS, wants_robustness
    from engine.recovery import attack_robustness
    from engine.run import run_unlearning
    from studies.settings import lab_settings
    from studies.store.forgetsets import forget_set_texts

    study = store.study(name)
    spec = study_spec(study)
    names = parse_attacks(attacks if attacks is not None else spec.run.attacks)
    tasks = parse_eval_tasks(eval_tasks if eval_tasks is not None
                             else spec.run.eval_tasks if spec.wants_best_cell_tasks else "")
    if not names and not tasks:
        raise UnlearnError("--attacks: name at least one of relearn, quant4, quant8 "
                           "(the study was not created with any, nor with --eval-tasks at the best cells)")
    methods = list(spec.methods)
    if method is not None:
        if method not in methods:
            raise UnlearnError(f"study {name!r} has no method {method!r}; its methods: {', '.join(methods)}")
        methods = [method]
    cells = load_cells(store, name)
    with store.read() as s:
        fs = s.get(ForgetSet, study.forgetset_id)
    texts = forget_set_texts(store, fs)
    out = []
    for m in methods:
        best = best_cell(cells, m, spec.knob_ranges)
        if best is None:
            out.append({"method": m, "skipped": "no computed cell"})
            continue
        cfg = replace(spec.run_config(best.method, best.lr), milestones=(best.steps,), attacks=",".join(names),
                      eval_tasks=",".join(tasks), eval_tasks_dir=spec.run.eval_tasks_dir if tasks else "",
                      eval_tasks_limit=spec.run.eval_tasks_limit if tasks else 0).validate()
        result = run_unlearning(spec.model, texts, cfg, device=device, cache_dir=lab_settings().baseline_cache,
                                trust_remote_code=bool(spec.trust_remote_code), on_step=on_step)
        cell = result["milestones"][-1]
        found = {"attacks": cell.get("attacks", {}), **{f"{a}_recovery": cell.get(f"{a}_recovery") for a in names}}
        downstream = {t: (cell.get("downstream") or {}).get(t) for t in tasks}
        with store.write() as s:
            ms = s.exec(select(CellRow).where(CellRow.run_id == best.run_id, CellRow.step == best.steps)).one()
            old = ms.metrics or {}
            merged = {**old, **found, "attacks": {**old.get("attacks", {}), **found["attacks"]},
                      **({"downstream": {**old.get("downstream", {}), **downstream}} if tasks else {})}
            done = {a: merged[f"{a}_recovery"] for a in ROBUSTNESS_ATTACKS if f"{a}_recovery" in merged}
            if wants_robustness(tuple(done)):  # from every recovery the cell has now, this rerun's or earlier ones
                merged[ATTACK_ROBUSTNESS] = attack_robustness(done)
            ms.metrics = merged
            s.add(ms)
        row = {"method": best.method, "lr": best.lr, "steps": best.steps, "score": best.score, "rerun_score": cell.get(SCORE),
               "reproduced": cell.get(SCORE) == best.score, "device": result["device"],
               **{f"{a}_recovery": found[f"{a}_recovery"] for a in names},
               **({ATTACK_ROBUSTNESS: merged[ATTACK_ROBUSTNESS]} if ATTACK_ROBUSTNESS in merged else {}),
               **{f"downstream.{t}": v for t, v in downstream.items()}}
        out.append(row)
        if on_cell:
            on_cell(row)
    return out


def describe_row(row: dict) -> str:
    """One attacked (or evaluated) best cell in words (the CLI's progress line and the job's log)."""
    def num(v):
        return "—" if v is None else f"{v:.3g}"

    rec = "  ".join(f"{k.removesuffix('_recovery')} {num(v)}" for k, v in row.items() if k.endswith("_recovery"))
    tasks = "  ".join(f"{k.removeprefix('downstream.')} {num(v)}" for k, v in row.items() if k.startswith("downstream."))
    parts = ([f"recovery {rec}"] if rec else []) + ([f"downstream {tasks}"] if tasks else [])
    same = "" if row["reproduced"] else f"  (rerun score {num(row['rerun_score'])}, stored {num(row['score'])})"
    return f"{row['method']} lr {row['lr']:g} × {row['steps']} steps: {';  '.join(parts)}{same}"


def main(argv: list[str] | None = None) -> int:
    """The pool's best-cell job: `python -m studies.running.attack --study NAME --device D --claim N`:
    the attacks saved for the best cells (--attacks-at best) and the --eval-tasks saved for them
    (--eval-tasks-at best). It beats while its claim holds and stops, writing nothing more, once
    another pool has claimed the job (exit code 4)."""
    from studies.running.attack_job import AttackBeat, AttackJobLost, log_attack_event
    from studies.running.worker import HEARTBEAT_EVERY_S
    from studies.settings import lab_settings

    p = argparse.ArgumentParser(description="Run a study's attacks and/or downstream tasks at each method's best "
                                            "cell (started by a worker pool); the store's URL comes from "
                                            "UNLEARN_STORAGE_URL.")
    p.add_argument("--study", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--claim", type=int, default=None, help="the pool's claim on the job (its 'attacks started' event)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    store = Store(lab_settings().storage_url, create=False)
    study = store.study(a.study)

    spec = study_spec(study)
    beat = AttackBeat(store, study.id, a.claim, HEARTBEAT_EVERY_S) if a.claim is not None else None
    if beat is not None:
        store.retry(beat.beat)  # at once: a job superseded before it began does nothing
        if beat.lost:
            print(f"claim {a.claim} on the best-cell attack job is no longer the study's; nothing done", flush=True)
            return 4
        beat.start()
    try:
        rows = attack_best_cells(store, a.study, attacks=spec.run.attacks if spec.attacks_at == "best" else "",
                                 device=a.device, on_cell=lambda row: print(describe_row(row), flush=True),
                                 on_step=(lambda step, loss: beat.check()) if beat is not None else None)
        if beat is not None:
            beat.check()
    except AttackJobLost as lost:
        print(f"{lost}; stopping, nothing more written", flush=True)
        return 4
    finally:
        if beat is not None:
            beat.stop()
    done = sum(1 for r in rows if "skipped" not in r)
    what = " and ".join(w for w, on in (("attacks", spec.attacks_at == "best" and spec.run.attacks),
                                        ("downstream tasks", spec.wants_best_cell_tasks)) if on)
    if not log_attack_event(store, study.id, a.claim, "attacks done", f"best-cell {what} done: {done} of {len(rows)} methods"):
        print("another pool took the job over meanwhile; 'attacks done' not written", flush=True)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
