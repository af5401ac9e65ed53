"""engine.selection: which weights a run may change (--params REGEX, --params saliency:P, RMU's
own choice). Everything outside the selection stays bitwise θ0; the saliency mask is the top share
of a score computed here independently; prefix sharing holds with a selection."""
from __future__ import annotations

import math

import pytest
import torch

from engine.config import RunConfig
from engine.errors import UnlearnError
from engine.models import load_model
from engine.run import train_to_milestones
from engine.selection import saliency_masks


def train(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, params, milestones=(3,), method="ga_gd"):
    cfg = RunConfig(method=method, lr=1e-2, milestones=milestones, batch_size=4, seq_len=128, params=params)
    return train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline)


def test_a_regex_trains_only_matching_parameters(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    theta0 = dict(load_model(str(tiny_model_dir)).named_parameters())
    after = dict(train(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, r"layers\.1\.mlp\.").model.named_parameters())
    changed = {n for n in theta0 if not torch.equal(theta0[n], after[n])}
    assert changed and all(".layers.1.mlp." in n for n in changed)
    assert all(torch.equal(theta0[n], after[n]) for n in theta0 if ".layers.1.mlp." not in n)


def test_a_regex_that_matches_nothing_is_a_user_error(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    with pytest.raises(UnlearnError, match=r"no parameter of this model matches --params 'nothing\\.here'"):
        train(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, r"nothing\.here")


def reference_scores(model, sets) -> dict[str, torch.Tensor]:
    """|∂L_U/∂w| / (|∂L_R/∂w| + mean |∂L_R/∂w|), each L the mean CE over every predicted token of
    the whole set, computed chunk by chunk on exactly its real tokens (no padding at all)."""
    def grads(chunks):
        model.zero_grad(set_to_none=True)
        total = sum(int(chunks.attention_mask[b].sum()) - 1 for b in range(len(chunks)))
        for b in range(len(chunks)):
            n = int(chunks.attention_mask[b].sum())
            ids = chunks.input_ids[b:b + 1, :n]
            logits = model(input_ids=ids).logits[0, :-1].double()
            (torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum") / total).backward()
        return {n: p.grad.double().clone() for n, p in model.named_parameters()}

    g_u, g_r = grads(sets.forget), grads(sets.retain)
    floor = torch.cat([g.abs().flatten() for g in g_r.values()]).mean()
    return {n: g_u[n].abs() / (g_r[n].abs() + floor) for n in g_u}


def test_saliency_selects_the_top_share_of_an_independent_score(tiny_model_dir, tiny_sets):
    model = load_model(str(tiny_model_dir)).eval()
    masks = saliency_masks(model, 5.0, tiny_sets.forget, tiny_sets.retain, 3, torch.device("cpu"))
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == math.ceil(0.05 * total)
    ref = reference_scores(model, tiny_sets)
    chosen = torch.cat([ref[n][masks[n]] for n in ref])
    rest = torch.cat([ref[n][~masks[n]] for n in ref])
    assert float(chosen.min()) >= float(rest.max()) * (1 - 1e-4)  # float32 vs float64: ties at the edge only


def test_saliency_trains_only_its_weights_and_keeps_prefix_sharing(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    theta0 = load_model(str(tiny_model_dir)).eval()
    masks = saliency_masks(theta0, 2.0, tiny_sets.forget, tiny_sets.retain, 8, torch.device("cpu"))
    long = train(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, "saliency:2", milestones=(1, 3))
    short = train(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, "saliency:2", milestones=(1,))
    assert long.milestones[0] == short.milestones[0] and long.losses[:1] == short.losses
    before, after = dict(theta0.named_parameters()), dict(long.model.named_parameters())
    moved = sum(int((before[n] != after[n]).sum()) for n in before)
    assert moved > 0
    for n in before:  # nothing outside the mask moved, bitwise
        assert torch.equal(before[n][~masks[n]], after[n][~masks[n]]), n


def test_params_override_rmus_own_choice(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    theta0 = dict(load_model(str(tiny_model_dir)).named_parameters())
    out = train(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, r"layers\.0\.self_attn\.o_proj", method="rmu")
    changed = {n for n, p in out.model.named_parameters() if not torch.equal(theta0[n], p)}
    assert changed == {"model.layers.0.self_attn.o_proj.weight"}
    # layer 1 comes after the layer RMU reads (ℓ = 0 here): its weights cannot move the loss
    with pytest.raises(UnlearnError, match="rmu: the loss does not depend on any weight this run trains"):
        train(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, r"layers\.1\.", method="rmu")


def test_the_saliency_knob_is_the_params_flag_as_a_sweepable_knob(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    flag = train(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, "saliency:2")
    knob = train(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, "", method="ga_gd[saliency=2.0]")
    assert knob.losses == flag.losses and knob.milestones[0]["score"] == flag.milestones[0]["score"]
    for (n, a), (_, b) in zip(flag.model.named_parameters(), knob.model.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(UnlearnError, match="sets the saliency share as a knob: leave out --params"):
        RunConfig(method="ga_gd[saliency=2]", lr=1e-2, milestones=(1,), params="saliency:5").validate()
    with pytest.raises(UnlearnError, match="share in percent: 0 \\(off\\) to 100"):
        RunConfig(method="ga_gd[saliency=120]", lr=1e-2, milestones=(1,)).validate()
