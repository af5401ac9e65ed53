"""The attacks as the literature runs them: bitsandbytes' NF4 and LLM.int8 (held to float64
references of the two formats, written here from their definitions), which quantizer ran and which
relearning recipe, relearning from unrelated data, and the one-line errors of the new flags."""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from engine.config import RunSettings
from engine.errors import UnlearnError
from engine.evaluate import evaluate
from engine.models import load_model
from engine.recovery import (
    RELEARN_RECIPES,
    RELEARN_SEED_OFFSET,
    attack_milestone,
    quant_backend,
    quantized_layers,
    relearn_plan,
    relearned_copy,
)
from tests.studies_helpers import cli_in_process

bnb = pytest.importorskip("bitsandbytes", reason="the bitsandbytes path needs bitsandbytes (the test extra has it)")
from engine.quant_bnb import bitsandbytes_copy  # noqa: E402
from tests.engine.quant_reference import computed_weight, ref_int8, ref_nf4  # noqa: E402


@pytest.fixture(scope="module")
def wide_model_dir(tiny_tokenizer, tmp_path_factory):
    """A 1-layer Llama of hidden size 64 (untrained) with the tiny tokenizer, saved like a user's model:
    bitsandbytes' CPU NF4 is right only for layers whose inputs are a multiple of its block of 64
    (every released LLM's), which the tiny model's 32 are not."""
    from transformers import LlamaForCausalLM

    from engine.models import tiny_llama_config

    path = tmp_path_factory.mktemp("wide_model")
    torch.manual_seed(0)
    tok = tiny_tokenizer
    config = tiny_llama_config(len(tok), hidden=64, layers=1, heads=2, max_positions=128, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.intermediate_size = 128
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_nf4_and_int8_weights_match_their_float64_definitions(wide_model_dir):
    model = load_model(str(wide_model_dir))
    layers = quantized_layers(model)
    q4, q8 = bitsandbytes_copy(model, 4, layers), bitsandbytes_copy(model, 8, layers)
    for name, module, _ in layers:
        w = module.weight.detach()
        nf4, int8 = computed_weight(q4.get_submodule(name)), computed_weight(q8.get_submodule(name))
        # the stored absmax scales are float32: equal to the float64 reference up to that rounding
        torch.testing.assert_close(nf4, ref_nf4(w), rtol=1e-6, atol=1e-7)
        # bitsandbytes takes 127 · w / max|w| in float16 arithmetic: a weight within that rounding of a
        # half level may land on the neighbouring level (1 weight in 4096 here), never further
        level = w.half().double().abs().amax(1, keepdim=True) / 127
        steps = ((int8 - ref_int8(w)) / level).abs()
        assert steps.max() <= 1.001 and (steps > 0.01).float().mean() <= 1e-3
        assert 0 < (nf4 - w.double()).abs().max() and len(torch.unique(nf4.flatten()[:64])) <= 16
    assert type(q4.get_submodule(layers[0][0])).__name__ == "Linear4bit"
    assert type(q8.get_submodule(layers[0][0])).__name__ == "Linear8bitLt"
    # the original is left as it was, and the output embedding is not quantized
    assert type(model.get_submodule(layers[0][0])) is torch.nn.Linear
    assert torch.equal(q4.get_output_embeddings().weight, model.get_output_embeddings().weight)


def test_the_bitsandbytes_copies_evaluate_and_8_bits_stay_closer(wide_model_dir, tiny_sets):
    model = load_model(str(wide_model_dir)).eval()
    layers = quantized_layers(model)
    base = evaluate(model, tiny_sets)[0]["ppl_forget"]
    got = {bits: evaluate(bitsandbytes_copy(model, bits, layers), tiny_sets)[0]["ppl_forget"] for bits in (4, 8)}
    assert all(math.isfinite(p) and p > 0 for p in got.values())
    assert abs(math.log(got[8] / base)) < abs(math.log(got[4] / base))


def test_each_attack_says_how_it_ran(wide_model_dir, tiny_sets, baseline):
    model = load_model(str(wide_model_dir)).eval()

    def attack(**kw):
        return attack_milestone(model, tiny_sets, ("relearn", "quant4", "quant8"), baseline, baseline, lr=3e-3,
                                batch_size=4, seed=0, eval_batch_size=8, min_k=0.2, tol_forget=0.1, **kw)[0]["attacks"]

    auto = attack()  # CPU: auto is round-to-nearest
    assert auto["quant4"]["how"] == "rtn 4-bit per channel" and auto["quant8"]["how"] == "rtn 8-bit per channel"
    n = len(tiny_sets.forget)
    assert auto["relearn"]["how"] == f"quick: {max(1, round(0.1 * n))} forget chunks, 20 steps at lr 0.003"
    published = attack(quant_backend_choice="bitsandbytes", relearn_recipe="openunlearning")
    assert published["quant4"]["how"] == "bitsandbytes nf4" and published["quant8"]["how"] == "bitsandbytes llm.int8"
    assert published["relearn"]["how"] == f"openunlearning: {n} forget chunks, {math.ceil(n / 4)} steps at lr 2e-05"
    assert published["quant4"]["ppl_forget"] != auto["quant4"]["ppl_forget"]  # a different quantizer


def test_the_published_recipe_and_relearning_from_unrelated_data(tiny_model_dir, tiny_sets):
    recipe = RELEARN_RECIPES["openunlearning"]
    part, steps, lr, _ = relearn_plan(tiny_sets, recipe, "forget", 1e-3, 4, 0)
    assert len(part) == len(tiny_sets.forget) and steps == math.ceil(len(part) / 4) and lr == 2e-5
    part, steps, lr, how = relearn_plan(tiny_sets, RELEARN_RECIPES["quick"], "retain", 1e-3, 4, 0)
    n = len(tiny_sets.retain)
    take = torch.randperm(n, generator=torch.Generator().manual_seed(RELEARN_SEED_OFFSET))[: max(1, round(0.1 * n))]
    assert torch.equal(part.input_ids, tiny_sets.retain.input_ids[take]) and (steps, lr) == (20, 1e-3)
    assert "retain chunks" in how
    model = load_model(str(tiny_model_dir)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attacked = relearned_copy(model, tiny_sets, 1e-3, 4, 0, torch.device("cpu"), contextlib.nullcontext,
                              RELEARN_RECIPES["quick"], "retain")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in attacked.state_dict().items())
    with pytest.raises(UnlearnError, match="no general chunks|must be one of"):
        relearn_plan(tiny_sets, recipe, "general", 1e-3, 4, 0)


def test_the_new_flags_fail_in_one_line(monkeypatch):
    for flag, field, bad in (("--relearn-recipe", "relearn_recipe", "hu2024"), ("--relearn-from", "relearn_from", "web"),
                             ("--quant-backend", "quant_backend", "gptq")):
        with pytest.raises(UnlearnError, match=f"{flag} must be one of"):
            RunSettings(**{field: bad}).validate()
    assert quant_backend("auto", "cpu") == "rtn" and quant_backend("bitsandbytes", "cpu") == "bitsandbytes"
    from engine import quant_bnb

    monkeypatch.setattr(quant_bnb, "available", lambda: False)  # a machine without the gpu extra
    with pytest.raises(UnlearnError, match=r"needs bitsandbytes: pip install 'unlearn-lab\[gpu\]'"):
        quant_backend("bitsandbytes", "cpu")
    assert quant_backend("auto", "cuda") == "rtn"


def test_cpu_nf4_refuses_a_layer_its_kernels_get_wrong(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    with pytest.raises(UnlearnError, match="32 inputs, not a multiple of 64.*use --quant-backend rtn"):
        bitsandbytes_copy(model, 4, quantized_layers(model))


def test_unlearn_run_with_the_published_attacks(wide_model_dir, forget_set_files, capsys):
    f = forget_set_files
    p = cli_in_process(capsys, "run", "--model", wide_model_dir, "--forget", f["forget"], "--retain", f["retain"],
                       "--unseen", f["unseen"], "--method", "ga", "--lr", "3e-3", "--steps", "2", "--seq-len", "128",
                       "--attacks", "relearn,quant4", "--quant-backend", "bitsandbytes", "--relearn-from", "retain",
                       "--json")
    assert p.returncode == 0, p.stderr
    cell = json.loads(p.stdout)["milestones"][0]
    assert cell["attacks"]["quant4"]["how"] == "bitsandbytes nf4"
    assert "retain chunks" in cell["attacks"]["relearn"]["how"] and "attack_robustness" in cell
