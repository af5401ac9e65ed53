"""`--fsdp`: weights, gradients, optimizer states and the reference θ0 sharded over a run's processes
(FSDP2, full shard). On CPU the processes talk over gloo under torchrun; the sharded run is held to
the same run on one process with the same effective batch (a run's figures do not depend on its
process count: tests/engine/test_process_count.py holds every method family to that, data parallel
too), --save-model gathers the shards into one folder, LoRA shards its frozen base and its adapter
alike, and what needs the whole model in one process is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.config import RunConfig
from engine.errors import UnlearnError
from engine.evaluate import evaluate
from engine.models import load_model
from studies.running.pool import free_port
from tests.conftest import SEQ_LEN
from tests.studies_helpers import cli_in_process


def one_process(capsys, model, f, *extra: str) -> dict:
    """The same run as `two_processes` on one process: batch 4, the two processes' 2 + 2."""
    p = cli_in_process(capsys, "run", "--model", str(model), "--forget", f["forget"], "--retain", f["retain"],
                       "--unseen", f["unseen"], "--seq-len", str(SEQ_LEN), "--batch-size", "4", "--json", *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def two_processes(tmp_path, model, f, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", UNLEARN_HOME=str(tmp_path / "home"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "tui.cli",
                        "run", "--model", str(model), "--forget", f["forget"], "--retain", f["retain"],
                        "--unseen", f["unseen"], "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--json", *extra],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


@pytest.mark.slow  # a torchrun launch of two processes
def test_a_sharded_run_matches_the_one_process_run(tmp_path, capsys, tiny_model_dir, forget_set_files, tiny_sets):
    args = ("--method", "ga_kl", "--lr", "3e-3", "--steps", "1,3")  # ga_kl: the reference θ0 is sharded too
    saved = tmp_path / "saved"
    sharded = two_processes(tmp_path, tiny_model_dir, forget_set_files, *args, "--fsdp", "--save-model", str(saved))
    replicated = one_process(capsys, tiny_model_dir, forget_set_files, *args)
    assert sharded["processes"] == 2 and replicated["processes"] == 1 and sharded["memory"]["fsdp"]
    # Each process holds half of every block; FSDP2 leaves the root unit (embeddings, final norm, the
    # tied head: 30 % of this tiny model) gathered after a forward pass, as backward needs it next.
    assert 0.45 < sharded["memory"]["local_parameter_share"] < 0.7
    assert replicated["memory"]["local_parameter_share"] == 1.0
    assert sharded["losses"] == pytest.approx(replicated["losses"], rel=1e-5)
    for a, b in zip(sharded["milestones"], replicated["milestones"]):
        for key in ("ppl_forget", "ppl_retain", "ppl_unseen", "score"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    # --save-model gathers the shards: the saved folder is the trained model of the last milestone
    cell = evaluate(load_model(str(saved)), tiny_sets)[0]
    for key in ("ppl_forget", "ppl_retain", "ppl_unseen"):
        assert cell[key] == pytest.approx(sharded["milestones"][-1][key], rel=1e-5), key


@pytest.mark.slow  # a torchrun launch of two processes
def test_a_sharded_lora_run_matches_the_one_process_run_and_saves_its_merged_model(
        tmp_path, capsys, tiny_model_dir, forget_set_files, tiny_sets):
    args = ("--method", "ga_kl", "--lr", "3e-3", "--steps", "1,3", "--lora", "4")  # θ0: the adapter switched off
    merged = tmp_path / "merged"
    sharded = two_processes(tmp_path, tiny_model_dir, forget_set_files, *args, "--fsdp", "--save-model", str(merged),
                            "--merge")
    replicated = one_process(capsys, tiny_model_dir, forget_set_files, *args)
    assert sharded["memory"]["fsdp"] and sharded["memory"]["lora"] == 4
    assert sharded["memory"]["local_parameter_share"] < 0.7 and replicated["memory"]["local_parameter_share"] == 1.0
    assert sharded["losses"] == pytest.approx(replicated["losses"], rel=1e-5)
    for a, b in zip(sharded["milestones"], replicated["milestones"]):
        for key in ("ppl_forget", "ppl_retain", "ppl_unseen", "score"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    model = load_model(str(merged))  # a plain model, through from_pretrained
    assert not hasattr(model, "peft_config")
    cell = evaluate(model, tiny_sets)[0]
    assert cell["ppl_forget"] == pytest.approx(sharded["milestones"][-1]["ppl_forget"], rel=1e-5)


def test_what_needs_the_whole_model_is_refused_with_fsdp():
    for settings, msg in (({"attacks": "relearn"}, "--fsdp does not run with --attacks"),
                          ({"optim": "adamw8bit"}, "--fsdp does not run with --optim adamw8bit")):
        with pytest.raises(UnlearnError, match=msg):
            RunConfig(method="ga", lr=1e-3, milestones=(1,), fsdp=True, **settings).validate()
    for method in ("task_vector", "rmu", "ga[saliency=5]"):
        with pytest.raises(UnlearnError, match="does not run with --fsdp yet"):
            RunConfig(method=method, lr=1e-3, milestones=(1,), fsdp=True).validate()
