"""`unlearn study create|run|ls|status|heatmap|pause|resume|cancel` and `unlearn worker`."""
from __future__ import annotations

from typing import Optional

import typer

from tui.commands.forgetset import STORAGE_HELP

study_app = typer.Typer(help="Optuna studies over method × learning rate × steps, run by per-GPU workers.",
                        no_args_is_help=True)


def _floats(text: str, flag: str) -> list[float]:
    from engine.errors import UnlearnError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UnlearnError(f"{flag} takes comma-separated numbers, not {text!r}") from None


@study_app.command("create")
def create_cmd(
    name: str = typer.Argument(..., help="unique study name (also the Optuna study name)"),
    model: str = typer.Option(..., "--model", help="local folder or Hugging Face id"),
    forget_set: str = typer.Option(..., "--forget-set", help="name of a stored forget set"),
    methods: str = typer.Option(..., "--methods", help="comma-separated method ids (see `unlearn methods`)"),
    lr: Optional[str] = typer.Option(None, "--lr", help="grid: comma-separated learning rates"),
    lr_range: Optional[str] = typer.Option(None, "--lr-range", help="tpe: LOW:HIGH, sampled log-uniformly"),
    sampler: str = typer.Option("grid", "--sampler", help="grid (every method × lr) or tpe (Optuna's TPE over method × lr)"),
    trials: Optional[int] = typer.Option(None, "--trials", help="tpe: (method, lr) runs to sample; each gives one trial per milestone"),
    steps: str = typer.Option(..., "--steps", help="milestones, e.g. 5,10,20,40 (one run per method × lr covers them all)"),
    seed: int = typer.Option(0, "--seed"),
    tol_forget: float = typer.Option(0.10, "--tol-forget", help="success: forget_gap ≤ ln(1+tol)"),
    tol_retain: float = typer.Option(0.05, "--tol-retain", help="success: retain_drift ≤ ln(1+tol)"),
    batch_size: int = typer.Option(4, "--batch-size"),
    warmup: int = typer.Option(0, "--warmup", help="warm-up steps, then constant lr (keeps prefix sharing)"),
    max_attempts: int = typer.Option(2, "--max-attempts", help="attempts per run before it is failed"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    as_json: bool = typer.Option(False, "--json"),
):
    """Create a study: the Optuna study and one run per (method, lr) in the store."""
    from engine.errors import UnlearnError
    from studies.store import open_store
    from studies.studies import create_study
    from tui.console import emit_json, out, parse_steps

    lrs = _floats(lr, "--lr") if lr else None
    rng = None
    if lr_range:
        parts = _floats(lr_range.replace(":", ","), "--lr-range")
        if len(parts) != 2:
            raise UnlearnError("--lr-range takes LOW:HIGH")
        rng = (parts[0], parts[1])
    if lrs and rng:
        raise UnlearnError("give --lr (grid) or --lr-range (tpe), not both")
    if rng and sampler == "grid":
        sampler = "tpe"
    store = open_store(storage)
    study = create_study(store, name, model, forget_set, methods=[m.strip() for m in methods.split(",") if m.strip()],
                         lrs=lrs, lr_range=rng, sampler=sampler, trials=trials, steps=parse_steps(steps), seed=seed,
                         tol_forget=tol_forget, tol_retain=tol_retain, batch_size=batch_size, warmup_steps=warmup,
                         max_attempts=max_attempts, trust_remote_code=trust_remote_code)
    from studies.spec import StudySpec

    spec = StudySpec.from_dict(study.spec)
    info = {"name": study.name, "runs": spec.total_runs, "cells": spec.total_runs * len(spec.steps), "spec": study.spec}
    if as_json:
        return emit_json(info)
    out.print(f"study [bold]{study.name}[/]: {info['runs']} runs → {info['cells']} cells. Start it: unlearn study run {study.name}")


@study_app.command("run")
def run_cmd(
    name: str = typer.Argument(...),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPU indices, one worker each (e.g. 0,1)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPU workers (when there is no GPU)"),
    detach: bool = typer.Option(False, "--detach", help="return at once; the scheduler outlives the terminal and SSH"),
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
):
    """Run (or resume) a study: a fresh subprocess per run, one per worker slot; finished cells are never recomputed."""
    from studies.scheduler import WorkerPool, detach as detach_scheduler, parse_slots, start_study
    from studies.store import open_store
    from tui.console import err, out

    store = open_store(storage)
    slots = parse_slots(gpus, workers)
    start_study(store, name)
    if detach:
        pid, log = detach_scheduler(store, name, slots)
        out.print(f"scheduler pid {pid} runs study {name} on {', '.join(slots)}; log {log}. Follow it: unlearn study status {name}")
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


def _set(name: str, state: str, storage: Optional[str]):
    from studies.store import open_store
    from studies.studies import set_state
    from tui.console import out

    st = set_state(open_store(storage), name, state)
    out.print(f"study {st.name}: {st.state}")


@study_app.command("pause")
def pause_cmd(name: str = typer.Argument(...), storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP)):
    """Stop handing out new runs (running ones finish)."""
    _set(name, "paused", storage)


@study_app.command("resume")
def resume_cmd(name: str = typer.Argument(...), storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP)):
    """Hand out runs again (a scheduler still running picks them up; else `unlearn study run NAME`)."""
    _set(name, "running", storage)


@study_app.command("cancel")
def cancel_cmd(name: str = typer.Argument(...), storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP)):
    """Cancel: pending runs are dropped, running ones stopped; written cells stay."""
    _set(name, "cancelled", storage)


def worker_cmd(
    storage: Optional[str] = typer.Option(None, "--storage", help=STORAGE_HELP),
    study: Optional[str] = typer.Option(None, "--study", help="serve only this study (default: every running study)"),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPU indices, one worker each"),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPU workers"),
):
    """Join studies from this node: claim runs from the shared store until none is left (Optuna's shared-RDB pattern)."""
    from studies.scheduler import WorkerPool, parse_slots
    from studies.store import open_store
    from tui.console import out

    store = open_store(storage)
    if study:
        store.study(study)  # fail fast on a typo
    summary = WorkerPool(store, parse_slots(gpus, workers), [study] if study else None).serve()
    out.print(f"worker done: {summary['spawned']} run processes, {summary['retried']} retried, {summary['failed']} failed")
