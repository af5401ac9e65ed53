"""A bounded chaos test of the run lifecycle: a study on PostgreSQL served by two workers (one on a
node of another name, so only heartbeats tell it about the first one's runs) and a study on SQLite
served by a scheduler, while a driver SIGKILLs and SIGSTOPs run processes, SIGKILLs the scheduler
once (and starts another), and restarts PostgreSQL once. When the dust settles every cell is
recorded exactly once, every Optuna trial is one cell's, no run is retried after it was done, and
each run's attempts are its retries plus the one that finished.

Why SIGSTOP: a stopped process is alive to its own node (never reaped there) but silent to the
others, which reap it by its stale heartbeat and run it again; when it wakes it must find its run
taken and write nothing (studies/running/fence.py). The figures are printed (pytest -s)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import optuna
import pytest
from sqlmodel import select

from studies.lifecycle.study import create_study, resume_study
from studies.store.db import CellRow, Event, Run, Store, Study
from studies.store.states import RunState
from tests.studies_helpers import cli_env, kill, make_forget_set, pid_alive, spawn, stop

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("postgresql"), pytest.mark.timeout(300)]

HEARTBEAT_TIMEOUT_S = 6  # what the pools and runs here use: reaping within seconds, not a minute
STEPS = [2, 4, 8]
KILLS, STOPS = 4, 2  # SIGKILLs and SIGSTOPs of run processes
SEED = 20261206


def restart_postgresql() -> None:
    """`pg_ctl restart` of the CI's server (.ci/postgres), as its owner: every connection drops."""
    data = os.environ["UNLEARN_TEST_PG_DATA"]
    cmd = [os.path.join(os.environ["UNLEARN_TEST_PG_BIN"], "pg_ctl"), "-D", data, "-l", os.path.join(data, "server.log"),
           "-m", "fast", "-w", "-t", "60", "restart"]  # (its options: the ones it was started with, postmaster.opts)
    if os.getuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    # no pipes: the server would hold them open for as long as it runs
    subprocess.run(cmd, cwd="/", check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=90)


def running_pids(stores: list[Store]) -> list[int]:
    """The live run processes the stores know of (every node is this machine here)."""
    pids = []
    for store in stores:
        try:
            with store.read() as s:
                pids += [p for p in s.exec(select(Run.pid).where(Run.state == RunState.RUNNING)).all() if p]
        except Exception:  # noqa: BLE001 - the server may be restarting this very moment
            pass
    return [p for p in pids if pid_alive(p)]


def check_every_cell_once(store: Store, url: str, name: str) -> dict:
    """The end state of one study, asserted; returns its figures."""
    with store.read() as s:
        study = s.exec(select(Study).where(Study.name == name)).one()
        runs = list(s.exec(select(Run).where(Run.study_id == study.id)).all())
        cells = list(s.exec(select(CellRow).join(Run, CellRow.run_id == Run.id).where(Run.study_id == study.id)).all())
        events = list(s.exec(select(Event).where(Event.study_id == study.id).order_by(Event.id)).all())
    assert {r.state for r in runs} <= {RunState.DONE, RunState.DIVERGED}, [(r.id, r.state, r.last_error) for r in runs]
    grid = [c for c in cells if c.step in STEPS]
    want = {(r.id, s) for r in runs for s in STEPS}
    have = [(c.run_id, c.step) for c in grid]
    trials = optuna.load_study(study_name=name, storage=url).trials
    by_trial = {t.number: (t.user_attrs.get("ul_run_id"), t.user_attrs.get("ul_step")) for t in trials}
    figures = {"runs": len(runs), "cells": len(grid), "trials": len(trials),
               "cells_lost": len(want - set(have)), "cells_duplicated": len(have) - len(set(have)),
               "trials_duplicated": len(by_trial) - len(set(by_trial.values()))}
    assert (figures["cells_lost"], figures["cells_duplicated"], figures["trials_duplicated"]) == (0, 0, 0), figures
    assert set(have) == want and all(c.trial_number is not None for c in grid)
    assert len(trials) == len(grid), "an Optuna trial that is no cell's, or a cell without its trial"
    assert {c.trial_number: (c.run_id, c.step) for c in grid} == by_trial
    retries = {r.id: 0 for r in runs}
    for r in runs:
        kinds = [e.kind for e in events if e.run_id == r.id]
        finished = max(i for i, k in enumerate(kinds) if k in (RunState.DONE, RunState.DIVERGED))
        assert not any(k in ("retry", "started") for k in kinds[finished + 1:]), (r.id, kinds)  # never after done
        retries[r.id] = kinds.count("retry")
        assert r.attempts == retries[r.id] + 1, (r.id, r.attempts, kinds)  # the attempts add up
    return {**figures, "retries": sum(retries.values())}


def test_runs_survive_kills_stops_a_dead_scheduler_and_a_postgresql_restart(pg_database, tmp_path, forget_set_files,
                                                                            tiny_model_dir):
    if not os.environ.get("UNLEARN_TEST_PG_BIN") or not os.environ.get("UNLEARN_TEST_PG_DATA"):
        pytest.skip("no PostgreSQL server of the CI's to restart (.ci/postgres)")
    pg_url, _ = pg_database
    sqlite_url = f"sqlite:///{tmp_path / 'lab.db'}"
    stores = {}
    # PostgreSQL: four runs for its two workers (kills and stops); SQLite: two for its scheduler (kills)
    for url, name, methods in ((pg_url, "P", ["ga", "ga_gd"]), (sqlite_url, "Q", ["ga"])):
        store = stores[name] = Store(url)
        make_forget_set(store, "fs", forget_set_files)
        create_study(store, name, str(tiny_model_dir), "fs", methods=methods, lrs=[1e-3, 4e-3],
                     steps=STEPS, max_attempts=50, batch_size=2)
    resume_study(stores["P"], "P")  # running: workers serve it
    home = tmp_path / "home"
    env = cli_env(home, UNLEARN_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT_S))
    logs = tmp_path / "logs"
    logs.mkdir()
    pools = [spawn("worker", "--study", "P", "--workers", "1", "--storage", pg_url, home=home, env=env,
                   log=logs / "worker-a.log"),
             spawn("worker", "--study", "P", "--workers", "1", "--storage", pg_url, home=home,
                   env={**env, "UNLEARN_NODE": "soak-node-b"}, log=logs / "worker-b.log")]
    scheduler = spawn("study", "run", "Q", "--workers", "1", "--storage", sqlite_url, home=home, env=env,
                      log=logs / "scheduler-1.log")
    rng = random.Random(SEED)
    figures = {"run_kills": 0, "run_stops": 0, "scheduler_kills": 0, "postgresql_restarts": 0}
    stopped: dict[int, float] = {}  # pid -> when to wake it
    plan = ["kill"] * KILLS + ["stop"] * STOPS + ["scheduler", "postgresql"]
    rng.shuffle(plan)
    t0 = time.monotonic()
    try:
        while plan and time.monotonic() - t0 < 150:
            time.sleep(rng.uniform(0.5, 1.5))
            for pid, wake in list(stopped.items()):
                if time.monotonic() >= wake:
                    kill(pid, signal.SIGCONT)
                    del stopped[pid]
            action = plan[0]
            if action == "scheduler":
                scheduler.kill()
                scheduler.wait()
                figures["scheduler_kills"] += 1
                time.sleep(1.0)
                scheduler = spawn("study", "run", "Q", "--workers", "1", "--storage", sqlite_url, home=home, env=env,
                                  log=logs / "scheduler-2.log")
            elif action == "postgresql":
                restart_postgresql()
                figures["postgresql_restarts"] += 1
            else:
                # a stop goes to a PostgreSQL run: there a worker of another node name watches it by its beat
                pids = [p for p in running_pids([stores["P"]] if action == "stop" else list(stores.values()))
                        if p not in stopped]
                if not pids:
                    continue  # nothing running this moment: the same action next time
                pid = rng.choice(pids)
                if action == "kill":
                    figures["run_kills"] += kill(pid, signal.SIGKILL)
                else:  # silent for longer than the heartbeat timeout: another node's worker reaps it
                    if kill(pid, signal.SIGSTOP):
                        figures["run_stops"] += 1
                        stopped[pid] = time.monotonic() + rng.uniform(HEARTBEAT_TIMEOUT_S + 2, HEARTBEAT_TIMEOUT_S + 6)
            plan.pop(0)
        for pid in stopped:
            kill(pid, signal.SIGCONT)
        stopped.clear()
        for proc in [*pools, scheduler]:
            assert proc.wait(timeout=240) == 0, proc.args
    finally:
        for pid in stopped:
            kill(pid, signal.SIGCONT)
        for proc in [*pools, scheduler]:
            stop(proc)
    assert plan == [], f"the studies finished before the driver was done: {plan} left"
    assert figures["run_stops"] == STOPS
    figures["wall_s"] = round(time.monotonic() - t0, 1)
    # attempts that woke (SIGCONT) to find their run taken by another node's worker, and stopped
    figures["stale_attempts_stopped"] = sum(p.read_text(errors="replace").count("no longer owns it")
                                            for p in tmp_path.rglob("*.log"))
    for url, name in ((pg_url, "P"), (sqlite_url, "Q")):
        figures[name] = check_every_cell_once(Store(url, create=False), url, name)
    print("soak:", json.dumps(figures))
    for store in stores.values():
        store.engine.dispose()
