"""`study create --gpus-per-run N`: the pool hands one run N slots and starts it as N processes under
torchrun (data parallel); only the main process writes to the store. On CPU the slots are
worker slots and the processes talk over gloo, which is what this test runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.metric_registry import SCORE
from studies.lifecycle.spec import StudySpec
from studies.running.pool import free_port
from studies.store.db import Store
from tests.studies_helpers import (
    assert_one_line_error,
    cli,
    cli_in_process,
    cli_main,
    events_of,
    make_forget_set,
    milestones_of,
    runs_of,
)


def test_a_pool_narrower_than_a_run_is_refused(tmp_path, forget_set_files, tiny_model_dir, capsys):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    make_forget_set(Store(url), "fs", forget_set_files)
    assert cli_main("study", "create", "W", "--model", tiny_model_dir, "--forget-set", "fs", "--methods", "ga",
                    "--lr", "1e-3", "--steps", "2", "--gpus-per-run", "2", "--storage", url) == 0
    assert StudySpec.from_dict(Store(url).study("W").spec).gpus_per_run == 2
    assert_one_line_error(cli_in_process(capsys, "study", "run", "W", "--workers", "1", "--storage", url),
                          "study W runs each run on 2 devices; this pool has 1")
    assert_one_line_error(cli_in_process(capsys, "study", "create", "X", "--model", str(tiny_model_dir), "--forget-set",
                                         "fs", "--methods", "ga", "--lr", "1e-3", "--steps", "2", "--gpus-per-run", "0",
                                         "--storage", url), "--gpus-per-run must be a whole number of 1 or more")


@pytest.mark.slow  # a study whose run is two processes under accelerate launch, and the same run by hand
def test_a_two_device_run_is_two_processes_and_records_each_cell_once(tmp_path, forget_set_files, tiny_model_dir):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    make_forget_set(Store(url), "fs", forget_set_files)
    assert cli_main("study", "create", "P", "--model", tiny_model_dir, "--forget-set", "fs", "--methods", "ga",
                    "--lr", "1e-3", "--steps", "2,4", "--batch-size", "2", "--gpus-per-run", "2", "--storage", url) == 0
    r = cli("study", "run", "P", "--workers", "2", "--storage", url, home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    store = Store(url)
    [run] = runs_of(store, "P")
    assert run.state == "done"
    assert any(" on cpu,cpu (pid " in e.message for e in events_of(store, "P", "started"))  # both slots, one process tree
    cells = sorted((m.step, m.score) for m in milestones_of(store, "P"))
    assert [step for step, _ in cells] == [2, 4]  # once each, from the main process

    # The same run by hand, two processes under torchrun: the same cells, bitwise.
    f = forget_set_files
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", UNLEARN_HOME=str(tmp_path / "home2"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "tui.cli",
                        "run", "--model", str(tiny_model_dir), "--forget", f["forget"], "--retain", f["retain"],
                        "--unseen", f["unseen"], "--general", f["general"], "--method", "ga", "--lr", "1e-3",
                        "--steps", "2,4", "--batch-size", "2", "--seq-len", str(StudySpec.from_dict(store.study("P").spec).run.seq_len),
                        "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout)
    assert result["processes"] == 2
    by_hand = [(c["step"], c[SCORE]) for c in result["milestones"]]  # the objective, as CellRow.score holds it
    assert by_hand == cells
