"""One source of truth for run settings: every RunSettings field is a flag of `unlearn run` and
`unlearn study create`, is stored in the study, and comes back out of an export's command."""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import typer
from sqlmodel import select

from engine.config import RunConfig, RunSettings, settings_fields
from engine.errors import UnlearnError
from engine.metric_registry import SCORE
from studies.lifecycle.spec import StudySpec
from studies.reading.export import export_best
from studies.store.db import CellRow, Run, Store
from studies.store.states import RunState
from tests.studies_helpers import cli_main, make_forget_set
from tui.cli import app

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# A value other than the default for every field (a new field without one here fails the test below).
NON_DEFAULT = {"batch_size": 3, "seq_len": 96, "seed": 5, "warmup_steps": 2, "retain_weight": 2.5,
               "eval_batch_size": 5, "min_k": 0.3, "tol_forget": 0.2, "tol_retain": 0.1, "target_spread": 0.03,
               "watch_every": 2, "stop_at_target": True, "divergence_factor": 500.0,
               "attacks": "relearn,quant4", "relearn_recipe": "openunlearning", "relearn_from": "retain",
               "quant_backend": "rtn", "params": "mlp", "dtype": "bf16", "gradient_checkpointing": True,
               "optim": "adamw8bit", "lora": 4, "lora_alpha": 16.0, "lora_targets": "q_proj,v_proj",
               "bench_samples": 20, "tofu_retain_truth_ratios": str(FIXTURES / "presets" / "tofu" / "forget01.json"),
               "muse_retrained_auc": 0.48, "retrained_auc": 0.52, "privleak_attack": "zlib",
               "reference_model": "EleutherAI/pythia-14m", "eval_tasks": "arc_easy,piqa", "eval_tasks_dir": str(FIXTURES),
               "eval_tasks_limit": 10, "fsdp": True,
               "mia_gradnorm": True}
# Settings that exclude each other (--params chooses weights, --lora trains an adapter instead, and
# --fsdp shards what those, the attacks, 8-bit states and the gradient-norm attack need whole): a study takes NON_DEFAULT
# without the ones each case leaves out.
LORA = {"lora", "lora_alpha", "lora_targets"}
LEFT_OUT = {"lora": {"params", "fsdp"}, "params": LORA | {"fsdp"}, "fsdp": LORA | {"params", "attacks", "optim", "mia_gradnorm"}}


def command(*path: str):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def test_every_field_is_a_flag_of_run_and_study_create():
    assert set(NON_DEFAULT) == {f.name for f in settings_fields()}
    for path in (("run",), ("study", "create")):
        opts = {o for p in command(*path).params for o in p.opts}
        missing = [f.metadata["flag"] for f in settings_fields() if f.metadata["flag"] not in opts]
        assert missing == [], f"unlearn {' '.join(path)} lacks {missing}"


@pytest.mark.parametrize("left_out", LEFT_OUT.values(), ids=LEFT_OUT.keys())
def test_settings_round_trip_through_a_study_and_its_export(tmp_path, forget_set_files, tiny_model_dir, left_out):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    make_forget_set(Store(url), "fs", forget_set_files)
    given = {k: v for k, v in NON_DEFAULT.items() if k not in left_out}
    flags = [a for f in settings_fields() if f.name in given
             for a in ((f.metadata["flag"],) if given[f.name] is True else (f.metadata["flag"], str(given[f.name])))]
    assert cli_main("study", "create", "S", "--model", tiny_model_dir, "--forget-set", "fs", "--methods", "ga,ga_gd",
                    "--lr", "1e-3", "--steps", "2,4", "--eval-tasks-at", "every", "--storage", url, *flags) == 0
    store = Store(url)
    spec = StudySpec.from_dict(store.study("S").spec)
    assert spec.run == RunSettings(**given)  # stored whole

    with store.write() as s:  # one computed cell per run, so each method has a best cell to export
        for run in s.exec(select(Run)).all():
            run.state = RunState.DONE
            s.add(CellRow(run_id=run.id, step=2, metrics={SCORE: 0.5}, score=0.5))
    entries = {e["method"]: e for e in export_best(store, "S")}
    run_cmd = command("run")
    for method, expected in (("ga_gd", RunSettings(**given)),
                             ("ga", RunSettings(**{**given, "retain_weight": None}))):  # ga has no retain term
        e = entries[method]
        assert e["hyperparameters"] == dataclasses.asdict(expected)
        params = run_cmd.make_context("run", shlex.split(e["command"])[2:]).params
        carried = {f.name: params[f"rs_{f.name}"] for f in settings_fields() if params[f"rs_{f.name}"] is not None}
        assert RunSettings(**carried) == expected, e["command"]


def test_study_seq_len_defaults_to_the_forget_sets(tmp_path, forget_set_files, tiny_model_dir):
    from studies.lifecycle.study import create_study

    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    make_forget_set(store, "fs", forget_set_files, seq_len=64)
    study = create_study(store, "S", str(tiny_model_dir), "fs", methods=["ga"], lrs=[1e-3], steps=[2], seed=4)
    assert StudySpec.from_dict(study.spec).run == RunSettings(seq_len=64, seed=4)


def test_a_spec_stored_before_run_settings_had_their_key_still_reads():
    legacy = {"model": "m", "forget_set": "fs", "forget_set_hash": "h", "methods": ["ga"], "steps": [2, 4],
              "lrs": [1e-3], "lr_range": None, "sampler": "grid", "trials": None, "seed": 3, "batch_size": 8,
              "seq_len": 128, "warmup_steps": 1, "eval_batch_size": 8, "min_k": 0.2, "tol_forget": 0.1,
              "tol_retain": 0.05, "max_attempts": 2, "trust_remote_code": False, "has_general": False, "extra": {}}
    spec = StudySpec.from_dict(legacy)
    # The tolerances it stored were the defaults of its day; now that the default is auto (None),
    # they read back as the explicit values they are, so the old study keeps its bands.
    assert spec.run == RunSettings(seed=3, batch_size=8, seq_len=128, warmup_steps=1, tol_forget=0.1, tol_retain=0.05)
    assert StudySpec.from_dict(spec.to_dict()) == spec


def test_an_auto_tolerance_reads_back_as_auto():
    """An Optional float left at None (auto) is stored as None and read back as None, not as a number."""
    spec = StudySpec(model="m", forget_set="fs", forget_set_hash="h", methods=["ga"], steps=[2], lrs=[1e-3],
                     run=RunSettings(tol_retain=0.2)).validate()
    stored = json.loads(json.dumps(spec.to_dict()))  # as the store keeps it: plain JSON
    back = StudySpec.from_dict(stored)
    assert (back.run.tol_forget, back.run.tol_retain) == (None, 0.2)
    assert back == spec and back.run.validate() == back.run


def test_validate_never_mutates_and_names_the_flag():
    spec = StudySpec(model="m", forget_set="fs", forget_set_hash="h", methods=["ga"], steps=[4, 2, 4], lrs=[3e-3, 1e-3])
    valid = spec.validate()
    assert (valid.steps, valid.lrs) == ((2, 4), (1e-3, 3e-3))
    assert (spec.steps, spec.lrs) == ([4, 2, 4], [3e-3, 1e-3])
    for field, value, flag in (("batch_size", 0, "--batch-size"), ("divergence_factor", 0.5, "--divergence-factor"),
                               ("min_k", 2.0, "--min-k"), ("warmup_steps", -1, "--warmup"),
                               ("attacks", "relearn,quant3", "--attacks: unknown attack 'quant3'"), ("attacks", 4, "--attacks")):
        with pytest.raises(UnlearnError, match=flag):
            dataclasses.replace(spec, run=RunSettings(**{field: value})).validate()
    with pytest.raises(UnlearnError, match="none of the methods has a retain term"):
        dataclasses.replace(spec, run=RunSettings(retain_weight=1.0)).validate()


def test_run_config_of_a_sweep_point():
    cfg = RunConfig.of("ga_gd", 1e-3, [4, 2], RunSettings(warmup_steps=3, retain_weight=2.0)).validate()
    assert (cfg.method, cfg.lr, cfg.milestones, cfg.warmup_steps, cfg.retain_weight) == ("ga_gd", 1e-3, (2, 4), 3, 2.0)
    assert cfg.settings == RunSettings(warmup_steps=3, retain_weight=2.0)
