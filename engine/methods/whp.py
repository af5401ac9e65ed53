"""WHP — "Who's Harry Potter?" (Eldan & Russinovich 2023): descend on the forget set towards
generic labels, the tokens a model that never specialized on U would predict.

    θ_r = θ0 fine-tuned on U for a fixed budget (the reinforced model: built once, cached)
    v_generic = v_θ0 − α · ReLU(v_θr − v_θ0),   label y'_t = argmax v_generic,t,   α = 1
    L_f = CE(θ; U with labels y')

Where the reinforced model is more confident than θ0, the token is U-specific and its logit is
pushed down; elsewhere θ0's prediction stands. The budget is REINFORCE_STEPS optimizer steps of
AdamW at REINFORCE_LR on U (the run's batch size and seed), fixed so the reinforced copy depends
only on (model, forget set, seq_len, batch size, seed, budget) and is reused by every run of a
study: it is saved under the user's cache (UNLEARN_HOME/prepared) the first time. The paper's
second ingredient, replacing anchored terms with generic translations, needs a term dictionary
made by a language model and is not done here.

Note that a model which already memorized U (the demo's) gains little from reinforcement, so its
generic labels are close to its own predictions: WHP is built for knowledge the base model holds
partially, and the demo reports what it does there as measured.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import IGNORE, ForgetTerm, Method, PrepareContext, causal_labels, chunk_batches, token_ce

WHP_ALPHA = 1.0
REINFORCE_STEPS = 50
REINFORCE_LR = 3e-4


def reinforced_model(input_ids, attention_mask, ctx: PrepareContext, steps: int, loss_mask=None):
    """θ0 fine-tuned on U (its scored tokens) for `steps` steps, loaded from the cache when it was built before."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.finetune import fine_tune

    key = f"whp-reinforced-{ctx.cache_key}-b{ctx.train_batch_size}-s{ctx.seed}-n{steps}-lr{REINFORCE_LR:g}"
    folder = Path(ctx.cache_dir) / key if ctx.cache_dir and ctx.cache_key else None
    if folder is not None and (folder / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(ctx.device).eval()
    model = copy.deepcopy(ctx.reference).train().requires_grad_(True)
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        fine_tune(model, input_ids, attention_mask, steps, REINFORCE_LR, ctx.train_batch_size, ctx.seed, ctx.device,
                  ctx.autocast, loss_mask=loss_mask)
    model.eval().requires_grad_(False)
    if folder is not None:  # whole or not at all: two runs building it at once each write their own
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
        model.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another run got there first: theirs is the same model
            shutil.rmtree(tmp, ignore_errors=True)
    return model


def generic_labels(base_logits, boosted_logits, labels, alpha: float):
    """Labels aligned with `labels`: at each predicted position t, argmax over the vocabulary of
    v_θ0 − α·ReLU(v_θr − v_θ0) at t−1; ignored positions and position 0 stay as they are."""
    import torch

    generic = base_logits - alpha * torch.relu(boosted_logits - base_logits)
    out = labels.clone()
    keep = labels[:, 1:] != IGNORE
    out[:, 1:] = torch.where(keep, generic[:, :-1, :].argmax(-1), labels[:, 1:])
    return out


class GenericLabelDescent(ForgetTerm):
    id = "whp"
    formula = "CE(θ; U with argmax(v_θ0 − α·ReLU(v_θr − v_θ0)) labels), θr reinforced on U; α=1"
    knobs = ("alpha", "reinforce_steps")  # hyperparameters a study may sweep (`--param NAME=V1,V2`)
    prepare_reads_reference = True

    def __init__(self, alpha: float = WHP_ALPHA, reinforce_steps: float = REINFORCE_STEPS):
        if not alpha >= 0:
            raise UnlearnError(f"whp: alpha must be 0 or more, not {alpha:g}")
        if not (reinforce_steps >= 1 and float(reinforce_steps).is_integer()):
            raise UnlearnError(f"whp: reinforce_steps must be a whole number ≥ 1, not {reinforce_steps:g}")
        self.alpha, self.reinforce_steps = alpha, int(reinforce_steps)

    def prepare(self, input_ids, attention_mask, ctx, loss_mask=None):
        import torch

        reinforced = reinforced_model(input_ids, attention_mask, ctx, self.reinforce_steps, loss_mask)
        labels = causal_labels(input_ids, attention_mask, loss_mask)
        out = labels.clone()
        for sl, ids, mask in chunk_batches(input_ids, attention_mask, ctx):
            with torch.no_grad(), ctx.autocast():
                base = ctx.reference(input_ids=ids, attention_mask=mask).logits.float()
                boosted = reinforced(input_ids=ids, attention_mask=mask).logits.float()
            out[sl] = generic_labels(base.cpu(), boosted.cpu(), labels[sl], self.alpha)
        del reinforced
        return {"labels": out}

    def loss(self, logits, batch, reference_logits=None):
        return token_ce(logits, batch["labels"])


register(Method("whp", "Who's Harry Potter: descend on the forget set towards the generic labels a reinforced "
                "copy reveals (the tokens only U makes likely are pushed down).", GenericLabelDescent()))
