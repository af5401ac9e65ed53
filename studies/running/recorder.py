"""Writing one cell: its row (CellRow) and its Optuna trial (params method, lr, steps; value the
objective, eval_score); an at-target cell between milestones gets its row only.

Idempotent, because a retried run passes its milestones again: a cell already written stays
as it is, and a trial already in Optuna for (run, step) is found instead of added twice."""
from __future__ import annotations

import optuna
from optuna.trial import TrialState, create_trial
from sqlmodel import select

from engine.metric_registry import MIA_AUC, SCORE
from studies.lifecycle.spec import StudySpec
from studies.store.db import CellRow, Run, Store


def _user_attrs(run: Run, cell: dict) -> dict:
    attrs = {k: v for k, v in cell.items() if k != MIA_AUC and k != "step"}
    for attack, auc in (cell.get(MIA_AUC) or {}).items():
        attrs[f"{MIA_AUC}_{attack}"] = auc
    attrs.update(ul_run_id=run.id, ul_step=cell["step"])
    return attrs


def _find_trial(ostudy: optuna.Study, run_id: int, step: int) -> int | None:
    for t in ostudy.get_trials(deepcopy=False):
        if t.user_attrs.get("ul_run_id") == run_id and t.user_attrs.get("ul_step") == step:
            return t.number
    return None


def record_cell(store: Store, study_name: str, spec: StudySpec, run: Run, cell: dict,
                attempt: int | None = None) -> int | None:
    """Store one cell and its Optuna trial. Returns the trial number (None: an at-target cell
    between milestones, which has no trial). With `attempt`, the cell is written only while that
    attempt owns the run (studies/running/fence.py); otherwise RunLost, and nothing is written."""
    from studies.running.fence import RunLost, owns

    step = cell["step"]

    def write_row():
        with store.write() as s:
            # FOR UPDATE: on PostgreSQL a pool settling the run waits for this cell (SQLite: one writer)
            if attempt is not None and not owns(s.exec(select(Run).where(Run.id == run.id).with_for_update()).first(), attempt):
                raise RunLost(run.id, attempt, f"its cell at step {step} was not written")
            ms = s.exec(select(CellRow).where(CellRow.run_id == run.id, CellRow.step == step)).first()
            created = ms is None
            if created:
                ms = CellRow(run_id=run.id, step=step, metrics=cell, score=cell.get(SCORE),
                             success=bool(cell.get("success")), diverged=bool(cell.get("diverged")))
                s.add(ms)
                s.flush()
            return created, ms.id, ms.metrics, ms.trial_number  # the first written values win

    created, ms_id, cell, told = store.retry(write_row)  # a server back from a restart: tried again
    if told is not None:
        return told
    if cell.get("at_target") and step not in {int(s) for s in spec.steps}:
        # An at-target cell between milestones: a row of its own, but no Optuna trial, whose `steps`
        # parameter is the study's categorical grid of milestones, which this step is not part of.
        return None
    ostudy = store.retry(lambda: optuna.load_study(study_name=study_name, storage=store.optuna))
    # The trial is added only after the cell's row commits, so a row made just now has none
    # yet: only a retried cell needs the (whole-study) search for a trial an earlier attempt added.
    number = None if created else store.retry(lambda: _find_trial(ostudy, run.id, step))
    value = cell.get(SCORE)
    attrs = _user_attrs(run, cell)
    asked = run.asked_trial if run.asked_trial is not None and run.asked_steps == step else None
    asked_id = store.retry(lambda: _trial_id(store, study_name, asked)) if asked is not None and number in (None, asked) else None
    if asked_id is not None and store.retry(lambda: store.optuna.get_trial(asked_id)).state == TrialState.RUNNING:
        # The trial the sampler asked for, still open (also when an attempt died between its
        # user attrs and its tell): tell it. Once told FAIL (an earlier attempt of the run
        # failed for good) it cannot be reopened, and the cell becomes a trial of its own below.
        number = asked
        for k, v in attrs.items():
            store.retry(lambda k=k, v=v: store.optuna.set_trial_user_attr(asked_id, k, v))
        if value is None:
            store.retry(lambda: ostudy.tell(number, state=TrialState.FAIL))
        else:
            store.retry(lambda: ostudy.tell(number, value))
    elif number is None:
        # A method variant's knobs are trial params too, so Optuna's own views can slice by them.
        params = spec.trial_params(run.method, run.lr, step, run.seed)
        distributions = spec.optuna_distributions()
        frozen = create_trial(
            params=params,
            distributions={k: d for k, d in distributions.items() if k in params},
            value=value,
            state=TrialState.COMPLETE if value is not None else TrialState.FAIL,
            user_attrs=attrs,
        )
        storage = store.optuna
        trial_id = store.retry(lambda: storage.create_new_trial(storage.get_study_id_from_name(study_name), template_trial=frozen))
        number = storage.get_trial_number_from_id(trial_id)
    def write_number():
        with store.write() as s:
            ms = s.get(CellRow, ms_id)
            ms.trial_number = number
            s.add(ms)

    store.retry(write_number)
    return number


def _trial_id(store: Store, study_name: str, number: int) -> int:
    storage = store.optuna
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)
