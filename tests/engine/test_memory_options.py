"""Memory options of a run (engine/precision.py, engine/lora.py): bf16 weights through an fp32
master copy, gradient checkpointing, LoRA with the adapter-off reference, and the 8-bit optimizer's
refusal on CPU. Each is held to the fp32 run's first milestone (within a stated tolerance) or to
what it must train."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.config import RunConfig
from engine.errors import UnlearnError
from engine.evaluate import evaluate
from engine.lora import AdapterOff, apply_lora
from engine.methods import list_methods
from engine.models import load_model
from engine.precision import MasterAdamW, make_optimizer
from engine.run import train_to_milestones
from tests.studies_helpers import assert_one_line_error, cli_in_process

# bf16 keeps 8 bits of mantissa: each logit carries a relative error of about 2^-9, and a 2-layer
# model's per-token log-probabilities move by a few 1e-3. 0.02 in ln ppl (2 % in perplexity) is
# that error with room for the few training steps it compounds over, far below the effects a
# milestone measures (forget_gap of 0.1 and more).
BF16_LN_PPL_TOLERANCE = 0.02


def run(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, method="ga_kl", dtype=torch.float32, lr=3e-3, **settings):
    cfg = RunConfig(method=method, lr=lr, milestones=(2,), batch_size=4, seq_len=128, **settings)
    model = load_model(str(tiny_model_dir), dtype=dtype)
    return train_to_milestones(model, tiny_tokenizer, tiny_sets, cfg, baseline)


def test_small_steps_move_bf16_weights_through_the_fp32_master_copy():
    # |w| in [0.01, 0.05): a bf16 ulp there is 6e-5 to 2.4e-4, so a 1e-6 update rounds away.
    w0 = torch.linspace(0.01, 0.05, 1000)
    naive = torch.nn.Parameter(w0.bfloat16())
    opt = torch.optim.AdamW([naive], lr=1e-6, weight_decay=0.0)
    kept = torch.nn.Parameter(w0.bfloat16())
    opt_m = make_optimizer("adamw", [kept], 1e-6, torch.device("cpu"))
    assert isinstance(opt_m, MasterAdamW)
    for _ in range(100):  # a constant gradient: Adam moves every weight by lr a step
        for p, o in ((naive, opt), (kept, opt_m)):
            p.sum().backward()
            o.step()
            o.zero_grad()
    assert torch.equal(naive.detach(), w0.bfloat16())  # plain bf16 AdamW: not one weight moved
    master = opt_m.state[kept]["master"]
    assert (w0.bfloat16().float() - master).mean().item() == pytest.approx(100 * 1e-6, rel=0.01)  # 100 steps × lr
    assert torch.equal(kept.detach(), master.bfloat16())  # the weights are the master, rounded
    assert int((kept.detach() != w0.bfloat16()).sum()) > 100  # and they moved


def test_master_adamw_is_torchs_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(64))
    b.data.copy_(a.data)
    ours, torchs = MasterAdamW([a], lr=1e-2), torch.optim.AdamW([b], lr=1e-2, weight_decay=0.0)
    for _ in range(20):
        g = torch.randn(64)
        for p, o in ((a, ours), (b, torchs)):
            p.grad = g.clone()
            o.step()
    assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_a_1e_6_step_changes_a_bf16_model(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    theta0 = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    out = run(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, method="ga", dtype=torch.bfloat16, lr=1e-6)
    changed = sum(int((a != b).sum()) for a, b in zip(theta0.parameters(), out.model.parameters()))
    assert next(out.model.parameters()).dtype == torch.bfloat16 and changed > 0


def test_each_memory_option_keeps_the_fp32_runs_first_milestone(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    ref = run(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline).milestones[0]
    ckpt_run = run(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, gradient_checkpointing=True)
    m = ckpt_run.model
    assert m.is_activation_checkpointing if hasattr(m, "is_activation_checkpointing") else m.is_gradient_checkpointing
    ckpt = ckpt_run.milestones[0]
    assert ckpt["score"] == ref["score"] and ckpt["ppl_forget"] == ref["ppl_forget"]  # recomputed exactly on CPU
    bf16 = run(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, dtype=torch.bfloat16).milestones[0]
    both = run(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, dtype=torch.bfloat16,
               gradient_checkpointing=True).milestones[0]
    for cell in (bf16, both):
        for key in ("ppl_forget", "ppl_retain", "ppl_unseen"):
            gap = abs(math.log(cell[key]) - math.log(ref[key]))
            print(f"bf16{'+ckpt' if cell is both else ''} {key}: |Δ ln ppl| = {gap:.2e}")
            assert gap <= BF16_LN_PPL_TOLERANCE, (key, cell[key], ref[key])


def test_lora_trains_only_its_adapter_and_its_reference_is_theta0_exactly(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    theta0 = load_model(str(tiny_model_dir)).eval()
    ids = tiny_sets.forget.input_ids[:2]
    with torch.no_grad():
        want = theta0(input_ids=ids).logits
        lora = apply_lora(load_model(str(tiny_model_dir)), 4, None, "").eval()
        assert torch.equal(lora(input_ids=ids).logits, want)  # B starts at 0: the model is θ0
    out = run(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, lora=4)
    trained = out.model
    assert all(math.isfinite(out.milestones[0][k]) for k in ("ppl_forget", "ppl_retain", "score"))
    with torch.no_grad():
        assert torch.equal(AdapterOff(trained)(input_ids=ids).logits, want)  # adapter off: θ0, exactly
        assert not torch.equal(trained(input_ids=ids).logits, want)  # adapter on: it learned
    base = dict(theta0.named_parameters())
    for name, p in trained.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p, base[plain]), name  # every base weight bitwise θ0


def test_every_method_runs_with_lora_or_says_why_not(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline):
    for method in list_methods():
        if method.forget.edits_weights:
            with pytest.raises(UnlearnError, match="does not run with --lora"):
                RunConfig(method=method.id, lr=1e-3, milestones=(1,), lora=4).validate()
            continue
        cfg = RunConfig(method=method.id, lr=1e-3, milestones=(1,), batch_size=2, seq_len=128, lora=4)
        cell = train_to_milestones(load_model(str(tiny_model_dir)), tiny_tokenizer, tiny_sets, cfg, baseline).milestones[0]
        assert cell["score"] is not None and math.isfinite(cell["score"]), method.id


def test_bad_memory_options_are_one_line_errors(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, forget_set_files, capsys):
    with pytest.raises(UnlearnError, match="--optim adamw8bit keeps its 8-bit states on the GPU"):
        run(tiny_model_dir, tiny_tokenizer, tiny_sets, baseline, optim="adamw8bit")
    for settings, msg in (({"dtype": "fp16"}, "--dtype must be one of auto, bf16, fp32"),
                          ({"optim": "sgd"}, "--optim must be one of"),
                          ({"lora": -1}, "--lora must be a rank"),
                          ({"lora_alpha": 8.0}, "need --lora R"),
                          ({"lora": 4, "params": "mlp"}, "give one of them"),
                          ({"gradient_checkpointing": 1}, "is on or off")):
        with pytest.raises(UnlearnError, match=msg):
            RunConfig(method="ga", lr=1e-3, milestones=(1,), **settings).validate()
    f = forget_set_files
    p = cli_in_process(capsys, "run", "--model", str(tiny_model_dir), "--forget", f["forget"], "--retain", f["retain"],
                       "--unseen", f["unseen"], "--method", "ga", "--lr", "1e-3", "--steps", "1", "--lora", "4",
                       "--lora-targets", "no_such_proj")
    assert_one_line_error(p, "--lora-targets no_such_proj")


def test_lora_and_bf16_runs_from_the_cli_save_the_adapter_or_the_merged_model(
        tiny_model_dir, tiny_sets, forget_set_files, tmp_path, capsys):
    f = forget_set_files
    common = ["run", "--model", str(tiny_model_dir), "--forget", f["forget"], "--retain", f["retain"],
              "--unseen", f["unseen"], "--method", "ga_kl", "--lr", "3e-3", "--steps", "1,2", "--seq-len", "128", "--json"]
    p = cli_in_process(capsys, *common, "--dtype", "bf16", "--gradient-checkpointing")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["memory"]["dtype"] == "bfloat16" and r["memory"]["master_copy"] and r["memory"]["gradient_checkpointing"]
    assert all(math.isfinite(c["score"]) for c in r["milestones"])

    p = cli_in_process(capsys, *common, "--lora", "4", "--save-model", str(tmp_path / "adapter"))
    assert p.returncode == 0, p.stderr
    lora_cell = json.loads(p.stdout)["milestones"][-1]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    p = cli_in_process(capsys, *common, "--lora", "4", "--save-model", str(tmp_path / "merged"), "--merge")
    assert p.returncode == 0, p.stderr
    merged = load_model(str(tmp_path / "merged"))  # a plain model, through from_pretrained
    assert not hasattr(merged, "peft_config")
    cell = evaluate(merged, tiny_sets)[0]  # the same chunks (seq_len 128): the merged model is the adapted one
    assert cell["ppl_forget"] == pytest.approx(lora_cell["ppl_forget"], rel=1e-5)


def test_a_study_run_that_cannot_fit_its_gpu_is_refused_with_the_plans_reason(tiny_model_dir):
    """studies/running/worker.py asks the plan before a run loads anything on a GPU (given the GPU's free bytes)."""
    from pathlib import Path

    from studies.lifecycle.spec import StudySpec
    from studies.running.worker import _does_not_fit

    llama8b = str(Path(__file__).parents[1] / "fixtures" / "configs" / "llama-3-8b")
    spec = StudySpec(model=llama8b, forget_set="fs", forget_set_hash="h", methods=("ga_kl",), steps=(1,), lrs=(1e-5,))
    gib = 1024 ** 3
    why = _does_not_fit(spec, RunConfig(method="ga_kl", lr=1e-5, milestones=(1,), dtype="fp32"), 80 * gib)
    assert "does not fit: needs 217.5 GiB per GPU, the GPU has 80.0 GiB; would fit with:" in why
    fitting = RunConfig(method="ga_kl", lr=1e-5, milestones=(1,), dtype="bf16", lora=16)
    assert _does_not_fit(spec, fitting, 80 * gib) is None
    unreadable = StudySpec(model="/no/such/model", forget_set="fs", forget_set_hash="h", methods=("ga",), steps=(1,), lrs=(1e-5,))
    assert _does_not_fit(unreadable, fitting, 80 * gib) is None  # no plan: the run itself says what is wrong


def test_a_gpu_whose_memory_other_processes_hold_makes_the_run_retryable_not_failed(tiny_model_dir):
    """Before, a run that found less memory free than its plan needs failed for good, even when the
    GPU could hold it and another scheduler's runs had the memory for the moment. Now only a plan
    that does not fit the whole GPU fails at once; a shortfall of free memory is retried."""
    from pathlib import Path

    from studies.lifecycle.spec import StudySpec
    from studies.running.worker import memory_verdict

    llama8b = str(Path(__file__).parents[1] / "fixtures" / "configs" / "llama-3-8b")
    spec = StudySpec(model=llama8b, forget_set="fs", forget_set_hash="h", methods=("ga_kl",), steps=(1,), lrs=(1e-5,))
    gib = 1024 ** 3
    lora = RunConfig(method="ga_kl", lr=1e-5, milestones=(1,), dtype="bf16", lora=16)  # fits 80 GiB
    assert memory_verdict(spec, lora, 79 * gib, 80 * gib) == (None, False)
    why, for_good = memory_verdict(spec, lora, 2 * gib, 80 * gib)  # 78 GiB held by others
    assert not for_good and "now: 2.0 of the GPU's 80.0 GiB free, the rest held by other processes; retried" in why
    full = RunConfig(method="ga_kl", lr=1e-5, milestones=(1,), dtype="fp32")  # 217.5 GiB: never fits
    why, for_good = memory_verdict(spec, full, 80 * gib, 80 * gib)
    assert for_good and "needs 217.5 GiB per GPU" in why
