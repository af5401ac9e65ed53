"""A SLURM task stopped mid-run, on the CI's single-node cluster (.ci/slurm) and PostgreSQL
(.ci/postgres): a task `scancel`led gives its run back, no attempt spent, and another task finishes
it; a task that reaches its `--time` with --requeue gives its run back, goes back in the queue and
serves again when it restarts; an array scancelled whole leaves its run pending for the next
`study run --slurm`, whose array takes it."""
from __future__ import annotations

import os
import subprocess

import pytest

from studies.lifecycle.study import create_study
from studies.store.db import Store
from tests.studies_helpers import cli, events_of, make_forget_set, milestones_of, runs_of, study_state, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("postgresql"), pytest.mark.timeout(400),
              pytest.mark.skipif(not os.environ.get("SLURM_CONF"),
                                 reason="SLURM_CONF is not set (.ci/slurm sets it where a cluster can run)")]


def _squeue(*args: str) -> str:
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=30).stdout.strip()


def _submit(store_url: str, name: str, home, *flags: str) -> str:
    r = cli("study", "run", name, "--slurm", *flags, "--storage", store_url, home=home)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("SLURM job array ", 1)[1].split()[0]


def test_a_task_scancelled_mid_run_gives_its_run_to_the_other_task(pg_database, tmp_path, forget_set_files,
                                                                   tiny_model_dir):
    url, _ = pg_database
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    steps = [2, 120]  # long enough for both tasks to be mid-run when one is cancelled
    create_study(store, "K", str(tiny_model_dir), "fs", methods=["ga"], lrs=[1e-5, 2e-5], steps=steps)
    array = _submit(url, "K", tmp_path / "home", "--jobs", "2", "--time", "00:10:00")

    def both_under_way():
        runs = runs_of(store, "K")
        return len({x.slurm_job for x in runs if x.state == "running" and x.step >= 1 and x.slurm_job}) == 2

    wait_for(both_under_way, 180, "both tasks mid-run", interval=0.2)
    victim = next(x for x in runs_of(store, "K") if x.state == "running")
    subprocess.run(["scancel", victim.slurm_job], check=True, timeout=30)
    wait_for(lambda: study_state(store, "K") == "done", 300, "the other task to finish the study", interval=1.0)
    runs = {x.id: x for x in runs_of(store, "K")}
    assert {x.state for x in runs.values()} == {"done"}
    assert all(x.attempts == 1 for x in runs.values()), [(x.id, x.attempts, x.last_error) for x in runs.values()]
    assert runs[victim.id].slurm_job != victim.slurm_job  # finished by the task that was not cancelled
    given = [e for e in events_of(store, "K", "given back") if e.run_id == victim.id]
    assert len(given) == 1 and "no attempt spent" in given[0].message and "SIGTERM" in given[0].message, given
    cells = sorted((m.run_id, m.step) for m in milestones_of(store, "K"))
    assert cells == sorted((i, s) for i in runs for s in steps)  # every cell once
    wait_for(lambda: not _squeue("-j", array), 60, "the array to leave the queue", interval=0.5)
    print(f"array {array}: task {victim.slurm_job} cancelled at step {victim.step}; its run finished by "
          f"{runs[victim.id].slurm_job}, attempts {[x.attempts for x in runs.values()]}")
    store.engine.dispose()


def test_a_task_at_its_time_limit_gives_its_run_back_and_requeues(pg_database, tmp_path, forget_set_files,
                                                                  tiny_model_dir):
    url, _ = pg_database
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    # one run far longer than the task's minute: the time limit always comes first
    create_study(store, "T", str(tiny_model_dir), "fs", methods=["ga"], lrs=[1e-5], steps=[2, 100000])
    home = tmp_path / "home"
    array = _submit(url, "T", home, "--jobs", "1", "--time", "00:01:00", "--requeue")
    wait_for(lambda: events_of(store, "T", "given back"), 150, "SLURM's time-limit signal to stop the task",
             interval=0.5)
    given = events_of(store, "T", "given back")[0]
    assert "requeued" in given.message and "no attempt spent" in given.message, given.message
    job = subprocess.run(["scontrol", "-o", "show", "job", array], capture_output=True, text=True, timeout=30).stdout
    assert "Restarts=1" in job, job
    wait_for(lambda: runs_of(store, "T")[0].state in ("pending", "running"), 30, "the run given back")
    # SLURM holds a requeued batch job for about two minutes (BeginTime); once it is back in the
    # queue, let it start now
    wait_for(lambda: _squeue("-j", array, "-o", "%T") == "PENDING", 60, "the task back in the queue", interval=0.5)
    update = subprocess.run(["scontrol", "update", f"jobid={array}", "StartTime=now"], capture_output=True, text=True,
                            timeout=30)
    assert update.returncode == 0, update.stderr
    wait_for(lambda: (r := runs_of(store, "T")[0]).state == "running" and r.step >= 1, 150,
             "the requeued task to take the run again", interval=0.5)
    run = runs_of(store, "T")[0]
    assert run.attempts == 1, (run.attempts, run.last_error)  # the stop spent no attempt
    logs = [p.read_text() for p in (home / "logs" / "T" / "slurm").rglob("*_log.out")]
    assert any("(start 2)" in text for text in logs), logs
    # the whole array scancelled: its run waits, given back, for the next submission, which takes it
    subprocess.run(["scancel", array], check=True, timeout=30)
    wait_for(lambda: not _squeue("-j", array), 90, "the array to leave the queue", interval=0.5)
    wait_for(lambda: runs_of(store, "T")[0].state == "pending", 60, "the run given back")
    again = _submit(url, "T", home, "--jobs", "1", "--time", "00:10:00")
    assert again != array
    wait_for(lambda: (r := runs_of(store, "T")[0]).state == "running" and (r.slurm_job or "").startswith(again), 150,
             "the new array to take the run", interval=0.5)
    assert runs_of(store, "T")[0].attempts == 1  # neither stop spent an attempt
    c = cli("study", "cancel", "T", "--storage", url, home=home)
    assert c.returncode == 0, c.stderr
    wait_for(lambda: not _squeue("-j", again), 90, "the array to leave the queue", interval=0.5)
    wait_for(lambda: runs_of(store, "T")[0].state == "cancelled", 60, "the run cancelled")
    print(f"array {array}: requeued at its time limit ({given.message}); served again; scancelled; "
          f"array {again} submitted for the pending run took it; cancelled")
    store.engine.dispose()
