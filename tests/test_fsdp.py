"""`--fsdp`: weights, gradients, optimizer states and the reference θ0 sharded over a run's processes
(FSDP2, full shard). On CPU the processes talk over gloo under torchrun; the sharded run is held to
the same run data parallel, and what needs the whole model in one process is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.config import RunConfig
from engine.errors import UnlearnError
from studies.scheduler import free_port
from tests.conftest import SEQ_LEN


def two_processes(tmp_path, model, f, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", UNLEARN_HOME=str(tmp_path / "home"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "tui.cli",
                        "run", "--model", str(model), "--forget", f["forget"], "--retain", f["retain"],
                        "--unseen", f["unseen"], "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--json", *extra],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


@pytest.mark.slow  # two torchrun launches of two processes each
def test_a_sharded_run_matches_the_data_parallel_run(tmp_path, tiny_model_dir, forget_set_files):
    args = ("--method", "ga_kl", "--lr", "3e-3", "--steps", "1,3")  # ga_kl: the reference θ0 is sharded too
    sharded = two_processes(tmp_path, tiny_model_dir, forget_set_files, *args, "--fsdp")
    replicated = two_processes(tmp_path, tiny_model_dir, forget_set_files, *args)
    assert sharded["processes"] == replicated["processes"] == 2 and sharded["memory"]["fsdp"]
    # Each process holds half of every block; FSDP2 leaves the root unit (embeddings, final norm, the
    # tied head: 30 % of this tiny model) gathered after a forward pass, as backward needs it next.
    assert 0.45 < sharded["memory"]["local_parameter_share"] < 0.7
    assert replicated["memory"]["local_parameter_share"] == 1.0
    assert sharded["losses"] == pytest.approx(replicated["losses"], rel=1e-5)
    for a, b in zip(sharded["milestones"], replicated["milestones"]):
        for key in ("ppl_forget", "ppl_retain", "ppl_unseen", "score"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_what_needs_the_whole_model_is_refused_with_fsdp():
    for settings, msg in (({"lora": 4}, "--fsdp does not run with --lora"),
                          ({"attacks": "relearn"}, "--fsdp does not run with --attacks"),
                          ({"optim": "adamw8bit"}, "--fsdp does not run with --optim adamw8bit")):
        with pytest.raises(UnlearnError, match=msg):
            RunConfig(method="ga", lr=1e-3, milestones=(1,), fsdp=True, **settings).validate()
    for method in ("task_vector", "rmu", "ga[saliency=5]"):
        with pytest.raises(UnlearnError, match="does not run with --fsdp yet"):
            RunConfig(method=method, lr=1e-3, milestones=(1,), fsdp=True).validate()
