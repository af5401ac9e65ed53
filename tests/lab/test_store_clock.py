"""Heartbeats on the store's clock (Store.now): written and aged with PostgreSQL's `now()`, so a node
whose clock is off (skew, an NTP step, a suspend) neither has its live runs reaped nor keeps dead
ones; and a store whose timestamp columns an older sqlmodel made without a time zone is upgraded
(v6), where under a server TimeZone other than UTC every beat read back was off by the offset."""
from __future__ import annotations

import datetime as dt
import sqlite3

import pytest
from sqlalchemy import text

from studies.lifecycle.study import create_study
from studies.reading.status import study_status
from studies.running.settle import reap_lost
from studies.running.worker import Heartbeat
from studies.store import clock as clock_module
from studies.store import db as db_module
from studies.store.clock import age_s
from studies.store.db import SCHEMA_VERSION, Store
from studies.store.states import RunState
from tests.studies_helpers import HUB_MODEL, make_forget_set, runs_of, set_run

TIMEOUT_S = 60.0
HOUR = dt.timedelta(hours=1)



def host_clock(monkeypatch, offset: dt.timedelta) -> None:
    """This process's notion of time, `offset` away from the true one."""
    true = clock_module.utcnow
    monkeypatch.setattr(clock_module, "utcnow", lambda: true() + offset)
    monkeypatch.setattr(db_module, "utcnow", lambda: true() + offset)


@pytest.fixture
def pg_store(pg_database, forget_set_files):
    url, _ = pg_database
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "S", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3], steps=[2])
    yield store
    store.engine.dispose()


@pytest.mark.xdist_group("postgresql")
def test_a_beat_from_a_node_whose_clock_is_an_hour_behind_is_fresh_to_a_node_an_hour_ahead(pg_store, monkeypatch):
    (run,) = runs_of(pg_store, "S")
    set_run(pg_store, run.id, state=RunState.RUNNING, attempts=1, host="node-behind", pid=4242)
    host_clock(monkeypatch, -HOUR)  # the run's node
    Heartbeat(pg_store, run.id, attempt=1).beat()
    monkeypatch.undo()
    host_clock(monkeypatch, +HOUR)  # the reaper's node
    reaped = []
    reap_lost(pg_store, "node-ahead", set(), TIMEOUT_S, lambda *a: reaped.append(a))
    assert reaped == []  # on host clocks the beat was 2 h old: reaped
    (seen,) = study_status(pg_store, "S")["running"]
    assert seen["heartbeat_age_s"] < 10


@pytest.mark.xdist_group("postgresql")
def test_a_beat_that_stopped_is_lost_however_slow_the_reapers_clock(pg_store, monkeypatch):
    (run,) = runs_of(pg_store, "S")
    set_run(pg_store, run.id, state=RunState.RUNNING, attempts=1, host="node-dead", pid=4242)
    with pg_store.write() as s:  # its last beat, two timeouts ago on the store's clock
        s.exec(text("UPDATE ul_run SET heartbeat = now() - interval '120 seconds' WHERE id = :id"), params={"id": run.id})
    host_clock(monkeypatch, -HOUR)  # the reaper's clock is an hour slow: on it the beat is in the future
    reaped = []
    reap_lost(pg_store, "node-slow", set(), TIMEOUT_S, lambda run_id, why, attempt: reaped.append((run_id, why)))
    assert [r[0] for r in reaped] == [run.id] and "heartbeat lost for 120 s" in reaped[0][1]


@pytest.mark.xdist_group("postgresql")
def test_a_store_with_naive_timestamps_under_a_new_york_server_is_upgraded(pg_database, forget_set_files, monkeypatch):
    """A v5 store as sqlmodel < 0.0.45 made it (`timestamp without time zone`), on a server whose
    TimeZone is America/New_York: a fresh beat read back 18,000 s old. Opening it upgrades the
    columns (each value read in the server's zone, where it was written) and beats are fresh."""
    url, admin = pg_database
    name = url.rsplit("/", 1)[1]
    admin.cursor().execute(f"ALTER DATABASE {name} SET timezone TO 'America/New_York'")
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "S", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3], steps=[2])
    with store.write() as s:  # the store as an older sqlmodel and unlearn-lab v5 left it
        for table, column in s.exec(text(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND data_type = 'timestamp with time zone' AND table_name LIKE 'ul_%'")).all():
            s.exec(text(f'ALTER TABLE {table} ALTER COLUMN "{column}" TYPE TIMESTAMP WITHOUT TIME ZONE'))
        s.exec(text("ALTER TABLE ul_study DROP COLUMN attack_heartbeat"))
        s.exec(text("UPDATE ul_meta SET value = '5' WHERE key = 'schema_version'"))
        s.exec(text("UPDATE ul_run SET state = 'running', attempts = 1, heartbeat = now()"))
        naive_beat = s.exec(text("SELECT heartbeat FROM ul_run")).one()[0]
    store.engine.dispose()
    assert naive_beat.tzinfo is None and age_s(naive_beat) > 17_000  # the defect, as the old columns show it

    store = Store(url, create=False)
    with store.read() as s:
        kinds = {r[0] for r in s.exec(text(
            "SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name LIKE 'ul_%' AND data_type LIKE 'timestamp%'")).all()}
    assert kinds == {"timestamp with time zone"}
    (seen,) = study_status(store, "S")["running"]
    assert seen["heartbeat_age_s"] < 60  # the value written before the upgrade, read right
    created = runs_of(store, "S")[0].created_at
    assert abs((db_module.utcnow() - created).total_seconds()) < 600
    Heartbeat(store, runs_of(store, "S")[0].id, attempt=1).beat()
    assert study_status(store, "S")["running"][0]["heartbeat_age_s"] < 10
    store.engine.dispose()


def test_a_v5_sqlite_store_gains_the_attack_jobs_heartbeat(tmp_path, forget_set_files):
    path = tmp_path / "lab.db"
    store = Store(f"sqlite:///{path}")
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "S", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3], steps=[2])
    with sqlite3.connect(path) as c:  # as v5 left it
        c.execute("ALTER TABLE ul_study DROP COLUMN attack_heartbeat")
        c.execute("UPDATE ul_meta SET value = '5' WHERE key = 'schema_version'")
    store = Store(f"sqlite:///{path}", create=False)
    assert store.study("S").attack_heartbeat is None
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM ul_meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
