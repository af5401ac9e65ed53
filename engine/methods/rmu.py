"""RMU — representation misdirection for unlearning (Li et al. 2024, "The WMDP Benchmark:
Measuring and Reducing Malicious Use With Unlearning").

At one decoder layer ℓ, with h_θ(x) the residual stream leaving layer ℓ:

    L_f = mean over forget tokens of ‖h_θ(x) − c·u‖² / d      (u a fixed random unit vector)
    L_r = mean over retain tokens of ‖h_θ(x) − h_θ0(x)‖² / d  (θ0's activations, cached once)
    L   = L_f + α · L_r

Defaults: ℓ = ⌊depth / 3⌋, c = 6.5, α = 100, and only the MLP down-projections of layers
ℓ−2..ℓ are trained (every other parameter stays bitwise θ0). u is drawn uniform in [0, 1)^d
from the run's seed and normalized, as in the published code. The published α = 1200 was tuned
for Zephyr-7B's activation scale; this tool sweeps models from a few million parameters up, whose
residual norms differ by orders of magnitude, so it defaults to 100 and lets a study search α
(`--retain-weight`). Layer names are known for the Llama, Mistral, Qwen, Gemma, Phi-3, OLMo,
GPT-NeoX, GPT-2 and OPT families and found by name (layers.<i>.mlp.down_proj, fc2, c_proj...) in
others; an architecture where neither works is refused with a one-line reason.
"""
from __future__ import annotations

import re

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import IGNORE, ForgetTerm, Method, RetainTerm, causal_labels, chunk_batches

RMU_STEERING = 6.5
RMU_ALPHA = 100.0
RMU_TRAINED_LAYERS = 3  # ℓ−2..ℓ

# model_type -> the name of layer i's MLP down-projection, where the family is known
DOWN_PROJ = {
    **{t: "model.layers.{i}.mlp.down_proj" for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                                                     "phi3", "olmo", "olmo2", "stablelm")},
    "gpt_neox": "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
    "gpt2": "transformer.h.{i}.mlp.c_proj",
    "opt": "model.decoder.layers.{i}.fc2",
}
# Elsewhere: a module of layer i whose name says it is the MLP's output projection.
_DOWN_NAME = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)\.(\d+)\.(?:(?:mlp|feed_forward|ffn)\.)?"
                        r"(?:down_proj|dense_4h_to_h|c_proj|fc2|fc_out|w2)$")


def _config(model):
    return getattr(model, "module", model).config  # under DDP the model is wrapped


def rmu_layer(model) -> int:
    """ℓ: the decoder layer at one third of the depth."""
    return _config(model).num_hidden_layers // 3


def down_projections(model) -> list[str]:
    """Parameter-name prefixes of the MLP down-projections RMU trains (layers ℓ−2..ℓ)."""
    layer = rmu_layer(model)
    wanted = range(max(0, layer - RMU_TRAINED_LAYERS + 1), layer + 1)
    kind = _config(model).model_type
    if kind in DOWN_PROJ:
        return [DOWN_PROJ[kind].format(i=i) + "." for i in wanted]
    found: dict[int, str] = {}
    for name, _ in getattr(model, "module", model).named_modules():
        m = _DOWN_NAME.match(name)
        if m and ".attn" not in name and ".attention" not in name:
            found.setdefault(int(m.group(1)), name + ".")
    if not all(i in found for i in wanted):
        raise UnlearnError(f"rmu: no MLP down-projection names for model type {kind!r} "
                           f"(known: {', '.join(sorted(DOWN_PROJ))}; or a module named layers.<i>.mlp.down_proj "
                           f"or alike)")
    return [found[i] for i in wanted]


def trains_down_projections(model):
    prefixes = tuple(down_projections(model))
    return lambda name: name.startswith(prefixes)


def layer_output(model, batch):
    """The residual stream leaving layer ℓ, [batch, tokens, d] (hidden_states[0] is the embeddings)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[rmu_layer(model) + 1]


def scored(batch):
    """Where a batch is scored: its labelled positions (real tokens; a QA chunk's answer only), or
    its real tokens when it carries no labels. For plain text the two are the same positions."""
    return batch["labels"] != IGNORE if "labels" in batch else batch["attention_mask"]


def masked_mse(h, target, mask):
    """Mean over the scored tokens (`mask` 1) of ‖h − target‖² / d."""
    mask = mask.float()
    per_token = (h.float() - target.float()).pow(2).mean(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


class MisdirectForget(ForgetTerm):
    id = "rmu_forget"
    formula = "mean ‖h_ℓ(θ; U) − c·u‖²/d, c=6.5"
    knobs = ("steering",)  # hyperparameters a study may sweep (`--param NAME=V1,V2`)

    def __init__(self, steering: float = RMU_STEERING):
        if not steering > 0:
            raise UnlearnError(f"rmu: steering must be above 0, not {steering:g}")
        self.steering = steering

    def constants(self, ctx):
        import torch

        d = _config(ctx.reference).hidden_size
        u = torch.rand(d, generator=ctx.generator)
        return {"rmu_control": self.steering * u / u.norm()}

    def mean_count(self, batch):
        return scored(batch).sum()  # masked_mse's mean: every scored position, position 0 included

    def forward_loss(self, model, batch, reference=None):
        h = layer_output(model, batch)
        return masked_mse(h, batch["rmu_control"].to(h.dtype), scored(batch))


class KeepActivations(RetainTerm):
    id = "rmu_retain"
    formula = "mean ‖h_ℓ(θ; R) − h_ℓ(θ0; R)‖²/d"

    def prepare(self, input_ids, attention_mask, ctx, loss_mask=None):
        """θ0's layer-ℓ activations of every retain chunk, once ([N, L, d] float32 on the CPU)."""
        import torch

        acts = []
        for _, ids, mask in chunk_batches(input_ids, attention_mask, ctx):  # full width: the rows are concatenated
            with torch.no_grad(), ctx.autocast():
                acts.append(layer_output(ctx.reference, {"input_ids": ids, "attention_mask": mask}).float().cpu())
        return {"labels": causal_labels(input_ids, attention_mask, loss_mask), "rmu_frozen": torch.cat(acts)}

    def mean_count(self, batch):
        return scored(batch).sum()  # masked_mse's mean: every scored position, position 0 included

    def forward_loss(self, model, batch, reference=None):
        return masked_mse(layer_output(model, batch), batch["rmu_frozen"], scored(batch))


register(Method("rmu", "Representation misdirection: scramble layer ℓ's activations on forget, keep them on retain; "
                "trains only the MLP down-projections of layers ℓ−2..ℓ.",
                MisdirectForget(), KeepActivations(), "retain", retain_weight=RMU_ALPHA,
                trains=trains_down_projections, trains_text="MLP down-projections of layers ℓ−2..ℓ (ℓ = depth/3)"))
