"""`unlearn study heatmap --metric X`: every metric path it accepted before the metric registry
(engine/metric_registry.py) still is, and nothing else is.

The list below is written out on purpose, not read from the registry: it is what the command
accepted when the metrics were still spelled out in studies/reading/grid.py, and it must never
shrink."""
from __future__ import annotations

import json

import pytest

from tests.cli.metric_store import metric_store
from tests.studies_helpers import cli_in_process

ACCEPTED_BEFORE = (
    "score", "forget_gap", "retain_drift", "ppl_forget", "ppl_retain", "ppl_unseen", "ppl_general",
    "mia_auc.loss", "mia_auc.zlib", "mia_auc.min_k", "mia_auc.min_k_pp",
    "relearn_recovery", "quant4_recovery", "quant8_recovery",
    "bench.tofu_truth_ratio", "bench.tofu_forget_quality", "bench.muse_verbmem_f", "bench.muse_knowmem_f",
    "bench.muse_knowmem_r", "bench.muse_auc", "bench.muse_privleak",
    "downstream.hellaswag", "downstream.arc_easy", "downstream.x",  # downstream.TASK: any task name
)
# Added since, with the held-out utility (retain_eval): the objective, its utility part, and the verdict's MIA interval.
ADDED_SINCE = ("eval_score", "retain_eval_drift", "ppl_retain_eval", "mia_auc_lo", "mia_auc_hi")
REFUSED = ("nope", "downstream.", "mia_auc", "mia_auc.nope", "bench.nope", "nope_recovery", "success", "step")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    return metric_store(tmp_path_factory.mktemp("metrics") / "lab.db")


def test_every_metric_accepted_before_is_accepted(url, capsys):
    for metric in ACCEPTED_BEFORE:
        p = cli_in_process(capsys, "study", "heatmap", "s", "--metric", metric, "--storage", url, "--json")
        assert p.returncode == 0, (metric, p.stderr)
        grid = json.loads(p.stdout)["ga"]
        assert len(grid["values"]) == 1 and len(grid["values"][0]) == 2, metric
    p = cli_in_process(capsys, "study", "heatmap", "s", "--metric", "retain_drift", "--storage", url, "--json")
    assert json.loads(p.stdout)["ga"]["values"] == [[0.01, 0.02]]


def test_the_objective_is_eval_score_and_the_held_out_figures_are_accepted(url, capsys):
    for metric in ADDED_SINCE:
        p = cli_in_process(capsys, "study", "heatmap", "s", "--metric", metric, "--storage", url, "--json")
        assert p.returncode == 0, (metric, p.stderr)
    values = {}
    for metric in (None, "eval_score", "score"):
        p = cli_in_process(capsys, "study", "heatmap", "s", *(("--metric", metric) if metric else ()), "--storage",
                           url, "--json")
        values[metric] = json.loads(p.stdout)["ga"]["values"]
    assert values[None] == values["eval_score"] == [[pytest.approx(0.13), pytest.approx(0.26)]]  # gap + retain_eval_drift
    assert values["score"] == [[pytest.approx(0.11), pytest.approx(0.22)]]  # gap + retain_drift: its old meaning


def test_an_unknown_metric_is_one_line_naming_the_known_ones(url, capsys):
    for metric in REFUSED:
        p = cli_in_process(capsys, "study", "heatmap", "s", "--metric", metric, "--storage", url)
        assert p.returncode == 2, (metric, p.stdout)
        assert f"unknown metric {metric!r}" in p.stderr and "downstream.TASK" in p.stderr, p.stderr
        assert "mia_auc.min_k_pp" in p.stderr and "bench.muse_privleak" in p.stderr, p.stderr
