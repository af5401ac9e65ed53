"""Studies end to end: the CLI, the scheduler and its workers, faults, concurrent workers on one
store (SQLite, and PostgreSQL when UNLEARN_TEST_PG_URL is set), Optuna and optuna-dashboard
reading what we wrote.

Everything is real: SQLite files in tmp_path, Optuna, the `unlearn` CLI and the run processes
as subprocesses, the tiny Llama of conftest.py loaded from its folder. Set-up that is not the
subject of a test (a forget set, a study row) goes through the same library calls the CLI makes.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from sqlmodel import select

from studies.lifecycle.study import create_study, resume_study, set_state
from studies.store.db import Run, Store
from tests.studies_helpers import (
    HUB_MODEL,
    SEQ_LEN,
    assert_one_line_error,
    children_of,
    cli,
    cli_env,
    cli_in_process,
    events_of,
    kill,
    make_forget_set,
    milestones_of,
    optuna_trials,
    pid_alive,
    runs_of,
    spawn,
    stop,
    study_state,
    wait_for,
)

FINISHED = ("done", "diverged")


@pytest.fixture
def lab(tmp_path, store):
    """The lab's store (tests/lab/conftest.py: a fresh SQLite store with the forget set `fs`, all
    four roles), its URL, and a home for the CLI."""
    home = tmp_path / "home"
    home.mkdir()
    return types.SimpleNamespace(url=store.url, store=store, home=home, dir=tmp_path)


def fs_args(files: dict, general: bool = False) -> list[str]:
    args = ["--forget", files["forget"], "--retain", files["retain"], "--unseen", files["unseen"]]
    return args + (["--general", files["general"]] if general else [])


def study(lab, name: str, model, **kw):
    kw.setdefault("methods", ["ga"])
    kw.setdefault("lrs", [1e-3])
    kw.setdefault("steps", [2, 4])
    return create_study(lab.store, name, str(model), "fs", **kw)


def cells_of_trials(trials) -> list[tuple]:
    return sorted((t.user_attrs["ul_run_id"], t.user_attrs["ul_step"]) for t in trials)


def on_grid(m, steps) -> bool:
    """Whether a CellRow is a cell of the grid: every row but a run's at-target cell between milestones."""
    return not (m.metrics or {}).get("at_target") or m.step in steps


def check_every_cell(store, url: str, name: str, steps: list[int]) -> tuple[list, list, list]:
    """Every run finished, every (run, step) cell present exactly once in ul_milestone and in Optuna,
    with params exactly {method, lr, steps} matching its run. A run's at-target cell between
    milestones is a row of its own (at most one per run) with no trial; the cells returned leave it out."""
    runs = runs_of(store, name)
    every = milestones_of(store, name)
    ms = [m for m in every if on_grid(m, steps)]
    between = [m for m in every if not on_grid(m, steps)]
    assert all(m.trial_number is None for m in between), "an at-target cell between milestones got a trial"
    assert len({m.run_id for m in between}) == len(between), "a run has two at-target cells"
    trials = optuna_trials(url, name)
    assert [r.state for r in runs if r.state not in FINISHED] == [], [(r.id, r.state, r.last_error) for r in runs]
    expected = sorted((r.id, s) for r in runs for s in steps)
    assert sorted((m.run_id, m.step) for m in ms) == expected
    # A TPE trial asked for an attempt that failed for good is FAIL without a cell; every other is a cell.
    asked = {r.asked_trial for r in runs if r.asked_trial is not None}
    cell_trials = [t for t in trials if "ul_run_id" in t.user_attrs]
    assert all(t.number in asked and t.state == optuna.trial.TrialState.FAIL for t in trials if t not in cell_trials)
    assert cells_of_trials(cell_trials) == expected, "a cell is missing from Optuna or written twice"
    by_run = {r.id: r for r in runs}
    for t in cell_trials:
        run = by_run[t.user_attrs["ul_run_id"]]
        assert set(t.params) == {"method", "lr", "steps"}
        assert (t.params["method"], t.params["lr"], t.params["steps"]) == (run.method, run.lr, t.user_attrs["ul_step"])
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    assert {m.trial_number for m in ms} == {t.number for t in cell_trials}
    return runs, ms, trials


def no_locked_errors(*paths: Path) -> None:
    for p in paths:
        files = sorted(p.rglob("*.log")) if p.is_dir() else [p]
        for f in files:
            text = f.read_text(errors="replace")
            assert "database is locked" not in text, f"{f}:\n{text[-3000:]}"


def report(**facts) -> None:
    """What a fault test saw (shown with pytest -s; kept short)."""
    print("\n  " + "  ".join(f"{k}={v}" for k, v in facts.items()), flush=True)


# ------------------------------------------------------------------ the CLI

def test_forgetset_create_ls_show_json(tmp_path, forget_set_files):
    home = tmp_path / "home"
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    r = cli("forgetset", "create", "records", *fs_args(forget_set_files, general=True), "--seq-len", SEQ_LEN,
            "--storage", url, "--json", home=home)
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["name"] == "records" and len(created["hash"]) == 64
    # no --retain-eval: a seeded 20 % of the 32 retain documents is held out as retain_eval, and the set says how
    assert created["documents"] == {"forget": 16, "retain": 26, "retain_eval": 6, "unseen": 16, "general": 12}
    assert created["meta"]["retain_eval"] == {"held_out_share": 0.2, "seed": 0}
    assert created["seq_len"] == SEQ_LEN
    assert created["sources"]["forget"] == [forget_set_files["forget"]] and created["sources"]["retain_eval"] == []

    with ThreadPoolExecutor(2) as pool:
        ls, show = pool.map(lambda args: cli(*args, "--storage", url, "--json", home=home),
                            [("forgetset", "ls"), ("forgetset", "show", "records")])
    assert ls.returncode == 0 and show.returncode == 0, ls.stderr + show.stderr
    assert [x["name"] for x in json.loads(ls.stdout)] == ["records"]
    assert json.loads(show.stdout) == created == json.loads(ls.stdout)[0]


def test_bad_input_is_one_line_and_exit_2(lab, tiny_model_dir, forget_set_files, tmp_path, capsys):
    """Every kind of bad input: exit 2, one line on stderr naming the problem, no traceback,
    and nothing written. (In this process: test_cli.py runs the same contract as whole processes.)"""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    study(lab, "taken", tiny_model_dir)
    f, u, m = forget_set_files, lab.url, str(tiny_model_dir)
    create = ["study", "create", "new", "--model", m, "--forget-set", "fs", "--storage", u]
    cases = [
        (["forgetset", "create", "x", *fs_args(f), "--storage", u, "--forget", str(tmp_path / "missing.jsonl")],
         ["no such file", "missing.jsonl"]),
        (["forgetset", "create", "x", "--forget", str(empty), "--retain", f["retain"], "--unseen", f["unseen"],
          "--storage", u], ["forget", "no documents"]),
        (["forgetset", "create", "fs", *fs_args(f), "--storage", u], ["already exists"]),
        ([*create, "--methods", "ga,nope", "--lr", "1e-3", "--steps", "2"], ["unknown method", "nope"]),
        ([*create, "--methods", "ga", "--lr", "-1", "--steps", "2"], ["--lr"]),
        ([*create, "--methods", "ga", "--lr", "1e-3", "--steps", "0"], ["--steps"]),
        (["study", "create", "taken", "--model", m, "--forget-set", "fs", "--methods", "ga", "--lr", "1e-3",
          "--steps", "2", "--storage", u], ["already exists"]),
        (["study", "run", "nope", "--workers", "0", "--storage", u], ["--workers"]),
        ([*create, "--methods", "ga", "--lr", "1e-3", "--steps", "2", "--retain-weight", "2"], ["none of the methods has a retain term"]),
        ([*create, "--methods", "ga_gd", "--lr", "1e-3", "--steps", "2", "--min-k", "1.5"], ["--min-k"]),
        (["study", "resume", "nope", "--storage", u], ["no study named 'nope'"]),
        (["study", "status", "taken", "--storage", f"sqlite:///{tmp_path / 'elsewhere.db'}"], ["no store at"]),
    ]
    results = [cli_in_process(capsys, *args) for args, _ in cases]
    for (args, needles), r in zip(cases, results):
        try:
            assert_one_line_error(r, *needles)
        except AssertionError as e:
            raise AssertionError(f"unlearn {' '.join(args)}: {e}") from None
    assert [x.name for x in (lab.store.forget_set("fs"),)] == ["fs"]
    assert optuna.get_all_study_names(lab.url) == ["taken"]
    assert study_state(lab.store, "taken") == "created"
    assert {r.state for r in runs_of(lab.store, "taken")} == {"pending"}


def test_cancel_pause_resume(lab, tiny_model_dir):
    study(lab, "c", tiny_model_dir, methods=["ga", "ga_gd"], lrs=[1e-4, 1e-3])
    set_state(lab.store, "c", "paused")
    assert study_state(lab.store, "c") == "paused"
    assert {r.state for r in runs_of(lab.store, "c")} == {"pending"}  # pausing drops nothing
    r = cli("study", "cancel", "c", "--storage", lab.url, home=lab.home)
    assert r.returncode == 0, r.stderr
    assert study_state(lab.store, "c") == "cancelled"
    assert [r.state for r in runs_of(lab.store, "c")] == ["cancelled"] * 4
    assert_one_line_error(cli("study", "run", "c", "--workers", "1", "--storage", lab.url, home=lab.home), "cancelled")
    from engine.errors import UnlearnError

    with pytest.raises(UnlearnError, match="cancelled"):  # `unlearn study resume`: refused too
        resume_study(lab.store, "c")
    with pytest.raises(UnlearnError, match="cancelled"):  # and `pause`
        set_state(lab.store, "c", "paused")
    assert study_state(lab.store, "c") == "cancelled"
    assert [r.state for r in runs_of(lab.store, "c")] == ["cancelled"] * 4
    assert optuna_trials(lab.url, "c") == []


def test_running_a_cancelled_study_does_not_revive_its_failed_runs(lab, tiny_model_dir):
    """`study run` gives failed runs a fresh budget, but not in a cancelled study: refused whole."""
    from engine.errors import UnlearnError

    study(lab, "c", tiny_model_dir, lrs=[1e-4, 1e-3])
    with lab.store.write() as s:
        run = s.exec(select(Run).where(Run.lr == 1e-4)).one()
        run.state, run.attempts, run.last_error = "failed", 2, "attempt 2: RuntimeError: boom"
        s.add(run)
    set_state(lab.store, "c", "cancelled")
    with pytest.raises(UnlearnError, match="cancelled"):
        resume_study(lab.store, "c", retry_failed=True)
    assert sorted((r.state, r.attempts) for r in runs_of(lab.store, "c")) == [("cancelled", 0), ("failed", 2)]


def test_optuna_dashboard_serves_the_store(lab, tiny_model_dir):
    study(lab, "dash", tiny_model_dir)
    exe = Path(sys.executable).parent / "optuna-dashboard"
    assert exe.exists(), exe
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(exe), lab.url, "--port", str(port), "--host", "127.0.0.1"], cwd=lab.dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def studies():
            if proc.poll() is not None:
                raise AssertionError(f"optuna-dashboard exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as resp:
                    return json.loads(resp.read()) if resp.status == 200 else None
            except OSError:
                return None

        body = wait_for(studies, 60, "optuna-dashboard to answer /api/studies", interval=0.5)
        assert [s["study_name"] for s in body["study_summaries"]] == ["dash"]
    finally:
        stop(proc)


# ------------------------------------------------------------------ recording cells, finding dead processes



def cell(step: int, score: float | None, at_target: bool = False) -> dict:
    """A cell as the engine hands it to on_milestone (numbers are test data, not computed); `score`
    is the objective, eval_score (the old score, on the trained-on retain set, is a little lower)."""
    return {"step": step, "ppl_forget": None if score is None else 10.0 + score, "ppl_retain": 5.0,
            "ppl_retain_eval": 5.5, "mia_auc": {"loss": 0.5, "zlib": 0.5, "min_k": 0.5, "min_k_pp": 0.5},
            "forget_gap": score, "retain_eval_drift": 0.0, "eval_score": score, "retain_drift": 0.0,
            "score": None if score is None else score - 0.01, "success": False, "at_target": at_target,
            "diverged": score is None, "train_loss": -1.0}


def test_record_cell_is_idempotent(lab):
    """A retried run passes its milestones again: the first written cell and its one trial stay,
    also when the first attempt died between the milestone row and its trial."""
    from studies.lifecycle.study import study_spec
    from studies.running.recorder import record_cell
    from studies.store.db import CellRow

    create_study(lab.store, "g", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3], steps=[2, 4])
    spec, (run,) = study_spec(lab.store.study("g")), runs_of(lab.store, "g")
    first = record_cell(lab.store, "g", spec, run, cell(2, 0.3))
    assert record_cell(lab.store, "g", spec, run, cell(2, 0.9)) == first
    with lab.store.write() as s:  # as if killed after the trial, before the row learnt its number
        ms = s.exec(select(CellRow)).one()
        ms.trial_number = None
        s.add(ms)
    assert record_cell(lab.store, "g", spec, run, cell(2, 0.7)) == first
    diverged = record_cell(lab.store, "g", spec, run, cell(4, None))
    trials = optuna_trials(lab.url, "g")
    assert [(t.number, t.state.name, t.value, t.params["steps"]) for t in trials] == [
        (first, "COMPLETE", 0.3, 2), (diverged, "FAIL", None, 4)]
    assert [(m.step, m.score, m.trial_number) for m in milestones_of(lab.store, "g")] == [(2, 0.3, first), (4, None, diverged)]


def test_record_cell_writes_an_at_target_cell_between_milestones_without_a_trial(lab):
    """A run's at-target cell at a step that is no milestone: its row, no Optuna trial (the trial's
    `steps` is the study's grid of milestones), also when a retried run passes it again; at a
    milestone it is that milestone's cell and trial."""
    from studies.lifecycle.study import study_spec
    from studies.reading.grid import load_at_target, load_cells
    from studies.running.recorder import record_cell

    create_study(lab.store, "a", HUB_MODEL, "fs", methods=["ga"], lrs=[1e-3, 3e-3], steps=[2, 4])
    spec, (slow, fast) = study_spec(lab.store.study("a")), runs_of(lab.store, "a")
    first = record_cell(lab.store, "a", spec, slow, cell(2, 0.5))
    assert record_cell(lab.store, "a", spec, slow, cell(3, 0.2, at_target=True)) is None
    assert record_cell(lab.store, "a", spec, slow, cell(3, 0.9, at_target=True)) is None  # retried: kept as written
    last = record_cell(lab.store, "a", spec, slow, cell(4, 0.4))
    at_milestone = record_cell(lab.store, "a", spec, fast, cell(2, 0.3, at_target=True))
    trials = optuna_trials(lab.url, "a")
    assert [(t.number, t.value, t.params["steps"]) for t in trials] == [(first, 0.5, 2), (last, 0.4, 4),
                                                                       (at_milestone, 0.3, 2)]
    assert [(m.run_id, m.step, m.score, m.trial_number) for m in milestones_of(lab.store, "a")] == [
        (slow.id, 2, 0.5, first), (slow.id, 3, 0.2, None), (slow.id, 4, 0.4, last), (fast.id, 2, 0.3, at_milestone)]
    assert sorted((c.lr, c.steps) for c in load_cells(lab.store, "a")) == [(1e-3, 2), (1e-3, 4), (3e-3, 2), (3e-3, 4)]
    assert sorted((c.lr, c.steps, c.value("eval_score")) for c in load_at_target(lab.store, "a")) == [
        (1e-3, 3, 0.2), (3e-3, 2, 0.3)]


def test_record_cell_tells_the_trial_tpe_asked_for(lab):
    """TPE: the cell at the asked steps tells the sampler's own trial, also when an attempt died
    between setting its user attrs and telling it; the other cells are trials of their own."""
    from studies.lifecycle.study import study_spec
    from studies.running.pool import WorkerPool
    from studies.running.recorder import record_cell

    create_study(lab.store, "t", HUB_MODEL, "fs", methods=["ga", "ga_gd"], lr_range=(1e-4, 1e-3), sampler="tpe",
                 trials=1, steps=[2, 4])
    resume_study(lab.store, "t")
    pool = WorkerPool(lab.store, ["cpu"], ["t"])
    run = pool._claim(pool._studies())  # the sampler picks (method, lr, steps); no process started
    assert run.asked_trial is not None and run.asked_steps in (2, 4) and run.state == "running"
    storage = lab.store.optuna
    tid = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("t"), run.asked_trial)
    storage.set_trial_user_attr(tid, "ul_run_id", run.id)  # the dead attempt got this far
    storage.set_trial_user_attr(tid, "ul_step", run.asked_steps)
    other = 6 - run.asked_steps
    assert record_cell(lab.store, "t", study_spec(lab.store.study("t")), run, cell(run.asked_steps, 0.4)) == run.asked_trial
    n = record_cell(lab.store, "t", study_spec(lab.store.study("t")), run, cell(other, 0.5))
    trials = {t.number: t for t in optuna_trials(lab.url, "t")}
    assert sorted(trials) == sorted([run.asked_trial, n])
    asked = trials[run.asked_trial]
    assert (asked.state.name, asked.value, asked.params) == ("COMPLETE", 0.4, {"method": run.method, "lr": run.lr,
                                                                               "steps": run.asked_steps})
    assert (trials[n].state.name, trials[n].value, trials[n].params["steps"]) == ("COMPLETE", 0.5, other)


def test_a_zombie_process_counts_as_gone():
    """A run process that died but was never reaped (its parent gone, PID 1 not waiting) is not alive."""
    from studies.running.processes import pid_alive as _pid_alive

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_for(lambda: not pid_alive(proc.pid), 30, "the child to exit")  # exited, not yet waited for
        assert Path(f"/proc/{proc.pid}").exists()  # a zombie: still in the process table
        assert not _pid_alive(proc.pid)
        assert _pid_alive(os.getpid())
    finally:
        proc.wait()
    assert not _pid_alive(proc.pid)


# ------------------------------------------------------------------ the outside check

@pytest.mark.slow
def test_outside_check(tmp_path, tiny_model_dir, forget_set_files):
    """What a user sees from outside: CLI in, stock Optuna and `study status` out."""
    home = tmp_path / "home"
    U = f"sqlite:///{tmp_path / 'outside.db'}"
    r = cli("forgetset", "create", "FS", *fs_args(forget_set_files), "--seq-len", SEQ_LEN, "--storage", U, home=home)
    assert r.returncode == 0, r.stderr
    r = cli("study", "create", "S", "--model", tiny_model_dir, "--forget-set", "FS", "--methods", "ga,ga_gd",
            "--lr", "1e-4,3e-4,1e-3", "--steps", "2,4,8", "--storage", U, home=home)
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    r = cli("study", "run", "S", "--workers", "2", "--storage", U, home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    report(run_s=f"{time.monotonic() - t0:.0f}", out=r.stdout.strip())

    trials = optuna.load_study(study_name="S", storage=U).get_trials()
    assert len(trials) == 18
    assert {(t.params["method"], t.params["lr"], t.params["steps"]) for t in trials} == {
        (m, lr, s) for m in ("ga", "ga_gd") for lr in (1e-4, 3e-4, 1e-3) for s in (2, 4, 8)}
    for t in trials:
        assert set(t.params) == {"method", "lr", "steps"}
        assert "ul_run_id" in t.user_attrs and "ul_step" in t.user_attrs
        assert t.user_attrs["ul_step"] == t.params["steps"]
    assert len({(t.user_attrs["ul_run_id"], t.user_attrs["ul_step"]) for t in trials}) == 18

    r = cli("study", "status", "S", "--json", "--storage", U, home=home)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["runs"]["total"] == 6
    assert status["state"] == "done"


# ------------------------------------------------------------------ faults

def _scheduler_pid(stdout: str) -> int:
    m = re.search(r"scheduler pid (\d+)", stdout)
    assert m, stdout
    return int(m.group(1))


def _snapshot(store, name: str) -> dict:
    return {(m.run_id, m.step): (m.id, m.created_at, m.trial_number, json.dumps(m.metrics, sort_keys=True))
            for m in milestones_of(store, name)}


def assert_kept(before: dict, after: dict) -> None:
    """Cells written before a fault are kept as they were (same row, time, metrics, trial); a cell
    whose process died before its Optuna trial was written gets its trial number later."""
    for key, (mid, created, trial, metrics) in before.items():
        now = after[key]
        assert (now[0], now[1], now[3]) == (mid, created, metrics), key
        assert trial is None or now[2] == trial, key


@pytest.mark.slow
def test_a_killed_run_is_retried_and_no_cell_is_written_twice(lab, tiny_model_dir):
    steps = [2, 4, 8, 100]
    study(lab, "S2", tiny_model_dir, methods=["ga_gd"], lrs=[1e-3, 3e-3], steps=steps)
    r = cli("study", "run", "S2", "--detach", "--workers", "2", "--storage", lab.url, home=lab.home)
    assert r.returncode == 0, r.stderr
    scheduler = _scheduler_pid(r.stdout)
    try:
        def victim():  # a run that is running and has written a milestone already
            written = {m.run_id for m in milestones_of(lab.store, "S2") if on_grid(m, steps)}
            return next((x for x in runs_of(lab.store, "S2")
                         if x.state == "running" and x.pid and x.id in written and pid_alive(x.pid)), None)

        run = wait_for(victim, 180, "a running run with a milestone", interval=0.05)
        before = _snapshot(lab.store, "S2")
        assert kill(run.pid)
        killed_at, killed_wall = time.monotonic(), dt.datetime.now(dt.timezone.utc)
        wait_for(lambda: study_state(lab.store, "S2") == "done", 240, "study S2 to finish", interval=0.5)
        wait_for(lambda: not pid_alive(scheduler), 30, "the scheduler to exit")
    finally:
        kill(scheduler)
    runs, ms, trials = check_every_cell(lab.store, lab.url, "S2", steps)
    assert len(trials) == len(runs) * len(steps) == 8
    by_id = {x.id: x for x in runs}
    again = by_id[run.id]
    assert again.attempts == 2 and "SIGKILL" in again.last_error, again.last_error
    assert again.last_error.startswith("attempt 1:")
    assert [x.attempts for x in runs if x.id != run.id] == [1]
    assert_kept(before, _snapshot(lab.store, "S2"))  # cells of the killed attempt stay as written
    retries = events_of(lab.store, "S2", "retry")
    assert len(retries) == 1 and "SIGKILL" in retries[0].message
    started = [e for e in events_of(lab.store, "S2", "started") if e.run_id == run.id]
    assert len(started) == 2
    logs = lab.dir / "lab-logs" / "S2"
    assert (logs / f"run{run.id}-ga_gd-attempt1.log").exists() and (logs / f"run{run.id}-ga_gd-attempt2.log").exists()
    no_locked_errors(lab.dir / "lab-logs")
    report(killed_run=run.id, at_step=max(s for (rid, s) in before if rid == run.id), attempts=again.attempts,
           last_error=repr(again.last_error), retried_after_s=f"{_age(killed_wall, retries[0].at):.1f}",
           done_after_kill_s=f"{time.monotonic() - killed_at:.0f}")


def _age(a: dt.datetime, b: dt.datetime) -> float:
    a, b = (x if x.tzinfo else x.replace(tzinfo=dt.timezone.utc) for x in (a, b))  # SQLite gives naive UTC back
    return abs((b - a).total_seconds())


@pytest.mark.slow
def test_a_killed_scheduler_resumes_where_the_store_says(lab, tiny_model_dir):
    steps = [2, 4, 8, 100]
    study(lab, "S3", tiny_model_dir, methods=["ga"], lrs=[1e-4, 1e-3], steps=steps)
    env = cli_env(lab.home, UNLEARN_HEARTBEAT_TIMEOUT="5")
    r = cli("study", "run", "S3", "--detach", "--workers", "1", "--storage", lab.url, home=lab.home, env=env)
    assert r.returncode == 0, r.stderr
    scheduler = _scheduler_pid(r.stdout)
    orphans: list[int] = []
    try:
        def moment():  # ≥ 1 run done, and the next one running with a milestone written (on the
            rows = runs_of(lab.store, "S3")  # last run, whatever it has written)
            written = {m.run_id for m in milestones_of(lab.store, "S3") if on_grid(m, steps)}
            done = sum(x.state in FINISHED for x in rows)
            return done and any(x.state == "running" and (x.id in written or done == len(rows) - 1) for x in rows)

        t0 = time.monotonic()
        wait_for(moment, 240, "one run done and another part-way", interval=0.05)
        waited = time.monotonic() - t0
        orphans = children_of(scheduler)
        assert kill(scheduler)
        wait_for(lambda: not pid_alive(scheduler), 10, "the scheduler to die")
        rows = runs_of(lab.store, "S3")
        orphans += [x.pid for x in rows if x.state == "running" and x.pid]
        for pid in set(orphans):
            kill(pid)
        killed_at = time.monotonic()
    finally:
        kill(scheduler)
        for pid in set(orphans):
            kill(pid)
    before = _snapshot(lab.store, "S3")
    rows = runs_of(lab.store, "S3")
    finished = {x.id: x for x in rows if x.state in FINISHED}
    interrupted = [x for x in rows if x.state == "running"]
    assert finished and interrupted

    r = cli("study", "run", "S3", "--workers", "2", "--storage", lab.url, home=lab.home, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    runs, ms, trials = check_every_cell(lab.store, lab.url, "S3", steps)
    assert len(trials) == 8
    assert study_state(lab.store, "S3") == "done"
    assert_kept(before, _snapshot(lab.store, "S3"))  # finished cells kept, not recomputed
    by_id = {x.id: x for x in runs}
    started = events_of(lab.store, "S3", "started")
    for rid, old in finished.items():
        now = by_id[rid]
        assert now.attempts == 1 and now.last_error is None
        assert (now.started_at, now.finished_at) == (old.started_at, old.finished_at)
        assert sum(e.run_id == rid for e in started) == 1
    for x in interrupted:
        now = by_id[x.id]
        assert now.attempts == 2, now
        assert re.search(r"^attempt 1: (process \d+ is gone|heartbeat lost)", now.last_error), now.last_error
    no_locked_errors(lab.dir / "lab-logs")
    report(killed_after_s=f"{waited:.0f}", finished_before=sorted(finished), interrupted=[(x.id, x.step) for x in interrupted],
           reasons=[by_id[x.id].last_error for x in interrupted], resumed_in_s=f"{time.monotonic() - killed_at:.0f}",
           kept_cells=len(before))


@pytest.mark.slow
def test_a_second_scheduler_is_refused_and_sigterm_gives_the_runs_back(lab, tiny_model_dir, capsys):
    """While a detached scheduler runs a study, another `study run` of it is one line and exit 2.
    SIGTERM to that scheduler (a preemption, a shutdown) gives its running runs back within 30 s with
    no attempt spent; `study run` then finishes the study with every cell once."""
    # a run that is still under way when the SIGTERM comes: 200 steps at an lr that does not diverge
    # (at 1e-3 GA diverged and ended the run early, before the signal, once runs got one thread each)
    steps = [2, 4, 200]
    study(lab, "T", tiny_model_dir, methods=["ga"], lrs=[1e-5], steps=steps)
    r = cli("study", "run", "T", "--detach", "--workers", "1", "--storage", lab.url, home=lab.home)
    assert r.returncode == 0, r.stderr
    scheduler = _scheduler_pid(r.stdout)
    try:
        wait_for(lambda: [x for x in runs_of(lab.store, "T") if x.state == "running" and x.step >= 1]
                 and lab.store.study("T").scheduler_heartbeat, 120, "a run under way and a scheduler beat", interval=0.1)
        for again in (["--detach"], []):  # refused before anything runs: in this process, in a moment
            second = cli_in_process(capsys, "study", "run", "T", *again, "--workers", "1", "--storage", lab.url)
            assert_one_line_error(second, f"already run by scheduler pid {scheduler}")
        running = [x.id for x in runs_of(lab.store, "T") if x.state == "running"]
        pids = [x.pid for x in runs_of(lab.store, "T") if x.state == "running" and x.pid]
        t0 = time.monotonic()
        os.kill(scheduler, signal.SIGTERM)
        wait_for(lambda: not pid_alive(scheduler), 30, "the scheduler to stop after SIGTERM", interval=0.1)
        stopped_s = time.monotonic() - t0
        assert not any(pid_alive(p) for p in pids)
    finally:
        kill(scheduler)
    back = {x.id: x for x in runs_of(lab.store, "T")}
    assert running and all(back[i].state == "pending" and back[i].attempts == 0 for i in running), back
    r = cli("study", "run", "T", "--workers", "1", "--storage", lab.url, home=lab.home)
    assert r.returncode == 0, r.stdout + r.stderr
    runs, _, _ = check_every_cell(lab.store, lab.url, "T", steps)
    assert all(x.attempts == 1 for x in runs)
    report(stopped_after_sigterm_s=f"{stopped_s:.1f}", given_back=len(running))


@pytest.mark.slow
def test_an_exception_in_every_attempt_fails_the_runs_with_its_message(lab, tiny_model_dir):
    model = lab.dir / "model-copy"
    shutil.copytree(tiny_model_dir, model)
    study(lab, "broken", model, lrs=[1e-3, 3e-3], steps=[2])
    (model / "config.json").write_text("{ this is not json")
    r = cli("study", "run", "broken", "--workers", "2", "--storage", lab.url, home=lab.home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 failed" in r.stdout and "2 retried" in r.stdout, r.stdout
    assert study_state(lab.store, "broken") == "done"
    runs = runs_of(lab.store, "broken")
    for x in runs:
        assert x.state == "failed" and x.attempts == 2
        assert re.match(r"attempt 2: UnlearnError: cannot load (tokenizer|model) ", x.last_error), x.last_error
        assert str(model) in x.last_error
    assert milestones_of(lab.store, "broken") == [] and optuna_trials(lab.url, "broken") == []
    assert len(events_of(lab.store, "broken", "retry")) == 2 and len(events_of(lab.store, "broken", "failed")) == 2
    log = lab.dir / "lab-logs" / "broken" / f"run{runs[0].id}-ga-attempt2.log"
    assert "Traceback" in log.read_text()  # the full story is in the run's log
    report(last_error=repr(runs[0].last_error), out=r.stdout.strip())


@pytest.mark.slow
def test_one_failing_run_does_not_stop_the_pool(lab, tiny_model_dir):
    """Two methods: the first run finishes; then the model folder is damaged (the study is paused
    meanwhile so no run can load it half-way) and the second run fails (max_attempts=1); the
    pool records it and ends, the study done with one run failed."""
    model = lab.dir / "model-copy"
    shutil.copytree(tiny_model_dir, model)
    study(lab, "mixed", model, methods=["ga", "ga_gd"], lrs=[1e-3], steps=[2, 4], max_attempts=1)
    proc = spawn("study", "run", "mixed", "--workers", "1", "--storage", lab.url, home=lab.home, log=lab.dir / "run.log")
    try:
        first = wait_for(lambda: next((x for x in runs_of(lab.store, "mixed") if x.state == "running" and x.pid), None),
                         120, "the first run to start", interval=0.05)
        set_state(lab.store, "mixed", "paused")
        assert first.method == "ga"
        wait_for(lambda: runs_of(lab.store, "mixed")[0].state in FINISHED, 180, "the first run to finish")
        time.sleep(1.0)  # a paused study hands out nothing
        assert runs_of(lab.store, "mixed")[1].state == "pending"
        (model / "config.json").write_text("{ this is not json")
        resume_study(lab.store, "mixed")
        assert proc.wait(timeout=240) == 0, (lab.dir / "run.log").read_text()
    finally:
        stop(proc)
    out = (lab.dir / "run.log").read_text()
    assert "study mixed: done" in out and "1 failed" in out, out
    ok, bad = runs_of(lab.store, "mixed")
    assert (ok.method, ok.state, ok.attempts) == ("ga", "done", 1)
    assert (bad.method, bad.state, bad.attempts) == ("ga_gd", "failed", 1)
    assert re.match(r"attempt 1: UnlearnError: cannot load (tokenizer|model) ", bad.last_error), bad.last_error
    trials = optuna_trials(lab.url, "mixed")
    assert cells_of_trials(trials) == [(ok.id, 2), (ok.id, 4)]
    assert study_state(lab.store, "mixed") == "done"
    report(failed=repr(bad.last_error))


# ------------------------------------------------------------------ many workers, one store

def _two_workers(url: str, store: Store, home: Path, logs: Path, run_logs: Path, model, files, tag: str):
    fs_name, name = f"fs-{tag}", f"S4-{tag}"
    make_forget_set(store, fs_name, files)
    create_study(store, name, str(model), fs_name, methods=["ga", "ga_gd"], lrs=[1e-3, 3e-3], steps=[2, 4])
    resume_study(store, name)  # what `unlearn study resume` does to a created study
    procs = [spawn("worker", "--storage", url, "--study", name, "--workers", "1", home=home, log=logs / f"worker{i}.log")
             for i in (1, 2)]
    try:
        codes = [p.wait(timeout=480) for p in procs]
    finally:
        for p in procs:
            stop(p)
    outs = [(logs / f"worker{i}.log").read_text() for i in (1, 2)]
    assert codes == [0, 0], outs
    spawned = []
    for out in outs:
        m = re.search(r"worker done: (\d+) run processes, (\d+) retried, (\d+) failed", out)
        assert m, out
        spawned.append(int(m.group(1)))
        assert m.group(2) == m.group(3) == "0", out
    assert sum(spawned) == 4 and min(spawned) >= 1, spawned  # each run once; each worker took some
    runs, ms, trials = check_every_cell(store, url, name, [2, 4])
    assert len(trials) == 8 and len(ms) == 8
    assert [x.attempts for x in runs] == [1, 1, 1, 1]
    started = events_of(store, name, "started")
    assert sorted(e.run_id for e in started) == sorted(x.id for x in runs)
    assert study_state(store, name) == "done"
    assert len(list((run_logs / name).glob("run*.log"))) == 4
    no_locked_errors(logs, run_logs / name)
    report(store=url.split(":", 1)[0], runs_per_worker=spawned)


@pytest.mark.slow
def test_two_workers_share_one_sqlite_store(lab, tiny_model_dir, forget_set_files):
    _two_workers(lab.url, lab.store, lab.home, lab.dir, lab.dir / "lab-logs", tiny_model_dir, forget_set_files, "sqlite")


@pytest.mark.slow
@pytest.mark.xdist_group("postgresql")  # under pytest-xdist: one test at a time makes the server's tables
def test_two_workers_share_one_postgresql_store(tmp_path, tiny_model_dir, forget_set_files):
    url = os.environ.get("UNLEARN_TEST_PG_URL")
    if not url:
        pytest.skip("UNLEARN_TEST_PG_URL is not set (.ci/postgres sets it where PostgreSQL can run)")
    home = tmp_path / "home"
    home.mkdir()
    store = Store(url)
    _two_workers(url, store, home, tmp_path, home / "logs", tiny_model_dir, forget_set_files, uuid.uuid4().hex[:12])


# ------------------------------------------------------------------ TPE

@pytest.mark.slow
def test_tpe_study(lab, tiny_model_dir):
    r = cli("study", "create", "T", "--model", tiny_model_dir, "--forget-set", "fs", "--lr-range", "1e-4:1e-3",
            "--sampler", "tpe", "--trials", "3", "--methods", "ga,ga_gd", "--steps", "2,4", "--storage", lab.url,
            home=lab.home)
    assert r.returncode == 0, r.stderr
    assert runs_of(lab.store, "T") == []  # TPE asks for its runs as it goes
    r = cli("study", "run", "T", "--workers", "2", "--storage", lab.url, home=lab.home)
    assert r.returncode == 0, r.stdout + r.stderr
    runs, ms, trials = check_every_cell(lab.store, lab.url, "T", [2, 4])
    assert len(runs) == 3 and len(trials) == 6
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    for x in runs:
        assert x.method in ("ga", "ga_gd") and 1e-4 <= x.lr <= 1e-3
        asked = next(t for t in trials if t.number == x.asked_trial)  # the sampler's own trial was told
        assert asked.state == optuna.trial.TrialState.COMPLETE
        assert asked.params == {"method": x.method, "lr": x.lr, "steps": x.asked_steps}
        assert asked.user_attrs["ul_run_id"] == x.id
    assert study_state(lab.store, "T") == "done"


@pytest.mark.slow
def test_a_failed_tpe_run_leaves_no_running_trial(lab, tiny_model_dir):
    """The trial the sampler asked for a run that then fails is told FAIL, not left RUNNING."""
    model = lab.dir / "model-copy"
    shutil.copytree(tiny_model_dir, model)
    study(lab, "tf", model, methods=["ga"], lrs=None, lr_range=(1e-4, 1e-3), sampler="tpe", trials=1, max_attempts=1)
    (model / "config.json").write_text("{ this is not json")
    r = cli("study", "run", "tf", "--workers", "1", "--storage", lab.url, home=lab.home)
    assert r.returncode == 0, r.stdout + r.stderr
    (run,) = runs_of(lab.store, "tf")
    assert run.state == "failed" and run.asked_trial is not None
    trials = optuna_trials(lab.url, "tf")
    assert [(t.number, t.state) for t in trials] == [(run.asked_trial, optuna.trial.TrialState.FAIL)]
    assert study_state(lab.store, "tf") == "done"

    # Repaired, run again: the failed run gets a fresh budget; its cells become new trials.
    shutil.copy(Path(tiny_model_dir) / "config.json", model / "config.json")
    r = cli("study", "run", "tf", "--workers", "1", "--storage", lab.url, home=lab.home)
    assert r.returncode == 0, r.stdout + r.stderr
    runs, ms, trials = check_every_cell(lab.store, lab.url, "tf", [2, 4])
    assert [(x.state, x.attempts) for x in runs] == [("done", 1)]
    states = {t.number: t.state for t in optuna_trials(lab.url, "tf")}
    assert states.pop(run.asked_trial) == optuna.trial.TrialState.FAIL
    assert sorted(states) == sorted(m.trial_number for m in ms)
    assert set(states.values()) == {optuna.trial.TrialState.COMPLETE}
