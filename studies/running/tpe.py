"""TPE: the run a study samples next, asked of Optuna's sampler by the pool that will run it, and
the trial of a run that will not finish told FAIL.

A grid study's runs are all made with the study; a TPE study's are made here, one per ask, until
its budget (spec.total_runs) is reached. The ask first reserves a run row in state ASKING (no
method, a negative lr to keep the unique constraint): every reader leaves such rows out, and the
budget counts them, so two pools asking at once never overshoot it. The row carries the asking
pool's pid and host, so a pool that dies mid-ask leaves a row the next pool on that host removes
at once (settle.reap_lost). The count and the reservation are made under the study row's lock.
"""
from __future__ import annotations

import contextlib
import os
import random

from sqlalchemy import func
from sqlmodel import select

from studies.lifecycle.spec import StudySpec
from studies.running.claim import mark_claimed
from studies.store.db import Run, Store, Study
from studies.store.states import RunState


def ask(store: Store, study: Study, spec: StudySpec, host: str) -> Run | None:
    """Reserve a run slot under the budget, then let the sampler choose (method, lr, steps) and
    the knobs the study samples; the run comes back claimed by this pool. None: the budget is
    spent, or the sampler repeated a (method, lr) the study has (its trial is told FAIL)."""
    import optuna

    with store.write() as s:
        # the count and the reservation under the study row's lock: on PostgreSQL (READ COMMITTED)
        # two pools could otherwise both count n < budget and both reserve; SQLite's IMMEDIATE
        # transaction already serializes them
        s.exec(select(Study.id).where(Study.id == study.id).with_for_update()).first()
        n = s.exec(select(func.count()).select_from(Run).where(Run.study_id == study.id)).one()
        if n >= spec.total_runs:
            return None
        placeholder = Run(study_id=study.id, method="", lr=-random.random(), seed=int(spec.run.seed), state=RunState.ASKING,
                          heartbeat=store.now(s), host=host, pid=os.getpid())
        s.add(placeholder)
        s.flush()
        run_id = placeholder.id
    trial = None
    try:
        sampler = optuna.samplers.TPESampler(seed=spec.run.seed + n)
        ostudy = store.retry(lambda: optuna.load_study(study_name=study.name, storage=store.optuna, sampler=sampler))
        trial = store.retry(lambda: ostudy.ask())
        method = trial.suggest_categorical("method", list(spec.methods))
        lr = trial.suggest_float("lr", spec.lr_range[0], spec.lr_range[1], log=True)
        steps = trial.suggest_categorical("steps", list(spec.steps))
        method = sample_knobs(trial, spec, method)
        with store.write() as s:
            clash = s.exec(select(Run).where(Run.study_id == study.id, Run.method == method, Run.lr == lr)).first()
            run = s.get(Run, run_id)
            if clash is not None:  # the sampler repeated itself: drop the slot, fail the trial
                s.delete(run)
                run = None
            else:
                run.method, run.lr, run.asked_trial, run.asked_steps = method, lr, trial.number, steps
                mark_claimed(run, host, store.now(s))
                s.add(run)
    except BaseException:
        drop_reservation(store, run_id)
        if trial is not None:  # asked but never a run: FAIL, not a RUNNING trial for ever
            with contextlib.suppress(Exception):
                store.retry(lambda: ostudy.tell(trial.number, state=optuna.trial.TrialState.FAIL))
        raise
    if run is None:
        store.retry(lambda: ostudy.tell(trial.number, state=optuna.trial.TrialState.FAIL))
    return run


def sample_knobs(trial, spec: StudySpec, method: str) -> str:
    """The variant of `method` with each knob it has that the study samples from a range (a
    conditional param: a method without the knob never draws it)."""
    from engine.methods import get_method
    from engine.methods.base import parse_variant, variant_id

    ranges = {k: r for k, r in (spec.knob_ranges or {}).items() if k in get_method(method).knob_values()}
    if not ranges:
        return method
    base, knobs = parse_variant(method)
    for name, r in sorted(ranges.items()):
        knobs[name] = trial.suggest_float(name, r["low"], r["high"], log=r["log"])
    return variant_id(base, knobs)


def drop_reservation(store: Store, run_id: int) -> None:
    """Remove a reservation still being asked (a run it became is left alone)."""
    with store.write() as s:
        row = s.get(Run, run_id)
        if row is not None and row.state == RunState.ASKING:
            s.delete(row)


def fail_asked_trial(store: Store, study_name: str, number: int) -> None:
    """The trial the sampler asked for a run that will not finish is told FAIL, so no trial stays
    RUNNING for ever (a cell already written has told it; then it is left alone)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = store.optuna

    def tell():
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
        if storage.get_trial(trial_id).state == TrialState.RUNNING:
            try:
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # told meanwhile
                pass

    store.retry(tell)


def fail_orphan_trials(store: Store, study: Study) -> list[int]:
    """The trials of a TPE study left RUNNING by a pool that died between the sampler's ask and the
    run it became (or between a run's end and its trial's FAIL), told FAIL: every RUNNING trial no
    pending or running run was asked for. Not while a reservation is being asked (its trial may
    exist before its run names it). Returns the trial numbers told."""
    from optuna.trial import TrialState

    storage = store.optuna
    study_id = store.retry(lambda: storage.get_study_id_from_name(study.name))
    # the trials first, then the runs: a trial asked by a live pool had its reservation before it,
    # so by the second read that reservation is still asking (wait) or names the trial (wanted)
    running = store.retry(lambda: storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)))
    if not running:
        return []
    with store.read() as s:
        runs = s.exec(select(Run.state, Run.asked_trial).where(Run.study_id == study.id)).all()
    if any(state == RunState.ASKING for state, _ in runs):
        return []
    wanted = {asked for state, asked in runs if asked is not None and state in (RunState.PENDING, RunState.RUNNING)}
    told = []
    for trial in running:
        if trial.number not in wanted:
            fail_asked_trial(store, study.name, trial.number)
            told.append(trial.number)
    return told
