"""Methods of the survey this tool does not run, and why: `unlearn methods --all` lists them, so
their absence is stated rather than silent. Each would need more than a loss on (U, R) and a set
of trainable weights — a second model trained to a fixed point, a reward model, an external
memory, a change to the prompt, or a closed-form edit of the representation."""
from __future__ import annotations

NOT_RUNNABLE = (
    ("kga", "KGA (Wang et al. 2023)",
     "aligns the knowledge gap between two auxiliary models fine-tuned on U and on fresh data; "
     "needs those extra models trained to convergence per forget set, outside one run's loop"),
    ("quark", "Quark (Lu et al. 2022)",
     "reinforcement learning with reward-quantile tokens; needs a reward model and sampling, "
     "not a likelihood on fixed texts"),
    ("serac", "SERAC (Mitchell et al. 2022)",
     "a memory-based editor: a scope classifier and a counterfactual model beside the frozen LM; "
     "it leaves the weights unchanged, so no cell of lr × steps exists"),
    ("icul", "ICUL (Pawelczyk et al. 2023)",
     "in-context unlearning: changes the prompt at inference, not the model; perplexity of the "
     "model on U is not what it moves"),
    ("leace", "LEACE (Belrose et al. 2023)",
     "closed-form concept erasure of a linear concept from representations; needs a labelled "
     "concept, not a forget set of texts, and has no learning rate or steps"),
)
