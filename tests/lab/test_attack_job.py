"""The best-cell attack job across pools (studies/running/attack_job.py): claimed once, claimed again
when its pool is gone from this node or, on another node, when its beat is stale; a superseded job
writes nothing and stops; a pool finishes a study whose job a dead node held."""
from __future__ import annotations

import datetime as dt
import os

import pytest

from studies.lifecycle.study import create_study
from studies.running.attack_job import (
    AttackBeat,
    AttackJobLost,
    attack_job_state,
    claim_attack_job,
    log_attack_event,
    owner_alive,
)
from studies.running.pool import WorkerPool
from studies.store.db import Event, Study, hostname
from studies.store.states import RunState, StudyState
from tests.studies_helpers import HUB_MODEL, dead_pid, events_of, runs_of, set_run, study_state

TIMEOUT_S = 60.0


@pytest.fixture
def study(store):
    return create_study(store, "B", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3], steps=[2],
                        attacks="relearn", attacks_at="best")


def foreign_claim(store, study_id: int, beat_age_s: float) -> int:
    """An "attacks started" event of a pool on another node whose job last beat `beat_age_s` ago."""
    with store.write() as s:
        row = s.get(Study, study_id)
        row.attack_heartbeat = store.now(s) - dt.timedelta(seconds=beat_age_s)
        s.add(row)
        event = Event(study_id=study_id, kind="attacks started", pid=4242, host="node-elsewhere", message="started on node-elsewhere")
        s.add(event)
        s.flush()
        return event.id


def test_owner_alive_reads_the_pid_here_and_the_beat_elsewhere():
    here = hostname()
    assert owner_alive(Event(kind="attacks started", message="", pid=os.getpid(), host=here), here)
    assert not owner_alive(Event(kind="attacks started", message="", pid=dead_pid(), host=here), here)
    elsewhere = Event(kind="attacks started", message="", pid=dead_pid(), host="elsewhere")
    assert owner_alive(elsewhere, here, 5.0, TIMEOUT_S) and not owner_alive(elsewhere, here, 61.0, TIMEOUT_S)
    assert owner_alive(elsewhere, here)  # no timeout given: not checkable, taken to be alive
    assert owner_alive(Event(kind="attacks started", message="no pid here"), here, 1e9, TIMEOUT_S)  # pre-v4 event


def test_the_job_is_claimed_once_and_again_only_when_its_pool_is_gone(store, study):
    assert attack_job_state(store, study.id)[0] is None
    claim = claim_attack_job(store, study, TIMEOUT_S)
    assert claim is not None and f"pid {os.getpid()}" in attack_job_state(store, study.id)[1].message
    assert claim_attack_job(store, study, TIMEOUT_S) is None  # its pool (this process) runs here
    with store.write() as s:  # the claim's pool is gone from this node
        s.add(Event(study_id=study.id, kind="attacks started", pid=dead_pid(), host=hostname(), message="gone"))
    assert claim_attack_job(store, study, TIMEOUT_S) is not None
    assert log_attack_event(store, study.id, None, "attacks stopped", "interrupted")
    assert claim_attack_job(store, study, TIMEOUT_S) is not None  # stopped: due again
    for end in ("attacks done", "attacks failed"):
        store.log(end, "over", study.id)
        assert claim_attack_job(store, study, TIMEOUT_S) is None


def test_a_job_on_another_node_is_taken_over_only_once_its_beat_is_stale(store, study):
    foreign_claim(store, study.id, beat_age_s=5)
    assert claim_attack_job(store, study, TIMEOUT_S) is None  # beating: alive, wherever it runs
    old = foreign_claim(store, study.id, beat_age_s=TIMEOUT_S + 30)
    claim = claim_attack_job(store, study, TIMEOUT_S)
    assert claim is not None and claim != old
    state, event = attack_job_state(store, study.id)
    assert state == "started" and "node-elsewhere is gone: no beat for" in event.message


def test_a_superseded_job_writes_nothing_and_its_beat_stops_it(store, study):
    old = foreign_claim(store, study.id, beat_age_s=TIMEOUT_S + 30)
    new = claim_attack_job(store, study, TIMEOUT_S)
    beat = AttackBeat(store, study.id, old, every_s=3600)
    beat.beat()
    assert beat.lost
    with pytest.raises(AttackJobLost):
        beat.check()
    assert not log_attack_event(store, study.id, old, "attacks failed", "the old job's exit")
    assert not log_attack_event(store, study.id, old, "attacks done", "the old job's result")
    assert attack_job_state(store, study.id)[1].id == new  # still the new claim's
    live = AttackBeat(store, study.id, new, every_s=3600)
    live.beat()
    assert not live.lost and log_attack_event(store, study.id, new, "attacks done", "the new job's result")


def test_a_pool_finishes_a_study_whose_job_a_dead_node_held(store, study):
    """Before: a job claimed on another node counted as alive for ever, the study stayed running
    and every pool looped. Now the pool takes it over once its beat is stale and runs it (here
    there is no computed cell, so the job ends at once: 0 of 1 methods)."""
    (run,) = runs_of(store, "B")
    set_run(store, run.id, state=RunState.FAILED, attempts=2)
    with store.write() as s:
        s.get(Study, study.id).state = StudyState.RUNNING
    foreign_claim(store, study.id, beat_age_s=TIMEOUT_S + 30)
    WorkerPool(store, ["cpu"], ["B"], heartbeat_timeout=TIMEOUT_S, poll_s=0.1).serve()
    assert study_state(store, "B") == StudyState.DONE
    kinds = [e.kind for e in events_of(store, "B") if e.kind.startswith("attacks")]
    assert kinds == ["attacks started", "attacks started", "attacks done"]
    assert "0 of 1 methods" in events_of(store, "B", "attacks done")[0].message
