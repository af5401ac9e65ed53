"""Task vector — forgetting by task arithmetic (Ilharco et al. 2023, "Editing Models with Task
Arithmetic"), the survey's local-weights family.

    θ_s = θ0 fine-tuned on U for s steps (descent on CE(θ; U));   reported: θ0 − α·(θ_s − θ0),  α = 1

Fine-tuning on U points the weights further towards the forget set; subtracting that direction
from θ0 is meant to point away from it. The training trajectory is plain fine-tuning, so it is
shared across milestones as for every method (prefix sharing); the negation is taken at each
milestone from θ0's weights, which the run keeps (one more copy of the model). At α = 0 the
reported model is θ0 exactly.
"""
from __future__ import annotations

import copy

from engine.errors import UnlearnError
from engine.methods import register
from engine.methods.base import ForgetTerm, Method, token_ce

TASK_VECTOR_ALPHA = 1.0


class TaskVectorNegation(ForgetTerm):
    id = "task_vector"
    formula = "θ0 − α·(θ_s − θ0), θ_s: descent on CE(θ; U); α=1"
    knobs = ("alpha",)  # hyperparameters a study may sweep (`--param NAME=V1,V2`)
    edits_weights = True

    def __init__(self, alpha: float = TASK_VECTOR_ALPHA):
        if not alpha >= 0:
            raise UnlearnError(f"task_vector: alpha must be 0 or more, not {alpha:g}")
        self.alpha = alpha

    def loss(self, logits, batch, reference_logits=None):
        return token_ce(logits, batch["labels"])  # learn U: the task vector's direction

    def edited(self, model, theta0: dict):
        import torch

        out = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name, p in out.named_parameters():
                p.copy_(theta0[name] - self.alpha * (p - theta0[name]))
        return out


register(Method("task_vector", "Task arithmetic: fine-tune on the forget set, then subtract that change from θ0 (×α).",
                TaskVectorNegation()))
