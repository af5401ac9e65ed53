"""Runs every method of METHODS for two steps in this process group and, on rank 0, writes each
run's losses and cells as JSON: the worker of tests/engine/test_process_count.py, launched once
under torchrun with two processes (data parallel, or sharded with --fsdp) and once as one plain
process, so one launch serves every method family.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine/invariance_worker.py MODEL FORGET RETAIN UNSEEN OUT BATCH [--fsdp] METHOD...
"""
from __future__ import annotations

import json
import os
import sys

SEQ_LEN = 64


def main(argv: list[str]) -> int:
    model_dir, forget, retain, unseen, out, batch_size, *rest = argv
    fsdp = "--fsdp" in rest
    methods = [m for m in rest if m != "--fsdp"]
    from engine.config import RunConfig
    from engine.data import chunk_forget_set, load_forget_set
    from engine.models import load_model, load_tokenizer
    from engine.run import baseline_metrics, train_to_milestones

    tok = load_tokenizer(model_dir)
    texts = load_forget_set([forget], [retain], [unseen], [])
    sets = chunk_forget_set(texts, tok, SEQ_LEN)
    rank = int(os.environ.get("RANK", "0"))
    results = {}
    for method in methods:
        cfg = RunConfig(method=method, lr=3e-3, milestones=(1, 2), batch_size=int(batch_size), seq_len=SEQ_LEN, fsdp=fsdp,
                        watch_every=0).validate()
        model = load_model(model_dir)
        baseline, _ = baseline_metrics(model, model_dir, sets, texts.hash, cfg, None)
        run = train_to_milestones(model, tok, sets, cfg, baseline)
        results[method] = {"losses": run.losses, "cells": run.milestones}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # run from the repository root: `tests` and `engine` import from there
    sys.exit(main(sys.argv[1:]))
