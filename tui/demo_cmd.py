"""`unlearn demo`: the offline end-to-end demo (engine/demo.py does the work, this draws it)."""
from __future__ import annotations

from pathlib import Path

import typer

from tui.cli import emit_json, err, out


def demo_cmd(
    quick: bool = typer.Option(False, "--quick", help="a smaller corpus and model: ≤ 2 minutes on 2 CPU cores"),
    workspace: Path = typer.Option(Path("unlearn-demo"), "--workspace", help="where data, tokenizer and models are built (and reused)"),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON on stdout"),
):
    """Build a synthetic corpus and a tiny Llama that memorized it (plus its exactly retrained twin), then unlearn
    the forget set with each of the seven methods of Yao et al. (2024). No download; cached after the first run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.demo import FULL, QUICK, run_demo
    from engine.settings import get_settings
    from tui.render import best_milestone, fmt, metrics_table

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

        def on_method(method: str, i: int, total: int):
            if "methods" not in tasks:
                tasks["methods"] = progress.add_task("unlearning", total=total)
            progress.update(tasks["methods"], completed=i, description=f"unlearning {method}".strip())

        result = run_demo(workspace, recipe, get_settings().baseline_cache, on_build, on_method)
    if as_json:
        return emit_json(result)
    rows = [("original θ0", "", "0", result["original"]), ("retrained", "", "", result["retrained"])]
    for run in result["runs"]:
        c = best_milestone(run)
        rows.append((run["method"], f"{run['lr']:.0e}", f"{c['step']}", c))
    out.print(metrics_table(f"unlearn demo ({'quick' if quick else 'full'}): best milestone of each method", rows,
                            exact_forget_ppl=result["retrained"]["ppl_forget"]))
    out.print(
        f"target: ln ppl_unseen(θ0) approximates ln ppl_forget(retrained) to {fmt(result['target_error'])}; "
        "forget_gap = |ln ppl_forget(θ) − ln ppl_unseen(θ0)|, exact gap uses the retrained twin; "
        "score = forget_gap + max(0, retain_drift), lower is better.\n"
        f"workspace {result['workspace']} ({'reused' if result['cached'] else 'built'}); "
        f"try: unlearn run --model {workspace / 'model'} --forget {workspace / 'data/forget.jsonl'} "
        f"--retain {workspace / 'data/retain.jsonl'} --unseen {workspace / 'data/unseen.jsonl'} --method ga_gd --lr 5e-4 --steps 5,10,20"
    )
