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
(ATTACK_EVENTS), so every pool on every node sees it and the job runs once.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Callable, Optional

from sqlmodel import select

from engine.config import parse_attacks, parse_eval_tasks
from engine.errors import UnlearnError
from engine.metric_registry import SCORE
from studies.lifecycle.spec import study_spec
from studies.reading.grid import best_cell, load_cells
from studies.store.db import CellRow, Event, ForgetSet, Store, Study, hostname

# The best-cell attack job's events, in the order they happen. "stopped" (the pool was interrupted,
# or the process that ran it is gone) makes the job due again; "done" and "failed" end it: a
# failed job is not retried by the pool (it costs a run per method), `unlearn study attack` reruns it.
ATTACK_EVENTS = ("attacks started", "attacks stopped", "attacks done", "attacks failed")


def attack_best_cells(store: Store, name: str, attacks: Optional[str] = None, method: Optional[str] = None, device: str = "auto",
                      on_cell: Optional[Callable[[dict], None]] = None, eval_tasks: Optional[str] = None) -> list[dict]:
    """Per method (or only `method`): {"method", "lr", "steps", "score", "rerun_score", "reproduced",
    "<attack>_recovery"..., "downstream.<task>"...}; each cell's stored metrics gain "attacks" and the
    recoveries, and "downstream". `attacks` None: the ones the study was created with; `eval_tasks`
    None: the study's --eval-tasks when it evaluates them at the best cells ("" : none)."""
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
                                trust_remote_code=bool(spec.trust_remote_code))
        cell = result["milestones"][-1]
        found = {"attacks": cell.get("attacks", {}), **{f"{a}_recovery": cell.get(f"{a}_recovery") for a in names}}
        downstream = {t: (cell.get("downstream") or {}).get(t) for t in tasks}
        with store.write() as s:
            ms = s.exec(select(CellRow).where(CellRow.run_id == best.run_id, CellRow.step == best.steps)).one()
            old = ms.metrics or {}
            ms.metrics = {**old, **found, "attacks": {**old.get("attacks", {}), **found["attacks"]},
                          **({"downstream": {**old.get("downstream", {}), **downstream}} if tasks else {})}
            s.add(ms)
        row = {"method": best.method, "lr": best.lr, "steps": best.steps, "score": best.score, "rerun_score": cell.get(SCORE),
               "reproduced": cell.get(SCORE) == best.score, "device": result["device"],
               **{f"{a}_recovery": found[f"{a}_recovery"] for a in names},
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


def attack_job_state(store: Store, study_id: int) -> tuple[str | None, Event | None]:
    """The last best-cell attack event of a study: (its kind without "attacks ", the event), or
    (None, None) when the job never started."""
    with store.read() as s:
        last = s.exec(select(Event).where(Event.study_id == study_id, Event.kind.in_(ATTACK_EVENTS))
                      .order_by(Event.id.desc()).limit(1)).first()
    return (last.kind.split(" ", 1)[1], last) if last is not None else (None, None)


def claim_attack_job(store: Store, study: Study, owner_alive: Callable[[Event], bool]) -> bool:
    """Start the study's best-cell attack job if it is due: never started, stopped, or started by a
    pool that is gone (`owner_alive(its "attacks started" event)` says). One write transaction, so
    one pool wins; the event names this process (pid, host) for the others to check."""
    with store.write() as s:
        s.exec(select(Study).where(Study.id == study.id).with_for_update()).first()  # PostgreSQL: one claimer
        last = s.exec(select(Event).where(Event.study_id == study.id, Event.kind.in_(ATTACK_EVENTS))
                      .order_by(Event.id.desc()).limit(1)).first()
        if last is not None and (last.kind in ("attacks done", "attacks failed")
                                 or (last.kind == "attacks started" and owner_alive(last))):
            return False
        pid, host = os.getpid(), hostname()
        s.add(Event(study_id=study.id, kind="attacks started", pid=pid, host=host,
                    message=f"best-cell attacks started by pid {pid} on {host}"))
    return True


def main(argv: list[str] | None = None) -> int:
    """The pool's best-cell job: `python -m studies.running.attack --study NAME --device D`: the attacks saved
    for the best cells (--attacks-at best) and the --eval-tasks saved for them (--eval-tasks-at best)."""
    from studies.settings import lab_settings

    p = argparse.ArgumentParser(description="Run a study's attacks and/or downstream tasks at each method's best "
                                            "cell (started by a worker pool); the store's URL comes from "
                                            "UNLEARN_STORAGE_URL.")
    p.add_argument("--study", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    store = Store(lab_settings().storage_url, create=False)
    study = store.study(a.study)

    spec = study_spec(study)
    rows = attack_best_cells(store, a.study, attacks=spec.run.attacks if spec.attacks_at == "best" else "",
                             device=a.device, on_cell=lambda row: print(describe_row(row), flush=True))
    done = sum(1 for r in rows if "skipped" not in r)
    what = " and ".join(w for w, on in (("attacks", spec.attacks_at == "best" and spec.run.attacks),
                                        ("downstream tasks", spec.wants_best_cell_tasks)) if on)
    store.log("attacks done", f"best-cell {what} done: {done} of {len(rows)} methods", study.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
