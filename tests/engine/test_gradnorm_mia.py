"""The gradient-norm membership attack (--mia-gradnorm, mia_auc.gradnorm; engine.evaluate.gradient_norms):
per-chunk norms against an independent float64 autograd computation, the AUC against sklearn's on
those scores, the model left exactly as it was, LoRA read as the merged model, and a run with the
knob (its baseline, cells and attacked copies) against one without."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from engine.config import RunConfig, RunSettings
from engine.data import ForgetSetChunks, chunk_texts
from engine.errors import UnlearnError
from engine.evaluate import evaluate, gradient_norms
from engine.metric_registry import MIA, blank, every_run_paths, get
from engine.models import load_model
from engine.run import baseline_metrics, train_to_milestones

RTOL = 1e-4


def hand_norms(model, chunks) -> np.ndarray:
    """‖∇θ (mean NLL of each chunk's scored tokens)‖₂ over every parameter, one chunk at a time on
    its real tokens, by torch.autograd in float64 on a copy of the model."""
    m = copy.deepcopy(model).double().eval().requires_grad_(True)
    params = list(m.parameters())
    out = []
    for b in range(len(chunks)):
        n = int(chunks.attention_mask[b].sum())
        ids = chunks.input_ids[b, :n]
        scored = chunks.loss_mask[b, 1:n].bool()
        logp = torch.log_softmax(m(input_ids=ids[None]).logits[0, :-1], -1)
        nll = -logp.gather(-1, ids[1:, None]).squeeze(-1)
        grads = torch.autograd.grad(nll[scored].mean(), params, allow_unused=True)
        out.append(math.sqrt(sum(float((g * g).sum()) for g in grads if g is not None)))
    return np.array(out)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir)).eval()


@pytest.fixture(scope="module")
def hand(model, tiny_sets):
    return {role: hand_norms(model, getattr(tiny_sets, role)) for role in ("forget", "unseen")}


def test_per_chunk_norms_match_a_float64_autograd_computation(model, tiny_sets, hand, tiny_tokenizer):
    for role in ("forget", "unseen"):
        np.testing.assert_allclose(gradient_norms(model, getattr(tiny_sets, role)), hand[role], rtol=RTOL)
    assert len(set(np.round(hand["forget"], 6))) == len(hand["forget"])  # not a constant
    # a question–answer chunk: only its answer's tokens make the loss (loss_mask), not the question's
    qa = chunk_texts(["Basil Mahfouz was born in Lisbon in 1961."], tiny_tokenizer, 128, "forget",
                     prompts=["Where was Basil Mahfouz born?"])
    assert 0 < int(qa.loss_mask[0].sum()) < int(qa.attention_mask[0].sum()) - 1
    got = gradient_norms(model, qa)
    np.testing.assert_allclose(got, hand_norms(model, qa), rtol=RTOL)
    whole = dataclasses.replace(qa, loss_mask=qa.attention_mask.clone())
    assert abs(gradient_norms(model, whole)[0] - got[0]) > 1e-3 * got[0]


def test_the_auc_is_sklearns_on_minus_the_norms_with_forget_as_members(model, tiny_sets, hand):
    metrics, tokens = evaluate(model, tiny_sets, gradnorm=True)
    y = np.r_[np.ones(len(hand["forget"])), np.zeros(len(hand["unseen"]))]
    want = roc_auc_score(y, -np.r_[hand["forget"], hand["unseen"]])
    assert metrics["mia_auc"]["gradnorm"] == pytest.approx(want, abs=1e-12)
    # the fixture model trained on forget: its loss is flatter there, so the attack tells U apart
    print(f"gradnorm AUC {want:.3f}")
    assert want > 0.75
    plain, plain_tokens = evaluate(model, tiny_sets)
    assert "gradnorm" not in plain["mia_auc"]  # only when asked for
    assert {k: v for k, v in metrics["mia_auc"].items() if k != "gradnorm"} == plain["mia_auc"]
    # a forward and a backward per token of forget and unseen: three forward passes' worth
    assert tokens == plain_tokens + 3 * (tiny_sets.forget.n_tokens + tiny_sets.unseen.n_tokens)


@pytest.mark.parametrize("training", [True, False])
def test_the_model_and_its_optimizer_are_left_exactly_as_they_were(tiny_model, tiny_sets, training):
    """Weights, pending gradients (the very tensors), requires_grad flags, train/eval mode, a
    gradient hook of the run's (a saliency mask) and the optimizer's state: untouched, and the norms
    do not depend on which weights the run trains."""
    chunks = tiny_sets.forget.subset(range(4))
    m = tiny_model.train(training)
    frozen = {n for n, _ in m.named_parameters() if ".layers.0." in n}
    for n, p in m.named_parameters():
        p.requires_grad_(n not in frozen)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):  # a step taken (optimizer state), then gradients accumulated and not yet applied
        opt.zero_grad()
        m(input_ids=chunks.input_ids[:2], labels=chunks.input_ids[:2]).loss.backward()
        if not opt.state:
            opt.step()
    untouched = gradient_norms(copy.deepcopy(m).requires_grad_(True), chunks)  # every weight trainable
    fired = []
    hooked = next(p for n, p in m.named_parameters() if n not in frozen)
    hooked.register_hook(lambda g: fired.append(1) or g)
    weights = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in m.named_parameters()}
    opt_state = copy.deepcopy(opt.state_dict())

    got = gradient_norms(m, chunks)

    np.testing.assert_array_equal(got, untouched)
    assert m.training is training
    assert {n for n, p in m.named_parameters() if not p.requires_grad} == frozen
    for n, p in m.named_parameters():
        assert torch.equal(p, weights[n]), n
        before, values = grads[n]
        assert p.grad is before and (before is None or torch.equal(p.grad, values)), n
    assert sum(p.grad is not None for p in m.parameters()) > 0  # the test did leave gradients pending
    assert not fired
    after = opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for i, state in opt_state["state"].items():
        for k, v in state.items():
            assert torch.equal(after["state"][i][k], v), (i, k)


def test_lora_reads_the_merged_models_gradient_and_leaves_the_adapter_alone(tiny_model, tiny_model_dir, tiny_sets):
    """With LoRA (frozen base), the figure is the merged model's: the gradient w.r.t. a base weight W
    is the gradient w.r.t. W + s·BA. The adapter's own weights are not counted, and keep no gradient."""
    from engine.lora import apply_lora

    chunks = tiny_sets.forget.subset(range(4))
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    peft = apply_lora(tiny_model, 4, None, "")
    with torch.no_grad():  # a trained adapter: B away from its zero start, so the merge changes the weights
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    merged = copy.deepcopy(peft).merge_and_unload()
    got = gradient_norms(peft, chunks)
    np.testing.assert_allclose(got, gradient_norms(merged, chunks), rtol=RTOL)
    assert not np.allclose(got, gradient_norms(load_model(str(tiny_model_dir)), chunks), rtol=1e-3)
    assert all(p.grad is None for p in peft.parameters())
    assert {n for n, p in peft.named_parameters() if p.requires_grad} == {n for n, _ in peft.named_parameters()
                                                                          if "lora_" in n}


def test_the_metric_is_only_in_runs_with_the_knob():
    m = get("mia_auc.gradnorm")
    assert m.runs == "--mia-gradnorm" and m.target == 0.5
    assert "mia_auc.gradnorm" not in every_run_paths()
    assert "gradnorm" not in blank(MIA)["mia_auc"] and "reference" in blank(MIA)["mia_auc"]
    assert "--mia-gradnorm" in RunSettings(mia_gradnorm=True).validate().to_flags()
    assert "--mia-gradnorm" not in RunSettings().validate().to_flags()
    assert RunSettings.from_dict(RunSettings(mia_gradnorm=True).to_dict()).mia_gradnorm is True
    with pytest.raises(UnlearnError, match="--fsdp does not run with --mia-gradnorm"):
        RunSettings(mia_gradnorm=True, fsdp=True).validate()


def test_a_run_with_the_knob_has_it_in_its_baseline_cells_and_attacked_copies(
        tiny_model_dir, tiny_tokenizer, tiny_sets, forget_set_texts, tmp_path):
    sets = ForgetSetChunks(tiny_sets.forget.subset(range(8)), tiny_sets.retain.subset(range(8)),
                           tiny_sets.unseen.subset(range(8)), None, retain_eval=tiny_sets.retain_eval)
    name, fs_hash = str(tiny_model_dir), forget_set_texts.hash

    def baseline(on: bool):
        cfg = RunConfig(method="ga", lr=3e-3, milestones=(1, 2), batch_size=4, seq_len=128, watch_every=0,
                        mia_gradnorm=on, attacks="quant8" if on else "")
        return cfg, *baseline_metrics(load_model(name), name, sets, fs_hash, cfg, tmp_path)

    # the baseline cache: an entry without the attack is never read for a run with it, nor the reverse
    off_cfg, off, off_tokens = baseline(False)
    on_cfg, on, on_tokens = baseline(True)
    assert "gradnorm" not in off["mia_auc"] and 0 <= on["mia_auc"]["gradnorm"] <= 1
    assert off_tokens > 0 and on_tokens == off_tokens + 3 * (sets.forget.n_tokens + sets.unseen.n_tokens)
    assert baseline(False)[1:] == (off, 0) and baseline(True)[1:] == (on, 0)  # each from its own entry now

    out = train_to_milestones(load_model(name), tiny_tokenizer, sets, on_cfg, on)
    assert [c["step"] for c in out.milestones] == [1, 2] and not out.diverged
    for cell in out.milestones:
        assert 0 <= cell["mia_auc"]["gradnorm"] <= 1
        assert 0 <= cell["attacks"]["quant8"]["mia_auc"]["gradnorm"] <= 1  # the attacked copy is scored alike
    # the cell's figure is the attack on the model at that milestone, computed afresh
    plain = train_to_milestones(load_model(name), tiny_tokenizer, sets, off_cfg, off)
    assert all("gradnorm" not in c["mia_auc"] for c in plain.milestones)
    assert plain.losses == out.losses  # the attack changes nothing of the training
    metrics, _ = evaluate(plain.model, sets, gradnorm=True)
    assert metrics["mia_auc"]["gradnorm"] == out.milestones[-1]["mia_auc"]["gradnorm"]
    assert [c["ppl_forget"] for c in plain.milestones] == [c["ppl_forget"] for c in out.milestones]


def test_under_autocast_the_norms_are_the_models_in_low_precision(model, tiny_sets):
    """CPU autocast (bf16), the way a CUDA run scores: the norms are those of the bf16 computation,
    close to fp32's but not equal, and finite."""
    chunks = tiny_sets.unseen.subset(range(3))
    fp32 = gradient_norms(model, chunks)
    bf16 = gradient_norms(model, chunks, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert np.isfinite(bf16).all() and not np.array_equal(bf16, fp32)
    np.testing.assert_allclose(bf16, fp32, rtol=0.1)
    assert gradient_norms(model, chunks, autocast=contextlib.nullcontext).tolist() == fp32.tolist()


def test_unlearn_run_mia_gradnorm_reports_it_in_the_baseline_and_each_milestone(tiny_model_dir, forget_set_files,
                                                                                 capsys):
    import json

    from tests.studies_helpers import cli_in_process

    f = forget_set_files
    p = cli_in_process(capsys, "run", "--model", tiny_model_dir, "--forget", f["forget"], "--retain", f["retain"],
                       "--unseen", f["unseen"], "--method", "ga", "--lr", "3e-3", "--steps", "1,2", "--seq-len", "128",
                       "--mia-gradnorm", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["config"]["mia_gradnorm"] is True
    for cell in (out["baseline"], *out["milestones"]):
        assert 0 <= cell["mia_auc"]["gradnorm"] <= 1
