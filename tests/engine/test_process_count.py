"""A run's cells do not depend on how many processes ran it (open-unlearning's users report results
that change with the GPU count). One process with batch 4 and two processes with batch 2 each (the
same effective batch, the same chunks) take the same steps, data parallel and sharded (--fsdp), for
every method family: the per-process losses are weighed by each process's share of the step's
tokens (or chunks), `_Run.balanced`. Without it, the chunks' different lengths moved ln ppl by up
to 2.4e-2 here; with it the two agree to float32 reduction order (measured: at most 5.3e-7 in
ln ppl), held to TOLERANCE."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.data import chunk_forget_set, load_forget_set
from engine.finetune import batch_indices
from engine.methods import get_method
from engine.models import load_tokenizer
from studies.running.pool import free_port
from tests.engine.invariance_worker import SEQ_LEN
from tests.engine.invariance_worker import main as run_methods

WORKER = Path(__file__).with_name("invariance_worker.py")
TOLERANCE = 1e-5  # |Δ ln ppl| and the relative difference of the step losses; 20 × the measured 5.3e-7
# One method per family: token means (ascent, prepared labels, weighted tokens, CE-U, UNDIAL), a
# retain term, θ0's live logits, per-chunk means (NPO, SimNPO), preference pairs (the DPO family), update rules (GRU, PDU), hidden states (RMU) and a weight
# edit (task vector); the last two read full weights, so they run data parallel only.
FAMILIES = ["ga", "random_label", "wga", "satimp", "ce_u", "undial", "ga_gd", "ga_kl", "npo", "simnpo", "gru", "pdu", "dpo", "idk_dpo",
            "idk_nll"]
WHOLE_WEIGHTS = ["rmu", "task_vector"]
METRICS = ("ppl_forget", "ppl_retain", "ppl_retain_eval", "ppl_unseen")


def two_processes(tmp_path, args: list[str], out: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), *args, str(out),
                        "2", *extra], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def assert_same_run(one: dict, two: dict, how: str) -> None:
    for method, got in two.items():
        want = one[method]
        for a, b in zip(want["losses"], got["losses"]):
            assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), (how, method, want["losses"], got["losses"])
        assert [c["step"] for c in want["cells"]] == [c["step"] for c in got["cells"]] == [1, 2]
        for a, b in zip(want["cells"], got["cells"]):
            for key in METRICS:
                assert abs(math.log(a[key] / b[key])) <= TOLERANCE, (how, method, a["step"], key, a[key], b[key])


def test_the_two_halves_of_a_step_score_different_token_counts(tiny_model_dir, forget_set_files):
    """What makes the test below able to fail: the processes' shares of a step differ in tokens, so
    a plain mean per process would weigh them wrongly."""
    f = forget_set_files
    sets = chunk_forget_set(load_forget_set([f["forget"]], [f["retain"]], [f["unseen"]], []),
                            load_tokenizer(str(tiny_model_dir)), SEQ_LEN)
    labels_per_row = (sets.forget.loss_mask[:, 1:] == 1).sum(1)
    halves = [[int(labels_per_row[batch_indices(len(sets.forget), 4, 0, step)[r * 2:(r + 1) * 2]].sum()) for r in (0, 1)]
              for step in (1, 2)]
    assert any(a != b for a, b in halves), halves
    assert get_method("npo").forget.mean_count({"labels": sets.forget.input_ids[:2]}).item() == 2  # chunks, not tokens


@pytest.mark.slow  # two torchrun launches of two processes, every method family in each
def test_one_and_two_processes_give_the_same_cells(tmp_path, tiny_model_dir, forget_set_files):
    f = forget_set_files
    args = [str(tiny_model_dir), f["forget"], f["retain"], f["unseen"]]
    run_methods([*args, str(tmp_path / "one.json"), "4", *FAMILIES, *WHOLE_WEIGHTS])
    one = json.loads((tmp_path / "one.json").read_text())
    data_parallel = two_processes(tmp_path, args, tmp_path / "dp.json", *FAMILIES, *WHOLE_WEIGHTS)
    assert set(data_parallel) == set(FAMILIES + WHOLE_WEIGHTS)
    assert_same_run(one, data_parallel, "data parallel")
    sharded = two_processes(tmp_path, args, tmp_path / "fsdp.json", "--fsdp", *FAMILIES)
    assert set(sharded) == set(FAMILIES)
    assert_same_run(one, sharded, "fsdp")
