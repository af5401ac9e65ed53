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
- seeds SCIENCE_SEEDS (the run setting --seed: batch order, random labels), one study each; a cell's
  figures are the mean over the seeds with the min–max spread, and a cell counts as a success when
  it succeeds under every seed;
- the verdict's auto bands, with the twin's spread (engine/verdict.py), as the demo uses them;
- at each method's best cell of seed 0 (lowest eval_score), `--attacks relearn,quant4,quant8`.

It prints a Markdown table and writes every figure to --json."""
from __future__ import annotations

import argparse
import json
import math
import statistics
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
    texts = demo_texts(ws, manifest)
    rows, t2 = [], time.perf_counter()
    for m in methods:
        row = {"method": m, **aggregate(m, per_seed, at_target, lrs), "best": None, "attacks": None}
        best = best_cell(per_seed[0], m)
        if best is not None:
            row["best"] = {"lr": best.lr, "steps": best.steps, "success": best.success,
                           **{k: best.value(k) for k in ("eval_score", "forget_gap", "retain_eval_drift", "ppl_forget",
                                                         "mia_auc.loss", "mia_auc_lo", "mia_auc_hi")}}
            cfg = RunConfig(method=m, lr=best.lr, milestones=(best.steps,), batch_size=FULL.run_batch_size,
                            seq_len=FULL.seq_len, seed=0, attacks=ATTACKS, target_spread=refs["target_spread"],
                            watch_every=0)
            cell = run_unlearning(str(ws / "model"), texts, cfg, device="cpu")["milestones"][-1]
            assert cell["eval_score"] == row["best"]["eval_score"], (m, cell["eval_score"])  # the same cell again
            row["attacks"] = {a: {"recovery": cell.get(f"{a}_recovery"), "ppl_forget": cell["attacks"][a]["ppl_forget"],
                                  "mia_auc_loss": cell["attacks"][a]["mia_auc"]["loss"]} for a in cell.get("attacks", {})}
        rows.append(row)
        print(f"{m}: robustness {row['robustness']}, at target {row['at_target_success']}", flush=True)
    attack_s = time.perf_counter() - t2

    result = {"studies": names, "storage": store.safe_url, "grid": {"lrs": lrs, "steps": SCIENCE_STEPS,
                                                                     "seeds": SCIENCE_SEEDS, "methods": methods},
              "regime": refs["regime"], "target": refs["target"], "bands": refs["bands"], "controls": refs["controls"],
              "seconds": {"build": build_s, "studies": study_s, "attacks": attack_s}, "methods": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print_table(result)


def aggregate(method: str, per_seed: dict, at_target: dict, lrs) -> dict:
    """Robustness over the seeds (a cell succeeds when it succeeds under every seed; min–max of the
    per-seed robustness), and the at-target cells per lr: step, eval_score and success, mean and
    spread over the seeds."""
    from studies.reading.grid import grids

    rob = [grids(cells)[method].robustness for cells in per_seed.values()]
    keyed = [{(c.lr, c.steps): c.success and c.computed for c in cells if c.method == method}
             for cells in per_seed.values()]
    every = {k for k in keyed[0] if all(d.get(k) for d in keyed)}
    at = []
    for lr in lrs:
        cs = [c for s in per_seed for c in at_target[s] if c.method == method and c.lr == lr]
        if not cs:
            at.append({"lr": lr, "reached": 0})
            continue
        scores = [c.value("eval_score") for c in cs if c.value("eval_score") is not None]
        at.append({"lr": lr, "reached": len(cs), "steps": sorted(c.steps for c in cs),
                   "eval_score": statistics.mean(scores) if scores else None,
                   "spread": (min(scores), max(scores)) if scores else None,
                   "successes": sum(1 for c in cs if c.success),
                   "verdicts": [(c.metrics or {}).get("verdict") for c in cs]})
    cells = len(keyed[0])
    return {"robustness": len(every) / cells if cells else 0.0, "robustness_per_seed": rob,
            "at_target": at, "at_target_success": sum(a.get("successes", 0) for a in at)}


def print_table(result: dict) -> None:
    print("\n| method | robustness (all seeds; per seed) | at target: successes / reached (of 3 lrs × 3 seeds) "
          "| best cell (seed 0) | eval_score | forget_gap | drift | MIA AUC [95 %] | relearn | quant4 | quant8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["methods"]:
        b, a = r["best"], r["attacks"] or {}
        reached = sum(x["reached"] for x in r["at_target"])
        rec = [fmt((a.get(k) or {}).get("recovery"), ".2f") for k in ("relearn", "quant4", "quant8")]
        per = "/".join(f"{x:.0%}" for x in r["robustness_per_seed"])
        best = (f"{b['lr']:g} × {b['steps']} | {fmt(b['eval_score'])} | {fmt(b['forget_gap'])} | "
                f"{fmt(b['retain_eval_drift'])} | {fmt(b['mia_auc.loss'], '.2f')} [{fmt(b['mia_auc_lo'], '.2f')}, "
                f"{fmt(b['mia_auc_hi'], '.2f')}] | " if b else "— | — | — | — | — | ")
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
