"""studies/lifecycle/inputs.py: the one parser per input that the CLI and the app share (the two
faces run one table through it in tests/app/test_new_study_both_faces.py)."""
from __future__ import annotations

import re

import pytest

from engine.config import settings_fields
from engine.errors import UnlearnError
from studies.lifecycle import inputs
from studies.lifecycle.inputs import SearchSpace, device_slots, parse_learning_rates, search_space


def test_a_range_is_written_with_dots_or_a_colon_and_means_tpe():
    for text in ("1e-5:1e-3", "1e-5..1e-3", " 1e-5 : 1e-3 ", "1e-5 .. 1e-3"):
        assert parse_learning_rates(text).range == (1e-5, 1e-3)
        assert search_space(text) == search_space(None, text) == search_space(text, sampler="tpe")
        assert search_space(text).sampler == "tpe"
    assert search_space(None, "1e-5,1e-3").lr_range == (1e-5, 1e-3)  # --lr-range's older spelling
    assert parse_learning_rates("1e-5:1e-3 x3").values == parse_learning_rates("1e-5..1e-3 x3").values
    assert search_space("1e-4,1e-3").lrs == [1e-4, 1e-3] and search_space("1e-4").sampler == "grid"
    assert search_space(None) == SearchSpace("grid", None, None)  # none given: the spec says what is missing


def test_the_rules_refuse_what_does_not_fit_with_one_line_naming_the_input():
    for args, says in (((None, "1e-4"), "--lr-range takes LOW:HIGH"),
                       (("1e-4", "1e-5:1e-3"), "give --lr (grid) or --lr-range (tpe), not both"),
                       (("1e-4", None, "tpe"), "the tpe sampler draws learning rates from a range"),
                       (("1e-4", None, "random"), "--sampler must be one of grid, tpe"),
                       (("1e-4,x",), "--lr 'x' is not a number")):
        with pytest.raises(UnlearnError, match=re.escape(says)):
            search_space(*args)
    with pytest.raises(UnlearnError, match="give learning rates"):
        search_space("", required=True)
    assert search_space(None, None, "tpe") == SearchSpace("tpe", None, None)
    assert inputs.parse_learning_rate("3e-4") == 3e-4
    for bad in ("nan", "inf", "0", "-1"):
        with pytest.raises(UnlearnError, match=f"--lr '{bad}' must be a positive number"):
            inputs.parse_learning_rate(bad)


def test_device_slots_from_flags_and_from_ticks():
    assert device_slots("1,0", None) == ["cuda:1", "cuda:0"]  # --gpus in the order given
    assert device_slots("0,0", None) == ["cuda:0", "cuda:0"]  # two workers on one GPU
    assert device_slots(None, 2) == device_slots([], "2") == ["cpu", "cpu"]
    assert device_slots(None, None, visible_gpus=lambda: 2) == ["cuda:0", "cuda:1"]
    assert device_slots(None, None, visible_gpus=lambda: 0) == ["cpu"]
    for args, says in ((("a,b", None), "--gpus takes comma-separated GPU indices"),
                       ((None, 0), "--workers must be at least 1"), ((None, "x"), "--workers must be a whole number"),
                       ((None, None), "choose a GPU or give --workers")):
        with pytest.raises(UnlearnError, match=says):
            device_slots(*args)


def test_a_setting_converts_as_its_flag_does():
    by_flag = {f.metadata["flag"]: f for f in settings_fields()}
    assert inputs.setting_value(by_flag["--batch-size"], " 8 ") == 8
    assert inputs.setting_value(by_flag["--retain-weight"], "0.5") == 0.5
    assert inputs.setting_value(by_flag["--attacks"], "quant4, relearn") == "quant4, relearn"  # checked by RunSettings
    assert inputs.setting_value(by_flag["--fsdp"], True) is True
    assert inputs.setting_value(by_flag["--fsdp"], False) is None and inputs.setting_value(by_flag["--seed"], " ") is None
    with pytest.raises(UnlearnError, match="--batch-size must be an integer, not '8.5'"):
        inputs.setting_value(by_flag["--batch-size"], "8.5")
    with pytest.raises(UnlearnError, match="--min-k must be a number, not 'x'"):
        inputs.setting_value(by_flag["--min-k"], "x")
