"""Claiming work for one pool: a pending run, or a study's best-cell attack job, taken in one write
transaction, so any number of pools on any number of nodes hand out each once. A claim is an
IMMEDIATE transaction on SQLite, SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL. (A TPE study's
runs are asked for instead: studies/running/tpe.py.)"""
from __future__ import annotations

from sqlmodel import select

from studies.lifecycle.spec import study_spec
from studies.running.attack import claim_attack_job
from studies.running.processes import pid_alive
from studies.store.db import Event, Run, Store, Study, utcnow
from studies.store.states import ACTIVE_RUN_STATES, RunState, StudyState


def mark_claimed(run: Run, host: str) -> None:
    """The run is this host's next attempt; its process records its own pid once it starts."""
    run.state, run.attempts = RunState.RUNNING, run.attempts + 1
    run.host, run.pid, run.heartbeat, run.started_at, run.step = host, None, utcnow(), utcnow(), 0


def claim_pending(store: Store, study_ids: list[int], host: str) -> Run | None:
    """The oldest pending run of these studies, claimed."""
    def claim():
        with store.write() as s:
            q = (select(Run).where(Run.study_id.in_(study_ids), Run.state == RunState.PENDING)
                 .order_by(Run.id).limit(1).with_for_update(skip_locked=True))
            run = s.exec(q).first()
            if run is not None:
                mark_claimed(run, host)
                s.add(run)
            return run

    return store.retry(claim)


def claim_due_attack_job(store: Store, studies: list[Study], host: str, running_here: set[int]) -> Study | None:
    """A running study whose runs are all over and whose best-cell attacks are due, claimed (the
    studies in `running_here` already run theirs in this pool)."""
    for st in studies:
        spec = study_spec(st)
        if st.state != StudyState.RUNNING or not spec.wants_best_cell_attacks or st.id in running_here:
            continue
        with store.read() as s:
            runs = list(s.exec(select(Run.state).where(Run.study_id == st.id)).all())
        if any(r in ACTIVE_RUN_STATES for r in runs) or (spec.sampler == "tpe" and len(runs) < spec.total_runs):
            continue
        if claim_attack_job(store, st, lambda started: owner_alive(started, host)):
            return st
    return None


def owner_alive(started: Event, host: str) -> bool:
    """Whether the pool that wrote an "attacks started" event still runs. Only a pool on this host
    can be checked; one elsewhere (or unknown) is taken to be alive: its own host's pools will
    see it gone."""
    return started.pid is None or started.host != host or pid_alive(started.pid)
