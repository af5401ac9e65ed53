"""Where the demo's original model θ0 sits: build the QUICK and FULL workspaces (engine/demo.py) into
temporary folders and print θ0's regime figures, the retrained twin's, and the build times.

The bands are fixed in advance (a pre-trained LLM's regime: it generalizes, and it remembered its
fine-tuning set a little, not by rote):
  ppl_unseen / ppl_retain_eval <= 3;  0.05 <= ln(ppl_unseen / ppl_forget) <= 1.5;  0.65 <= loss-MIA AUC <= 0.95
and the build within its time budget (QUICK 45 s, FULL 150 s, on 2 CPU cores). The twin's figures are
reported, not checked. Exit status 0 when every recipe passes.

    python bench/demo_regime.py [--recipes quick,full] [--seeds 0,1] [--json]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/demo_regime.py` puts bench/ first on the path
    sys.path.insert(0, str(ROOT))

BUDGET_S = {"quick": 45.0, "full": 150.0}


def measure(recipe) -> dict:
    from engine.demo import build_workspace, demo_controls
    from engine.metric_registry import MIA_AUC, PPL_FORGET, PPL_RETAIN_EVAL, PPL_UNSEEN

    ws = Path(tempfile.mkdtemp(prefix=f"demo-regime-{recipe.name}-"))
    try:
        t0 = time.perf_counter()
        manifest = build_workspace(ws, recipe)
        build_s = time.perf_counter() - t0
        refs = demo_controls(ws, recipe, manifest)  # the regime and controls `unlearn demo` prints
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    regime, theta0, twin = refs["regime"], refs["original_metrics"], refs["retrained_metrics"]
    roles = {"forget": PPL_FORGET, "retain_eval": PPL_RETAIN_EVAL, "unseen": PPL_UNSEEN}
    figures = {k: regime[k] for k in regime["bands"]}
    figures["ppl"] = {r: theta0[p] for r, p in roles.items()}
    figures["twin"] = {"ln_forget_twin_minus_ln_unseen_theta0": math.log(twin[PPL_FORGET] / theta0[PPL_UNSEEN]),
                       "mia_auc_loss": twin[MIA_AUC]["loss"],
                       "ln_retain_eval_twin_minus_theta0": math.log(twin[PPL_RETAIN_EVAL] / theta0[PPL_RETAIN_EVAL]),
                       "ppl": {r: twin[p] for r, p in roles.items()}, "success": refs["controls"]["retrained"]["success"]}
    inside = regime["inside"]
    return {"recipe": recipe.name, "seed": recipe.seed, "build_s": build_s, "timings": manifest["timings"],
            "roles": manifest["roles"], "parameters": manifest["original"]["parameters"], **figures,
            "inside": inside, "in_time": build_s <= BUDGET_S[recipe.name],
            "pass": all(inside.values()) and build_s <= BUDGET_S[recipe.name]}


def show(r: dict) -> None:
    t = r["twin"]
    print(f"{r['recipe']} seed {r['seed']}: build {r['build_s']:.1f} s (budget {BUDGET_S[r['recipe']]:.0f} s; "
          + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()) + f"), {r['parameters']:,} parameters, "
          + "documents " + ", ".join(f"{k} {v}" for k, v in r["roles"].items()))
    print(f"  θ0:   ppl_unseen/ppl_retain_eval {r['ppl_unseen_over_retain_eval']:.3f} (≤ 3)   "
          f"ln(ppl_unseen/ppl_forget) {r['ln_unseen_over_forget']:.3f} (0.05–1.5)   "
          f"loss-MIA AUC {r['mia_auc_loss']:.3f} (0.65–0.95)   "
          + "ppl " + ", ".join(f"{k} {v:.3f}" for k, v in r["ppl"].items()))
    print(f"  twin: ln ppl_forget(twin) − ln ppl_unseen(θ0) {t['ln_forget_twin_minus_ln_unseen_theta0']:+.3f}   "
          f"loss-MIA AUC forget vs unseen {t['mia_auc_loss']:.3f}   "
          f"ln ppl_retain_eval(twin) − ln ppl_retain_eval(θ0) {t['ln_retain_eval_twin_minus_theta0']:+.3f}   "
          + "ppl " + ", ".join(f"{k} {v:.3f}" for k, v in t["ppl"].items()))
    print(f"  {'PASS' if r['pass'] else 'FAIL'}"
          + ("" if r["pass"] else f" (bands {r['inside']}, in time {r['in_time']})"), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="quick,full")
    ap.add_argument("--seeds", default="0", help="data and training seeds, comma-separated")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args()
    from engine.demo import FULL, QUICK

    recipes = {"quick": QUICK, "full": FULL}
    results = []
    for name in args.recipes.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            results.append(measure(replace(recipes[name.strip()], seed=seed)))
            show(results[-1])
    if args.json:
        print(json.dumps(results))
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
