"""Question–answer forget sets: the prompt is context, only answer tokens count in a loss or a metric.

And the proof that plain text is untouched: figures of every method recorded from the code before
loss masks existed (tests/fixtures/plain_text_figures.json) are reproduced bitwise."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
FIGURES = FIXTURES / "plain_text_figures.json"


def _figure_methods() -> list[str]:
    from engine.methods import list_methods

    ids = [m.id for m in list_methods()]
    # whp's reinforced copy at 3 steps (the figure is what matters, not the budget); saliency covers selection
    return [("whp[reinforce_steps=3.0]" if i == "whp" else i) for i in ids] + ["ga_gd[saliency=20.0]"]


def _small(sets, n=4):
    from engine.data import ForgetSetChunks

    return ForgetSetChunks(*(ch.subset(list(range(n))) for ch in (sets.forget, sets.retain, sets.unseen, sets.general)))


def plain_text_figures(tiny_model_dir, tiny_tokenizer, tiny_sets) -> dict:
    """Per method: the losses of 2 steps and the milestone's metrics (ga also its relearn attack)."""
    from engine.config import RunConfig, RunSettings
    from engine.models import load_model
    from engine.run import train_to_milestones

    sets = _small(tiny_sets)
    out = {}
    for mid in _figure_methods():
        model = load_model(str(tiny_model_dir), "cpu")
        settings = RunSettings(batch_size=2, seq_len=128, eval_batch_size=4,
                               attacks="relearn" if mid == "ga" else "")
        cfg = RunConfig.of(mid, 1e-3, (2,), settings)
        res = train_to_milestones(model, tiny_tokenizer, sets, cfg, {"ppl_unseen": 10.0, "ppl_retain": 10.0,
                                                                     "ppl_forget": 10.0})
        cell = res.milestones[0]
        out[mid] = {"losses": res.losses, "train_tokens": res.train_tokens,
                    "metrics": {k: cell[k] for k in ("ppl_forget", "ppl_retain", "ppl_unseen", "ppl_general", "mia_auc")},
                    **({"relearn": cell["attacks"]["relearn"]} if mid == "ga" else {})}
    return out


@pytest.mark.slow
def test_plain_text_figures_bitwise_unchanged(tiny_model_dir, tiny_tokenizer, tiny_sets):
    """Every method's losses and metrics on plain text are exactly those recorded before QA masking
    (same torch build; elsewhere within float rounding)."""
    got = json.loads(json.dumps(plain_text_figures(tiny_model_dir, tiny_tokenizer, tiny_sets)))
    if os.environ.get("UNLEARN_RECORD_FIGURES") == "1":
        FIGURES.write_text(json.dumps({"torch": torch.__version__, "figures": got}, indent=1, sort_keys=True) + "\n")
    want = json.loads(FIGURES.read_text())
    if want["torch"] == torch.__version__:
        assert got == want["figures"]
    else:  # another BLAS or kernel: the same computation, rounded differently
        assert got.keys() == want["figures"].keys()
        for mid, w in want["figures"].items():
            assert got[mid]["losses"] == pytest.approx(w["losses"], rel=1e-4), mid
