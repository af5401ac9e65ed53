"""`unlearn study logs NAME [--run ID]`: every log of a study (its scheduler's, each SLURM task's,
its attacks', each run attempt's), newest last, or one run's. The files are where the pool and
submitit write them (studies/running/logs.py); the cluster test reads real SLURM task logs."""
from __future__ import annotations

import json
import os

from studies.lifecycle.study import create_study
from studies.running.logs import SLURM_FOLDER, attempt_log_name, log_dir_for, scheduler_log_path
from studies.store.db import Store
from tests.studies_helpers import assert_one_line_error, cli_in_process, make_forget_set, runs_of


def test_study_logs_lists_every_log_newest_last_and_one_run_with_run(tmp_path, forget_set_files, capsys):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "S", "EleutherAI/pythia-14m", "fs", methods=["ga"], lrs=[1e-3, 2e-3], steps=[2])
    r = cli_in_process(capsys, "study", "logs", "S", "--storage", url)
    assert r.returncode == 0 and "has no log yet" in r.stdout
    a, b = runs_of(store, "S")
    folder = log_dir_for(store, "S")
    files = [(scheduler_log_path(store, "S"), "scheduler up\n"),
             (folder / SLURM_FOLDER / "77_1" / "77_1_0_log.out", "SLURM task 77_1 serving study S\n"),
             (folder / attempt_log_name(a.id, "ga", 1), "attempt one\nfailed: out of memory\n"),
             (folder / attempt_log_name(a.id, "ga", 2), "".join(f"step {i}\n" for i in range(100))),
             (folder / attempt_log_name(b.id, "ga", 1), "other run\n")]
    for i, (path, text) in enumerate(files):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # written in this order
    listed = json.loads(cli_in_process(capsys, "study", "logs", "S", "--json", "--lines", "2", "--storage", url).stdout)
    assert [x["kind"] for x in listed] == ["scheduler", "slurm", "run", "run", "run"]
    assert listed[1]["slurm_job"] == "77_1" and listed[3]["tail"] == ["step 98", "step 99"]
    assert [(x["run_id"], x["attempt"]) for x in listed[2:]] == [(a.id, 1), (a.id, 2), (b.id, 1)]
    r = cli_in_process(capsys, "study", "logs", "S", "--run", str(a.id), "-n", "1", "--storage", url)
    assert r.returncode == 0
    assert f"== run {a.id} attempt 1" in r.stdout and "failed: out of memory" in r.stdout and "step 99" in r.stdout
    assert "other run" not in r.stdout and "scheduler up" not in r.stdout and "attempt one" not in r.stdout
    assert_one_line_error(cli_in_process(capsys, "study", "logs", "S", "--run", "999", "--storage", url), "has no run 999")
    assert_one_line_error(cli_in_process(capsys, "study", "logs", "S", "-n", "-1", "--storage", url), "--lines must be 0")
