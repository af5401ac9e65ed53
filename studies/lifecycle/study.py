"""Creating studies and changing their state. The worker pool and the app only talk through these rows."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from engine.config import RunSettings
from engine.errors import UnlearnError
from studies.lifecycle.spec import StudySpec, study_spec
from studies.store.db import Run, Store, Study, utcnow
from studies.store.forgetsets import check_name
from studies.store.states import RunState, StudyState

SETTING_NAMES = frozenset(f.name for f in fields(RunSettings))


def create_study(store: Store, name: str, model: str, forget_set: str, *, methods, steps, lrs=None, lr_range=None,
                 sampler: str = "grid", trials: int | None = None, max_attempts: int = 2,
                 trust_remote_code: bool = False, knobs: dict | None = None, attacks_at: str = "every",
                 gpus_per_run: int = 1, eval_tasks_at: str = "best", seeds=None, **settings) -> Study:
    """Validate the spec, create the Optuna study and our row (with every grid run) together.

    `settings` are RunSettings fields given by the user (`batch_size=8, warmup_steps=3, ...`); the
    rest take their defaults, except seq_len, which defaults to the forget set's. `knobs` sweeps method
    hyperparameters ({"beta": [0.05, 0.1]}): every method that has one runs once per combination; a
    TPE study may also give a knob a range ({"beta": {"low": 0.01, "high": 1, "log": True}}), sampled
    per run. `attacks_at="best"` runs the settings' attacks at each method's best cell once the runs
    are done, instead of at every cell; `eval_tasks_at="best"` (the default) does the same with the
    settings' downstream --eval-tasks ("every": at every cell, with the runs). `seeds` ([0, 1, 2]) runs
    each grid cell under every seed; the lab reads the cell as their mean with an interval
    (studies.reading.seeds)."""
    import optuna

    from engine.models import check_local_model

    unknown = set(settings) - SETTING_NAMES
    if unknown:
        raise TypeError(f"create_study: unknown run settings {sorted(unknown)}")
    check_name(name, "study")
    check_local_model(model)
    if os.path.isdir(os.path.expanduser(model)):
        model = os.path.abspath(os.path.expanduser(model))  # exported commands must work from any directory
    fs = store.forget_set(forget_set)
    run = RunSettings(**{"seq_len": fs.seq_len, **settings})
    spec = StudySpec(model=model, forget_set=fs.name, forget_set_hash=fs.hash, methods=tuple(methods or ()),
                     steps=tuple(steps or ()), lrs=tuple(lrs) if lrs else None,
                     lr_range=tuple(lr_range) if lr_range else None, sampler=sampler, trials=trials, run=run,
                     max_attempts=max_attempts, trust_remote_code=trust_remote_code,
                     knobs={k: v for k, v in (knobs or {}).items() if not isinstance(v, dict)} or None,
                     knob_ranges={k: v for k, v in (knobs or {}).items() if isinstance(v, dict)} or None,
                     attacks_at=attacks_at, gpus_per_run=gpus_per_run, eval_tasks_at=eval_tasks_at,
                     has_general=bool(fs.counts.get("general")),
                     seeds=tuple(seeds) if seeds is not None else None).validate()
    with store.read() as s:
        if s.exec(select(Study).where(Study.name == name)).first():
            raise UnlearnError(f"a study named {name!r} already exists")
    if name in optuna.get_all_study_names(store.optuna):
        raise UnlearnError(f"an Optuna study named {name!r} already exists in this store, without a study of ours "
                           f"(a create or delete cut short): `unlearn study rm {name}` removes it")
    ostudy = store.retry(lambda: optuna.create_study(study_name=name, storage=store.optuna, direction="minimize"))
    try:
        ostudy.set_user_attr("unlearn_lab", {"model": model, "forget_set": fs.name, "forget_set_hash": fs.hash,
                                             "methods": list(spec.methods), "steps": list(spec.steps),
                                             "sampler": spec.sampler, "seeds": list(spec.run_seeds),
                                             "objective": "eval_score = forget_gap + max(0, retain_eval_drift)"})
        with store.write() as s:
            study = Study(name=name, model=model, forgetset_id=fs.id, spec=spec.to_dict())
            s.add(study)
            s.flush()
            for method, lr, seed in spec.grid_seeded_runs:
                s.add(Run(study_id=study.id, method=method, lr=lr, seed=seed))
    except BaseException as exc:
        optuna.delete_study(study_name=name, storage=store.optuna)  # never half a study
        if isinstance(exc, IntegrityError):  # created by another process meanwhile
            raise UnlearnError(f"a study named {name!r} already exists") from None
        raise
    store.log("created", f"study {name}: {len(spec.methods)} methods, {spec.total_runs} runs × {len(spec.steps)} milestones", study.id)
    return study


def set_state(store: Store, name: str, state: StudyState) -> Study:
    """pause / cancel (and the pool's done). Cancel also cancels pending runs; the worker pool
    stops the running ones when it sees the state. Handing runs out again is `resume_study`."""
    state = StudyState(state)
    study = store.study(name)
    with store.write() as s:
        st = s.get(Study, study.id)
        if st.state == StudyState.CANCELLED and state != StudyState.CANCELLED:
            raise UnlearnError(f"study {name!r} is cancelled")
        if st.state == StudyState.DONE and state == StudyState.PAUSED:
            raise UnlearnError(f"study {name!r} is done")
        st.state, st.updated_at = state, utcnow()
        if state == StudyState.CANCELLED:
            for run in s.exec(select(Run).where(Run.study_id == st.id, Run.state == RunState.PENDING)).all():
                run.state = RunState.CANCELLED
        s.add(st)
    store.log(state, f"study {name} → {state}", study.id)
    return store.study(name)


@dataclass(frozen=True)
class Resumed:
    study: Study
    running: bool  # the study hands out runs now
    retried: int  # failed runs given a fresh budget
    failed: int  # failed runs left as they are
    message: str  # one line for the user


def resume_study(store: Store, name: str, retry_failed: bool = False) -> Resumed:
    """Hand out runs again: `study resume`, and what `study run` does before it serves a study.

    A cancelled study is refused. With retry_failed, failed runs get a fresh attempt budget. A study
    left with nothing to hand out (finished, nothing pending, failed runs not retried) is not
    touched: it stays done and the message says so, and how to retry what failed."""
    study = store.study(name)
    spec = study_spec(study)
    with store.write() as s:
        st = s.get(Study, study.id)
        if st.state == StudyState.CANCELLED:
            raise UnlearnError(f"study {name!r} is cancelled")
        failed = list(s.exec(select(Run).where(Run.study_id == st.id, Run.state == RunState.FAILED)).all())
        if retry_failed:
            for run in failed:
                run.state, run.attempts = RunState.PENDING, 0
                s.add(run)
        s.flush()
        pending = s.exec(select(func.count()).select_from(Run).where(
            Run.study_id == st.id, Run.state.in_((RunState.PENDING, RunState.RUNNING)))).one()
        runs = s.exec(select(func.count()).select_from(Run).where(
            Run.study_id == st.id, Run.state != RunState.ASKING)).one()
        unasked = spec.sampler == "tpe" and runs < spec.total_runs
        if st.state == StudyState.DONE and not (pending or unasked):
            left = len(failed) if not retry_failed else 0
            tail = (f"; {left} run(s) failed: `unlearn study resume {name} --retry-failed` retries them"
                    if left else "")
            return Resumed(st, False, 0, left, f"study {name} is done: nothing to resume{tail}")
        st.state, st.updated_at = StudyState.RUNNING, utcnow()
        s.add(st)
    retried = len(failed) if retry_failed else 0
    store.log("running", f"study {name} → running" + (f" ({retried} failed runs retried)" if retried else ""), study.id)
    return Resumed(store.study(name), True, retried, 0 if retry_failed else len(failed),
                   f"study {name}: running" + (f"; {retried} failed run(s) queued again" if retried else ""))


def _has_study_row(store: Store, name: str) -> bool:
    with store.read() as s:
        return s.exec(select(Study.id).where(Study.name == name)).first() is not None


def delete_study(store: Store, name: str, heartbeat_timeout_s: float | None = None) -> int:
    """Delete a study that nothing runs: its runs, cells, events and its Optuna study. Refused while
    it hands out runs, has a running run, or a worker pool beat for it within `heartbeat_timeout_s`
    (None: the lab's setting; pause or cancel it first). Returns the number of cells deleted. The
    forget set stays."""
    import optuna

    from studies.settings import lab_settings
    from studies.store.clock import age_s
    from studies.store.db import CellRow, Event

    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = lab_settings().heartbeat_timeout

    if not _has_study_row(store, name) and name in optuna.get_all_study_names(store.optuna):
        # an Optuna study left without our rows (a create or a delete cut short): it blocks the name
        store.retry(lambda: optuna.delete_study(study_name=name, storage=store.optuna))
        store.log("deleted", f"Optuna study {name} left without its unlearn-lab rows")
        return 0
    study = store.study(name)
    with store.write() as s:
        st = s.get(Study, study.id)
        running = s.exec(select(func.count(Run.id)).where(Run.study_id == st.id, Run.state == RunState.RUNNING)).one()
        alive = age_s(st.scheduler_heartbeat, store.now(s))
        if st.state == StudyState.RUNNING or running or (alive is not None and alive < heartbeat_timeout_s
                                                          and st.state != StudyState.DONE):
            raise UnlearnError(f"study {name!r} is {st.state} with {running} running run(s): "
                               f"cancel it first (unlearn study cancel {name})")
        run_ids = list(s.exec(select(Run.id).where(Run.study_id == st.id)).all())
        cells = 0
        if run_ids:
            for ms in s.exec(select(CellRow).where(CellRow.run_id.in_(run_ids))).all():
                s.delete(ms)
                cells += 1
        for ev in s.exec(select(Event).where(Event.study_id == st.id)).all():
            s.delete(ev)
        for run in s.exec(select(Run).where(Run.study_id == st.id)).all():
            s.delete(run)
        s.flush()
        s.delete(st)
    # Our rows go first: a study whose Optuna half is gone but ours is left would show up
    # broken, while an Optuna study with no row of ours is invisible to the lab (and removed here).
    if name in optuna.get_all_study_names(store.optuna):
        store.retry(lambda: optuna.delete_study(study_name=name, storage=store.optuna))
    store.log("deleted", f"study {name}: {cells} cells deleted")
    return cells
