"""A TPE study samples a method's knobs from ranges (`--param beta=0.05:0.5:log`) beside lr and
steps, and `--attacks ... --attacks-at best` runs the attacks once, at each method's best cell,
after the runs (the pool's attack job)."""
from __future__ import annotations

import json
import shlex

import optuna
import pytest
from optuna.distributions import FloatDistribution

from engine.errors import UnlearnError
from engine.metric_registry import SCORE
from studies.lifecycle.spec import StudySpec, parse_knob_options, without_ranged_knobs
from studies.reading.export import export_best
from studies.reading.grid import best_cell, load_cells
from studies.store.db import Store
from tests.studies_helpers import (
    assert_one_line_error,
    cli,
    cli_in_process,
    events_of,
    make_forget_set,
    runs_of,
    study_state,
)


def tpe_spec(**kw) -> StudySpec:
    base = dict(model="m", forget_set="fs", forget_set_hash="h", methods=("npo", "ga"), steps=(2,),
                sampler="tpe", lr_range=(1e-4, 1e-2), trials=3)
    return StudySpec(**{**base, **kw})


def test_knob_ranges_parse_validate_and_become_float_params():
    assert parse_knob_options(["beta=0.05:0.5:log", "retain_weight=0.5,1"]) == {
        "beta": {"low": 0.05, "high": 0.5, "log": True}, "retain_weight": [0.5, 1.0]}
    assert parse_knob_options(["c=1:10"]) == {"c": {"low": 1.0, "high": 10.0, "log": False}}
    for bad in ("beta=0.1:x", "beta=1:2:3", "beta=:2", "beta=1:2:lin"):
        with pytest.raises(UnlearnError, match="a range is NAME=LOW:HIGH"):
            parse_knob_options([bad])

    spec = tpe_spec(knob_ranges={"beta": {"low": 0.05, "high": 0.5, "log": True}}).validate()
    assert spec.methods == ("npo", "ga")  # ranges do not expand the method list; each run samples
    assert spec.optuna_distributions()["beta"] == FloatDistribution(0.05, 0.5, log=True)
    assert StudySpec.from_dict(spec.to_dict()).validate() == spec
    assert spec.trial_params("npo[beta=0.123]", 1e-3, 2) == {"method": "npo", "lr": 1e-3, "steps": 2, "beta": 0.123}
    assert without_ranged_knobs("npo_gd[beta=0.1,retain_weight=2.0]", {"beta": {}}) == "npo_gd[retain_weight=2.0]"

    for kw, msg in (({"sampler": "grid", "lrs": (1e-3,), "lr_range": None, "trials": None,
                      "knob_ranges": {"beta": {"low": 0.1, "high": 1}}}, "sampled by TPE"),
                    ({"knob_ranges": {"beta": {"low": 0.1, "high": 1}}, "knobs": {"beta": [0.2]}}, "as a list and as a range"),
                    ({"knob_ranges": {"steering": {"low": 1, "high": 2}}}, "none of the methods has this knob"),
                    ({"knob_ranges": {"beta": {"low": 0.0, "high": 1}}}, "npo: beta must be above 0"),
                    ({"knob_ranges": {"beta": {"low": 0.5, "high": 0.1}}}, "LOW < HIGH"),
                    ({"knob_ranges": {"beta": {"low": 0.0, "high": 1, "log": True}}}, "log range needs LOW > 0"),
                    ({"attacks_at": "best"}, "--attacks-at best needs --attacks"),
                    ({"attacks_at": "worst"}, "--attacks-at must be one of every, best")):
        with pytest.raises(UnlearnError, match=msg):
            tpe_spec(**kw).validate()


def test_attacks_at_best_are_not_run_with_the_runs():
    from engine.config import RunSettings

    every = tpe_spec(run=RunSettings(attacks="relearn")).validate()
    best = tpe_spec(run=RunSettings(attacks="relearn"), attacks_at="best").validate()
    assert every.run_config("ga", 1e-3).attacks == "relearn" and not every.wants_best_cell_attacks
    assert best.run_config("ga", 1e-3).attacks == "" and best.wants_best_cell_attacks


@pytest.mark.slow  # a whole TPE study through its scheduler, run subprocesses and the attack job
def test_a_tpe_study_samples_a_knob_range_and_attacks_its_best_cells(tmp_path, forget_set_files, tiny_model_dir, capsys):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    make_forget_set(Store(url), "fs", forget_set_files)
    p = cli_in_process(capsys, "study", "create", "T", "--model", tiny_model_dir, "--forget-set", "fs",
                       "--methods", "npo,ga", "--lr-range", "1e-3:1e-2", "--trials", "3", "--steps", "1,2",
                       "--param", "beta=0.05:0.5:log", "--attacks", "relearn", "--attacks-at", "best", "--storage", url)
    assert p.returncode == 0, p.stderr
    r = cli("study", "run", "T", "--workers", "1", "--storage", url, home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    store = Store(url)
    assert study_state(store, "T") == "done"
    assert [e.kind for e in events_of(store, "T") if e.kind.startswith("attacks")] == ["attacks started", "attacks done"]

    runs = runs_of(store, "T")
    assert len(runs) == 3
    trials = [t for t in optuna.load_study(study_name="T", storage=url).trials if t.state.name == "COMPLETE"]
    assert len(trials) == 6  # 3 runs × 2 milestones
    for t in trials:
        assert t.params["method"] in ("npo", "ga")
        if t.params["method"] == "npo":
            assert 0.05 <= t.params["beta"] <= 0.5  # a conditional param: only npo draws it
        else:
            assert "beta" not in t.params
    assert any(run.method.startswith("npo") for run in runs)  # TPE's seeded start drew npo (checked, not hoped)
    for run in runs:
        if run.method.startswith("npo"):
            assert run.method.startswith("npo[beta=")

    cells = load_cells(store, "T")
    attacked = [c for c in cells if "relearn_recovery" in (c.metrics or {})]
    ran = {without_ranged_knobs(r.method, {"beta": {}}) for r in runs}
    assert sorted(without_ranged_knobs(c.method, {"beta": {}}) for c in attacked) == sorted(ran)  # one best cell per method
    assert all("attacks" not in (c.metrics or {}) for c in cells if c not in attacked)

    best = best_cell(cells, "npo", {"beta": {}})  # the export reproduces a sampled variant through --param
    e = next(e for e in export_best(store, "T") if e["method"] == best.method)
    argv = shlex.split(e["command"])
    assert argv[argv.index("--method") + 1] == "npo" and argv[argv.index("--param") + 1].startswith("beta=")
    rerun = cli_in_process(capsys, *argv[1:])
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["milestones"][-1][SCORE] == e[SCORE]

    assert_one_line_error(cli_in_process(capsys, "study", "create", "G", "--model", tiny_model_dir, "--forget-set", "fs",
                                         "--methods", "npo", "--lr", "1e-3", "--steps", "2", "--param", "beta=0.1:1",
                                         "--storage", url), "sampled by TPE")
