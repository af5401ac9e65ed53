"""Claiming work for one pool: a pending run, or a study's best-cell attack job, taken in one write
transaction, so any number of pools on any number of nodes hand out each once. A claim is an
IMMEDIATE transaction on SQLite, SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL. (A TPE study's
runs are asked for instead: studies/running/tpe.py.)"""
from __future__ import annotations

import os

from sqlmodel import select

from studies.lifecycle.spec import study_spec
from studies.running.attack_job import claim_attack_job
from studies.store.db import Run, Store, Study
from studies.store.states import ACTIVE_RUN_STATES, RunState, StudyState


def slurm_job_here() -> str | None:
    """The SLURM job this process runs in: ARRAYJOB_INDEX for an array task, the job id for a plain
    job, None outside SLURM (read from the environment sbatch gives every task)."""
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and index:
        return f"{array}_{index}"
    return os.environ.get("SLURM_JOB_ID") or None


def mark_claimed(run: Run, host: str, now) -> None:
    """The run is this host's next attempt as of `now` (the store's clock); its process records its
    own pid once it starts."""
    run.state, run.attempts = RunState.RUNNING, run.attempts + 1
    run.host, run.pid, run.heartbeat, run.started_at, run.step = host, None, now, now, 0
    run.slurm_job = slurm_job_here()


def claim_pending(store: Store, study_ids: list[int], host: str) -> Run | None:
    """The oldest pending run of these studies, claimed."""
    def claim():
        with store.write() as s:
            q = (select(Run).where(Run.study_id.in_(study_ids), Run.state == RunState.PENDING)
                 .order_by(Run.id).limit(1).with_for_update(skip_locked=True))
            run = s.exec(q).first()
            if run is not None:
                mark_claimed(run, host, store.now(s))
                s.add(run)
            return run

    return store.retry(claim)


def claim_due_attack_job(store: Store, studies: list[Study], node: str, running_here: set[int],
                         heartbeat_timeout_s: float) -> tuple[Study, int] | None:
    """A running study whose runs are all over and whose best-cell attacks are due, claimed
    (studies/running/attack_job.py; the studies in `running_here` already run theirs in this pool):
    (the study, the claim), or None."""
    for st in studies:
        spec = study_spec(st)
        if st.state != StudyState.RUNNING or not spec.wants_best_cell_attacks or st.id in running_here:
            continue
        with store.read() as s:
            runs = list(s.exec(select(Run.state).where(Run.study_id == st.id)).all())
        if any(r in ACTIVE_RUN_STATES for r in runs) or (spec.sampler == "tpe" and len(runs) < spec.total_runs):
            continue
        claim = store.retry(lambda st=st: claim_attack_job(store, st, heartbeat_timeout_s, node))
        if claim is not None:
            return st, claim
    return None
