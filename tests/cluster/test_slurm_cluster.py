"""The CI's single-node SLURM cluster (.ci/slurm) that the cluster tests run on: a job array is placed,
runs every task with its array index, and leaves the queue; `sacct` has no accounting daemon to ask,
as on some clusters, so nothing in the lab may rely on it. Skipped where no cluster could start."""
from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = [pytest.mark.xdist_group("slurm"),
              pytest.mark.skipif(not os.environ.get("SLURM_CONF"),
                                 reason="SLURM_CONF is not set (.ci/slurm sets it where a cluster can run)")]


def test_a_job_array_runs_every_task_and_leaves_the_queue(tmp_path):
    script = tmp_path / "task.sh"
    script.write_text("#!/bin/bash\necho \"$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $SLURM_JOB_NODELIST\" "
                      f"> {tmp_path}/task-$SLURM_ARRAY_TASK_ID.txt\n")
    p = subprocess.run(["sbatch", "--parsable", "--wait", "--array=0-1", "--time=00:01:00", "--cpus-per-task=1",
                        "--mem=100M", "-o", str(tmp_path / "slurm-%A_%a.out"), str(script)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    lines = sorted((tmp_path / f"task-{i}.txt").read_text().split() for i in (0, 1))
    assert [(j, i) for j, i, _ in lines] == [(job, "0"), (job, "1")]
    queue = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30)
    assert queue.stdout.strip() == ""
