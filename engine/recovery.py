"""Attacks that test whether forgetting holds: does the forgotten text come back after a little
fine-tuning (`relearn`) or after quantizing the weights (`quant4`, `quant8`)?

Each attack works on a copy of the model at a milestone, which it never changes (the run goes on from
the model as it was, so prefix sharing still holds), and reports the metrics of the attacked model
and its **recovery**: the share of what unlearning removed from the forget set that the attack
brings back, in log-perplexity on U,

    recovery = (log ppl_U(θ) − log ppl_U(attacked θ)) / (log ppl_U(θ) − log ppl_U(θ0))

0 when the attack brings nothing back, 1 when the forget set is as likely as under the original
model θ0 (it may fall outside [0, 1]: reported as measured). When the cell forgot nothing
measurable — its forget perplexity within the success tolerance (`--tol-forget`) of θ0's — there
is nothing to recover and the recovery is None.

- relearn: fine-tune a copy on chunks drawn (seeded) from the forget set — or, with
  `--relearn-from retain`, from the retain set: unrelated to U, so whatever comes back was never shown
  (Hu et al. 2024's benign relearning) — with AdamW (clipping 1.0, no dropout), then evaluate on
  the whole sets. How many chunks, steps and which lr is a recipe (`--relearn-recipe`, RELEARN_RECIPES):
  `quick` (the default: 10 % of the chunks, 20 steps at the run's own lr and batch size) or
  `openunlearning` (every chunk once at lr 2e-5, the relearning of OpenUnlearning's meta-evaluation).
  Drawn from U, some of the recovery is simply learning the slice again; how much comes back on
  the rest of U is what relearning attacks measure (Lynch et al. 2024; Deeb & Roger 2024).
- quant4 / quant8: the linear layers (all but the output embedding, as 4-bit loaders leave it)
  quantized and evaluated. Two implementations (`--quant-backend`, reported per attack as `how`):
  `bitsandbytes` — NF4 and LLM.int8, as the published attack loads the model (Zhang et al., ICLR
  2025; engine/quant_bnb.py) — and `rtn`, symmetric per-output-channel round-to-nearest to 4 or 8
  bits and back (scale = max|w| / (2^(b−1) − 1)), which runs anywhere and which a test holds to a
  float64 reference and its error bound of scale / 2 per weight. `auto` (the default) takes
  bitsandbytes on CUDA where it is installed, rtn otherwise. The two are different quantizers (NF4's
  16 levels per block of 64 weights are not 4-bit RTN's per channel), so their recoveries differ:
  compare cells only within one.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch

from engine.attack_recipes import QUANT_BACKENDS, RELEARN_RECIPES, RELEARN_SOURCES, RelearnRecipe
from engine.data import ForgetSetChunks
from engine.evaluate import evaluate
from engine.finetune import fine_tune
from engine.metric_registry import ATTACK_ROBUSTNESS, PPL_FORGET, QUANT_ATTACKS, wants_robustness
from engine.metric_registry import recovery as recovery_path

RELEARN_SEED_OFFSET = 7919  # the relearn slice and batches draw from their own seeded stream
RELEARN_FRACTION = RELEARN_RECIPES["quick"].share
RELEARN_STEPS = RELEARN_RECIPES["quick"].steps


def recovery(ppl_unlearned, ppl_attacked, ppl_original, tol_forget: float) -> float | None:
    """The share of the forgetting the attack undoes (see the module's docstring), or None."""
    if not all(isinstance(p, (int, float)) and math.isfinite(p) and p > 0 for p in (ppl_unlearned, ppl_original)):
        return None
    forgotten = math.log(ppl_unlearned) - math.log(ppl_original)
    if forgotten <= math.log1p(tol_forget):
        return None
    if not (isinstance(ppl_attacked, (int, float)) and math.isfinite(ppl_attacked) and ppl_attacked > 0):
        return None  # the attack blew the model up: no perplexity to compare
    return (math.log(ppl_unlearned) - math.log(ppl_attacked)) / forgotten


def attack_robustness(recoveries: dict[str, float | None]) -> float | None:
    """One robustness figure from a cell's recoveries, as the OpenUnlearning meta-evaluation combines
    them: the harmonic mean of (1 − relearn recovery) and (1 − quantization recovery), each clipped
    to [0, 1] (a recovery past 1, or below 0, as measured, is no more than all, or nothing, undone).
    The quantization recovery is the larger of quant4's and quant8's where both ran (the attack that
    did more). None without relearn and a quantization attack, or where either recovery is None
    (the cell forgot nothing measurable: there is nothing to be robust about)."""
    quant = [recoveries[a] for a in QUANT_ATTACKS if a in recoveries]
    if "relearn" not in recoveries or not quant or recoveries["relearn"] is None or any(q is None for q in quant):
        return None
    held = [min(1.0, max(0.0, 1.0 - r)) for r in (recoveries["relearn"], max(quant))]
    return 0.0 if sum(held) == 0 else 2 * held[0] * held[1] / (held[0] + held[1])


# ---------------------------------------------------------------- quantization

def quantize_rtn(weight: torch.Tensor, bits: int, channel_dim: int = 0) -> torch.Tensor:
    """Symmetric per-channel round-to-nearest: the weight quantized to `bits` and back."""
    qmax = 2 ** (bits - 1) - 1
    reduce = [d for d in range(weight.dim()) if d != channel_dim]
    w = weight.float()
    scale = w.abs().amax(dim=reduce, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel stays zero
    q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
    return (q * scale).to(weight.dtype)


def quantized_layers(model) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, module, output-channel dim) of every linear layer but the output embedding: nn.Linear
    (weight [out, in]) and GPT-2's Conv1D (weight [in, out])."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = []
    for name, module in model.named_modules():
        if module is out_emb:
            continue
        if isinstance(module, torch.nn.Linear):
            layers.append((name, module, 0))
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            layers.append((name, module, 1))
    return layers


def quantized_copy(model, bits: int):
    """A copy with every quantized layer's weight rounded to `bits` by round-to-nearest (rtn)."""
    q = copy.deepcopy(model).eval()
    with torch.no_grad():
        for _, module, dim in quantized_layers(q):
            module.weight.copy_(quantize_rtn(module.weight, bits, dim))
    return q


def quant_backend(choice: str, device) -> str:
    """The quantizer `--quant-backend` names on this device: auto → bitsandbytes on CUDA where it
    is installed, rtn otherwise."""
    from engine import quant_bnb
    from engine.errors import UnlearnError

    if choice not in QUANT_BACKENDS:
        raise UnlearnError(f"--quant-backend must be one of {', '.join(QUANT_BACKENDS)}, not {choice!r}")
    if choice == "auto":
        return "bitsandbytes" if torch.device(device).type == "cuda" and quant_bnb.available() else "rtn"
    if choice == "bitsandbytes" and not quant_bnb.available():
        raise UnlearnError("--quant-backend bitsandbytes needs bitsandbytes: pip install 'unlearn-lab[gpu]'")
    return choice


def quantized_attack_copy(model, bits: int, backend: str):
    """(the attacked copy, how it was quantized, in words) for quant4 / quant8."""
    if backend == "bitsandbytes":
        from engine.quant_bnb import bitsandbytes_copy

        return bitsandbytes_copy(model, bits, quantized_layers(model)), f"bitsandbytes {'nf4' if bits == 4 else 'llm.int8'}"
    return quantized_copy(model, bits), f"rtn {bits}-bit per channel"


# ---------------------------------------------------------------- relearning

def relearn_plan(sets: ForgetSetChunks, recipe: RelearnRecipe, source: str, lr: float, batch_size: int,
                 seed: int):
    """(the chunks drawn, steps, lr, the recipe in words) of the relearning attack."""
    from engine.errors import UnlearnError

    if source not in RELEARN_SOURCES:
        raise UnlearnError(f"--relearn-from must be one of {', '.join(RELEARN_SOURCES)}, not {source!r}")
    chunks = getattr(sets, source)
    if chunks is None or len(chunks) == 0:
        raise UnlearnError(f"--relearn-from {source}: this forget set has no {source} chunks")
    n = len(chunks)
    g = torch.Generator().manual_seed(seed + RELEARN_SEED_OFFSET)
    take = torch.randperm(n, generator=g)[: max(1, round(recipe.share * n))]
    part = chunks.subset(take.tolist())
    steps = recipe.steps if recipe.steps is not None else math.ceil(len(part) / batch_size)
    lr = recipe.lr if recipe.lr is not None else lr
    return part, steps, lr, f"{recipe.name}: {len(part)} {source} chunks, {steps} steps at lr {lr:g}"


def relearned_copy(model, sets: ForgetSetChunks, lr: float, batch_size: int, seed: int, device, autocast,
                   recipe: RelearnRecipe = RELEARN_RECIPES["quick"], source: str = "forget"):
    """A copy of `model` fine-tuned as `recipe` says on chunks of `source` (see the module's docstring)."""
    part, steps, lr, _ = relearn_plan(sets, recipe, source, lr, batch_size, seed)
    return _relearn(model, part, steps, lr, batch_size, seed, device, autocast)


def _relearn(model, part, steps: int, lr: float, batch_size: int, seed: int, device, autocast):
    attacked = copy.deepcopy(model).eval().requires_grad_(True)  # eval: no dropout, so no global RNG drawn
    fine_tune(attacked, part.input_ids, part.attention_mask, steps, lr, batch_size, seed + RELEARN_SEED_OFFSET,
              device, autocast, loss_mask=part.loss_mask)
    return attacked.requires_grad_(False).eval()


# ---------------------------------------------------------------- all of them at one milestone

def attack_milestone(model, sets: ForgetSetChunks, attacks: tuple[str, ...], metrics: dict, baseline: dict, *,
                     lr: float, batch_size: int, seed: int, eval_batch_size: int, min_k: float, tol_forget: float,
                     device=None, autocast=contextlib.nullcontext, reference=None, relearn_recipe: str = "quick",
                     relearn_from: str = "forget", quant_backend_choice: str = "auto",
                     gradnorm: bool = False) -> tuple[dict, int]:
    """The cell's attack fields — {"attacks": {name: metrics + recovery + how}, "<name>_recovery": ...}
    — and the tokens they evaluated. `metrics` are the cell's own, `baseline` θ0's; `how` says which
    recipe or quantizer ran, in words. Each attacked model is scored by the membership attacks the
    cell was (`reference`, `gradnorm`: engine.evaluate)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    results, tokens = {}, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for name in attacks:
            if name == "relearn":
                part, steps, relearn_lr, how = relearn_plan(sets, RELEARN_RECIPES[relearn_recipe], relearn_from, lr,
                                                            batch_size, seed)
                attacked = _relearn(model, part, steps, relearn_lr, batch_size, seed, device, autocast)
            else:
                attacked, how = quantized_attack_copy(model, int(name.removeprefix("quant")),
                                                      quant_backend(quant_backend_choice, device))
            m, n = evaluate(attacked, sets, eval_batch_size, device, autocast, min_k, reference=reference,
                            gradnorm=gradnorm)
            del attacked
            tokens += n
            m["recovery"] = recovery(metrics.get(PPL_FORGET), m.get(PPL_FORGET), baseline.get(PPL_FORGET),
                                     tol_forget)
            m["how"] = how
            results[name] = m
    model.train(was_training)
    recoveries = {recovery_path(name): r["recovery"] for name, r in results.items()}
    robust = attack_robustness({name: r["recovery"] for name, r in results.items()})
    return {"attacks": results, **recoveries, **({ATTACK_ROBUSTNESS: robust} if wants_robustness(attacks) else {})}, tokens

