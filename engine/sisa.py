"""SISA — exact unlearning by sharding (Bourtoule et al. 2021, "Machine Unlearning"), at the demo's
scale only, applied to the demo's fine-tuning stage.

The demo's θ0 is a pre-trained base model fine-tuned on the forget, retain and retain_eval
people's question–answer documents (engine/demo.py). SISA here shards those fine-tuning documents
over K shards (a seeded assignment) and fine-tunes one constituent from the shared base on each
shard with the demo's own fine-tuning recipe; the model is the ensemble that averages the
constituents' next-token probabilities. The base's pre-training corpus holds none of the forget
set, so it is shared, not sharded. To forget U, every shard that held a document of U is
fine-tuned again from the base without it; shards that held none are kept. The result is exact
unlearning — no constituent has seen U, which `shard_hashes` lets a test check — at the price of
(a) re-fine-tuning the touched shards and (b) an ensemble whose members each saw only 1/K of the
fine-tuning data. With K = 1 it is θ0 before and the retrained twin after.

It is scored like every cell, against the original single model θ0's metrics (`compare`), and K,
not the learning rate, is the swept knob (`unlearn sisa --shards 1,2,4`). It needs the fine-tuning
documents, the base model and the recipe, which only the demo has; beyond a size limit it refuses,
because sharded retraining at that size is a training job, not an unlearning run.
"""
from __future__ import annotations

import hashlib
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from engine.errors import UnlearnError

SISA_MAX_PARAMETERS = 20_000_000  # a constituent larger than this is a training job
SISA_MAX_TOKENS = 2_000_000  # fine-tuning tokens per pass over the documents, likewise


def doc_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pair_hash(question: str, answer: str) -> str:
    """A question–answer document's content hash (the NUL keeps the two fields apart)."""
    return doc_hash(f"{question}\0{answer}")


def assign_shards(n_docs: int, shards: int, seed: int) -> list[int]:
    """Shard of each document: a seeded permutation dealt round-robin, so shards differ by at most one."""
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    out = [0] * n_docs
    for position, doc in enumerate(order):
        out[doc] = position % shards
    return out


class Ensemble(torch.nn.Module):
    """The constituents as one causal LM: logits = log of the mean of their next-token probabilities
    (a log-probability vector, so every metric reads it like any model's logits)."""

    def __init__(self, models: list) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(models)

    def forward(self, input_ids, attention_mask=None, **_):
        logps = torch.stack([torch.log_softmax(m(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1)
                             for m in self.members])
        return SimpleNamespace(logits=torch.logsumexp(logps, 0) - math.log(len(self.members)))


def check_size(recipe, tokenizer, docs: list[str]) -> None:
    from transformers import LlamaForCausalLM

    from engine.models import count_parameters, tiny_llama_config

    with torch.device("meta"):
        n = count_parameters(LlamaForCausalLM(tiny_llama_config(len(tokenizer), recipe.hidden, recipe.layers,
                                                                recipe.heads, max_positions=recipe.seq_len)))
    tokens = sum(len(tokenizer(d)["input_ids"]) for d in docs)
    if n > SISA_MAX_PARAMETERS or tokens > SISA_MAX_TOKENS:
        raise UnlearnError(f"sisa: {n:,} parameters × {tokens:,} fine-tuning tokens is beyond its demo-scale limit "
                           f"({SISA_MAX_PARAMETERS:,} / {SISA_MAX_TOKENS:,}): SISA fine-tunes its shards again, "
                           f"which at this size is a training job")


def eval_sets(workspace: Path, tokenizer, seq_len: int):
    """The demo's roles as the engine scores a forget set (question–answer chunks)."""
    from engine.data import chunk_forget_set, load_forget_set
    from engine.demo import QA_FIELDS, demo_sources

    src = demo_sources(workspace)
    texts = load_forget_set(src["forget"], src["retain"], src["unseen"], src["general"], **QA_FIELDS,
                            retain_eval=src["retain_eval"])
    return chunk_forget_set(texts, tokenizer, seq_len)


def sisa(workspace: Path, recipe, shards: int, seed: int = 0, out_dir: Path | None = None, progress=None) -> dict:
    """Fine-tune K constituents from the demo's base on shards of its fine-tuning documents, fine-tune
    the shards that held U again without it, and score the unlearned ensemble (and the ensemble
    before unlearning). Returns {"shards", "metrics" (after), "before" (metrics), "cells" (compare),
    "cost", "shard_hashes"}."""
    from engine.demo import FINETUNED_ROLES, finetune, read_role
    from engine.evaluate import compare, evaluate
    from engine.models import load_model, load_tokenizer

    if shards < 1:
        raise UnlearnError("sisa: --shards must be at least 1")
    if not (workspace / "base").is_dir():
        raise UnlearnError(f"sisa: {workspace} has no base model: rebuild it with `unlearn demo --workspace {workspace}`")
    tokenizer = load_tokenizer(str(workspace / "model"))
    # θ0's fine-tuning documents, in its order (so K = 1 fine-tunes exactly θ0, then exactly the twin)
    train_docs = [pair for role in FINETUNED_ROLES for pair in read_role(workspace, role)]
    forget_hashes = {pair_hash(q, a) for q, a in read_role(workspace, "forget")}
    check_size(recipe, tokenizer, [f"{q} {a}" for q, a in train_docs])
    if shards > len(train_docs):
        raise UnlearnError(f"sisa: {shards} shards for {len(train_docs)} fine-tuning documents")
    of = assign_shards(len(train_docs), shards, seed)
    sets = eval_sets(workspace, tokenizer, recipe.seq_len)
    theta0, _ = evaluate(load_model(str(workspace / "model")), sets, 16)

    work = Path(tempfile.mkdtemp(prefix="sisa-", dir=out_dir))
    t0 = time.perf_counter()
    before, after, shard_hashes, tokens, retrained = [], [], [], {"before": 0, "retrain": 0}, 0
    try:
        for k in range(shards):
            docs = [d for d, s in zip(train_docs, of) if s == k]
            kept = [d for d in docs if pair_hash(*d) not in forget_hashes]
            info = finetune(workspace / "base", docs, tokenizer, recipe, work / f"before-{k}", progress,
                            f"shard {k + 1}/{shards}", seed=recipe.seed + k)
            tokens["before"] += info["finetune_tokens"]
            before.append(load_model(str(work / f"before-{k}")))
            if len(kept) < len(docs):  # the shard held U: fine-tune it again without it
                retrained += 1
                if not kept:
                    raise UnlearnError(f"sisa: shard {k} holds only forget documents; use fewer shards")
                info = finetune(workspace / "base", kept, tokenizer, recipe, work / f"after-{k}", progress,
                                f"retrain {k + 1}/{shards}", seed=recipe.seed + k)
                tokens["retrain"] += info["finetune_tokens"]
                after.append(load_model(str(work / f"after-{k}")))
            else:
                after.append(before[-1])
            shard_hashes.append(sorted(pair_hash(*d) for d in kept))
        m_before, _ = evaluate(Ensemble(before), sets, 16)
        m_after, _ = evaluate(Ensemble(after), sets, 16)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"shards": shards, "metrics": m_after, **compare(m_after, theta0), "before": m_before,
            "theta0": theta0, "retrained_shards": retrained,
            "cost": {"train_tokens": tokens["before"], "retrain_tokens": tokens["retrain"],
                     "seconds": time.perf_counter() - t0},
            "shard_hashes": shard_hashes}
