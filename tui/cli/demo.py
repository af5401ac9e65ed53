"""`unlearn demo`: the offline end-to-end demo (engine/demo.py builds, studies/lifecycle/demo.py runs
the study, this draws it)."""
from __future__ import annotations

from pathlib import Path

import typer

from tui.cli.common import Json
from tui.cli.console import emit_json, err, out


def demo_cmd(
    quick: bool = typer.Option(False, "--quick", help="a smaller corpus, model and grid: about 2 minutes on 2 CPU cores"),
    workspace: Path = typer.Option(Path("unlearn-demo"), "--workspace", help="where data, tokenizer, models and the study store are built (and reused)"),
    workers: int = typer.Option(2, "--workers", help="CPU worker processes for the demo study"),
    as_json: Json = False,
):
    """Build a synthetic corpus, pre-train a tiny Llama on it and fine-tune it a few epochs on fictitious people's
    records (plus the exactly retrained twin, fine-tuned without the forget set); print θ0's regime and the verdict's
    controls; then sweep the seven methods of Yao et al. (2024) over lr × steps in a study run by CPU workers.
    No download; cached after the first run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.demo import FULL, QUICK
    from engine.errors import UnlearnError
    from engine.metric_registry import PPL_FORGET, SCORE
    from studies.lifecycle.demo import run_demo
    from studies.reading.grid import load_at_target, load_cells, original_note, robustness
    from tui.heatmap import render_heatmaps
    from tui.render import fmt, metrics_table

    if workers < 1:
        raise UnlearnError("--workers must be at least 1")
    recipe = QUICK if quick else FULL
    workspace = workspace.expanduser().resolve()
    tasks: dict[str, int] = {}
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:

        def on_build(label: str, step: int, total: int):
            key = f"pretraining {label}"
            if key not in tasks:
                tasks[key] = progress.add_task(key, total=total)
            progress.update(tasks[key], completed=step)

        def on_tick(p: dict):
            if "study" not in tasks:
                tasks["study"] = progress.add_task("study cells", total=p["cells_total"] or None)
            progress.update(tasks["study"], completed=p["cells_done"])

        def on_regime(refs: dict):  # before any method runs
            if not as_json:
                for line in regime_lines(refs):
                    err.print(line, markup=False)

        result = run_demo(workspace, recipe, workers, on_build, on_tick, on_regime)
    if as_json:
        return emit_json(result)
    ctl = result["controls"]
    rows = [("original θ0", "", "0", {**result["original"], **ctl["original"]}),
            ("retrained", "", "", {**result["retrained"], **ctl["retrained"]})]
    for run in result["runs"]:  # each method's best cell (studies.reading.grid.best_cell), or its last if none counts
        by_step = {c["step"]: c for c in run["milestones"]}
        c = by_step.get(run["best_step"]) or (run["milestones"][-1] if run["milestones"] else {})
        rows.append((run["method"], f"{run['lr']:.0e}", str(c.get("step", "—")), c))
    out.print(metrics_table(f"unlearn demo ({recipe.name}): best cell of each method", rows,
                            exact_forget_ppl=result["retrained"][PPL_FORGET]))
    from studies.lifecycle.demo import demo_store

    cells = load_cells(demo_store(workspace), result["study"])
    at_target = load_at_target(demo_store(workspace), result["study"])
    controls = result["controls"]
    note = original_note({**controls["original"], "target": result["target"]})
    out.print(render_heatmaps(cells, SCORE, title=f"study {result['study']}: score by lr × steps (✓ = success)",
                              at_target=at_target, note=note))
    rob = robustness(cells)
    out.print("robustness (share of cells that succeed): " + ", ".join(f"{m} {v:.0%}" for m, v in rob.items()))
    out.print(
        f"ln ppl_unseen(θ0) approximates the exact target ln ppl_forget(retrained) to {fmt(result['target_error'])}. "
        f"Workspace {result['workspace']} ({'reused' if result['cached'] else 'built'}); "
        f"study store {result['storage']} ({'reused' if result['study_reused'] else 'run now'}).\n"
        f"Next: unlearn study status {result['study']} --storage {result['storage']}"
    )
    for line in regime_lines(result):
        out.print(line, markup=False)


def regime_lines(refs: dict) -> list[str]:
    """θ0's regime against its bands, the target with its band, and the two controls: one line each."""
    from tui.render import fmt

    r, t, b = refs["regime"], refs["target"], refs["bands"]

    def band(lo, hi):
        return f"≤ {hi:g}" if lo is None else f"in [{lo:g}, {hi:g}]"

    figures = ", ".join(f"{k} {fmt(r[k])} ({band(*r['bands'][k])}{'' if r['inside'][k] else ' ✘ OUTSIDE'})"
                        for k in r["bands"])
    lines = [f"regime of θ0: {figures}" + ("" if r["ok"] else " — θ0 is not in a pre-trained model's regime"),
             f"target ln ppl_unseen(θ0) = {fmt(t['value'])} ± {fmt(t['band'])} (bootstrap noise {fmt(t.get('noise'))}, "
             f"twin spread {fmt(t.get('spread'))}, floor {fmt(t.get('floor'))}); utility band ±{fmt(b['utility']['band'])}"]
    for who, label in (("retrained", "positive control, the retrained twin"), ("original", "negative control, θ0")):
        c = refs["controls"][who]
        parts = " ".join(f"{p} {'✔' if ok else '✘'}" for p, ok in c["verdict"].items())
        lines.append(f"{label}: {'succeeds' if c['success'] else 'fails'} ({parts}; gap {fmt(c['forget_gap'])}, "
                     f"MIA AUC {fmt(c['mia_auc_loss'], 2)} [{fmt(c['mia_auc_lo'], 2)}, {fmt(c['mia_auc_hi'], 2)}], "
                     f"drift {fmt(c['retain_eval_drift'])})")
    return lines


def sisa_cmd(
    workspace: Path = typer.Option(Path("unlearn-demo"), "--workspace", help="a demo workspace (`unlearn demo` builds one)"),
    shards: str = typer.Option("1,2,4", "--shards", help="the K to try, comma-separated (K is SISA's knob, not the lr)"),
    seed: int = typer.Option(0, "--seed", help="seed of the shard assignment"),
    as_json: Json = False,
):
    """Exact unlearning by sharding (SISA) on the demo's fine-tuning stage: fine-tune K models from the demo's base
    model on K shards of the fine-tuning documents, fine-tune the shards that held the forget set again without it,
    and score the ensemble like any cell. Demo scale only: it needs the fine-tuning corpus and the base model."""
    import json

    from rich.table import Table

    from engine.demo import DemoRecipe
    from engine.errors import UnlearnError
    from engine.metric_registry import FORGET_GAP, PPL_FORGET, PPL_RETAIN, RETAIN_DRIFT, SCORE
    from engine.metric_registry import get as get_metric
    from engine.sisa import sisa
    from tui.render import fmt

    workspace = workspace.expanduser().resolve()
    manifest = workspace / "manifest.json"
    if not manifest.is_file():
        raise UnlearnError(f"no demo workspace at {workspace} (run `unlearn demo --workspace {workspace}` first)")
    recipe = DemoRecipe(**json.loads(manifest.read_text())["recipe_config"])
    try:
        ks = [int(k) for k in shards.split(",") if k.strip()]
    except ValueError:
        raise UnlearnError(f"--shards takes comma-separated whole numbers, not {shards!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise UnlearnError("--shards: each K must be at least 1")
    rows = []
    for k in ks:
        err.print(f"sisa: K = {k} (fine-tuning {k} constituent model(s) from the base)", markup=False)
        r = sisa(workspace, recipe, k, seed)
        r.pop("shard_hashes")
        rows.append(r)
    if as_json:
        return emit_json(rows)
    t = Table(title=f"SISA on the {recipe.name} demo, scored against the original single model",
              caption="shards: retrained / all · before: the ensemble's ppl_retain before unlearning")
    shown = [get_metric(p) for p in (FORGET_GAP, RETAIN_DRIFT, SCORE)]  # what engine.sisa scores the ensemble by
    for col in ("K", "shards", PPL_FORGET, PPL_RETAIN, *(x.label for x in shown), "ok", "retrained tok", "before"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        m = r["metrics"]
        t.add_row(str(r["shards"]), f"{r['retrained_shards']}/{r['shards']}", fmt(m[PPL_FORGET]), fmt(m[PPL_RETAIN]),
                  *(fmt(r[x.path]) for x in shown), "yes" if r["success"] else "no",
                  f"{r['cost']['retrain_tokens']:,}", fmt(r["before"][PPL_RETAIN]))
    out.print(t)
