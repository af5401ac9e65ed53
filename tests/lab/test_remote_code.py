"""A worker that joins a shared store runs no code stored with a study (the model repo's own Python,
lm-eval task files) unless it is started with --allow-remote-code: anyone who can write the store
chooses that code."""
from __future__ import annotations

from studies.lifecycle.study import create_study, resume_study
from studies.store.db import Store
from tests.studies_helpers import assert_one_line_error, cli_in_process, make_forget_set, runs_of


def test_a_worker_runs_no_code_stored_with_a_study_unless_allowed(tmp_path, forget_set_files, tiny_model_dir, capsys):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    create_study(store, "R", str(tiny_model_dir), "fs", methods=["ga"], lrs=[1e-3], steps=[2], trust_remote_code=True)
    create_study(store, "E", str(tiny_model_dir), "fs", methods=["ga"], lrs=[1e-3], steps=[2],
                 eval_tasks="piqa", eval_tasks_dir=str(tasks))
    for name in ("R", "E"):
        resume_study(store, name)
    p = cli_in_process(capsys, "worker", "--study", "R", "--workers", "1", "--storage", url)
    assert_one_line_error(p, "study R runs --trust-remote-code", "--allow-remote-code")
    p = cli_in_process(capsys, "worker", "--study", "E", "--workers", "1", "--storage", url)
    assert_one_line_error(p, f"--eval-tasks-dir {tasks}", "--allow-remote-code")
    p = cli_in_process(capsys, "worker", "--workers", "1", "--storage", url)  # every running study: both left alone
    assert p.returncode == 0, p.stderr
    assert "study R left alone" in p.stderr and "study E left alone" in p.stderr
    assert [r.state for r in runs_of(store, "R") + runs_of(store, "E")] == ["pending", "pending"]


def test_an_optuna_study_left_without_our_rows_is_removed_by_study_rm(tmp_path, forget_set_files, tiny_model_dir,
                                                                     capsys):
    """A create cut short between Optuna's study and ours blocks the name; `study rm` frees it."""
    import optuna

    url = f"sqlite:///{tmp_path / 'lab.db'}"
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    optuna.create_study(study_name="half", storage=store.optuna)
    create = ("study", "create", "half", "--model", str(tiny_model_dir), "--forget-set", "fs", "--methods", "ga",
              "--lr", "1e-3", "--steps", "2", "--storage", url)
    assert_one_line_error(cli_in_process(capsys, *create), "unlearn study rm half")
    p = cli_in_process(capsys, "study", "rm", "half", "--yes", "--storage", url)
    assert p.returncode == 0, p.stderr
    assert "half" not in optuna.get_all_study_names(store.optuna)
    assert cli_in_process(capsys, *create).returncode == 0  # the name is free again
