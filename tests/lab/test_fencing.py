"""Fenced attempts: every write about a run names its attempt and lands only while that attempt owns
the run (studies/running/fence.py). An old attempt's exit never settles the new one, a live process
on this host is never reaped, and a process that lost its run writes nothing more and stops."""
from __future__ import annotations

import datetime as dt
import os

import pytest

from studies.lifecycle.spec import study_spec
from studies.lifecycle.study import create_study
from studies.running.fence import RunLost
from studies.running.recorder import record_cell
from studies.running.settle import give_back, reap_lost, settle
from studies.running.worker import Heartbeat, run_one
from studies.store.db import hostname, utcnow
from studies.store.states import RunState
from tests.studies_helpers import HUB_MODEL, events_of, milestones_of, runs_of, set_run


@pytest.fixture
def taken(store):
    """A run that attempt 2 holds now (attempt 1 was reaped and the run handed out again)."""
    create_study(store, "S", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3], steps=[2, 4])
    (run,) = runs_of(store, "S")
    set_run(store, run.id, state=RunState.RUNNING, attempts=2, pid=os.getpid(), host="node-2", heartbeat=utcnow())
    return runs_of(store, "S")[0]


def test_an_old_attempts_exit_never_settles_the_new_one(store, taken):
    assert settle(store, taken.id, "exited with code 1", attempt=1) is None
    give_back(store, taken.id, attempt=1)
    now = runs_of(store, "S")[0]
    assert (now.state, now.attempts, now.last_error) == (RunState.RUNNING, 2, None)
    assert settle(store, taken.id, "exited with code 1", attempt=2) == RunState.FAILED  # its own does (2 of 2)


def test_an_old_attempts_heartbeat_and_cells_change_nothing_and_stop_it(store, taken):
    before = runs_of(store, "S")[0].heartbeat
    heart = Heartbeat(store, taken.id, attempt=1)
    heart.beat()
    assert heart.lost and runs_of(store, "S")[0].heartbeat == before
    with pytest.raises(RunLost, match="attempt 1 of run"):
        heart.check()
    spec = study_spec(store.study("S"))
    with pytest.raises(RunLost):
        record_cell(store, "S", spec, taken, {"step": 2, "eval_score": 0.5}, attempt=1)
    assert milestones_of(store, "S") == []
    record_cell(store, "S", spec, taken, {"step": 2, "eval_score": 0.5}, attempt=2)  # the owner's lands
    assert [m.step for m in milestones_of(store, "S")] == [2]
    Heartbeat(store, taken.id, attempt=2).beat()
    assert runs_of(store, "S")[0].heartbeat != before


def test_a_process_started_for_an_attempt_that_lost_its_run_does_nothing(store, taken):
    assert run_one(store, taken.id, "cpu", attempt=1) == 4
    now = runs_of(store, "S")[0]
    assert (now.state, now.attempts, now.pid, now.last_error) == (RunState.RUNNING, 2, os.getpid(), None)


def test_a_live_process_on_this_host_is_never_reaped_however_old_its_beat(store, taken):
    old = utcnow() - dt.timedelta(seconds=61)
    set_run(store, taken.id, host=hostname(), pid=os.getpid(), heartbeat=old)
    settled = []
    reap_lost(store, hostname(), set(), 60, lambda run_id, why, attempt: settled.append((why, attempt)))
    assert settled == []
    set_run(store, taken.id, host="node-7")  # elsewhere: its beat is all there is to go by
    reap_lost(store, hostname(), set(), 60, lambda run_id, why, attempt: settled.append((why, attempt)))
    assert len(settled) == 1 and settled[0][0].startswith("heartbeat lost") and settled[0][1] == 2


@pytest.mark.slow  # a real run in a subprocess
def test_a_database_locked_past_its_busy_timeout_stops_no_run(tmp_path, forget_set_files, tiny_model_dir,
                                                             monkeypatch, capsys):
    """One pass of the pool meeting "database is locked" (or a PostgreSQL restart, a full disk) is
    logged and tried again; before, serve() raised and its shutdown killed every run."""
    import sqlite3
    import threading
    import time

    from studies.lifecycle.study import resume_study
    from studies.running.pool import WorkerPool
    from studies.store.db import Store
    from tests.studies_helpers import make_forget_set, wait_for

    monkeypatch.setattr("studies.store.db.SQLITE_BUSY_MS", 200)  # this pool's store waits 0.2 s for a lock
    path = tmp_path / "lab.db"
    store = Store(f"sqlite:///{path}")
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "L", str(tiny_model_dir), "fs", methods=["ga"], lrs=[1e-4], steps=[2, 20])
    resume_study(store, "L")

    def hold_the_lock() -> None:
        wait_for(lambda: any(r.state == RunState.RUNNING and r.pid for r in runs_of(store, "L")), 120, "the run to start")
        c = sqlite3.connect(path, isolation_level=None)
        c.execute("BEGIN IMMEDIATE")
        time.sleep(2.0)
        c.execute("ROLLBACK")
        c.close()

    locker = threading.Thread(target=hold_the_lock, daemon=True)
    locker.start()
    summary = WorkerPool(store, ["cpu"], ["L"], poll_s=0.1).serve()
    locker.join()
    (run,) = runs_of(store, "L")
    assert (run.state, run.attempts, summary["retried"], summary["failed"]) == (RunState.DONE, 1, 0, 0), run.last_error
    assert {2, 20} <= {m.step for m in milestones_of(store, "L")}
    assert "pool: OperationalError" in capsys.readouterr().err


def test_a_trial_left_running_by_a_pool_that_died_mid_ask_is_failed_by_the_next_pool(store):
    """A pool killed between the sampler's ask and the run it became leaves a RUNNING trial no run
    names (the name of it in no cell, for ever RUNNING in optuna-dashboard): the next pool tells it
    FAIL, and leaves alone the trial a pending run was asked for and any trial while a reservation
    is being asked."""
    import optuna
    from optuna.trial import TrialState

    from studies.running.pool import WorkerPool
    from studies.store.db import Run, Study

    study = create_study(store, "T", HUB_MODEL, "fs", methods=["ga"], lr_range=(1e-4, 1e-2), steps=[2],
                         sampler="tpe", trials=2)
    ostudy = optuna.load_study(study_name="T", storage=store.url)
    orphan, wanted = ostudy.ask().number, ostudy.ask().number
    with store.write() as s:
        s.add(Run(study_id=study.id, method="ga", lr=1e-3, state=RunState.PENDING, asked_trial=wanted, asked_steps=2))
        asking = Run(study_id=study.id, method="", lr=-0.5, state=RunState.ASKING, heartbeat=utcnow(), host=hostname(),
                     pid=os.getpid())  # a live pool asking right now
        s.add(asking)
        s.get(Study, study.id).state = "running"
    WorkerPool(store, ["cpu"], ["T"])._fail_orphan_trials([store.study("T")])
    assert {t.number: t.state for t in ostudy.get_trials()} == {orphan: TrialState.RUNNING, wanted: TrialState.RUNNING}
    with store.write() as s:
        s.delete(s.get(Run, asking.id))
    WorkerPool(store, ["cpu"], ["T"])._fail_orphan_trials([store.study("T")])
    assert {t.number: t.state for t in ostudy.get_trials()} == {orphan: TrialState.FAIL, wanted: TrialState.RUNNING}
    assert "left running by a pool that died" in events_of(store, "T", "trials failed")[0].message
