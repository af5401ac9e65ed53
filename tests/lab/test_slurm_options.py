"""The SLURM options of `study run --slurm` and the app's form, declared once (studies/running/
slurm_options.py), and what a run claimed by a SLURM task shows. No cluster needed: the end-to-end
tests on a real one are in tests/cluster/."""
from __future__ import annotations

import json
import pickle

import pytest

from engine.errors import UnlearnError
from studies.lifecycle.study import create_study
from studies.running.claim import claim_pending, slurm_job_here
from studies.running.slurm import ArrayTask, RequeueingArrayTask
from studies.running.slurm_options import SLURM_FIELDS, SlurmOptions, slurm_options
from studies.store.db import Store
from tests.studies_helpers import assert_one_line_error, cli_in_process, make_forget_set


def test_both_faces_read_the_same_values_into_the_same_options():
    typed = slurm_options({"jobs": 4, "time": "02:30:00", "gpus_per_job": 2, "extra": ["constraint=a100", "--exclusive=1"],
                           "requeue": True})
    texted = slurm_options({"jobs": " 4 ", "time": "02:30:00", "gpus_per_job": "2", "partition": "",
                            "extra": "constraint=a100 --exclusive=1", "requeue": True})
    assert typed == texted == SlurmOptions(jobs=4, time="02:30:00", gpus_per_job=2, requeue=True,
                                           extra={"constraint": "a100", "exclusive": "1"})
    assert slurm_options({}) == SlurmOptions()
    assert (SlurmOptions(time="90").seconds, SlurmOptions(time="1:30").seconds, SlurmOptions(time="00:00:30").minutes) == (5400, 90, 1)


@pytest.mark.parametrize("given, needle", [
    ({"time": "9 o'clock"}, "--time must be HH:MM:SS"),
    ({"time": "00:00:00"}, "--time must be HH:MM:SS"),
    ({"jobs": "two"}, "--jobs takes a whole number"),
    ({"jobs": 0}, "--jobs must be at least 1"),
    ({"gpus_per_job": -1}, "--gpus-per-job must be 0 or more"),
    ({"extra": "constraint"}, "--slurm-opt takes KEY=VALUE"),
])
def test_a_bad_value_is_one_line_naming_its_input(given, needle):
    with pytest.raises(UnlearnError, match=needle):
        slurm_options(given)
    field = next(f for f in SLURM_FIELDS if f.name in given)
    with pytest.raises(UnlearnError) as e:  # the app names its field instead of the flag
        slurm_options(given, label_of=lambda f: f"the form's {f.name}")
    assert f"the form's {field.name}" in str(e.value) and field.flag not in str(e.value)


def test_the_cli_has_one_flag_per_declared_field_and_refuses_them_without_slurm(capsys):
    from typer.main import get_command

    from tui.cli.main import app

    run = get_command(app).commands["study"].commands["run"]
    flags = {o for p in run.params for o in p.opts}
    assert {f.flag for f in SLURM_FIELDS} <= flags
    r = cli_in_process(capsys, "study", "run", "S", "--jobs", "3", "--storage", "sqlite:///nowhere.db")
    assert_one_line_error(r, "--jobs go with --slurm")


def test_a_task_is_requeued_only_with_requeue():
    # submitit requeues a task at its time limit only when its callable has `checkpoint`
    assert not hasattr(ArrayTask(), "checkpoint") and hasattr(RequeueingArrayTask(), "checkpoint")
    again = RequeueingArrayTask().checkpoint("S")
    assert isinstance(again.function, RequeueingArrayTask) and again.args == ("S",)
    assert isinstance(pickle.loads(pickle.dumps(RequeueingArrayTask())), RequeueingArrayTask)


def test_a_run_claimed_by_a_slurm_task_shows_the_task_and_its_node(tmp_path, forget_set_files, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "S", "EleutherAI/pythia-14m", "fs", methods=["ga"], lrs=[1e-3, 2e-3], steps=[2])
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "4245")
    assert slurm_job_here() == "4242_3"
    study = store.study("S")
    claimed = claim_pending(store, [study.id], "gpu-node-7")
    assert claimed.slurm_job == "4242_3"
    r = cli_in_process(capsys, "study", "status", "S", "--json", "--storage", url)
    running = json.loads(r.stdout)["running"]
    assert [(x["slurm_job"], x["slurm_array"], x["array_index"], x["node"]) for x in running] == [("4242_3", "4242", 3, "gpu-node-7")]
    r = cli_in_process(capsys, "study", "status", "S", "--storage", url)
    assert "slurm task" in r.stdout and "4242_3" in r.stdout and "gpu-node-7" in r.stdout
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var)
    assert slurm_job_here() is None
    plain = claim_pending(store, [study.id], "laptop")
    assert plain.slurm_job is None
    r = cli_in_process(capsys, "study", "status", "S", "--storage", url)
    assert r.returncode == 0 and "slurm task" in r.stdout  # one SLURM run is enough for the column


def test_a_study_whose_runs_need_more_gpus_than_a_task_gets_is_refused_before_submitting(tmp_path, forget_set_files,
                                                                                         capsys):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "W", "EleutherAI/pythia-14m", "fs", methods=["ga"], lrs=[1e-3], steps=[2], gpus_per_run=2)
    r = cli_in_process(capsys, "study", "run", "W", "--slurm", "--gpus-per-job", "1", "--slurm-allow-sqlite",
                       "--storage", url)
    assert_one_line_error(r, "runs each run on 2 GPUs", "--gpus-per-job 2")
    assert store.study("W").state != "running"  # nothing was handed out
