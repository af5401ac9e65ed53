"""engine/metric_registry.py, the metric registry: torch-free, and what it says of each metric."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from engine import metric_registry as M
from engine.errors import UnlearnError


def test_the_registry_never_imports_torch():
    code = "import engine.metric_registry, sys; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_run_metrics_are_the_plain_cell_metrics_in_table_order():
    assert M.every_run_paths() == ("eval_score", "forget_gap", "retain_eval_drift", "ppl_forget", "ppl_retain",
                                   "ppl_retain_eval", "ppl_unseen", "ppl_general", "mia_auc.loss", "mia_auc.zlib",
                                   "mia_auc.min_k", "mia_auc.min_k_pp", "mia_auc.reference", "mia_auc_lo",
                                   "mia_auc_hi", "exact_memorization.forget", "exact_memorization.retain_eval",
                                   "exact_memorization.unseen", "extraction_strength.forget",
                                   "extraction_strength.retain_eval", "extraction_strength.unseen", "score",
                                   "retain_drift")
    assert M.every_run_paths(max_tier=M.HEADLINE) == ("eval_score", "forget_gap", "retain_eval_drift", "ppl_forget",
                                                      "ppl_retain_eval", "mia_auc.loss", "mia_auc.min_k")
    # the objective is judged on held-out utility; the figures on the trained-on retain keep their names
    assert M.SCORE == "eval_score" and [m.path for m in M.objective()] == ["eval_score", "forget_gap", "retain_eval_drift"]
    assert M.paths(M.TRAINED_ON) == ("score", "retain_drift")
    assert M.paths(M.RECOVERY) == (*(f"{a}_recovery" for a in M.ROBUSTNESS_ATTACKS), "attack_robustness")


@pytest.mark.parametrize("path, x, want", [
    ("score", 0.3, 0.3), ("retain_drift", -0.2, 0.2), ("bench.muse_privleak", -4.0, 4.0),
    ("mia_auc.min_k_pp", 0.3, 0.2), ("bench.muse_auc", 0.9, 0.4), ("bench.tofu_truth_ratio", 0.7, -0.7),
    ("downstream.hellaswag", 0.4, -0.4), ("ppl_forget", math.e, 1.0), ("ppl_retain", 0.0, None),
    ("relearn_recovery", 0.25, 0.25),
])
def test_badness_runs_lower_is_better(path, x, want):
    got = M.get(path).badness(x)
    assert (got is None and want is None) or math.isclose(got, want, abs_tol=1e-12)


def test_only_the_forget_side_figures_have_no_better_direction():
    # and the memorization figures of the forget and unseen sets, read against each other like the perplexities
    assert [m.path for m in M.every() if not m.good_bad] == [
        "ppl_forget", "ppl_unseen", "ppl_general", "exact_memorization.forget", "exact_memorization.unseen",
        "extraction_strength.forget", "extraction_strength.unseen"]
    assert M.get("retain_eval_drift").scale == "|drift| lower = greener"
    assert M.get("mia_auc.loss").scale == "closer to 0.5 = greener"
    assert M.get("ppl_retain").scale == "log scale, lower = greener"


def test_unknown_paths_are_one_line_errors():
    for bad in ("nope", "downstream.", "mia_auc"):
        with pytest.raises(UnlearnError, match="unknown metric"):
            M.get(bad)
    assert M.get("downstream.arc_easy").better == M.HIGHER


def test_a_blank_cell_has_every_measured_field_nested_as_a_cell_nests_them():
    assert M.blank(M.PERPLEXITY, M.MIA) == {
        "ppl_forget": None, "ppl_retain": None, "ppl_retain_eval": None, "ppl_unseen": None, "ppl_general": None,
        "mia_auc": {"loss": None, "zlib": None, "min_k": None, "min_k_pp": None, "reference": None}, "mia_auc_lo": None,
        "mia_auc_hi": None}


def test_the_cell_type_has_a_key_for_every_metric():
    keys = set(M.CellMetrics.__annotations__)
    assert {m.path.split(".")[0] for m in M.every()} <= keys
    assert {"step", "success", "diverged", "train_loss", "attacks", "downstream"} <= keys


def test_registered_is_gone_after_its_with():
    with M.registered(M.Metric("edit_norm", "edit", "", M.LOWER, M.OBJECTIVE, "a test's")):
        assert "edit_norm" in M.every_run_paths()
        with pytest.raises(ValueError):
            M.register(M.Metric("edit_norm", "edit", "", M.LOWER, M.OBJECTIVE, "twice"))
    assert M.find("edit_norm") is None
