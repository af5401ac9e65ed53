"""Attacks at each method's best cell, after a study: `unlearn study attack NAME --attacks ...`.

Attacking every cell (`--attacks` on `study create`) costs a model copy and an evaluation per
attack per milestone; most of the time a researcher wants to know whether the *best* forgetting a
method found holds. This reruns each method's best cell (the same run settings: on CPU the rerun
is bitwise the stored cell, which the result says) with the attacks, and writes what they found
into that cell's metrics in the store, so `study heatmap --metric relearn_recovery`, the app and
exports show it there. The cell's Optuna trial keeps what it recorded when it finished: Optuna
does not let a finished trial change, and this tool does not go around its API.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from sqlmodel import select

from engine.config import parse_attacks
from engine.errors import UnlearnError
from studies.grid import best_cell, load_cells
from studies.spec import StudySpec
from studies.store import ForgetSet, Milestone, Store


def attack_best_cells(store: Store, name: str, attacks: str, method: Optional[str] = None, device: str = "auto",
                      on_cell: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Per method (or only `method`): {"method", "lr", "steps", "score", "rerun_score", "reproduced",
    "<attack>_recovery"...}; each cell's stored metrics gain "attacks" and the recoveries."""
    from engine.run import run_unlearning
    from engine.settings import get_settings
    from studies.forgetsets import forget_set_texts

    names = parse_attacks(attacks)
    if not names:
        raise UnlearnError("--attacks: name at least one of relearn, quant4, quant8")
    study = store.study(name)
    spec = StudySpec.from_dict(study.spec)
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
        best = best_cell(cells, m)
        if best is None:
            out.append({"method": m, "skipped": "no computed cell"})
            continue
        cfg = replace(spec.run_config(m, best.lr), milestones=(best.steps,), attacks=",".join(names)).validate()
        result = run_unlearning(spec.model, texts, cfg, device=device, cache_dir=get_settings().baseline_cache,
                                trust_remote_code=bool(spec.trust_remote_code))
        cell = result["milestones"][-1]
        found = {"attacks": cell.get("attacks", {}), **{f"{a}_recovery": cell.get(f"{a}_recovery") for a in names}}
        with store.write() as s:
            ms = s.exec(select(Milestone).where(Milestone.run_id == best.run_id, Milestone.step == best.steps)).one()
            ms.metrics = {**(ms.metrics or {}), **found,
                          "attacks": {**(ms.metrics or {}).get("attacks", {}), **found["attacks"]}}
            s.add(ms)
        row = {"method": m, "lr": best.lr, "steps": best.steps, "score": best.score, "rerun_score": cell.get("score"),
               "reproduced": cell.get("score") == best.score, "device": result["device"],
               **{f"{a}_recovery": found[f"{a}_recovery"] for a in names}}
        out.append(row)
        if on_cell:
            on_cell(row)
    return out
