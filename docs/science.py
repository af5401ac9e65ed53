"""The measurement behind docs/science.md: every runnable method on the full demo, one grid fixed in
advance, then the attacks at each method's best cell.

    python docs/science.py --workspace science-ws [--workers 2] [--json results.json]

The grid was fixed before any of it ran and is not tuned afterwards: learning rates 1e-4, 3e-4,
1e-3 × milestones 10, 20, 40, 80, 160, each method's default knobs, the demo's run settings
(batch 8, sequence length 128, seed 0) and the design's success tolerances (0.10 forget, 0.05
retain). The full demo's workspace (corpus, tokenizer, the model that memorized it and its exactly
retrained twin) is built on the first run and reused. After the study, each method's best cell
(lowest score; ties to fewer steps, then the lower lr) is run again with
`--attacks relearn,quant4,quant8`, and its recoveries are reported. It prints a Markdown table and
writes every figure to --json."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SCIENCE_LRS = (1e-4, 3e-4, 1e-3)
SCIENCE_STEPS = (10, 20, 40, 80, 160)
ATTACKS = "relearn,quant4,quant8"


def fmt(x, spec=".3g") -> str:
    return "—" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True, help="the full demo's workspace (built when missing)")
    ap.add_argument("--workers", type=int, default=2, help="CPU worker processes for the study")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()

    from engine.config import RunConfig
    from engine.data import load_forget_set
    from engine.demo import FULL, build_workspace, demo_sources, reference_metrics
    from engine.methods import list_methods
    from engine.run import run_unlearning
    from studies.lifecycle.demo import demo_store
    from studies.lifecycle.study import create_study, resume_study
    from studies.reading.grid import best_cell, grids, load_cells
    from studies.running.pool import WorkerPool
    from studies.store.forgetsets import create_forget_set

    ws = args.workspace.resolve()
    t0 = time.perf_counter()
    build_workspace(ws, FULL, lambda what, i, n: None)
    refs = reference_metrics(ws, FULL)
    store = demo_store(ws)
    fs_name = f"science-{refs['forget_set_hash'][:8]}"
    src = demo_sources(ws)
    try:
        store.forget_set(fs_name)
    except Exception:  # noqa: BLE001 - not there yet
        create_forget_set(store, fs_name, src["forget"], src["retain"], src["unseen"], src["general"],
                          seq_len=FULL.seq_len, tokenizer=str(ws / "model"))
    methods = [m.id for m in list_methods()]
    name = f"science-{FULL.fingerprint}-{len(methods)}"
    try:
        store.study(name)
    except Exception:  # noqa: BLE001 - not there yet
        create_study(store, name, str(ws / "model"), fs_name, methods=methods, lrs=list(SCIENCE_LRS),
                     steps=list(SCIENCE_STEPS), batch_size=FULL.run_batch_size, seed=FULL.seed)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if str(store.study(name).state) != "done":
        resume_study(store, name, retry_failed=True)
        WorkerPool(store, ["cpu"] * args.workers, [name]).serve()
    study_s = time.perf_counter() - t1

    cells = load_cells(store, name)
    by_method = grids(cells)
    texts = load_forget_set(src["forget"], src["retain"], src["unseen"], src["general"])
    rows, t2 = [], time.perf_counter()
    for m in methods:
        g, best = by_method.get(m), best_cell(cells, m)
        row = {"method": m, "robustness": g.robustness if g else None, "cells": g.size if g else 0,
               "diverged": sum(1 for c in cells if c.method == m and str(c.status) == "diverged"),
               "best": None, "attacks": None}
        if best is not None:
            row["best"] = {"lr": best.lr, "steps": best.steps, **{k: best.value(k) for k in (
                "score", "forget_gap", "retain_drift", "ppl_forget", "ppl_retain", "mia_auc.loss", "mia_auc.min_k_pp")},
                "success": best.success}
            cfg = RunConfig(method=m, lr=best.lr, milestones=(best.steps,), batch_size=FULL.run_batch_size,
                            seq_len=FULL.seq_len, seed=FULL.seed, attacks=ATTACKS)
            out = run_unlearning(str(ws / "model"), texts, cfg, device="cpu")
            cell = out["milestones"][-1]
            assert cell["score"] == row["best"]["score"], (m, cell["score"], row["best"]["score"])  # the same cell again
            row["attacks"] = {a: {"recovery": cell.get(f"{a}_recovery"), "ppl_forget": cell["attacks"][a]["ppl_forget"],
                                  "mia_auc_loss": cell["attacks"][a]["mia_auc"]["loss"]} for a in cell.get("attacks", {})}
        rows.append(row)
        print(f"{m}: best {row['best'] and (row['best']['lr'], row['best']['steps'], row['best']['score'])}", flush=True)
    attack_s = time.perf_counter() - t2

    result = {"study": name, "storage": store.safe_url, "grid": {"lrs": SCIENCE_LRS, "steps": SCIENCE_STEPS},
              "original": refs["original"], "retrained": refs["retrained"], "target_error": refs["target_error"],
              "seconds": {"build": build_s, "study": study_s, "attacks": attack_s}, "methods": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print("\n| method | robustness | best cell (lr × steps) | score | forget_gap | retain_drift | MIA AUC (loss) "
          "| relearn | quant4 | quant8 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, a = r["best"], r["attacks"] or {}
        rec = [fmt((a.get(k) or {}).get("recovery"), ".2f") for k in ("relearn", "quant4", "quant8")]
        print(f"| `{r['method']}` | {fmt(r['robustness'], '.0%')} | "
              + (f"{b['lr']:g} × {b['steps']} | {fmt(b['score'])} | {fmt(b['forget_gap'])} | {fmt(b['retain_drift'])} | "
                 f"{fmt(b['mia_auc.loss'])} | " if b else "— | — | — | — | — | ")
              + " | ".join(rec) + " |")
    print(f"\nbuild {build_s:.0f} s · study {study_s:.0f} s · attacks {attack_s:.0f} s")


if __name__ == "__main__":
    main()
