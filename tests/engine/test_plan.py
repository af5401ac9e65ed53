"""`unlearn plan`: parameter counts from configs against real models, every memory figure against bytes
computed by hand here, and the command's contract. Real configs, real (tiny or meta) models, no mocks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T

from engine.config import RunSettings
from engine.errors import UnlearnError
from engine.methods import get_method
from engine.plan import GIB, OVERHEAD, Options, adapter_params, check_fits, describe_oom, figures, make_plan
from engine.plan_shape import read_config, shape_of
from tests.studies_helpers import cli_in_process

CONFIGS = Path(__file__).parents[1] / "fixtures" / "configs"
L8B, L7B, L70B = (str(CONFIGS / n) for n in ("llama-3-8b", "llama-2-7b", "llama-3-70b"))
P8B, P7B, P70B = 8_030_261_248, 6_738_415_616, 70_553_706_496  # the published totals
B, S = 4, 512  # RunSettings' defaults
SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)
FAMILIES = {
    "llama": T.LlamaConfig(**SMALL, num_key_value_heads=2),
    "llama-biases-tied": T.LlamaConfig(**SMALL, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                       tie_word_embeddings=True),
    "mistral": T.MistralConfig(**SMALL, num_key_value_heads=2),
    "qwen2": T.Qwen2Config(**SMALL, num_key_value_heads=2),
    "qwen3": T.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16),
    "olmo": T.OlmoConfig(**SMALL, pad_token_id=0, bos_token_id=None, eos_token_id=1),
    "olmo2": T.Olmo2Config(**SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=None, eos_token_id=1),
    "gpt_neox": T.GPTNeoXConfig(**SMALL, bos_token_id=0, eos_token_id=1),
    "gpt_neox-tied-nobias": T.GPTNeoXConfig(**SMALL, tie_word_embeddings=True, attention_bias=False, bos_token_id=0,
                                            eos_token_id=1),
    "gpt2": T.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1),
    "phi3 (meta fallback)": T.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=1),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_counts_equal_a_real_model_of_each_family(family):
    config = FAMILIES[family]
    model = T.AutoModelForCausalLM.from_config(config)
    shape = shape_of(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.counted == ("meta" if "meta" in family else "config")


@pytest.mark.parametrize("path, published", [(L7B, P7B), (L8B, P8B), (L70B, P70B)])
def test_published_totals_and_the_meta_device_agree(path, published):
    from accelerate import init_empty_weights

    config = read_config(path)
    with init_empty_weights():
        meta = T.AutoModelForCausalLM.from_config(config)
    assert shape_of(config).params == sum(p.numel() for p in meta.parameters()) == published


def plan_bytes(path, method, opts=Options(), batch=B, seq=S):
    return figures(shape_of(read_config(path)), get_method(method), opts, batch, seq)


def test_8b_ga_kl_bf16_by_hand():
    f = plan_bytes(L8B, "ga_kl")
    assert f["weights"] == 2 * P8B == 16_060_522_496
    assert f["master"] == 4 * P8B == 32_121_044_992
    assert f["gradients"] == 2 * P8B
    assert f["optimizer"] == 8 * P8B == 64_242_089_984
    assert f["reference"] == 2 * P8B  # KL reads a live frozen copy
    # per block per token: 16h + 4q + 4kv + 8i + 8 + 4·heads; outside the blocks: 6h + 12 + 2·head_dim
    a = 16 * 4096 + 4 * 4096 + 4 * 1024 + 8 * 14336 + 8 + 4 * 32
    assert a == 200_840
    e = 6 * 4096 + 12 + 2 * 128
    tokens = 4 * 512 * 2  # forget and retain batches
    assert f["activations"] == tokens * (32 * a + e) == 26_426_261_504
    assert f["autocast"] == 0
    # CE forget term keeps 4 B, KL keeps 12 B; the KL's peak is 20 B, per row·position·vocab entry
    assert f["logits"] == 4 * 512 * 128256 * (4 + 12 + 20) == 9_456_058_368
    assert f["overhead"] == OVERHEAD == 1_610_612_736
    assert sum(f.values()) == 182_037_635_072  # 169.5 GiB


def test_8b_fp32_by_hand():
    f = plan_bytes(L8B, "ga_kl", Options("fp32"))
    assert (f["weights"], f["master"], f["gradients"], f["optimizer"], f["reference"]) == (
        4 * P8B, 0, 4 * P8B, 8 * P8B, 4 * P8B)
    a = 200_840 + 10 * 4096
    e = 8 * 4096 + 12 + 4 * 128
    assert f["activations"] == 4096 * (32 * a + e) == 31_829_573_632
    linears = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # q, o; k, v; gate, up, down
    assert f["autocast"] == 2 * (32 * linears + 128256 * 4096) * 2 == 30_018_633_728


def test_8b_lora_by_hand():
    f = plan_bytes(L8B, "ga_kl", Options("bf16", lora=16))
    per_block = (4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096)
    A = 32 * 16 * per_block
    assert A == 41_943_040
    assert f["weights"] == 2 * P8B + 4 * A == 16_228_294_656
    assert (f["master"], f["gradients"], f["optimizer"], f["reference"]) == (0, 4 * A, 8 * A, 0)
    assert f["activations"] == 4096 * (32 * (200_840 + 2 * 16 * 7) + 24_844) == 26_455_621_632


def test_7b_checkpointing_by_hand():
    f = plan_bytes(L7B, "ga_kl", Options("bf16", gradient_checkpointing=True))
    assert f["weights"] == 2 * P7B == 13_476_831_232
    a = 16 * 4096 + 4 * 4096 + 4 * 4096 + 8 * 11008 + 8 + 4 * 32  # no GQA: kv width = 4096
    assert a == 186_504
    e = 6 * 4096 + 12 + 2 * 128
    # every block's bf16 input for both batches, plus one block recomputed for one batch
    assert f["activations"] == 4096 * (32 * 2 * 4096 + e) + 2048 * a == 1_557_463_040
    assert f["logits"] == 2048 * 32000 * 36 == 2_359_296_000


def test_70b_fsdp_over_8_gpus_by_hand():
    f = plan_bytes(L70B, "ga_kl", Options("bf16", True, gpus=8))
    embedding = 128256 * 8192
    block = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert embedding == 1_050_673_152 > block == 855_654_400  # the largest FSDP unit: the embedding
    # FSDP keeps fp32 shards (its own master copy) and gathers each unit in bf16 to compute
    assert f["weights"] == 4 * P70B // 8 + 2 * embedding * 2 == 39_479_545_856
    assert f["master"] == 0
    assert f["gradients"] == f["reference"] == 4 * P70B // 8 == 35_276_853_248  # fp32 shards, θ0 sharded alike
    assert f["optimizer"] == 8 * P70B // 8
    lora = plan_bytes(L70B, "ga_kl", Options("bf16", True, lora=16, gpus=8))
    A = adapter_params(shape_of(read_config(L70B)), get_method("ga_kl"), Options("bf16", True, lora=16, gpus=8))
    assert lora["weights"] == 4 * P70B // 8 + 2 * embedding * 2 + 4 * A and lora["reference"] == 0


def test_the_8bit_optimizers_are_not_planned_over_several_gpus():
    """A run sharded with --fsdp refuses them, so the plan never recommends them there."""
    plan = make_plan(str(L70B), "ga_kl", Options(gpus=8), 4, 512, 80 * GIB)
    assert [o.optim for o, _ in plan.ladder] == ["adamw"] * 5
    assert plan.recommended[0].flags() == "--dtype bf16 --gradient-checkpointing --lora 16 --gpus 8"
    with pytest.raises(UnlearnError, match="--optim adamw8bit does not run sharded over --gpus 2"):
        make_plan(str(L70B), "ga_kl", Options(optim="adamw8bit", gpus=2), 4, 512, 80 * GIB)


def test_method_dependent_rows():
    npo = plan_bytes(L8B, "npo")  # θ0's log-probs once per chunk: no copy on the GPU, no retain batch
    assert npo["reference"] == 0
    assert npo["logits"] == 2048 * 128256 * (4 + 6)
    rmu = plan_bytes(L8B, "rmu")  # trains 3 down-projections; reads hidden states, not logits
    trained = 3 * 14336 * 4096
    assert (rmu["master"], rmu["gradients"], rmu["optimizer"]) == (4 * trained, 2 * trained, 8 * trained)
    assert rmu["logits"] == 2048 * 128256 * 2
    assert plan_bytes(L8B, "whp")["reference"] == 2 * P8B  # the reinforced copy trained in prepare
    assert plan_bytes(L8B, "task_vector")["reference"] == 2 * P8B  # θ0's weights kept for the edit
    assert plan_bytes(L8B, "ga_kl", Options(lora=8))["reference"] == 0  # adapter off is θ0


def test_activation_estimate_matches_what_autograd_saves():
    """The per-block figure `a` is what a bf16 Llama block saves for backward, measured with saved-tensor hooks."""
    def saved_per_token(layers):
        config = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
        model = T.LlamaForCausalLM(config).to(torch.bfloat16).train()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=torch.randint(64, (2, 32)))
        return sum(seen.values()) / 64, config

    one, config = saved_per_token(1)
    three, _ = saved_per_token(3)
    shape = shape_of(config)
    a = 16 * 64 + 4 * shape.q_dim + 4 * shape.kv_dim + 8 * 96 + 8 + 4 * 4
    assert (three - one) / 2 == a
    assert one - a == pytest.approx(6 * 64 + 12 + 2 * shape.head_dim, rel=0.1)


def test_check_fits_and_describe_oom():
    # RunSettings' default --dtype auto is planned as bf16 (the plan is for GPUs)
    with pytest.raises(UnlearnError, match=r"needs 169\.5 GiB per GPU, the GPU has 80\.0 GiB; would fit with: "
                                           r"--dtype bf16 --gradient-checkpointing --optim adamw8bit$"):
        check_fits(L8B, "ga_kl", RunSettings(), 80 * GIB)
    check_fits(L8B, "ga_kl", RunSettings(), 200 * GIB)  # no error


def test_check_fits_passes_and_reads_the_options_from_settings():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class WithOptions(RunSettings):  # the fields the run's options will add to RunSettings
        dtype: str = "bf16"
        lora: int = 16

    assert check_fits(L8B, "ga_kl", WithOptions(), 80 * GIB) is None
    text = describe_oom(L8B, "ga_kl", RunSettings(batch_size=8), 80 * GIB)
    assert "--dtype bf16 at batch 8 × 512 tokens" in text and "optimizer 59.8 GiB" in text
    assert "would fit with: --dtype bf16 --gradient-checkpointing --lora 16" in text
    assert describe_oom("/no/such/model", "ga", RunSettings(), None).startswith("no plan: no such model folder")


def test_plan_json_8b_on_80_gib(capsys):
    p = cli_in_process(capsys, "plan", "--model", L8B, "--method", "ga_kl", "--gpu-mem", "80", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["params"] == P8B and out["gpu_bytes"] == 80 * GIB and out["gpus"] == 1
    assert out["asked"]["fits"] is False and out["fits"] is False
    assert out["recommended"]["options"] == "--dtype bf16 --gradient-checkpointing --optim adamw8bit"
    assert out["recommended"]["total"] <= 80 * GIB
    fp32 = out["ladder"][0]
    assert fp32["options"] == "--dtype fp32" and fp32["fits"] is False and fp32["total"] > 200 * GIB


def test_plan_table_names_the_verdict(capsys):
    p = cli_in_process(capsys, "plan", "--model", L8B, "--method", "ga_kl", "--gpu-mem", "80", "--dtype", "fp32")
    assert p.returncode == 0, p.stderr
    assert ("does not fit: needs 217.5 GiB per GPU, the GPU has 80.0 GiB; would fit with: --dtype bf16 "
            "--gradient-checkpointing --optim adamw8bit") in p.stdout
    p = cli_in_process(capsys, "plan", "--model", L70B, "--method", "ga_kl", "--gpu-mem", "80")
    assert "no option set fits" in p.stdout and p.returncode == 0


def test_a_tiny_local_model_folder(tmp_path, capsys):
    config = T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    p = cli_in_process(capsys, "plan", "--model", str(tmp_path), "--method", "npo_kl", "--gpu-mem", "4",
                       "--batch-size", "2", "--seq-len", "64", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["params"] == sum(p.numel() for p in model.parameters())
    assert out["fits"] is True and out["recommended"]["options"] == "--dtype fp32"


@pytest.mark.parametrize("args, needle", [
    (["--model", "/no/such/model", "--method", "ga"], "no such model folder"),
    (["--model", L8B, "--method", "nope"], "unknown method 'nope'"),
    (["--model", L8B, "--method", "ga", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--model", L8B, "--method", "ga", "--seq-len", "-3"], "--seq-len must be a positive integer"),
    (["--model", L8B, "--method", "ga", "--dtype", "fp16"], "--dtype must be one of"),
    (["--model", L8B, "--method", "ga", "--optim", "sgd"], "--optim must be one of"),
    (["--model", L8B, "--method", "ga", "--lora", "8", "--lora-targets", "wq"], "has no linear layer 'wq'"),
    (["--model", L8B, "--method", "ga", "--gpu-mem", "0"], "--gpu-mem must be above 0"),
    (["--model", str(CONFIGS), "--method", "ga"], "cannot read the config"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    p = cli_in_process(capsys, "plan", *args)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr
