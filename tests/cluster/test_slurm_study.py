"""`unlearn study run NAME --slurm`: the study's workers as one SLURM job array (submitit, the real
sbatch) on the CI's single-node cluster (.ci/slurm) and PostgreSQL (.ci/postgres). What the outside
check runs: a 2-task array finishes a study with every cell once while `squeue` shows it."""
from __future__ import annotations

import json
import os
import subprocess

import optuna
import pytest

from studies.lifecycle.study import create_study
from studies.store.db import Store
from tests.studies_helpers import (
    assert_one_line_error,
    cli,
    events_of,
    make_forget_set,
    milestones_of,
    runs_of,
    study_state,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("postgresql"), pytest.mark.timeout(400),
              pytest.mark.skipif(not os.environ.get("SLURM_CONF"),
                                 reason="SLURM_CONF is not set (.ci/slurm sets it where a cluster can run)")]
STEPS = [2, 4]


def test_a_two_task_array_finishes_a_study_with_every_cell_once(pg_database, tmp_path, forget_set_files, tiny_model_dir):
    url, _ = pg_database
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "S", str(tiny_model_dir), "fs", methods=["ga", "ga_gd"], lrs=[1e-3, 4e-3], steps=STEPS)
    home = tmp_path / "home"
    r = cli("study", "run", "S", "--slurm", "--jobs", "2", "--time", "00:10:00", "--partition", "ci",
            "--storage", url, home=home)
    assert r.returncode == 0, r.stderr
    assert "SLURM job array" in r.stdout, r.stdout
    array = r.stdout.split("SLURM job array ", 1)[1].split()[0]
    queue = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i"], capture_output=True, text=True, timeout=30)
    seen = queue.stdout.split()
    wait_for(lambda: study_state(store, "S") == "done", 300, "the array to finish the study", interval=1.0)
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip(),
             60, "the array to leave the queue", interval=0.5)
    status = json.loads(cli("study", "status", "S", "--json", "--storage", url, home=home).stdout)
    assert status["cells"]["done"] == status["cells"]["total"] == 8, status["cells"]  # what the outside check reads
    assert [a["array"] for a in status["slurm"]["arrays"]] == [array]
    runs = runs_of(store, "S")
    cells = [(m.run_id, m.step) for m in milestones_of(store, "S") if m.step in STEPS]
    assert sorted(cells) == sorted((x.id, s) for x in runs for s in STEPS)  # every cell once
    trials = optuna.load_study(study_name="S", storage=url).trials
    assert sorted((t.user_attrs["ul_run_id"], t.user_attrs["ul_step"]) for t in trials) == sorted(cells)
    assert {x.state for x in runs} == {"done"} and all(x.attempts == 1 for x in runs)
    logs = sorted((home / "logs" / "S" / "slurm").rglob("*_log.out"))
    served = [p for p in logs if "serving study S" in p.read_text()]
    assert len(served) == 2, [p.read_text()[-500:] for p in logs]
    assert "submitted job array" in events_of(store, "S", "slurm")[0].message
    shown = cli("study", "logs", "S", "--json", "--storage", url, home=home)  # what the tasks wrote, read back
    tasks = {x["slurm_job"] for x in json.loads(shown.stdout) if x["kind"] == "slurm"
             and any("serving study S" in line for line in x["tail"])}
    assert tasks == {f"{array}_0", f"{array}_1"}, shown.stdout[-2000:]
    print(f"array {array}: squeue showed {seen}; {len(runs)} runs, {len(cells)} cells")
    store.engine.dispose()


def test_an_sqlite_store_is_refused_for_slurm_in_one_line(tmp_path, forget_set_files):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "S", "EleutherAI/pythia-14m", "fs", methods=["ga"], lrs=[1e-3], steps=[2])
    r = cli("study", "run", "S", "--slurm", "--storage", url, home=tmp_path / "home")
    assert_one_line_error(r, "--slurm needs a store every node reaches", "--slurm-allow-sqlite")


def test_study_cancel_cancels_the_array_and_records_its_runs_cancelled(pg_database, tmp_path, forget_set_files,
                                                                       tiny_model_dir):
    url, _ = pg_database
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    # runs long enough to be under way when the cancel comes: 200 steps at an lr that does not diverge
    create_study(store, "C", str(tiny_model_dir), "fs", methods=["ga"], lrs=[1e-5, 2e-5, 4e-5], steps=[2, 200])
    home = tmp_path / "home"
    r = cli("study", "run", "C", "--slurm", "--jobs", "2", "--time", "00:10:00", "--storage", url, home=home)
    assert r.returncode == 0, r.stderr
    array = r.stdout.split("SLURM job array ", 1)[1].split()[0]
    wait_for(lambda: any(x.state == "running" and x.step >= 1 for x in runs_of(store, "C")), 120, "a run under way",
             interval=0.2)
    c = cli("study", "cancel", "C", "--storage", url, home=home)
    assert c.returncode == 0, c.stderr
    assert f"SLURM job array(s) {array} cancelled" in c.stdout, c.stdout
    wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip(),
             90, "the array to leave the queue", interval=0.5)
    wait_for(lambda: {x.state for x in runs_of(store, "C")} <= {"cancelled", "done"}, 60,
             "every run cancelled (or done before the cancel)", interval=0.5)
    assert study_state(store, "C") == "cancelled"
    assert any(x.state == "cancelled" for x in runs_of(store, "C"))
    store.engine.dispose()
