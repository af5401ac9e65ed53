"""SISA on a tiny demo workspace (SISA applied to its fine-tuning stage): shards cover every
fine-tuning document once, no re-fine-tuned constituent saw a forget document (by content hash),
the ensemble is the mean of its members' probabilities, K = 1 is θ0 before and the exactly
retrained twin after, and the size limit refuses with its reason."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from engine.demo import QUICK, build_workspace
from engine.errors import UnlearnError
from engine.models import load_model
from engine.sisa import Ensemble, assign_shards, pair_hash, sisa

# A corpus and model small enough to pre-train and fine-tune several times in seconds (the mechanics, not the science).
TINY = replace(QUICK, people_forget=3, people_retain=6, people_retain_eval=2, people_unseen=3, general_docs=4,
               pretrain_people=40, pretrain_code_docs=10, vocab_size=300, hidden=32, heads=2, pretrain_steps=20,
               finetune_epochs=6, finetune_lr=3e-3, name="sisa-test")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("sisa-ws")
    build_workspace(ws, TINY)
    return ws


def test_shards_deal_every_document_once_and_evenly():
    of = assign_shards(23, 4, seed=1)
    assert sorted(of.count(k) for k in range(4)) == [5, 6, 6, 6]
    assert of == assign_shards(23, 4, seed=1) and of != assign_shards(23, 4, seed=2)


def test_the_ensemble_averages_its_members_probabilities(workspace):
    a, b = load_model(str(workspace / "model")).eval(), load_model(str(workspace / "retrained")).eval()
    ids = torch.tensor([[0, 5, 9, 17, 4]])
    with torch.no_grad():
        got = Ensemble([a, b])(input_ids=ids).logits.double()
        pa, pb = (torch.softmax(m(input_ids=ids).logits.double(), -1) for m in (a, b))
    torch.testing.assert_close(got, torch.log((pa + pb) / 2), rtol=1e-5, atol=1e-6)


def test_retrained_shards_never_saw_the_forget_set(workspace):
    from engine.demo import read_role

    forget = {pair_hash(q, a) for q, a in read_role(workspace, "forget")}
    r = sisa(workspace, TINY, 2, seed=0)
    assert len(r["shard_hashes"]) == 2 and r["retrained_shards"] >= 1
    assert sum(map(len, r["shard_hashes"])) == 7 * (TINY.people_retain + TINY.people_retain_eval)  # all but U, once
    assert not any(h in forget for shard in r["shard_hashes"] for h in shard)
    assert r["cost"]["retrain_tokens"] > 0
    assert all(math.isfinite(r["metrics"][k]) for k in ("ppl_forget", "ppl_retain", "ppl_unseen"))
    # exact unlearning: U is now about as likely as unseen text, and less likely than before
    assert r["metrics"]["ppl_forget"] > r["before"]["ppl_forget"]


def test_one_shard_is_exact_retraining(workspace):
    r = sisa(workspace, TINY, 1, seed=0)
    from engine.evaluate import evaluate
    from engine.models import load_tokenizer
    from engine.sisa import eval_sets

    sets = eval_sets(workspace, load_tokenizer(str(workspace / "model")), TINY.seq_len)
    retrained, _ = evaluate(load_model(str(workspace / "retrained")), sets, 16)
    original, _ = evaluate(load_model(str(workspace / "model")), sets, 16)
    for k in ("ppl_forget", "ppl_retain", "ppl_unseen"):
        assert r["metrics"][k] == pytest.approx(retrained[k], rel=1e-4)  # the twin, fine-tuned the same way
        assert r["before"][k] == pytest.approx(original[k], rel=1e-4)  # and before it, θ0 itself


def test_beyond_the_size_limit_it_refuses_with_the_reason(workspace, monkeypatch):
    import engine.sisa

    monkeypatch.setattr(engine.sisa, "SISA_MAX_TOKENS", 100)
    with pytest.raises(UnlearnError, match="beyond its demo-scale limit .* a training job"):
        sisa(workspace, TINY, 2)
    with pytest.raises(UnlearnError, match="at least 1"):
        sisa(workspace, TINY, 0)
