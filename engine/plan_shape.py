"""A causal LM's shape, read from its config alone (no weights): what `engine.plan` needs to size a run.

`read_config` loads config.json through `AutoConfig.from_pretrained` (a local folder or a hub id;
HF_HUB_OFFLINE is honored by transformers itself). `shape_of` counts parameters exactly for the
families written out below, the way their modeling code builds them:

    llama, mistral, qwen2, qwen3, olmo, olmo2 (decoder blocks with a gated MLP):
        embeddings V·h, lm_head V·h unless tied (tie_word_embeddings),
        per layer  q h·(n·d), k and v h·(k·d) each, o (n·d)·h, gate/up/down 3·h·i,
                   biases where the family has them (qwen2: q, k, v; llama: attention_bias, mlp_bias),
                   norms: 2·h (RMSNorm weights; olmo's LayerNorm has none; olmo2 adds q/k norms n·d + k·d,
                   qwen3 adds q/k norms d + d),
        final norm h (olmo: 0)
    gpt_neox:  embed_in and embed_out V·h (one when tied); per layer two LayerNorms 2·2h, fused qkv h·3h,
               dense h·h, h→i and i→h (biases when attention_bias; MLP biases always); final LayerNorm 2h
    gpt2:      wte V·h, wpe P·h, per layer two LayerNorms 2·2h, c_attn h·3h + 3h, c_proj h·h + h,
               c_fc h·i + i, c_proj i·h + h (i = n_inner or 4h); ln_f 2h; lm_head tied to wte

where h = hidden size, V = vocabulary, n = attention heads, k = key-value heads (GQA), d = head
dim, i = MLP width. Any other family is instantiated on the `meta` device (no memory) and counted
with `sum(p.numel())`; the test suite checks the formulas above against real models of each family.

`linears` lists the (name, in, out) of one block's linear layers: LoRA adapts them (r·(in + out)
parameters each) and RMU trains the MLP's output one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from engine.errors import UnlearnError

GATED = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2")
KNOWN = GATED + ("gpt_neox", "gpt2")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    params: int  # every parameter, a tied matrix once
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool  # gate · up MLP (SwiGLU), or one up-projection and an activation
    linears: tuple[tuple[str, int, int], ...]  # one block's linear layers: (name, in, out), biases not counted
    largest_unit: int  # parameters of the largest FSDP unit: a block, or the embedding matrix
    counted: str  # "config" (the formulas above) or "meta" (instantiated on the meta device)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def read_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config (config.json only: no weights are read); a bad name is one UnlearnError line."""
    from transformers import AutoConfig

    from engine.models import check_local_model, hub_source, quiet_transformers

    quiet_transformers()
    check_local_model(name_or_path)
    try:
        with hub_source(name_or_path) as source:
            return AutoConfig.from_pretrained(os.path.expanduser(name_or_path), trust_remote_code=trust_remote_code,
                                              **source)
    except (OSError, ValueError, KeyError) as exc:
        raise UnlearnError(f"cannot read the config of model {name_or_path!r}: {str(exc).splitlines()[0]}") from None


def _block(c, kind: str) -> tuple[int, tuple]:
    """(parameters of one block, its linear layers) for a known family."""
    h = c.hidden_size
    if kind == "gpt2":
        i = c.n_inner or 4 * h
        lin = (("c_attn", h, 3 * h), ("attn.c_proj", h, h), ("c_fc", h, i), ("mlp.c_proj", i, h))
        return sum(a * b + b for _, a, b in lin) + 2 * 2 * h, lin
    if kind == "gpt_neox":
        i, bias = c.intermediate_size, int(c.attention_bias)
        lin = (("query_key_value", h, 3 * h), ("dense", h, h), ("dense_h_to_4h", h, i), ("dense_4h_to_h", i, h))
        attn = h * 3 * h + h * h + bias * (3 * h + h)
        return attn + (h * i + i) + (i * h + h) + 2 * 2 * h, lin
    n, k = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    d = getattr(c, "head_dim", None) or h // n
    i = c.intermediate_size
    lin = (("q_proj", h, n * d), ("k_proj", h, k * d), ("v_proj", h, k * d), ("o_proj", n * d, h),
           ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h))
    total = sum(a * b for _, a, b in lin)
    if kind == "qwen2":
        total += n * d + 2 * k * d
    elif getattr(c, "attention_bias", False):
        total += n * d + 2 * k * d + h
    if getattr(c, "mlp_bias", False):
        total += 2 * i + h
    norms = {"olmo": 0, "olmo2": 2 * h + n * d + k * d, "qwen3": 2 * h + 2 * d}.get(kind, 2 * h)
    return total + norms, lin


def _from_config(c, kind: str) -> ModelShape:
    h, V = c.hidden_size, c.vocab_size
    block, lin = _block(c, kind)
    tied = bool(getattr(c, "tie_word_embeddings", kind != "gpt_neox"))
    embed = V * h * (1 if tied else 2)
    if kind == "gpt2":
        embed += c.n_positions * h
    final = {"olmo": 0, "gpt2": 2 * h, "gpt_neox": 2 * h}.get(kind, h)
    n = c.num_attention_heads
    k = getattr(c, "num_key_value_heads", None) or n
    d = getattr(c, "head_dim", None) or h // n
    inter = dict((name, out) for name, _, out in lin).get("c_fc") or getattr(c, "intermediate_size", 4 * h)
    return ModelShape(kind, embed + c.num_hidden_layers * block + final, V, h, c.num_hidden_layers, n, k, d,
                      inter, kind in GATED, lin, max(block, V * h), "config")


def _from_meta(c, trust_remote_code: bool) -> ModelShape:
    """Unknown family: build it on the meta device and read its parameters and linear layers."""
    import re

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(c, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as exc:
        raise UnlearnError(f"cannot build model type {c.model_type!r} from its config: {str(exc).splitlines()[0]}") from None
    params = sum(p.numel() for p in model.parameters())
    h = c.hidden_size
    n = c.num_attention_heads
    k = getattr(c, "num_key_value_heads", None) or n
    layer0 = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)\.0\.(.+)$")
    lin, block = [], 0
    for name, mod in model.named_modules():
        m = layer0.match(name)
        if m and isinstance(mod, torch.nn.Linear):
            lin.append((m.group(1), mod.in_features, mod.out_features))
    for name, p in model.named_parameters():
        if layer0.match(name):
            block += p.numel()
    V = c.vocab_size
    return ModelShape(c.model_type, params, V, h, c.num_hidden_layers, n, k, getattr(c, "head_dim", None) or h // n,
                      getattr(c, "intermediate_size", None) or 4 * h, "glu" in str(getattr(c, "hidden_act", "")).lower()
                      or any(x[0].endswith("gate_proj") for x in lin), tuple(lin), max(block, V * h), "meta")


def shape_of(config, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a model from its config (a transformers PretrainedConfig)."""
    kind = getattr(config, "model_type", "")
    if kind in KNOWN:
        return _from_config(config, kind)
    return _from_meta(config, trust_remote_code)
