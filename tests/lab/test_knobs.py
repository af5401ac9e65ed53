"""Method knobs: a study sweeps a method's own hyperparameters (β, c, the retain weight...) beside
lr and steps. Each value combination is a method variant (`npo[beta=0.2]`), its own run, its own
lr × steps map, stored as Optuna params, and exported as the command that reproduces it."""
from __future__ import annotations

import json
import shlex

import optuna
import pytest

from engine.config import RunConfig
from engine.errors import UnlearnError
from engine.methods import get_method
from engine.methods.base import parse_variant, variant_id
from engine.metric_registry import SCORE
from studies.lifecycle.spec import StudySpec, expand_knobs
from studies.reading.export import export_best
from studies.store.db import Store
from tests.studies_helpers import cli, cli_in_process, cli_main, make_forget_set, runs_of


def test_variant_names_round_trip_and_set_the_knobs():
    assert variant_id("npo_gd", {"retain_weight": 2, "beta": 0.2}) == "npo_gd[beta=0.2,retain_weight=2.0]"
    assert parse_variant("npo_gd[beta=0.2,retain_weight=2.0]") == ("npo_gd", {"beta": 0.2, "retain_weight": 2.0})
    m = get_method("npo_gd[beta=0.2,retain_weight=2.0]")
    assert (m.id, m.forget.beta, m.retain_weight) == ("npo_gd[beta=0.2,retain_weight=2.0]", 0.2, 2.0)
    assert get_method("npo").forget.beta == 0.1  # the registered method is never changed
    assert get_method("rmu[steering=3]").forget.steering == 3.0
    assert get_method("ga").knob_values() == {"forget_weight": 1.0, "saliency": 0.0}
    assert get_method("simnpo_gd").knob_values() == {"beta": 4.5, "delta": 0.0, "forget_weight": 0.125,
                                                     "retain_weight": 1.0, "saliency": 0.0}
    for bad, msg in (("ga[beta=1]", "method ga has no knob 'beta'"), ("npo[beta=0]", "npo: beta must be above 0"),
                     ("npo[beta=x]", "must be NAME=NUMBER"), ("npo[beta=1", "knobs go in brackets"),
                     ("ga_gd[retain_weight=-1]", "must be 0 or more")):
        with pytest.raises(UnlearnError, match=msg.replace("[", "\\[")):
            get_method(bad)
    with pytest.raises(UnlearnError, match="leave out --retain-weight"):
        RunConfig(method="ga_gd[retain_weight=2]", lr=1e-3, milestones=(2,), retain_weight=1.0).validate()


def test_expansion_is_a_product_per_method_and_idempotent():
    knobs = {"beta": [0.05, 0.2], "retain_weight": [0.5, 1.0]}
    got = expand_knobs(("npo_gd", "npo", "ga"), knobs)
    assert got == ("npo_gd[beta=0.05,retain_weight=0.5]", "npo_gd[beta=0.05,retain_weight=1.0]",
                   "npo_gd[beta=0.2,retain_weight=0.5]", "npo_gd[beta=0.2,retain_weight=1.0]",
                   "npo[beta=0.05]", "npo[beta=0.2]", "ga")
    assert expand_knobs(got, knobs) == got
    with pytest.raises(UnlearnError, match="--param steering: none of the methods has this knob"):
        expand_knobs(("npo", "ga"), {"steering": [1.0]})
    spec = StudySpec(model="m", forget_set="fs", forget_set_hash="h", methods=("npo",), steps=(2,), lrs=(1e-3,),
                     knobs={"beta": [0.2, 0.05, 0.2]}).validate()
    assert spec.methods == ("npo[beta=0.05]", "npo[beta=0.2]") and spec.knobs == {"beta": [0.05, 0.2]}
    assert spec.validate() == spec and StudySpec.from_dict(spec.to_dict()).validate() == spec
    assert set(spec.optuna_distributions()) == {"method", "lr", "steps", "beta"}


@pytest.mark.slow  # a whole study through its scheduler and run subprocesses
def test_a_retain_weight_sweep_runs_each_value_and_exports_commands_that_reproduce_it(
        tmp_path, forget_set_files, tiny_model_dir, capsys):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    make_forget_set(Store(url), "fs", forget_set_files)
    assert cli_main("study", "create", "K", "--model", tiny_model_dir, "--forget-set", "fs", "--methods", "ga_gd,ga",
                    "--lr", "3e-3", "--steps", "2", "--param", "retain_weight=0.5,1", "--storage", url) == 0
    store = Store(url)
    assert sorted((r.method, r.lr) for r in runs_of(store, "K")) == [
        ("ga", 3e-3), ("ga_gd[retain_weight=0.5]", 3e-3), ("ga_gd[retain_weight=1.0]", 3e-3)]
    r = cli("study", "run", "K", "--workers", "1", "--storage", url, home=tmp_path / "home")
    assert r.returncode == 0, r.stderr

    trials = optuna.load_study(study_name="K", storage=url).trials
    assert sorted(t.params.get("retain_weight", -1) for t in trials) == [-1, 0.5, 1.0]  # ga has no retain term
    heat = json.loads(cli_in_process(capsys, "study", "heatmap", "K", "--json", "--storage", url).stdout)
    assert set(heat) == {"ga", "ga_gd[retain_weight=0.5]", "ga_gd[retain_weight=1.0]"}  # one map per variant

    entries = {e["method"]: e for e in export_best(store, "K")}
    for variant in ("ga_gd[retain_weight=0.5]",):  # one rerun shows the command carries the knob
        e = entries[variant]
        argv = shlex.split(e["command"])
        assert argv[argv.index("--method") + 1] == "ga_gd" and "--param" in argv
        p = cli_in_process(capsys, *argv[1:])
        assert p.returncode == 0, p.stderr
        rerun = json.loads(p.stdout)
        assert rerun["config"]["method"] == variant
        assert rerun["milestones"][0][SCORE] == e[SCORE]  # bitwise on CPU
        assert rerun["milestones"][0]["score"] == e["metrics"]["score"]  # the figure on the trained-on retain set too
    scores = [entries[v][SCORE] for v in ("ga_gd[retain_weight=0.5]", "ga_gd[retain_weight=1.0]")]
    assert scores[0] != scores[1]  # the knob reached the loss

    # The app shows a variant like any method: its name is not markup, nor a widget id; and at 120×50
    # plotext's legend does not fit one of the trial's plots (drawn again without it, not a crash).
    import asyncio

    from tui.app.app import create_app
    from tui.app.messages import CellRef, CompareCells, ExportRequested, OpenStudy, OpenTrial

    cells = [CellRef("K", v, 3e-3, 2) for v in ("ga_gd[retain_weight=0.5]", "ga_gd[retain_weight=1.0]")]

    async def walk() -> list[str]:
        app = create_app(url, refresh_s=0.5, read_devices=False)
        seen = []
        async with app.run_test(size=(120, 50)) as pilot:
            await pilot.pause(1.5)
            for message in (OpenStudy("K"), OpenTrial(cells[0]), CompareCells(cells), ExportRequested("K")):
                app.post_message(message)
                for _ in range(40):
                    await pilot.pause(0.05)
                seen.append(type(app.screen).__name__)
        return seen

    assert asyncio.run(walk()) == ["DashboardScreen", "TrialScreen", "CompareScreen", "ExportDialog"]


def test_a_variant_named_among_the_methods_is_an_optuna_trial_with_its_knob():
    """`--methods npo,npo[beta=0.01]` (no --param): the variant's knob is a trial param, so its
    distribution must be declared too, the same for every trial (Optuna refuses a trial whose
    params lack one: each such run failed before)."""
    from optuna.trial import create_trial

    spec = StudySpec(model="m", forget_set="fs", forget_set_hash="h", methods=("npo", "npo[beta=0.01]", "simnpo[delta=0.8]"),
                     steps=(2, 4), lrs=(1e-3,))
    dists = spec.optuna_distributions()
    assert dists["beta"].choices == (0.01,) and dists["delta"].choices == (0.8,)
    for method in spec.methods:
        params = spec.trial_params(method, 1e-3, 2)
        create_trial(params=params, distributions={k: d for k, d in dists.items() if k in params}, value=0.5)
    swept = StudySpec(model="m", forget_set="fs", forget_set_hash="h", methods=("npo[beta=0.1]", "npo[beta=0.2]", "npo[beta=0.05]"),
                      steps=(2,), lrs=(1e-3,), knobs={"beta": [0.1, 0.2]})
    assert swept.optuna_distributions()["beta"].choices == (0.1, 0.2, 0.05)
