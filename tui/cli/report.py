"""`study status|heatmap|ls` and `export`: reading a study (plain Typer command functions; tui/cli/main.py
registers them). stdout holds only JSON/YAML when asked for; messages go to stderr. None of these
imports torch or the other training libraries (the light read path; a test proves it)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engine.metric_registry import SCORE, metric_help, objective
from tui.cli.common import Json, Storage, lab, sigterm_as_exit

METRIC_HELP = metric_help()


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status_cmd(ctx: typer.Context, name: str = typer.Argument(..., help="study name"), storage: Storage = None,
               as_json: Json = False):
    """Where a study stands: cells and runs, running runs, robustness and best cell per method, errors."""
    from studies.reading.status import study_status
    from tui.cli.console import emit_json, out

    st = study_status(lab(ctx).store(), name)
    if as_json:
        return emit_json(st)
    out.print(status_renderable(st))


def logs_cmd(ctx: typer.Context, name: str = typer.Argument(..., help="study name"),
             run: Optional[int] = typer.Option(None, "--run", help="only this run's logs (its id: `study status --json`)"),
             lines: int = typer.Option(40, "--lines", "-n", help="the last N lines of each log (0: list them only)"),
             storage: Storage = None, as_json: Json = False):
    """The logs of a study, newest last: its scheduler's, each SLURM task's, its best-cell attacks' and
    every run attempt's (with --run, that run's attempts): the last --lines of each under its path."""
    from studies.running.logs import study_logs, tail_file
    from tui.cli.console import emit_json, out

    if lines < 0:
        from engine.errors import UnlearnError

        raise UnlearnError(f"--lines must be 0 or more, not {lines}")
    found = study_logs(lab(ctx).store(), name, run)
    if as_json:
        return emit_json([{**x, "tail": tail_file(x["path"], lines)} for x in found])
    if not found:
        out.print(f"study {name} has no log yet" + (f" for run {run}" if run is not None else "") +
                  " (logs are written on the node that runs the work)", markup=False, highlight=False)
        return
    for x in found:
        what = {"run": f"run {x['run_id']} attempt {x['attempt']}", "slurm": f"SLURM task {x['slurm_job']}"}.get(x["kind"], x["kind"])
        out.print(f"== {what}: {x['path']} ({x['bytes']:,} bytes) ==", markup=False, highlight=False, style="bold")
        for line in tail_file(x["path"], lines):
            out.print(line, markup=False, highlight=False, soft_wrap=True)


def status_renderable(st: dict):
    """The human summary of study_status(): a Rich Group (also usable by the app)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from tui.heatmap import fmt_lr, fmt_value

    c, r, sch = st["cells"], st["runs"], st["scheduler"]
    parts: list = []
    head = Text.assemble(("study ", "bold"), (st["name"], "bold cyan"), "  ", (st["state"], "bold"),
                         f"  {st['sampler']}  model {st['model']}")
    parts.append(head)
    parts.append(Text(f"forget set {st['forget_set']['name']} ({st['forget_set']['hash'][:12]})  "
                      f"methods {', '.join(st['methods'])}  steps {','.join(map(str, st['steps']))}"))
    parts.append(Text(f"cells {c['done']}/{c['total']} done · {c['diverged']} diverged · {c['failed']} failed · "
                      f"{c['running']} running · {c['pending']} pending"))
    parts.append(Text(f"runs  {r['done']}/{r['total']} done · {r['diverged']} diverged · {r['failed']} failed · "
                      f"{r['running']} running · {r['pending']} pending"
                      + (f" · {r['cancelled']} cancelled" if r["cancelled"] else "") + f" · {r['attempts']} attempts"))
    if st.get("seeds") and len(st["seeds"]) > 1:
        parts.append(Text(f"seeds {','.join(map(str, st['seeds']))}: each cell is their mean; ✓ needs its 95 % "
                          "interval inside the band"))
    t0 = st.get("target") or {}
    if isinstance(t0.get("value"), (int, float)) and isinstance(t0.get("band"), (int, float)):
        parts.append(Text(f"target ln ppl_unseen(θ0) = {t0['value']:.3f} ± {t0['band']:.3f}"))
    if st.get("original_note"):
        parts.append(Text(st["original_note"], style="yellow"))
    if sch.get("pid"):
        parts.append(Text(f"scheduler pid {sch['pid']} on {sch.get('host') or '?'}, heartbeat {_age(sch.get('alive_s_ago'))} ago"))
    else:
        parts.append(Text("no scheduler", style="dim"))
    if st["running"]:
        t = Table(title="running", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        slurm = any(x.get("slurm_job") for x in st["running"])  # the SLURM task column only where one ran a run
        for col in ("run", "method", "lr", "step", "device", "pid", "node", *(("slurm task",) if slurm else ()), "heartbeat"):
            t.add_column(col, justify="right" if col in ("run", "lr", "step", "pid", "heartbeat") else "left", no_wrap=True)
        last = st["steps"][-1] if st["steps"] else None
        for x in st["running"]:
            t.add_row(str(x.get("run_id") or "—"), x["method"], fmt_lr(x["lr"]), f"{x['step']}/{last}", str(x.get("device") or "—"),
                      str(x.get("pid") or "—"), str(x.get("node") or "—"),
                      *((x.get("slurm_job") or "—",) if slurm else ()), _age(x.get("heartbeat_age_s")))
        parts.append(t)
    for a in st.get("slurm", {}).get("arrays", []):
        tasks = a.get("queue")
        queue = ("not in squeue" if tasks == [] else "squeue not read" if tasks is None else
                 ", ".join(f"{q['task']} {q['state'].lower()}" + (f" ({q['reason']})" if q.get("reason") not in (None, "None") else "")
                           for q in tasks))
        parts.append(Text(f"SLURM job array {a['array']}: {queue}", overflow="ellipsis", no_wrap=True))
    t = Table(title="best per method (lowest score)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
              show_edge=False)
    shown = objective()  # score, gap, drift
    for col in ("method", "robust", "lr", "steps", *(x.label for x in shown), "ok"):
        t.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for m in st["methods"]:
        b = st["best"].get(m)
        rob = f"{st['robustness'].get(m, 0.0):.0%}"
        if b is None:
            t.add_row(m, rob, "—", "—", *("—" for _ in shown), "")
        else:
            t.add_row(m, rob, fmt_lr(b["lr"]), str(b["steps"]), *(fmt_value(b[x.path]) for x in shown),
                      "✓" if b["success"] else "")
    parts.append(t)
    for e in st["errors"][-5:]:
        msg = (e.get("error") or "").strip().splitlines()
        parts.append(Text(f"{e['method']} lr={fmt_lr(e['lr'])} ({e['state']}, {e['attempts']} attempts): "
                          f"{msg[-1] if msg else ''}", style="red", overflow="ellipsis", no_wrap=True))
    return Group(*parts)


def heatmap_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="study name"),
    metric: str = typer.Option(SCORE, "--metric", help=METRIC_HELP),
    method: Optional[str] = typer.Option(None, "--method", help="only this method"),
    storage: Storage = None,
    as_json: Json = False,
):
    """lr × steps heatmap of one metric per method, with success marks and robustness."""
    from engine.errors import UnlearnError
    from studies.reading.grid import check_metric, grids, load_at_target, load_cells, original_baseline, original_note
    from tui.cli.console import emit_json, out
    from tui.heatmap import render_heatmaps

    check_metric(metric)
    store = lab(ctx).store()
    cells = load_cells(store, store.study(name))
    at_target = load_at_target(store, name)
    original = original_baseline(store, name)
    if method is not None and method not in {c.method for c in cells}:
        raise UnlearnError(f"study {name!r} has no method {method!r}; its methods: "
                           f"{', '.join(dict.fromkeys(c.method for c in cells))}")
    if as_json:
        gs = grids(cells)
        return emit_json({m: {"lrs": g.lrs, "steps": g.steps, "values": g.value(metric), "status": g.status(),
                              "success": [[bool(c and c.success) for c in (g.cell(lr, s) for s in g.steps)] for lr in g.lrs],
                              "robustness": g.robustness,
                              "at_target": [{"lr": c.lr, "steps": c.steps, "value": c.value(metric),
                                             "success": bool(c.success)} for c in at_target if c.method == m]}
                          for m, g in gs.items() if method is None or m == method})
    out.print(render_heatmaps(cells, metric, method, title=f"study {name}: {metric}", at_target=at_target,
                              note=original_note(original)))


def ls_cmd(ctx: typer.Context, storage: Storage = None, as_json: Json = False):
    """Every study in the store: state, model, forget set, cells done, robustness per method."""
    from rich import box
    from rich.table import Table

    from studies.reading.listing import list_studies_sqlite
    from tui.cli.console import emit_json, out
    from tui.numbers import fmt_value

    # A SQLite store this version reads as it is: the stdlib driver answers, no ORM imported.
    rows = list_studies_sqlite(lab(ctx).storage_url)
    if rows is None:
        from studies.reading.status import list_studies
        from studies.store.db import StoreMissing

        try:
            rows = list_studies(lab(ctx).store())
        except StoreMissing:  # nothing created yet: an empty list, and no file made for it
            rows = []
    if as_json:
        return emit_json(rows)
    if not rows:
        out.print("no studies yet")
        return
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in ("study", "state", "model", "forget set", "cells", "best", "robustness"):
        t.add_column(col, overflow="fold")
    for r in rows:
        rob = " ".join(f"{m} {v:.0%}" for m, v in r["robustness"].items()) or "—"
        t.add_row(r["name"], r["state"], Path(r["model"]).name or r["model"], r["forget_set"]["name"],
                  f"{r['cells']['done']}/{r['cells']['total']}", fmt_value(r["best_score"]), rob)
    out.print(t)


def export_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="study name"),
    method: Optional[str] = typer.Option(None, "--method", help="only this method"),
    pareto: bool = typer.Option(False, "--pareto", help="every cell of the Pareto front of forget_gap × retain_drift"),
    fmt: str = typer.Option("yaml", "--format", help="yaml or json"),
    out_file: Optional[Path] = typer.Option(None, "--out", help="write here (atomically) instead of stdout"),
    save_model: Optional[Path] = typer.Option(None, "--save-model", help="rerun each exported cell and save the model + card under DIR/<method>"),
    device: str = typer.Option("auto", "--device", help="device for --save-model: auto, cpu or cuda[:N]"),
    merge: bool = typer.Option(False, "--merge", help="with --save-model, for a study run with --lora: save the "
                               "merged full model instead of the adapter"),
    storage: Storage = None,
):
    """Export the best configuration per method (or the Pareto front) with the command that reproduces it."""
    from engine.errors import UnlearnError
    from engine.files import write_text_atomic
    from studies.reading.export import export_best, to_json, to_yaml
    from studies.reading.export import save_model as save
    from tui.cli.console import err, step_progress

    fmt = fmt.lower()
    if fmt not in ("yaml", "json"):
        raise UnlearnError(f"--format must be yaml or json, not {fmt!r}")
    store = lab(ctx).store()
    entries = export_best(store, name, method=method, pareto=pareto)
    text = to_json(entries) if fmt == "json" else to_yaml(entries)
    if save_model is not None:
        for e in entries:
            with sigterm_as_exit(), step_progress(f"{e['method']} lr={e['lr']:g}", int(e["steps"])) as on_step:
                saved = save(store, e, save_model, device=device, on_step=on_step, merge=merge)
            note = "" if saved["matches"] else f" (score {saved[SCORE]} differs from the study's {e[SCORE]}: device {saved['device']})"
            err.print(f"saved {saved['path']}{note}", markup=False, highlight=False)
    if out_file is not None:
        write_text_atomic(out_file, text)
        err.print(f"wrote {len(entries)} configuration(s) to {out_file}", markup=False, highlight=False)
    else:
        import sys

        sys.stdout.write(text)
