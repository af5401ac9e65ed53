"""What the robustness attacks (engine/recovery.py) may be told, declared once and torch-free, so the
run settings (`--relearn-recipe`, `--relearn-from`, `--quant-backend`) and their help derive from it."""
from __future__ import annotations

from dataclasses import dataclass

RELEARN_SOURCES = ("forget", "retain")  # --relearn-from
QUANT_BACKENDS = ("auto", "rtn", "bitsandbytes")  # --quant-backend


@dataclass(frozen=True)
class RelearnRecipe:
    """How the relearning attack fine-tunes: which chunks, how many steps, at which lr."""

    name: str
    about: str
    share: float  # of the source set's chunks, drawn seeded (at least one)
    steps: int | None  # optimizer steps; None: one pass over the drawn chunks (⌈n / batch⌉ steps)
    lr: float | None  # None: the run's own lr


RELEARN_RECIPES = {r.name: r for r in (
    RelearnRecipe("quick", "10 % of the chunks, 20 steps at the run's lr and batch size", 0.10, 20, None),
    # OpenUnlearning's meta-evaluation (Dorna et al. 2025, arXiv:2506.12618) relearns by fine-tuning
    # on the forget set for one epoch at lr 2e-5. Its meta-evaluation scripts are not in its public
    # repository: these figures are those reproductions of it state (docs/concepts.md#attacks).
    RelearnRecipe("openunlearning", "every chunk once (one epoch) at lr 2e-5, the run's batch size "
                  "(OpenUnlearning's meta-evaluation)", 1.0, None, 2e-5),
)}
