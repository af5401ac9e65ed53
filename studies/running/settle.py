"""What a pool writes when a run's process is gone: the run retried, failed or cancelled (settle),
runs whose process no pool watches any more found and settled (reap_lost), and a stopped run given
back without costing it an attempt (give_back)."""
from __future__ import annotations

from typing import Callable

from sqlmodel import select

from studies.lifecycle.spec import study_spec
from studies.running.fence import owns
from studies.running.processes import pid_alive
from studies.running.tpe import drop_reservation, fail_asked_trial
from studies.running.worker import HEARTBEAT_EVERY_S
from studies.store.clock import age_s
from studies.store.db import Run, Store, Study
from studies.store.states import RunState, StudyState

# A run process gone from this host is settled by the pool that started it, which knows its exit
# code; another pool on the host waits this long (two missed beats) before settling it as gone.
GONE_GRACE_S = 2 * HEARTBEAT_EVERY_S


def settle(store: Store, run_id: int, reason: str, attempt: int) -> str | None:
    """Attempt `attempt` of a run has no process any more. A run that attempt no longer owns (it
    finished, or another attempt holds it) is left alone (None); otherwise the run is retried
    (PENDING), failed once out of attempts, or cancelled with its study. Returns the state written."""
    with store.write() as s:
        run = s.exec(select(Run).where(Run.id == run_id).with_for_update()).first()
        if not owns(run, attempt):
            return None
        study = s.get(Study, run.study_id)
        n = run.attempts
        own = run.last_error if run.last_error and run.last_error.startswith(f"attempt {n}:") else None
        why = own or f"attempt {n}: {reason or 'ended without a result'}"
        run.last_error, run.pid = why, None
        if study.state == StudyState.CANCELLED:
            run.state = RunState.CANCELLED
        elif n < study_spec(study).max_attempts:
            run.state = RunState.PENDING
        else:
            run.state = RunState.FAILED
        s.add(run)
        state, sid, label = run.state, study.id, f"{run.method} lr={run.lr:g}"
        asked, study_name = run.asked_trial, study.name
    if state in (RunState.FAILED, RunState.CANCELLED) and asked is not None:
        fail_asked_trial(store, study_name, asked)
    store.log("retry" if state == RunState.PENDING else state, f"{label}: {why}", sid, run_id)
    return state


def reap_lost(store: Store, host: str, watched: set, heartbeat_timeout_s: float,
              settle_run: Callable[[int, str, int], None]) -> None:
    """Runs marked running whose process no pool watches any more (`watched`: the run ids this pool
    does): a stale heartbeat, or a pid on this host that is gone; never a run whose process is alive
    on this host, however old its beat. They go to `settle_run` (run id, reason, the attempt seen);
    their written milestones stay. A TPE reservation whose pool is gone is removed."""
    with store.read() as s:
        rows = list(s.exec(select(Run).where(Run.state.in_((RunState.RUNNING, RunState.ASKING)))).all())
        now = store.now(s)  # beats are written on the store's clock, and aged on it
    for run in rows:
        if run.id in watched:
            continue
        age = float("inf") if run.heartbeat is None else age_s(run.heartbeat, now)  # never beat: infinitely old
        here = run.host == host and run.pid is not None
        gone_here = here and not pid_alive(run.pid)
        if run.state == RunState.ASKING:
            if gone_here or age > heartbeat_timeout_s:
                drop_reservation(store, run.id)
        elif gone_here and age > GONE_GRACE_S:
            settle_run(run.id, f"process {run.pid} is gone", run.attempts)
        elif age > heartbeat_timeout_s and not (here and not gone_here):  # a live process here is never reaped
            settle_run(run.id, f"heartbeat lost for {age:.0f} s", run.attempts)


def give_back(store: Store, run_id: int, attempt: int, why: str = "its stopped pool") -> None:
    """A run this pool stopped (it was interrupted) is pending again, the attempt not counted
    (cancelled, in a cancelled study: `study cancel` of a SLURM study stops its tasks); not when
    another attempt holds it by now."""
    with store.write() as s:
        run = s.exec(select(Run).where(Run.id == run_id).with_for_update()).first()
        if owns(run, attempt):
            cancelled = s.get(Study, run.study_id).state == StudyState.CANCELLED
            run.state = RunState.CANCELLED if cancelled else RunState.PENDING
            run.attempts, run.pid = max(0, run.attempts - 1), None
            s.add(run)
            given = (run.study_id, f"{run.method} lr={run.lr:g}: " + (
                "stopped with its study" if cancelled else f"given back at step {run.step} by {why}, no attempt spent"))
        else:
            given = None
    if given:
        store.log("cancelled" if cancelled else "given back", given[1], given[0], run_id)
