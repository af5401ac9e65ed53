"""`unlearn study create|run|pause|resume|cancel|rm` and `unlearn worker` (tui/cli/main.py assembles the group)."""
from __future__ import annotations

from typing import List, Optional

import typer

from studies.lifecycle.inputs import STUDY_OPTIONS
from tui.cli.common import Json, Storage, lab, run_settings_options, with_declared_options


def study_option(name: str):
    """The flag of a study option declared in studies.lifecycle.inputs (the app's form builds its
    field from the same declaration)."""
    o = next(o for o in STUDY_OPTIONS if o.name == name)
    return typer.Option(o.default, o.flag, help=o.help)


def slurm_options_of(func):
    """Give `study run` one option per SLURM_FIELDS entry (studies.running.slurm_options, which the
    app's new-study form reads too) and hand it `slurm_given`: {field: value} of the ones given."""
    from studies.running.slurm_options import SLURM_FIELDS

    options = []
    for f in SLURM_FIELDS:
        shown = f" [default: {f.default}]" if f.default not in (None, False) else ""
        if f.kind is bool:
            options.append((f.name, bool, typer.Option(False, f.flag, help=f"--slurm: {f.help}")))
        elif f.kind is list:
            options.append((f.name, Optional[List[str]],
                            typer.Option(None, f.flag, metavar="KEY=VALUE", help=f"--slurm: {f.help}")))
        else:
            options.append((f.name, Optional[f.kind],
                            typer.Option(None, f.flag, help=f"--slurm: {f.help}{shown}", show_default=False)))
    # given: anything but an absent flag (None, an unset switch, no --slurm-opt); a 0 is given (0 == False)
    return with_declared_options(func, "slurm_given", "sl_", options, lambda values: {
        k: v for k, v in values.items() if not (v is None or v is False or v == [])})


def _cuda_device_count() -> int:
    """The GPUs torch sees: the default pool when neither --gpus nor --workers is given. Only the
    CLI asks (it runs the worker pool here anyway); the app's form always says which devices."""
    import torch

    return torch.cuda.device_count()


@run_settings_options
def create_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="unique study name (also the Optuna study name)"),
    model: str = typer.Option(..., "--model", help="local folder or Hugging Face id"),
    forget_set: str = typer.Option(..., "--forget-set", help="name of a stored forget set"),
    methods: str = typer.Option(..., "--methods", help="comma-separated method ids (see `unlearn methods`)"),
    lr: Optional[str] = typer.Option(None, "--lr", help="learning rates: a list 1e-5,3e-5 or 1e-5..1e-3 x4 (4 values "
                                     "evenly spaced in log, ends included) for the grid; a range 1e-5:1e-3 (or "
                                     "1e-5..1e-3) for tpe, which a range implies. The app's field takes the same"),
    lr_range: Optional[str] = typer.Option(None, "--lr-range", help="tpe: LOW:HIGH (or LOW..HIGH), sampled "
                                           "log-uniformly; the same as --lr LOW:HIGH"),
    sampler: str = typer.Option("grid", "--sampler", help="grid (every method × lr) or tpe (Optuna's TPE over "
                                "method × lr); a learning-rate range means tpe"),
    trials: Optional[int] = typer.Option(None, "--trials", help="tpe: (method, lr) runs to sample; each gives one trial per milestone"),
    steps: str = typer.Option(..., "--steps", help="milestones, e.g. 5,10,20,40 (one run per method × lr covers them all)"),
    max_attempts: int = study_option("max_attempts"),
    trust_remote_code: bool = study_option("trust_remote_code"),
    param: Optional[List[str]] = typer.Option(None, "--param", metavar="NAME=V1,V2",
                                              help="sweep a method hyperparameter: NAME=V1,V2,... "
                                              "(repeat for several; `unlearn methods --json` lists each method's knobs); "
                                              "every combination is its own run. With tpe, NAME=LOW:HIGH (or "
                                              "LOW:HIGH:log) samples the knob per run"),
    gpus_per_run: int = study_option("gpus_per_run"),
    attacks_at: str = typer.Option("every", "--attacks-at",
                                   help="every: the --attacks at every cell; best: only at each method's best "
                                   "cell, once the runs are done (far cheaper)"),
    eval_tasks_at: str = study_option("eval_tasks_at"),
    seeds: Optional[str] = study_option("seeds"),
    storage: Storage = None,
    as_json: Json = False,
    given_settings: dict = None,
):
    """Create a study: the Optuna study and one run per (method, lr) in the store. Every run setting
    not given takes its default, except --seq-len, which defaults to the forget set's."""
    from studies.lifecycle.inputs import parse_milestones, parse_seeds, search_space
    from studies.lifecycle.spec import parse_knob_options, study_spec
    from studies.lifecycle.study import create_study
    from tui.cli.console import emit_json, out

    space = search_space(lr, lr_range, sampler)
    study = create_study(lab(ctx).store(), name, model, forget_set,
                         methods=[m.strip() for m in methods.split(",") if m.strip()], lrs=space.lrs,
                         lr_range=space.lr_range, sampler=space.sampler, trials=trials, steps=parse_milestones(steps),
                         max_attempts=max_attempts,
                         trust_remote_code=trust_remote_code, knobs=parse_knob_options(param), attacks_at=attacks_at,
                         gpus_per_run=gpus_per_run, eval_tasks_at=eval_tasks_at, seeds=parse_seeds(seeds),
                         **given_settings)
    spec = study_spec(study)
    cells = spec.total_runs // len(spec.run_seeds) * len(spec.steps)  # a cell is a (method, lr, steps), over its seeds
    info = {"name": study.name, "runs": spec.total_runs, "cells": cells, "seeds": list(spec.run_seeds), "spec": study.spec}
    if as_json:
        return emit_json(info)
    seeded = f" (each under seeds {','.join(map(str, spec.seeds))})" if spec.seeds else ""
    out.print(f"study [bold]{study.name}[/]: {info['runs']} runs → {info['cells']} cells{seeded}. "
              f"Start it: unlearn study run {study.name}")


@slurm_options_of
def run_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(...),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPU indices, one worker each (e.g. 0,1)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPU workers (when there is no GPU)"),
    detach: bool = typer.Option(False, "--detach", help="return at once; the scheduler outlives the terminal and SSH"),
    retry_failed: bool = typer.Option(True, "--retry-failed/--no-retry-failed",
                                      help="give runs that failed a fresh attempt budget"),
    slurm: bool = typer.Option(False, "--slurm", help="submit the workers as one SLURM job array (submitit) and "
                               "return; the --jobs ... --slurm-allow-sqlite options say how"),
    storage: Storage = None,
    slurm_given: dict = None,
):
    """Run (or resume) a study: a fresh subprocess per run, one per worker slot; finished cells are never recomputed."""
    from engine.errors import UnlearnError
    from studies.lifecycle.inputs import device_slots
    from studies.lifecycle.spec import study_spec
    from studies.lifecycle.study import resume_study
    from studies.running.pool import WorkerPool
    from tui.cli.console import err, out

    if slurm:
        from studies.running.slurm_options import slurm_options

        opts = slurm_options(slurm_given)  # a bad value is refused before anything is opened
        return _run_on_slurm(lab(ctx).store(), name, retry_failed, opts)
    if slurm_given:
        from studies.running.slurm_options import SLURM_FIELDS

        given = ", ".join(f.flag for f in SLURM_FIELDS if f.name in slurm_given)
        raise UnlearnError(f"{given} go with --slurm (they say how to submit the study's job array)")
    store = lab(ctx).store()
    slots = device_slots(gpus, workers, visible_gpus=_cuda_device_count)
    width = study_spec(store.study(name)).gpus_per_run
    if width > len(slots):
        raise UnlearnError(f"study {name} runs each run on {width} devices; this pool has {len(slots)} "
                           f"({','.join(slots)}): give --gpus with {width} or more, or --workers {width}")
    if detach:  # the app's launch button starts a study through this same function
        from studies.running.launch import launch_detached

        message, _pid, _log = launch_detached(store, name, slots, retry_failed=retry_failed)
        out.print(message, markup=False, highlight=False)
        return
    from studies.running.launch import check_no_live_scheduler

    check_no_live_scheduler(store, name)
    resumed = resume_study(store, name, retry_failed=retry_failed)
    if not resumed.running:
        out.print(resumed.message, markup=False, highlight=False)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"study {name}"), BarColumn(), MofNCompleteColumn(), TextColumn("cells · {task.fields[running]} running"),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task(name, total=None, running=0)

        def tick(p: dict) -> None:
            progress.update(task, completed=p["cells_done"], total=p["cells_total"] or None, running=p["running"])

        summary = WorkerPool(store, slots, [name], on_tick=tick).serve()
    st = store.study(name)
    out.print(f"study {name}: {st.state}; {summary['spawned']} run processes, {summary['retried']} retried, {summary['failed']} failed")


def _run_on_slurm(store, name: str, retry_failed: bool, opts) -> None:
    """`study run NAME --slurm`: the study's workers as one job array; returns once it is submitted."""
    from studies.running.slurm import launch_on_slurm
    from tui.cli.console import out

    line, _array = launch_on_slurm(store, name, opts, retry_failed=retry_failed)
    out.print(line, markup=False, highlight=False)


def pause_cmd(ctx: typer.Context, name: str = typer.Argument(...), storage: Storage = None):
    """Stop handing out new runs (running ones finish)."""
    _act(ctx, "pause", name)


def resume_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(...),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="also give runs that failed a fresh attempt budget"),
    storage: Storage = None,
):
    """Hand out runs again. A running scheduler picks them up; else start one (`unlearn study run NAME`).
    A finished study stays finished unless --retry-failed has failed runs to retry."""
    _act(ctx, "resume", name, retry_failed=retry_failed)


def cancel_cmd(ctx: typer.Context, name: str = typer.Argument(...), storage: Storage = None):
    """Cancel: pending runs are dropped, running ones stopped; written cells stay."""
    _act(ctx, "cancel", name)


def rm_cmd(ctx: typer.Context, name: str = typer.Argument(..., help="study name"),
           yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
           storage: Storage = None):
    """Delete a study that is not running (its runs, cells, events and Optuna trials; the forget set stays).
    Also removes an Optuna study left without our rows by a create or delete cut short."""
    from engine.errors import UnlearnError

    store = lab(ctx).store()
    try:
        store.study(name)  # a typo fails before the question
    except UnlearnError:
        import optuna

        if name not in optuna.get_all_study_names(store.optuna):
            raise
    if not yes:
        typer.confirm(f"delete study {name} and all its cells?", abort=True)
    _act(ctx, "delete", name)


def attack_cmd(ctx: typer.Context, name: str = typer.Argument(..., help="study name"),
               attacks: Optional[str] = typer.Option(None, "--attacks", help="relearn, quant4, quant8 (comma-separated; "
                                                     "default: those the study was created with)"),
               method: Optional[str] = typer.Option(None, "--method", help="only this method's best cell"),
               device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]"),
               eval_tasks: Optional[str] = typer.Option(None, "--eval-tasks", help="lm-eval tasks to evaluate there too "
                                                        "(default: the study's, when it has them at the best cells)"),
               storage: Storage = None, as_json: Json = False):
    """Test whether forgetting holds at each method's best cell: rerun it with the attacks (and the
    downstream tasks) and store what they find in that cell (see `study heatmap --metric
    relearn_recovery` or `--metric downstream.TASK`)."""
    from studies.running.attack import attack_best_cells, describe_row
    from tui.cli.console import emit_json, err, out

    def said(row: dict) -> None:
        err.print(describe_row(row), markup=False, soft_wrap=True, highlight=False)

    rows = attack_best_cells(lab(ctx).store(), name, attacks, method=method, device=device, on_cell=said,
                             eval_tasks=eval_tasks)
    if as_json:
        return emit_json(rows)
    out.print(f"study {name}: attacked {sum('skipped' not in r for r in rows)} best cell(s)", markup=False)


def _act(ctx: typer.Context, verb: str, name: str, **kwargs) -> None:
    from studies.lifecycle.actions import study_action
    from tui.cli.console import out

    line = study_action(lab(ctx).store(), verb, name, heartbeat_timeout_s=lab(ctx).settings.heartbeat_timeout, **kwargs)
    out.print(line, markup=False, highlight=False)


def worker_cmd(
    ctx: typer.Context,
    study: Optional[str] = typer.Option(None, "--study", help="serve only this study (default: every running study)"),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPU indices, one worker each"),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPU workers"),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code",
                                           help="also run studies that run code stored with them (--trust-remote-code, "
                                                "--eval-tasks-dir): anyone who can write the shared store chooses it"),
    storage: Storage = None,
):
    """Join studies from this node: claim runs from the shared store until none is left (Optuna's shared-RDB pattern)."""
    from engine.errors import UnlearnError
    from studies.lifecycle.inputs import device_slots
    from studies.lifecycle.spec import study_spec
    from studies.running.pool import WorkerPool
    from tui.cli.console import out

    store = lab(ctx).store()
    if study:
        why = study_spec(store.study(study)).remote_code  # (and fail fast on a typo)
        if why and not allow_remote_code:
            raise UnlearnError(f"study {study} runs {', '.join(why)}: start the worker with --allow-remote-code "
                               "to run it (anyone who can write the shared store chooses that code)")
    slots = device_slots(gpus, workers, visible_gpus=_cuda_device_count)
    summary = WorkerPool(store, slots, [study] if study else None, allow_remote_code=allow_remote_code).serve()
    out.print(f"worker done: {summary['spawned']} run processes, {summary['retried']} retried, {summary['failed']} failed")
