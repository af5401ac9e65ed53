"""The measurement behind docs/science.md: every runnable method on the full demo, one grid fixed in
advance, three seeds, then the attacks at each method's best cell.

    python docs/science.py --workspace science-ws [--workers 2] [--json results.json]

Fixed before any of it ran, and not tuned afterwards (written at the top of docs/science.md):

- the full demo (`unlearn demo`): a tiny Llama pre-trained on other synthetic people and code, then
  fine-tuned a few epochs on the forget, retain and retain_eval people; its twin fine-tuned without
  the forget people;
- learning rates DEMO_LRS["full"] (from the fine-tuning lr alone) × milestones SCIENCE_STEPS (the demo's), plus the
  at-target cell of every run;
- every runnable method at its published knobs, and the knobs docs/science.md says cannot reach the
  target at their published value, swept as variants: NPO's β (× 0.1: the sequence-summed log-ratio's
  scale) and SimNPO's δ (0 and ln ppl_unseen(θ0), a property of θ0, measured before any run);
- seeds SCIENCE_SEEDS (the run setting --seed: batch order, random labels), one study each (the
  measurement began before `study create --seeds` existed; the runs are the same), read as
  `--seeds` reads a cell (studies.reading.seeds.mean_cell): the mean over the seeds with a 95 %
  Student-t interval, a success only when the intervals are inside the bands (and the membership
  part holds at every seed);
- the verdict's auto bands, with the twin's spread (engine/verdict.py), as the demo uses them;
- at each method's best cell of seed 0 (lowest eval_score), `--attacks relearn,quant4,quant8`.

It prints a Markdown table and writes every figure to --json."""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

SCIENCE_STEPS = (5, 10, 20, 40)  # the demo's milestones; with the at-target cell, 3 seeds × 22 variants × 3 lrs fit 2 CPU cores in ~30 min
SCIENCE_SEEDS = (0, 1, 2)
ATTACKS = "relearn,quant4,quant8"
NPO_FAMILY = ("npo", "npo_gd", "npo_kl")
SIMNPO_FAMILY = ("simnpo", "simnpo_gd")


def fmt(x, spec=".3g") -> str:
    return "—" if x is None else format(x, spec)


def variants(delta: float) -> list[str]:
    """Every runnable method at its published knobs, and the pre-registered knob variants."""
    from engine.methods import list_methods
    from engine.methods.base import variant_id

    out = [m.id for m in list_methods()]
    out += [variant_id(m, {"beta": 0.01}) for m in NPO_FAMILY]
    out += [variant_id(m, {"delta": round(delta, 3)}) for m in SIMNPO_FAMILY]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, required=True, help="the full demo's workspace (built when missing)")
    ap.add_argument("--workers", type=int, default=2, help="CPU worker processes for the studies")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()

    from engine.config import RunConfig
    from engine.demo import DEMO_LRS, FULL, build_workspace, demo_controls, demo_sources, demo_texts
    from engine.run import run_unlearning
    from studies.lifecycle.demo import demo_store
    from studies.lifecycle.study import create_study, resume_study
    from studies.reading.grid import best_cell, load_at_target, load_cells
    from studies.running.pool import WorkerPool
    from studies.store.forgetsets import create_forget_set

    ws = args.workspace.resolve()
    t0 = time.perf_counter()
    manifest = build_workspace(ws, FULL, lambda what, i, n: None)
    refs = demo_controls(ws, FULL, manifest)
    delta = refs["target"]["value"]  # ln ppl_unseen(θ0): SimNPO's δ on the target's scale
    methods = variants(delta)
    store = demo_store(ws)
    fs_name = f"science-{refs['forget_set_hash'][:8]}"
    src, qa = demo_sources(ws), manifest.get("qa") or {}
    try:
        store.forget_set(fs_name)
    except Exception:  # noqa: BLE001 - not there yet
        create_forget_set(store, fs_name, src["forget"], src["retain"], src["unseen"], src["general"],
                          seq_len=FULL.seq_len, tokenizer=str(ws / "model"), retain_eval=src["retain_eval"],
                          prompt_field=qa.get("prompt_field"), answer_field=qa.get("answer_field"))
    build_s = time.perf_counter() - t0
    lrs = DEMO_LRS["full"]
    names = {}
    t1 = time.perf_counter()
    for seed in SCIENCE_SEEDS:
        name = names[seed] = f"science-{FULL.fingerprint}-{len(methods)}-seed{seed}"
        try:
            store.study(name)
        except Exception:  # noqa: BLE001 - not there yet
            create_study(store, name, str(ws / "model"), fs_name, methods=methods, lrs=list(lrs),
                         steps=list(SCIENCE_STEPS), batch_size=FULL.run_batch_size, seed=seed,
                         target_spread=refs["target_spread"])
        if str(store.study(name).state) != "done":
            resume_study(store, name, retry_failed=True)
            WorkerPool(store, ["cpu"] * args.workers, [name]).serve()
        print(f"seed {seed}: done ({time.perf_counter() - t1:.0f} s)", flush=True)
    study_s = time.perf_counter() - t1

    per_seed = {s: load_cells(store, n) for s, n in names.items()}
    at_target = {s: load_at_target(store, n) for s, n in names.items()}
    band = {part: refs["bands"][part]["band"] for part in ("forget", "utility")}
    texts = demo_texts(ws, manifest)
    rows, t2 = [], time.perf_counter()
    for m in methods:
        row = {"method": m, **aggregate(m, per_seed, at_target, lrs, band), "attacks": None}
        best = best_cell(per_seed[0], m)
        if best is not None:  # the pre-registered attack cell: seed 0's best
            row["attacked"] = {"lr": best.lr, "steps": best.steps, "eval_score": best.value("eval_score")}
            cfg = RunConfig(method=m, lr=best.lr, milestones=(best.steps,), batch_size=FULL.run_batch_size,
                            seq_len=FULL.seq_len, seed=0, attacks=ATTACKS, target_spread=refs["target_spread"],
                            watch_every=0)
            cell = run_unlearning(str(ws / "model"), texts, cfg, device="cpu")["milestones"][-1]
            assert cell["eval_score"] == best.value("eval_score"), (m, cell["eval_score"])  # the same cell again
            row["attacks"] = {a: {"recovery": cell.get(f"{a}_recovery"), "ppl_forget": cell["attacks"][a]["ppl_forget"],
                                  "mia_auc_loss": cell["attacks"][a]["mia_auc"]["loss"]} for a in cell.get("attacks", {})}
        rows.append(row)
        print(f"{m}: robustness {row['robustness']:.0%}, at target {row['at_target_success']}/{len(lrs)}", flush=True)
    attack_s = time.perf_counter() - t2

    result = {"studies": names, "storage": store.safe_url, "grid": {"lrs": lrs, "steps": SCIENCE_STEPS,
                                                                     "seeds": SCIENCE_SEEDS, "methods": methods},
              "regime": refs["regime"], "target": refs["target"], "bands": refs["bands"], "controls": refs["controls"],
              "seconds": {"build": build_s, "studies": study_s, "attacks": attack_s}, "methods": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print_table(result)


FIGURES = ("eval_score", "forget_gap", "retain_eval_drift", "mia_auc.loss", "mia_auc_lo", "mia_auc_hi")


def summary(cell) -> dict:
    """A mean cell's figures, each with its 95 % half width, and its verdict."""
    spread = (cell.metrics or {}).get("seeds", {}).get("spread", {})
    return {"lr": cell.lr, "steps": cell.steps, "success": cell.success, "verdict": (cell.metrics or {}).get("verdict"),
            **{k: cell.value(k) for k in FIGURES}, "spread": {k: spread.get(k) for k in FIGURES}}


def aggregate(method: str, per_seed: dict, at_target: dict, lrs, band: dict) -> dict:
    """The method's cells over the seeds, as `study create --seeds` reads them: robustness (share of
    mean cells that succeed), its best mean cell, and its at-target cell per lr (the mean of the
    seeds' at-target cells, once every seed reached the target)."""
    from studies.reading.grid import best_cell, grids
    from studies.reading.seeds import mean_at_target, mean_cell

    seeds = sorted(per_seed)
    keyed = [{(c.lr, c.steps): c for c in per_seed[s] if c.method == method} for s in seeds]
    means = [mean_cell([k[key] for k in keyed], seeds, band) for key in keyed[0] if all(key in k for k in keyed)]
    best = best_cell(means, method)
    at = []
    for lr in lrs:
        cs = [c for s in seeds for c in at_target[s] if c.method == method and c.lr == lr]
        if len(cs) < len(seeds):
            at.append({"lr": lr, "reached": len(cs)})
            continue
        at.append({"lr": lr, "reached": len(cs), **summary(mean_at_target(cs, seeds, band))})
    return {"robustness": sum(1 for c in means if c.success and c.computed) / len(means) if means else 0.0,
            "robustness_per_seed": [grids(per_seed[s])[method].robustness for s in seeds],
            "best": summary(best) if best else None, "at_target": at,
            "at_target_success": sum(1 for a in at if a.get("success"))}


def pm(x, hw, spec=".3g") -> str:
    return fmt(x, spec) + (f" ± {format(hw, spec)}" if x is not None and hw is not None else "")


def print_table(result: dict) -> None:
    n = len(result["grid"]["seeds"])
    print(f"\n| method | robustness (mean cells; per seed) | at target: successes / lrs reached by all {n} seeds "
          "| best mean cell | eval_score | forget_gap | retain_eval_drift | MIA AUC (mean of seeds) "
          "| relearn | quant4 | quant8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["methods"]:
        b, a = r["best"], r["attacks"] or {}
        reached = sum(1 for x in r["at_target"] if x["reached"] == n)
        rec = [fmt((a.get(k) or {}).get("recovery"), ".2f") for k in ("relearn", "quant4", "quant8")]
        per = "/".join(f"{x:.0%}" for x in r["robustness_per_seed"])
        sp = (b or {}).get("spread") or {}
        best = (f"{b['lr']:g} × {b['steps']}{' ✓' if b['success'] else ''} | {pm(b['eval_score'], sp['eval_score'])} | "
                f"{pm(b['forget_gap'], sp['forget_gap'])} | {pm(b['retain_eval_drift'], sp['retain_eval_drift'])} | "
                f"{pm(b['mia_auc.loss'], sp['mia_auc.loss'], '.2f')} | " if b else "— | — | — | — | — | ")
        print(f"| `{r['method']}` | {r['robustness']:.0%} ({per}) | {r['at_target_success']} / {reached} | "
              + best + " | ".join(rec) + " |")
    s = result["seconds"]
    print(f"\nbuild {s['build']:.0f} s · studies {s['studies']:.0f} s · attacks {s['attacks']:.0f} s")
    print("target", json.dumps(result["target"]), "\nregime", json.dumps({k: result["regime"][k] for k in (
        "ppl_unseen_over_retain_eval", "ln_unseen_over_forget", "mia_auc_loss")}))
    for who, c in result["controls"].items():
        print(who, "success" if c["success"] else "fails", json.dumps(c["verdict"]),
              f"gap {c['forget_gap']:.3g} drift {c['retain_eval_drift']:.3g} "
              f"AUC {c['mia_auc_loss']:.3g} [{c['mia_auc_lo']:.3g}, {c['mia_auc_hi']:.3g}]"
              if not math.isnan(c["forget_gap"] or math.nan) else "")


if __name__ == "__main__":
    main()
