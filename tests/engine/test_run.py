"""engine.run: prefix sharing (bitwise), the batch stream, divergence, config validation and the
result object of `unlearn run --json`. Every run loads the saved tiny model the user's way."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.config import RunConfig
from engine.errors import UnlearnError
from engine.evaluate import ATTACKS, evaluate
from engine.models import count_parameters, load_model
from engine.run import batch_indices, run_unlearning, train_to_milestones

SEQ_LEN = 128


def run(model_dir, texts, cache_dir, method, milestones, lr=1e-3, **kw):
    cfg = RunConfig(method=method, lr=lr, milestones=tuple(milestones), batch_size=4, seq_len=SEQ_LEN, **kw)
    return run_unlearning(str(model_dir), texts, cfg, device="cpu", cache_dir=cache_dir)


# ------------------------------------------------------------------ prefix sharing

@pytest.mark.parametrize("method", ["ga_gd", "random_label"])
def test_prefix_property_is_bitwise(method, tiny_model_dir, forget_set_texts, tmp_path):
    """The run to [2, 4] passes through exactly the model of the run to [2]."""
    long = run(tiny_model_dir, forget_set_texts, tmp_path, method, [2, 4], lr=3e-3)
    short = run(tiny_model_dir, forget_set_texts, tmp_path, method, [2], lr=3e-3)
    assert [c["step"] for c in long["milestones"]] == [2, 4]
    assert [c["step"] for c in short["milestones"]] == [2]
    assert long["baseline"] == short["baseline"]
    assert long["milestones"][0] == short["milestones"][0]  # == on floats: bitwise
    assert long["losses"][:2] == short["losses"]
    assert long["cost"]["train_tokens"] > short["cost"]["train_tokens"]
    # the two extra steps did move the model: the test would notice a run that never trains
    assert long["milestones"][1]["ppl_forget"] != long["milestones"][0]["ppl_forget"]
    assert long["milestones"][0]["ppl_forget"] != long["baseline"]["ppl_forget"]


def test_prefix_property_in_train_to_milestones(tiny_model_dir, tiny_tokenizer, tiny_sets):
    """Same property one level down, and the final weights of two identical runs agree."""
    baseline = evaluate(load_model(str(tiny_model_dir)), tiny_sets)[0]
    outs = []
    for milestones in ([1, 3], [1]):
        torch.manual_seed(0)
        cfg = RunConfig(method="ga_kl", lr=3e-3, milestones=tuple(milestones), batch_size=4, seq_len=SEQ_LEN)
        outs.append(train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline))
    assert outs[0].milestones[0] == outs[1].milestones[0]
    assert outs[0].losses[:1] == outs[1].losses


# ------------------------------------------------------------------ the batch stream

@pytest.mark.parametrize("n, bs", [(10, 4), (7, 7), (3, 5), (16, 4)])
def test_batch_indices_stream_covers_each_permutation_epoch(n, bs):
    steps = 3 * n  # a few epochs, batches straddling epoch boundaries when bs ∤ n
    stream = torch.cat([batch_indices(n, bs, seed=5, step=s) for s in range(1, steps + 1)]).tolist()
    assert len(stream) == steps * bs
    epochs = [stream[i:i + n] for i in range(0, len(stream) - n + 1, n)]
    assert len(epochs) >= 3
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    if n > 3:
        assert len({tuple(e) for e in epochs}) > 1  # a new permutation each epoch


def test_batch_indices_do_not_depend_on_history_or_total():
    n, bs = 10, 4
    forward = [batch_indices(n, bs, 0, s).tolist() for s in range(1, 21)]
    backward = [batch_indices(n, bs, 0, s).tolist() for s in range(20, 0, -1)][::-1]
    assert forward == backward
    # a run to 5 steps sees the first five batches of a run to 20 steps
    assert forward[:5] == [batch_indices(n, bs, 0, s).tolist() for s in range(1, 6)]
    assert batch_indices(n, bs, 1, 1).tolist() != forward[0] or batch_indices(n, bs, 1, 2).tolist() != forward[1]
    assert all(len(b) == bs for b in forward)


# ------------------------------------------------------------------ divergence

def test_divergence_records_remaining_cells_as_diverged(tiny_model_dir, forget_set_texts, tmp_path):
    milestones = [1, 2, 3, 4]
    out = run(tiny_model_dir, forget_set_texts, tmp_path, "ga", milestones, lr=10.0)
    assert out["diverged"] is True
    assert out["reason"]
    cells = out["milestones"]
    assert [c["step"] for c in cells] == milestones  # every cell present, in order
    first = next(i for i, c in enumerate(cells) if c["diverged"])
    for c in cells[:first]:
        assert c["score"] is not None
    for c in cells[first:]:
        assert c["diverged"] is True and c["success"] is False
    for c in cells[first + 1:]:
        assert c["score"] is None and c["forget_gap"] is None and c["ppl_forget"] is None
    assert cells[-1]["diverged"] is True and cells[-1]["score"] is None
    json.dumps(out, allow_nan=False)


def test_no_divergence_at_a_sane_lr(tiny_model_dir, forget_set_texts, tmp_path):
    out = run(tiny_model_dir, forget_set_texts, tmp_path, "ga", [1, 2], lr=1e-4)
    assert out["diverged"] is False and out["reason"] is None
    assert all(c["diverged"] is False and c["score"] is not None for c in out["milestones"])


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("kw", [
    {"lr": 0.0}, {"lr": -1e-3}, {"lr": float("nan")}, {"lr": float("inf")},
    {"milestones": [0]}, {"milestones": []}, {"milestones": [5, -1]}, {"milestones": [2.5]},
    {"method": "nope"}, {"batch_size": 0}, {"seq_len": 8}, {"warmup_steps": -1}, {"min_k": 0.0},
    {"divergence_factor": 1.0}, {"tol_forget": -0.1}, {"eval_batch_size": 0}, {"seed": 1.5},
    {"method": "ga_gd", "retain_weight": -1.0},
])
def test_run_config_validation(kw, forget_set_texts, tmp_path):
    args = {"method": "ga", "lr": 1e-3, "milestones": [1]} | kw
    cfg = RunConfig(**args)
    with pytest.raises(UnlearnError):
        cfg.validate()
    # run_unlearning refuses it before it loads anything (the model path does not exist)
    with pytest.raises(UnlearnError):
        run_unlearning(str(tmp_path / "no-model"), forget_set_texts, RunConfig(**args), device="cpu")


def test_run_config_validate_returns_a_normalized_copy():
    cfg = RunConfig(method="ga", lr=1e-3, milestones=[4, 2, 4], batch_size=2.0)
    valid = cfg.validate()
    assert valid.milestones == (2, 4) and type(valid.batch_size) is int
    assert cfg.milestones == [4, 2, 4] and cfg.batch_size == 2.0  # the original is left as it was
    assert valid.validate() is valid  # checked once
    with pytest.raises(UnlearnError, match="no retain term"):
        RunConfig(method="ga", lr=1e-3, milestones=(1,), retain_weight=2.0).validate()


# ------------------------------------------------------------------ the at-target cell

def test_the_at_target_cell_is_where_the_forget_perplexity_first_reaches_the_target(
        tiny_model_dir, forget_set_texts, tmp_path):
    """Watching ln ppl_forget every step finds the step the trajectory passes the target between
    two milestones; the cell there is a full one, flagged, and the milestones are unchanged."""
    out = run(tiny_model_dir, forget_set_texts, tmp_path, "ga", [1, 20], lr=1e-3)
    plain = run(tiny_model_dir, forget_set_texts, tmp_path, "ga", [1, 20], lr=1e-3, watch_every=0)
    assert out["milestones"] == plain["milestones"]  # the watch changes nothing
    target = math.log(out["baseline"]["ppl_unseen"])
    assert math.log(out["baseline"]["ppl_forget"]) < target
    cell = out["at_target"]
    assert cell is not None and cell["at_target"] is True, "plain ascent at 1e-3 reaches the target within 20 steps"
    assert cell["step"] not in (1, 20)  # between the milestones, where the grid alone would not see it
    assert math.log(cell["ppl_forget"]) >= target
    assert set(cell) >= {"forget_gap", "retain_eval_drift", "verdict", "success", "mia_auc"}
    before = run(tiny_model_dir, forget_set_texts, tmp_path, "ga", [cell["step"] - 1], lr=1e-3, watch_every=0)
    assert math.log(before["milestones"][0]["ppl_forget"]) < target  # the first step at the target
    stopped = run(tiny_model_dir, forget_set_texts, tmp_path, "ga", [1, 20], lr=1e-3, stop_at_target=True)
    assert stopped["at_target"]["ppl_forget"] == cell["ppl_forget"]
    assert len(stopped["losses"]) == cell["step"]  # the steps after it are saved
    after = [c for c in stopped["milestones"] if c["step"] > cell["step"]]
    assert after and all(c["stopped_at_target"] and c["success"] is False and not c["diverged"] for c in after)


# ------------------------------------------------------------------ the result object

def test_result_json_structure(tiny_model_dir, forget_set_texts, tiny_sets, tmp_path):
    out = run(tiny_model_dir, forget_set_texts, tmp_path / "cache", "ga_gd", [1, 2], lr=1e-3,
              watch_every=0)  # no at-target watch: eval tokens are the baseline's and the milestones' alone
    text = json.dumps(out, allow_nan=False)  # strict JSON: no NaN or Infinity anywhere
    assert json.loads(text) == out
    assert out["model"] == str(tiny_model_dir)
    assert out["method"] == "ga_gd" and out["lr"] == 1e-3 and out["seed"] == 0
    assert out["device"] == "cpu"
    assert out["forget_set"]["hash"] == forget_set_texts.hash
    assert out["forget_set"]["documents"] == forget_set_texts.counts()
    assert out["forget_set"]["chunks"] == {role: len(ch) for role, ch in tiny_sets.items()}

    base = out["baseline"]
    assert set(base) >= {"ppl_forget", "ppl_retain", "ppl_retain_eval", "ppl_unseen", "ppl_general", "mia_auc"}
    # θ0 carries the verdict fields every cell does: the negative control of every run
    assert set(base) >= {"forget_gap", "retain_drift", "retain_eval_drift", "eval_score", "verdict", "success",
                         "mia_auc_lo", "mia_auc_hi", "target", "bands"}
    assert base["retain_eval_drift"] == 0.0 and base["step"] == 0
    assert base["target"]["value"] == pytest.approx(math.log(base["ppl_unseen"]))
    assert base["target"]["band"] >= math.log1p(0.10)
    assert out["at_target"] is None
    assert set(base["mia_auc"]) == set(ATTACKS)
    assert all(isinstance(base[f"ppl_{r}"], float) and base[f"ppl_{r}"] > 1 for r in ("forget", "retain", "unseen", "general"))
    expected_base = evaluate(load_model(str(tiny_model_dir)), tiny_sets)[0]
    for key in ("ppl_forget", "ppl_retain", "ppl_unseen", "ppl_general"):
        assert base[key] == pytest.approx(expected_base[key], rel=1e-6)

    cells = out["milestones"]
    assert [c["step"] for c in cells] == [1, 2]
    for c in cells:
        assert set(c) >= {"step", "ppl_forget", "ppl_retain", "ppl_unseen", "ppl_general", "mia_auc",
                          "forget_gap", "retain_drift", "score", "success", "diverged"}
        assert set(c["mia_auc"]) == {*ATTACKS, "reference"}  # a run's reference attack: against θ0
        assert c["forget_gap"] == pytest.approx(abs(math.log(c["ppl_forget"]) - math.log(base["ppl_unseen"])))
        assert c["retain_drift"] == pytest.approx(math.log(c["ppl_retain"]) - math.log(base["ppl_retain"]))
        assert c["score"] == pytest.approx(c["forget_gap"] + max(0.0, c["retain_drift"]))
        assert isinstance(c["success"], bool) and c["diverged"] is False
    assert out["diverged"] is False

    cost = out["cost"]
    assert set(cost) >= {"train_tokens", "wall_seconds", "flops"}
    # train tokens: every real token of the forget and the retain batch of each step
    fb = [batch_indices(len(tiny_sets.forget), 4, 0, s) for s in (1, 2)]
    rb = [batch_indices(len(tiny_sets.retain), 4, 1, s) for s in (1, 2)]
    expected_train = sum(int(tiny_sets.forget.attention_mask[i].sum()) for i in fb) + \
        sum(int(tiny_sets.retain.attention_mask[i].sum()) for i in rb)
    assert cost["train_tokens"] == expected_train
    n_params = count_parameters(load_model(str(tiny_model_dir)))
    set_tokens = sum(int(ch.attention_mask.sum()) for _, ch in tiny_sets.items())
    assert cost["eval_tokens"] == 3 * set_tokens  # baseline (not cached yet) + two milestones
    assert cost["flops"] == 6 * n_params * cost["train_tokens"] + 2 * n_params * cost["eval_tokens"]
    assert cost["wall_seconds"] > 0

    # the baseline is now cached: a second run spends no eval tokens on it and reports the same one
    again = run(tiny_model_dir, forget_set_texts, tmp_path / "cache", "ga_gd", [1], lr=1e-3, watch_every=0)
    assert again["baseline"] == base
    assert again["cost"]["eval_tokens"] == set_tokens


def test_general_methods_need_a_general_set(tiny_model_dir, forget_set_texts, tmp_path):
    from engine.data import ForgetSetTexts

    no_general = ForgetSetTexts(forget_set_texts.forget, forget_set_texts.retain, forget_set_texts.unseen, [], {})
    with pytest.raises(UnlearnError, match="general"):
        run(tiny_model_dir, no_general, tmp_path, "ga_gd_general", [1])


def test_a_corrupt_baseline_cache_entry_is_discarded_and_computed_again(tiny_model_dir, forget_set_texts, tmp_path):
    cache = tmp_path / "cache"
    cfg = RunConfig(method="ga", lr=1e-3, milestones=(1,), seq_len=128, watch_every=0)
    first = run_unlearning(str(tiny_model_dir), forget_set_texts, cfg, device="cpu", cache_dir=cache)
    (entry,) = cache.glob("v*.json")  # the baseline's entry (the reference attack's losses are ref-*.json)
    entry.write_text('{"ppl_forget": 1.2, "ppl_ret')  # a write cut short (a full disk, a killed copy)
    again = run_unlearning(str(tiny_model_dir), forget_set_texts, cfg, device="cpu", cache_dir=cache)
    assert again["baseline"]["ppl_forget"] == first["baseline"]["ppl_forget"]
    assert json.loads(entry.read_text())["ppl_forget"] == first["baseline"]["ppl_forget"]
