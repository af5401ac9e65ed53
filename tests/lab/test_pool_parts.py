"""The worker pool's named parts, each on its own: the command lines of the processes it starts
(never the store's URL), whose pool an "attacks started" event names (its own columns, read from
the message of an older store once, by the migration), the grace a gone run process gets (two
heartbeats), and the lab's settings (resolved once, the defaults in one place)."""
from __future__ import annotations

import datetime as dt
import os
import sqlite3

from sqlmodel import select

from studies.lifecycle.study import create_study
from studies.running import processes
from studies.running.settle import GONE_GRACE_S, reap_lost
from studies.running.worker import HEARTBEAT_EVERY_S
from studies.store.db import SCHEMA_VERSION, Event, Run, Store, hostname, utcnow
from studies.store.states import RunState
from tests.studies_helpers import HUB_MODEL, dead_pid, runs_of, set_run

SECRET_URL = "postgresql+psycopg2://lab:s3cret@db/unlearn"


def test_every_command_line_the_lab_builds_leaves_the_store_url_to_the_environment(tmp_path):
    one = processes.worker_command(7, "cpu", 2)
    assert one == ["-m", "studies.running.worker", "--run-id", "7", "--device", "cpu", "--threads", "2"]
    two = processes.worker_command(7, "cuda", 0, processes=2)
    assert two[:4] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert two[-8:] == ["-m", "studies.running.worker", "--run-id", "7", "--device", "cuda", "--threads", "0"]
    attack = processes.attack_command("S", "cpu", 1, claim=9)
    scheduler = processes.pool_command("S", ["cpu", "cpu"])
    assert scheduler == ["-m", "studies.running.pool", "--study", "S", "--slots", "cpu,cpu"]
    for command in (one, two, attack, scheduler):
        assert not any("s3cret" in a or "postgresql" in a for a in command)

    class Named:  # a store as processes.start sees one: its URL
        url = SECRET_URL

    assert processes.child_env(Named)["UNLEARN_STORAGE_URL"] == SECRET_URL
    assert processes.devices_of(["cuda:2", "cuda:3"]) == ("2,3", "cuda")
    assert processes.devices_of(["cpu"]) == ("", "cpu")
    log = tmp_path / "out.log"
    proc = processes.start(["-c", "import os; print(os.environ['UNLEARN_STORAGE_URL'], os.environ['CUDA_VISIBLE_DEVICES'])"],
                           Named, log, cuda_visible="")
    assert proc.wait(timeout=60) == 0
    assert log.read_text().split("\n")[0] == f"{SECRET_URL} "


def test_a_v3_store_gains_the_event_columns_and_older_jobs_keep_their_pool(tmp_path):
    path = tmp_path / "lab.db"
    Store(f"sqlite:///{path}").log("attacks started", "best-cell attacks started by pid 4242 on node-7", 1)
    with sqlite3.connect(path) as c:  # the store as the code before v4 left it
        c.execute("ALTER TABLE ul_event DROP COLUMN pid")
        c.execute("ALTER TABLE ul_event DROP COLUMN host")
        c.execute("INSERT INTO ul_event (study_id, at, kind, message) VALUES (1, '2026-01-01', 'done', 'pid 9 on x')")
        c.execute("UPDATE ul_meta SET value = '3' WHERE key = 'schema_version'")
    assert SCHEMA_VERSION >= 4
    store = Store(f"sqlite:///{path}", create=False)
    with store.read() as s:
        events = {e.kind: (e.pid, e.host) for e in s.exec(select(Event)).all()}
    assert events == {"attacks started": (4242, "node-7"), "done": (None, None)}  # only the job's event is read
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM ul_meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)


def test_a_run_process_gone_from_this_host_waits_two_heartbeats(store):
    assert GONE_GRACE_S == 2 * HEARTBEAT_EVERY_S
    create_study(store, "S", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3], steps=[2])
    (run,) = runs_of(store, "S")
    set_run(store, run.id, state=RunState.RUNNING, attempts=1, pid=dead_pid(), host=hostname(), heartbeat=utcnow())
    settled = []
    reap_lost(store, hostname(), set(), 600, lambda run_id, why, attempt: settled.append(why))
    assert settled == []  # its own pool settles it first, with its exit code
    old = utcnow() - dt.timedelta(seconds=GONE_GRACE_S + 1)
    set_run(store, run.id, heartbeat=old)
    reap_lost(store, hostname(), {run.id}, 600, lambda run_id, why, attempt: settled.append(why))
    assert settled == []  # watched by this pool
    reap_lost(store, hostname(), set(), 600, lambda run_id, why, attempt: settled.append(why))
    assert settled == [f"process {runs_of(store, 'S')[0].pid} is gone"]


def test_lab_settings_are_resolved_once_and_declared_once(monkeypatch):
    from studies.settings import LabSettings, lab_settings

    assert lab_settings() is lab_settings()
    monkeypatch.setenv("UNLEARN_HEARTBEAT_TIMEOUT", "5")
    assert LabSettings().heartbeat_timeout == 5.0
    monkeypatch.delenv("UNLEARN_HEARTBEAT_TIMEOUT")
    monkeypatch.chdir(os.path.dirname(__file__))  # no .env here
    assert LabSettings().heartbeat_timeout == 60.0 and LabSettings().storage_url == "sqlite:///unlearn.db"


def test_every_reader_parses_a_study_spec_one_way(store):
    from studies.lifecycle.spec import StudySpec, study_spec

    study = create_study(store, "S", HUB_MODEL, "fs", methods=["ga", "ga_gd"], lrs=[1e-3], steps=[2, 4])
    assert study_spec(store.study("S")) == StudySpec.from_dict(study.spec)
    with store.read() as s:
        assert [r.method for r in s.exec(select(Run)).all()] == ["ga", "ga_gd"]


def test_cpu_runs_share_the_cores_and_keep_to_omp_num_threads(monkeypatch):
    """A pool's CPU runs split the cores between them, at most OMP_NUM_THREADS each where it is set
    (a batch system's CPUs per job, or the tests' one thread): more threads than cores only spin."""
    from studies.running.pool import cpu_threads

    cores = os.cpu_count() or 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads(["cpu"]) == cores and cpu_threads(["cpu"] * (2 * cores)) == 1
    assert cpu_threads(["cuda:0", "cuda:1"]) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(["cpu"]) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert cpu_threads(["cpu"]) == cores
