"""The worker pool and the run process, piece by piece, on a real SQLite store with real processes:
a heartbeat never lands after a run's final write, a run process deaf to SIGTERM cannot hang a
cancel, a TPE reservation left by a dead pool is cleared at once, and `study resume` leaves a
finished study finished."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from sqlmodel import select

from studies.lifecycle.study import create_study, resume_study, set_state
from studies.running.pool import Child, WorkerPool
from studies.running.worker import Heartbeat
from studies.store.db import Run, Study, hostname, utcnow
from studies.store.states import RunState, StudyState
from tests.studies_helpers import HUB_MODEL, cli_main, dead_pid, runs_of, set_run, study_state

# ------------------------------------------------------------------ the heartbeat

def test_a_beat_in_flight_never_lands_after_the_final_write(store, tmp_path):
    """A beat blocked on the database when the run ends: stop() waits for it, and it cannot move
    run.step back (or touch the run) once the final write has made the run done."""
    create_study(store, "S", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3], steps=[2, 4])
    (run,) = runs_of(store, "S")
    set_run(store, run.id, state=RunState.RUNNING, step=0, attempts=1)
    heart = Heartbeat(store, run.id, attempt=1, every_s=0.01)
    heart.step = 3
    lock = sqlite3.connect(tmp_path / "lab.db", isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN IMMEDIATE")  # another writer holds the database: the next beat waits for it
    heart.start()
    time.sleep(0.3)
    threading.Timer(0.7, lambda: lock.execute("ROLLBACK")).start()
    heart.stop()
    assert not heart.is_alive(), "stop() returned while a beat was still in flight"
    set_run(store, run.id, state=RunState.DONE, step=4)  # the run's final write
    time.sleep(0.3)
    heart.beat()  # even a beat that does come late changes nothing now
    with store.read() as s:
        final = s.get(Run, run.id)
    assert (final.state, final.step) == (RunState.DONE, 4)


# ------------------------------------------------------------------ stopping a run

@pytest.mark.timeout(60)  # without its own timeout the pool would wait for ever: fail instead of hanging
def test_cancel_kills_a_run_process_that_ignores_sigterm(store, monkeypatch):
    monkeypatch.setattr("studies.running.pool.STOP_GRACE_S", 1.0)
    create_study(store, "S", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3], steps=[2])
    (run,) = runs_of(store, "S")
    deaf = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(120)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert deaf.stdout.readline().strip() == "ready"
        set_run(store, run.id, state=RunState.RUNNING, attempts=1, pid=deaf.pid, host=hostname(), heartbeat=utcnow())
        pool = WorkerPool(store, ["cpu"], ["S"])
        pool.children["0:cpu"] = Child(deaf, run.id, run.study_id, "cpu", 1)
        set_state(store, "S", StudyState.CANCELLED)
        t0 = time.monotonic()
        pool._stop_cancelled(pool._studies())
        waited = time.monotonic() - t0
    finally:
        deaf.kill()
        deaf.wait()
    assert waited < 10, f"stopping a cancelled run took {waited:.1f} s"
    assert deaf.returncode == -signal.SIGKILL
    assert pool.children == {}
    assert runs_of(store, "S")[0].state == RunState.CANCELLED


# ------------------------------------------------------------------ TPE reservations

def test_a_reservation_left_by_a_dead_pool_is_cleared_at_once(store):
    create_study(store, "T", HUB_MODEL, "fs", methods=["ga"], lr_range=(1e-4, 1e-3), sampler="tpe", trials=2,
                 steps=[2])
    resume_study(store, "T")
    study_id = store.study("T").id
    now = utcnow()
    with store.write() as s:  # two pools mid-ask on this host: one died, one is this very process
        s.add(Run(study_id=study_id, method="", lr=-0.1, state=RunState.ASKING, heartbeat=now, host=hostname(), pid=dead_pid()))
        s.add(Run(study_id=study_id, method="", lr=-0.2, state=RunState.ASKING, heartbeat=now, host=hostname(), pid=1))
    WorkerPool(store, ["cpu"], ["T"], heartbeat_timeout=600)._reap_lost()
    with store.read() as s:
        left = s.exec(select(Run).where(Run.study_id == study_id)).all()
    assert [(r.lr, r.state) for r in left] == [(-0.2, RunState.ASKING)]  # the live pool's stays


# ------------------------------------------------------------------ resume

def finish(store, name: str, states: list[str]) -> None:
    """Mark the study's runs as the scheduler would leave them, and the study done."""
    for run, state in zip(runs_of(store, name), states):
        set_run(store, run.id, state=state, attempts=2 if state == RunState.FAILED else 1,
                last_error="attempt 2: RuntimeError: boom" if state == RunState.FAILED else None)
    with store.write() as s:
        st = s.exec(select(Study).where(Study.name == name)).one()
        st.state = StudyState.DONE
        s.add(st)


def test_resume_leaves_a_finished_study_finished(store, capsys):
    create_study(store, "S", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-4, 1e-3], steps=[2])
    finish(store, "S", [RunState.DONE, RunState.DIVERGED])
    assert cli_main("study", "resume", "S", "--storage", store.url) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["study S is done: nothing to resume"]
    assert study_state(store, "S") == StudyState.DONE
    assert cli_main("study", "run", "S", "--workers", "1", "--storage", store.url) == 0  # nothing to run either
    assert capsys.readouterr().out.strip() == "study S is done: nothing to resume"
    assert study_state(store, "S") == StudyState.DONE and [r.state for r in runs_of(store, "S")] == ["done", "diverged"]


def test_resume_retries_failed_runs_only_when_asked(store, capsys):
    create_study(store, "S", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-4, 1e-3], steps=[2])
    finish(store, "S", [RunState.DONE, RunState.FAILED])
    assert cli_main("study", "resume", "S", "--storage", store.url) == 0
    line = capsys.readouterr().out.strip()
    assert "done" in line and "1 run(s) failed" in line and "--retry-failed" in line, line
    assert study_state(store, "S") == StudyState.DONE
    assert [(r.state, r.attempts) for r in runs_of(store, "S")] == [("done", 1), ("failed", 2)]

    assert cli_main("study", "resume", "S", "--retry-failed", "--storage", store.url) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("study S: running; 1 failed run(s) queued again") and "unlearn study run S" in line, line
    assert study_state(store, "S") == StudyState.RUNNING
    assert [(r.state, r.attempts) for r in runs_of(store, "S")] == [("done", 1), ("pending", 0)]


def test_resume_starts_a_created_or_paused_study(store, capsys):
    create_study(store, "S", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3], steps=[2])
    assert cli_main("study", "resume", "S", "--storage", store.url) == 0
    assert study_state(store, "S") == StudyState.RUNNING
    set_state(store, "S", StudyState.PAUSED)
    assert cli_main("study", "resume", "S", "--storage", store.url) == 0
    assert study_state(store, "S") == StudyState.RUNNING
    assert "no scheduler serves it" in capsys.readouterr().out
