"""Creating studies and changing their state. The scheduler and the TUI only talk through these rows."""
from __future__ import annotations

import os

from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from engine.errors import UnlearnError
from engine.models import _check_local
from studies.forgetsets import check_name
from studies.spec import StudySpec
from studies.store import Run, Store, Study, utcnow

STATES = ("created", "running", "paused", "cancelled", "done")


def create_study(store: Store, name: str, model: str, forget_set: str, **spec_fields) -> Study:
    """Validate the spec, create the Optuna study and our row (with every grid run) together."""
    import optuna

    check_name(name, "study")
    _check_local(model)
    if os.path.isdir(os.path.expanduser(model)):
        model = os.path.abspath(os.path.expanduser(model))  # exported commands must work from any directory
    fs = store.forget_set(forget_set)
    spec_fields.setdefault("seq_len", fs.seq_len)
    spec = StudySpec(model=model, forget_set=fs.name, forget_set_hash=fs.hash,
                     has_general=bool(fs.counts.get("general")), **spec_fields).validate()
    with store.read() as s:
        if s.exec(select(Study).where(Study.name == name)).first():
            raise UnlearnError(f"a study named {name!r} already exists")
    if name in optuna.get_all_study_names(store.optuna):
        raise UnlearnError(f"an Optuna study named {name!r} already exists in this store")
    ostudy = store.retry(lambda: optuna.create_study(study_name=name, storage=store.optuna, direction="minimize"))
    try:
        ostudy.set_user_attr("unlearn_lab", {"model": model, "forget_set": fs.name, "forget_set_hash": fs.hash,
                                             "methods": spec.methods, "steps": spec.steps, "sampler": spec.sampler,
                                             "objective": "score = forget_gap + max(0, retain_drift)"})
        with store.write() as s:
            study = Study(name=name, model=model, forgetset_id=fs.id, spec=spec.to_dict())
            s.add(study)
            s.flush()
            for method, lr in spec.grid_runs:
                s.add(Run(study_id=study.id, method=method, lr=lr))
    except BaseException as exc:
        optuna.delete_study(study_name=name, storage=store.optuna)  # never half a study
        if isinstance(exc, IntegrityError):  # created by another process meanwhile
            raise UnlearnError(f"a study named {name!r} already exists") from None
        raise
    store.log("created", f"study {name}: {len(spec.methods)} methods, {spec.total_runs} runs × {len(spec.steps)} milestones", study.id)
    return study


def study_spec(study: Study) -> StudySpec:
    return StudySpec.from_dict(study.spec)


def list_study_rows(store: Store) -> list[Study]:
    with store.read() as s:
        return list(s.exec(select(Study).order_by(Study.created_at)).all())


def set_state(store: Store, name: str, state: str) -> Study:
    """pause / resume / cancel (and the scheduler's running / done). Cancel also cancels pending runs;
    the scheduler stops the running ones when it sees the state."""
    if state not in STATES:
        raise ValueError(state)
    study = store.study(name)
    with store.write() as s:
        st = s.get(Study, study.id)
        if st.state == "cancelled" and state != "cancelled":
            raise UnlearnError(f"study {name!r} is cancelled")
        if st.state == "done" and state in ("paused", "running"):
            # A finished study stays finished unless failed runs are being retried.
            pending = s.exec(select(Run).where(Run.study_id == st.id, Run.state.in_(("pending", "failed")))).first()
            if not pending and state == "paused":
                raise UnlearnError(f"study {name!r} is done")
        st.state = state
        st.updated_at = utcnow()
        if state == "cancelled":
            for run in s.exec(select(Run).where(Run.study_id == st.id, Run.state == "pending")).all():
                run.state = "cancelled"
        s.add(st)
    store.log(state, f"study {name} → {state}", study.id)
    return store.study(name)
