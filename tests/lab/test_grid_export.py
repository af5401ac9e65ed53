"""studies.reading.grid, studies.reading.status, studies.reading.export and the heatmap, on a real SQLite store.

The runs and milestones of the fast tests are test data written by hand into a real store (the
scheduler is not needed to read a study); the slow test computes its cells with the engine and
reruns the exported `unlearn run ...` command in a subprocess to check it reproduces the score.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from engine.config import RunSettings
from engine.errors import UnlearnError
from engine.metric_registry import SCORE
from studies.lifecycle.spec import StudySpec
from studies.reading.export import export_best, reproduce_command, save_model, to_json, to_yaml
from studies.reading.grid import Cell, best, load_cells, pareto, robustness
from studies.reading.listing import list_studies_sqlite
from studies.reading.status import list_studies, study_status
from studies.store.db import CellRow, Run, Store, Study, utcnow
from studies.store.forgetsets import create_forget_set, forget_set_texts
from tui.heatmap import fmt_lr, render_heatmaps

ROOT = Path(__file__).resolve().parents[2]
LN_TOL_F, LN_TOL_R = math.log(1.10), math.log(1.05)
TPE_LR = (1 / 3) * 1e-4  # 3.3333333333333335e-05: must survive the command exactly


def metrics(step: int, gap: float | None, drift: float | None, diverged: bool = False,
            at_target: bool = False) -> dict:
    """An engine cell dict (the numbers around gap/drift are plausible, not computed). `drift` is the
    utility the objective counts, on retain_eval; the old figures on the trained-on retain documents
    (retain_drift, score) are given a drift of their own, half of it, so the two never coincide."""
    if diverged or gap is None:
        return {"step": step, "ppl_forget": None, "ppl_retain": None, "ppl_retain_eval": None, "ppl_unseen": None,
                "ppl_general": None, "mia_auc": {"loss": None, "zlib": None, "min_k": None, "min_k_pp": None},
                "mia_auc_lo": None, "mia_auc_hi": None, "forget_gap": None, "retain_eval_drift": None,
                "eval_score": None, "retain_drift": None, "score": None,
                "verdict": {"forget": False, "mia": False, "utility": False}, "success": False, "diverged": True,
                "train_loss": None}
    trained = drift / 2
    auc = 0.5 + gap / 2
    verdict = {"forget": gap <= LN_TOL_F, "mia": auc - 0.1 <= 0.5 <= auc + 0.1, "utility": drift <= LN_TOL_R}
    return {"step": step, "ppl_forget": 20.0 * math.exp(gap), "ppl_retain": 5.0 * math.exp(trained),
            "ppl_retain_eval": 6.0 * math.exp(drift), "ppl_unseen": 20.0, "ppl_general": 40.0,
            "mia_auc": {"loss": auc, "zlib": 0.55, "min_k": 0.5 + gap / 3, "min_k_pp": 0.6},
            "mia_auc_lo": auc - 0.1, "mia_auc_hi": auc + 0.1,
            "forget_gap": gap, "retain_eval_drift": drift, "eval_score": gap + max(0.0, drift),
            "retain_drift": trained, "score": gap + max(0.0, trained),
            "verdict": verdict, "success": all(verdict.values()), "at_target": at_target, "diverged": False,
            "train_loss": -1.0}


def milestone(run: Run, step: int, gap=None, drift=None, diverged=False, trial=None, at_target=False) -> CellRow:
    m = metrics(step, gap, drift, diverged, at_target)
    return CellRow(run_id=run.id, step=step, metrics=m, score=m[SCORE], success=m["success"],
                     diverged=m["diverged"], trial_number=trial)


# ------------------------------------------------------------------ the store

@pytest.fixture
def lab(tmp_path):
    """A store with a forget set, a grid study (ga, ga_gd, ga_kl × 3 lrs × steps 5,10,20) in every
    state a cell can be in, a TPE study, and an empty study."""
    data = tmp_path / "my data"  # a space in the path: the command must quote it
    data.mkdir()
    rows = {"forget": ["Record 1. Alice lives in Kelvary.", "Record 2. Bob keeps bees."],
            "retain": ["Record 3. Carol bakes bread.", "Record 4. Dan pilots ferries."],
            "unseen": ["Record 5. Eve draws maps.", "Record 6. Fay makes violins."],
            "general": ["def f(x):\n    return x + 1"]}
    for role, texts in rows.items():
        (data / f"{role}.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts), encoding="utf-8")
    store = Store(f"sqlite:///{tmp_path}/u.db")
    fs = create_forget_set(store, "people", [str(data / "forget.jsonl")], [str(data / "retain.jsonl")],
                           [str(data / "unseen.jsonl")], [str(data / "general.jsonl")], text_field="body", seq_len=128)
    spec = StudySpec(model="/models/tiny llama", forget_set="people", forget_set_hash=fs.hash,
                     methods=["ga", "ga_gd", "ga_kl"], steps=[20, 5, 10], lrs=[1e-4, 1e-5, 3e-5],
                     run=RunSettings(seq_len=128, batch_size=2, seed=7, warmup_steps=1, eval_batch_size=3, min_k=0.25,
                                     tol_forget=0.10),  # a tolerance given; tol_retain left auto
                     has_general=True).validate()
    now = utcnow()
    with store.write() as s:
        study = Study(name="s1", model=spec.model, forgetset_id=fs.id, spec=spec.to_dict(), state="running",
                      scheduler_pid=4242, scheduler_host="node1", scheduler_heartbeat=now - dt.timedelta(seconds=5))
        s.add(study)
        s.flush()
        R = {}
        for method, lr, state, attempts, error in [
            ("ga", 1e-5, "done", 1, None),
            ("ga", 3e-5, "diverged", 1, None),
            ("ga", 1e-4, "failed", 2, "worker died: CUDA out of memory"),
            ("ga_gd", 1e-5, "done", 2, "killed: heartbeat lost"),
            ("ga_gd", 3e-5, "running", 1, None),
            ("ga_gd", 1e-4, "pending", 0, None),
            ("ga_kl", 1e-5, "pending", 0, None),
            ("ga_kl", 3e-5, "pending", 0, None),
            # ("ga_kl", 1e-4): no row yet; the grid still covers it
        ]:
            run = Run(study_id=study.id, method=method, lr=lr, state=state, attempts=attempts, last_error=error)
            if state == "running":
                run.device, run.host, run.pid, run.step = "cuda:1", "node1", 999, 7
                run.heartbeat = now - dt.timedelta(seconds=3)
            s.add(run)
            s.flush()
            R[(method, lr)] = run
        s.add_all([
            milestone(R["ga", 1e-5], 5, 0.50, 0.01, trial=0), milestone(R["ga", 1e-5], 10, 0.08, 0.02, trial=1),
            milestone(R["ga", 1e-5], 20, 0.05, 0.20, trial=2),
            # where the run's forget perplexity first reached the target, between two milestones: a row of its
            # own, no trial, in no grid, count or best (the lowest score of the study, and a success)
            milestone(R["ga", 1e-5], 7, 0.03, 0.0, at_target=True),
            milestone(R["ga", 3e-5], 5, 0.09, 0.04, trial=3), milestone(R["ga", 3e-5], 10, diverged=True, trial=4),
            # at a milestone, the at-target cell is that milestone's cell
            milestone(R["ga_gd", 1e-5], 5, 0.30, 0.0), milestone(R["ga_gd", 1e-5], 10, 0.06, -0.01, at_target=True),
            milestone(R["ga_gd", 1e-5], 20, 0.04, 0.03),
            milestone(R["ga_gd", 3e-5], 5, 0.20, 0.01),
        ])
        tspec = StudySpec(model="/models/tiny llama", forget_set="people", forget_set_hash=fs.hash, methods=["ga"],
                          steps=[5, 10], lr_range=(1e-5, 1e-3), sampler="tpe", trials=4, has_general=True).validate()
        tpe = Study(name="t1", model=tspec.model, forgetset_id=fs.id, spec=tspec.to_dict(), state="running")
        empty = Study(name="e1", model=tspec.model, forgetset_id=fs.id, spec=spec.to_dict())
        s.add_all([tpe, empty])
        s.flush()
        trun = Run(study_id=tpe.id, method="ga", lr=TPE_LR, state="done", attempts=1)
        # The slot a TPE pool reserves while its sampler picks (method, lr): not a run, never a cell.
        asking = Run(study_id=tpe.id, method="", lr=-0.028, state="asking", heartbeat=now, host="node1", pid=4242)
        s.add_all([trun, asking])
        s.flush()
        s.add_all([milestone(trun, 5, 0.07, 0.01), milestone(trun, 10, 0.02, 0.06)])
    return {"store": store, "fs": fs, "spec": spec, "data": data, "url": store.url}


# ------------------------------------------------------------------ grid

def test_cells_cover_the_search_space(lab):
    cells = load_cells(lab["store"], "s1")
    assert len(cells) == 3 * 3 * 3
    by = {(c.method, c.lr, c.steps): c for c in cells}
    assert [c.method for c in cells[:9]] == ["ga"] * 9 and cells[0].lr == 1e-5 and cells[0].steps == 5
    assert by["ga", 3e-5, 5].status == "done" and by["ga", 3e-5, 5].success
    assert by["ga", 3e-5, 10].status == "diverged" and by["ga", 3e-5, 20].status == "diverged"  # never missing
    assert {by["ga", 1e-4, s].status for s in (5, 10, 20)} == {"failed"}
    assert by["ga_gd", 3e-5, 5].status == "done" and by["ga_gd", 3e-5, 10].status == "running"
    assert by["ga_kl", 1e-4, 20].status == "pending" and by["ga_kl", 1e-4, 20].run_id is None
    assert by["ga", 1e-5, 10].value("mia_auc.min_k") == pytest.approx(0.5 + 0.08 / 3)
    assert by["ga", 3e-5, 10].value("score") is None


def test_queries_are_one_per_table(lab):
    from sqlalchemy import event

    statements = []
    listener = lambda conn, cursor, stmt, *a: statements.append(stmt)  # noqa: E731
    event.listen(lab["store"].engine, "before_cursor_execute", listener)
    try:
        study = lab["store"].study("s1")
        statements.clear()
        load_cells(lab["store"], study)
    finally:
        event.remove(lab["store"].engine, "before_cursor_execute", listener)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2, selects


def test_robustness_best_and_pareto(lab):
    cells = load_cells(lab["store"], "s1")
    assert robustness(cells) == {"ga": pytest.approx(2 / 9), "ga_gd": pytest.approx(2 / 9), "ga_kl": 0.0}
    b = best(cells)
    assert set(b) == {"ga", "ga_gd"}  # ga_kl has nothing computed
    assert (b["ga"]["lr"], b["ga"]["steps"], b["ga"]["success"]) == (1e-5, 10, True)
    assert b["ga"][SCORE] == pytest.approx(0.10) and b["ga"]["forget_gap"] == pytest.approx(0.08)
    assert b["ga"]["retain_eval_drift"] == pytest.approx(0.02)
    assert b["ga"]["score"] == pytest.approx(0.09) and b["ga"]["retain_drift"] == pytest.approx(0.01)  # the old figures
    assert b["ga"]["ppl_forget"] == pytest.approx(20 * math.exp(0.08))
    assert (b["ga_gd"]["lr"], b["ga_gd"]["steps"]) == (1e-5, 10) and b["ga_gd"][SCORE] == pytest.approx(0.06)
    front = pareto(cells, "ga")  # on forget_gap × retain_eval_drift
    assert [(c.lr, c.steps) for c in front] == [(1e-5, 20), (1e-5, 10), (1e-5, 5)]  # (.09, .04) is dominated
    assert pareto(cells, "ga_kl") == []


def test_tpe_study_cells(lab):
    cells = load_cells(lab["store"], "t1")
    assert [(c.lr, c.steps, c.status) for c in cells] == [(TPE_LR, 5, "done"), (TPE_LR, 10, "done")]
    assert robustness(cells) == {"ga": 0.5}


def test_a_tpe_reservation_is_never_a_cell(lab, tmp_path):
    """The row a TPE pool holds while asking its sampler is in no grid, status, heatmap, list or export."""
    from typer.testing import CliRunner

    from tui.cli import app

    store = lab["store"]
    assert {c.method for c in load_cells(store, "t1")} == {"ga"}
    st = study_status(store, "t1")
    assert set(st["robustness"]) == set(st["best"]) == set(st["grids"]) == {"ga"}
    assert st["runs"]["total"] == 4 and st["runs"]["done"] == 1 and st["runs"]["pending"] == 3
    assert all(r["method"] for r in st["running"] + st["errors"])
    listed = next(r for r in list_studies(store) if r["name"] == "t1")
    assert listed["robustness"] == {"ga": 0.5} and listed["cells"] == {"done": 2, "diverged": 0, "total": 8}
    assert [e["method"] for e in export_best(store, "t1")] == ["ga"]
    res = CliRunner().invoke(app, ["study", "heatmap", "t1", "--json", "--storage", lab["url"]])
    assert res.exit_code == 0 and list(json.loads(res.stdout)) == ["ga"], res.output
    assert all(lr > 0 for lr in json.loads(res.stdout)["ga"]["lrs"])


# ------------------------------------------------------------------ status

def test_study_status_numbers(lab):
    st = study_status(lab["store"], "s1")
    assert (st["name"], st["state"], st["model"], st["sampler"]) == ("s1", "running", "/models/tiny llama", "grid")
    assert st["forget_set"] == {"name": "people", "hash": lab["fs"].hash}
    assert st["methods"] == ["ga", "ga_gd", "ga_kl"] and st["steps"] == [5, 10, 20]
    assert st["cells"] == {"total": 27, "done": 8, "diverged": 2, "failed": 3, "running": 2, "cancelled": 0, "pending": 12}
    assert st["runs"] == {"total": 9, "done": 2, "running": 1, "failed": 1, "pending": 4, "diverged": 1,
                          "cancelled": 0, "attempts": 7}
    [r] = st["running"]
    assert (r["method"], r["lr"], r["step"], r["device"], r["pid"], r["host"]) == ("ga_gd", 3e-5, 7, "cuda:1", 999, "node1")
    assert 2 <= r["heartbeat_age_s"] < 60
    assert st["scheduler"]["pid"] == 4242 and st["scheduler"]["host"] == "node1"
    assert 4 <= st["scheduler"]["alive_s_ago"] < 60
    assert st["robustness"]["ga"] == pytest.approx(2 / 9)
    assert st["best"]["ga_gd"]["steps"] == 10
    errors = {(e["method"], e["lr"]): e for e in st["errors"]}
    assert set(errors) == {("ga", 1e-4), ("ga_gd", 1e-5)}
    assert errors["ga", 1e-4]["attempts"] == 2 and "out of memory" in errors["ga", 1e-4]["error"]
    json.dumps(st, allow_nan=False)  # what `--json` prints

    t = study_status(lab["store"], "t1")
    assert t["runs"]["total"] == 4 and t["runs"]["done"] == 1 and t["runs"]["pending"] == 3
    assert t["cells"]["total"] == 8 and t["cells"]["done"] == 2 and t["cells"]["pending"] == 6
    assert t["scheduler"]["alive_s_ago"] is None


def test_list_studies(lab):
    rows = {r["name"]: r for r in list_studies(lab["store"])}
    for name, row in rows.items():  # the aggregate list counts what the cells count
        st = study_status(lab["store"], name)
        assert row["cells"] == {k: st["cells"][k] for k in ("done", "diverged", "total")}, name
        assert row["robustness"] == pytest.approx(st["robustness"]), name
        best_scores = [b[SCORE] for b in st["best"].values()]
        assert row["best_score"] == (pytest.approx(min(best_scores)) if best_scores else None), name
    assert list(rows) == ["s1", "t1", "e1"]
    assert rows["s1"]["cells"] == {"done": 8, "diverged": 2, "total": 27}
    assert rows["t1"]["cells"]["total"] == 8 and rows["e1"]["cells"]["done"] == 0
    assert rows["s1"]["forget_set"]["name"] == "people" and rows["s1"]["methods"] == ["ga", "ga_gd", "ga_kl"]
    assert rows["t1"]["robustness"] == {"ga": 0.5}
    now = utcnow()  # `study ls` reads the same list through the stdlib sqlite3
    assert list_studies_sqlite(lab["store"].url, now) == list_studies(lab["store"], now)


def test_unknown_study_is_a_user_error(lab):
    with pytest.raises(UnlearnError, match="no study named 'nope'"):
        study_status(lab["store"], "nope")


# ------------------------------------------------------------------ heatmap

def render(renderable, width=80) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system="truecolor")
    console.print(renderable)
    return console.export_text()


def test_heatmap_at_80_columns(lab):
    cells = load_cells(lab["store"], "s1")
    text = render(render_heatmaps(cells, SCORE))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "✓" in text and "div" in text and "✗" in text and "…" in text and "·" in text
    assert "ga_gd  robustness 22% (2/9 cells)" in text and "ga_kl  robustness 0%" in text
    row = next(line for line in lines if line.lstrip().startswith("1e-05") and "0.1✓" in line)  # ga, lr 1e-5
    assert "0.51" in row and "0.25" in row
    assert render(render_heatmaps(cells, "mia_auc.min_k", method="ga")).count("robustness") == 1
    with pytest.raises(UnlearnError, match="unknown metric"):
        render_heatmaps(cells, "accuracy")
    with pytest.raises(UnlearnError, match="no method 'npo'"):
        render_heatmaps(cells, SCORE, method="npo")


def test_heatmap_six_steps_fit_80_columns():
    steps = [1, 10, 100, 1000, 5000, 10000]
    cells = []
    for i, lr in enumerate([1e-6, 2.5e-5, 3e-4, 1.2345e-3]):
        for j, s in enumerate(steps):
            gap, drift = 10 ** (i - 2) * (j + 1), -0.0123 * (j + 1)
            m = metrics(s, gap, drift)
            m["ppl_forget"] = 12345.678 * (i + 1)
            cells.append(Cell("ga_kl_general", lr, s, "done", metrics=m, score=m[SCORE], success=m["success"]))
    cells[-1] = Cell("ga_kl_general", 1.2345e-3, 10000, "diverged", metrics=metrics(10000, None, None, True), diverged=True)
    for metric in (SCORE, "retain_eval_drift", "score", "retain_drift", "ppl_forget", "mia_auc.loss"):
        text = render(render_heatmaps(cells, metric))
        assert max(len(line) for line in text.splitlines()) <= 80, text
        assert sum(1 for line in text.splitlines() if line.lstrip().startswith(("1e-06", "2.5e-05", "3e-04", "1.23e-03"))) == 4, text
    assert [fmt_lr(x) for x in (1e-5, 3e-5, 2.5e-4, TPE_LR)] == ["1e-05", "3e-05", "2.5e-04", "3.33e-05"]


# ------------------------------------------------------------------ export

def flags(command: str) -> tuple[list[str], dict[str, list[str]], set[str]]:
    """(prefix, --flag -> values, bare flags) of a command line."""
    argv = shlex.split(command)
    values: dict[str, list[str]] = {}
    bare = set()
    i = 2
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values.setdefault(argv[i], []).append(argv[i + 1])
            i += 2
        else:
            bare.add(argv[i])
            i += 1
    return argv[:2], values, bare


def test_export_best_entries_and_command(lab):
    entries = export_best(lab["store"], "s1")
    assert [e["method"] for e in entries] == ["ga", "ga_gd"]
    e = entries[0]
    for key in ("method", "lr", "steps", SCORE, "forget_gap", "retain_eval_drift", "success", "metrics", "model",
                "forget_set", "hyperparameters", "study", "command"):
        assert key in e
    assert (e["lr"], e["steps"], e["success"], e["study"]) == (1e-5, 10, True, "s1")
    assert e[SCORE] == pytest.approx(0.10) and e["metrics"]["mia_auc"]["loss"] == pytest.approx(0.54)
    assert e["metrics"]["score"] == pytest.approx(0.09)  # the old figure travels in the cell's metrics
    assert e["forget_set"] == {"name": "people", "hash": lab["fs"].hash}
    assert e["hyperparameters"] == {"batch_size": 2, "seq_len": 128, "seed": 7, "warmup_steps": 1, "retain_weight": None,
                                    "eval_batch_size": 3, "min_k": 0.25, "tol_forget": 0.10, "tol_retain": None,
                                    "target_spread": 0.0, "watch_every": 1, "stop_at_target": False,
                                    "divergence_factor": 1e4, "attacks": "", "relearn_recipe": "quick",
                                    "relearn_from": "forget", "quant_backend": "auto", "params": "", "dtype": "auto",
                                    "gradient_checkpointing": False, "optim": "adamw", "lora": 0, "lora_alpha": None,
                                    "lora_targets": "", "bench_samples": 100, "tofu_retain_truth_ratios": "",
                                    "muse_retrained_auc": None, "retrained_auc": None, "privleak_attack": "min_k",
                                    "reference_model": "", "mia_gradnorm": False, "eval_tasks": "", "eval_tasks_dir": "",
                                    "eval_tasks_limit": 0, "fsdp": False}
    prefix, v, bare = flags(e["command"])
    d = lab["data"]
    assert prefix == ["unlearn", "run"] and bare == {"--json"}
    assert v["--model"] == ["/models/tiny llama"]
    assert v["--forget"] == [str(d / "forget.jsonl")] and v["--retain"] == [str(d / "retain.jsonl")]
    assert v["--unseen"] == [str(d / "unseen.jsonl")] and v["--general"] == [str(d / "general.jsonl")]
    assert v["--text-field"] == ["body"] and v["--method"] == ["ga"] and float(v["--lr"][0]) == 1e-5
    assert v["--steps"] == ["10"]
    assert (v["--batch-size"], v["--seq-len"], v["--seed"], v["--warmup"], v["--eval-batch-size"]) == (["2"], ["128"], ["7"], ["1"], ["3"])
    assert float(v["--min-k"][0]) == 0.25 and float(v["--tol-forget"][0]) == 0.10
    assert "--tol-retain" not in v and "--stop-at-target" not in bare  # auto, and off: the run's own defaults
    assert v["--watch-every"] == ["1"]
    assert "'" in e["command"]  # the paths with a space are quoted

    [t] = export_best(lab["store"], "t1")
    assert float(flags(t["command"])[1]["--lr"][0]) == TPE_LR and t["lr"] == TPE_LR  # exact round trip
    assert t["steps"] == 5

    assert [x["method"] for x in export_best(lab["store"], "s1", method="ga_gd")] == ["ga_gd"]
    front = export_best(lab["store"], "s1", method="ga", pareto=True)
    assert [(x["steps"], x["pareto"]) for x in front] == [(20, True), (10, True), (5, True)]


def test_command_parses_with_the_real_cli(lab):
    """Every flag of the command exists on `unlearn run` and takes the value given."""
    import typer

    from tui.cli import app

    [e] = export_best(lab["store"], "t1")
    run = typer.main.get_command(app).commands["run"]
    ctx = run.make_context("run", shlex.split(e["command"])[2:])
    p = ctx.params
    assert float(p["lr"]) == TPE_LR and p["steps"] == "5" and p["method"] == "ga" and p["as_json"] is True
    assert p["text_field"] == "body" and p["rs_seq_len"] == 512 and list(p["general"]) == [str(lab["data"] / "general.jsonl")]


def test_export_errors(lab):
    store = lab["store"]
    with pytest.raises(UnlearnError, match="no study named"):
        export_best(store, "nope")
    with pytest.raises(UnlearnError, match="no method 'npo'"):
        export_best(store, "s1", method="npo")
    with pytest.raises(UnlearnError, match="no computed cells"):
        export_best(store, "e1")
    with pytest.raises(UnlearnError, match="ga_kl.*no computed cells"):
        export_best(store, "s1", method="ga_kl")


def test_yaml_and_json(lab):
    entries = export_best(lab["store"], "s1", pareto=True)
    as_json = json.loads(to_json(entries))
    assert as_json == json.loads(json.dumps(entries))
    assert yaml.safe_load(to_yaml(entries)) == as_json
    assert yaml.safe_load(to_yaml(entries))[0]["command"] == entries[0]["command"]


def test_report_commands(lab, tmp_path):
    """The Typer command functions, through a Typer app of their own (tui/cli/main.py registers them)."""
    import typer
    from typer.testing import CliRunner

    from tui.cli.report import export_cmd, heatmap_cmd, ls_cmd, status_cmd

    app = typer.Typer()
    for name, fn in (("status", status_cmd), ("heatmap", heatmap_cmd), ("ls", ls_cmd), ("export", export_cmd)):
        app.command(name)(fn)
    runner = CliRunner()
    url = lab["url"]

    res = runner.invoke(app, ["export", "s1", "--format", "json", "--storage", url])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["method"] for r in rows] == ["ga", "ga_gd"]
    assert {"method", "lr", "steps", SCORE, "command"} <= set(rows[0])
    res = runner.invoke(app, ["export", "s1", "--storage", url])  # yaml by default
    assert yaml.safe_load(res.stdout) == rows
    target = tmp_path / "out" / "best.yaml"
    res = runner.invoke(app, ["export", "s1", "--method", "ga", "--out", str(target), "--storage", url])
    assert res.exit_code == 0 and res.stdout == "" and yaml.safe_load(target.read_text())[0]["method"] == "ga"
    assert not [p for p in target.parent.iterdir() if p.name != "best.yaml"]  # no temp file left

    res = runner.invoke(app, ["status", "s1", "--json", "--storage", url])
    assert json.loads(res.stdout)["cells"]["done"] == 8
    res = runner.invoke(app, ["status", "s1", "--storage", url])
    assert res.exit_code == 0 and "8/27 done" in res.stdout and "ga_gd" in res.stdout
    res = runner.invoke(app, ["ls", "--json", "--storage", url])
    assert [r["name"] for r in json.loads(res.stdout)] == ["s1", "t1", "e1"]
    res = runner.invoke(app, ["ls", "--storage", url])
    assert res.exit_code == 0 and "s1" in res.stdout
    res = runner.invoke(app, ["heatmap", "s1", "--metric", "forget_gap", "--storage", url])
    assert res.exit_code == 0 and "robustness" in res.stdout and "div" in res.stdout
    res = runner.invoke(app, ["heatmap", "s1", "--json", "--method", "ga", "--storage", url])
    assert json.loads(res.stdout)["ga"]["status"][1] == ["done", "diverged", "diverged"]

    for argv, message in ((["heatmap", "s1", "--metric", "bleu"], "unknown metric"),
                          (["heatmap", "s1", "--method", "npo"], "no method"),
                          (["export", "e1"], "no computed cells"),
                          (["export", "s1", "--format", "toml"], "--format"),
                          (["status", "zz"], "no study named")):
        res = runner.invoke(app, argv + ["--storage", url])
        assert isinstance(res.exception, UnlearnError) and message in str(res.exception), (argv, res.output)


# ------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_exported_command_reproduces_the_score(tiny_model_dir, forget_set_files, tmp_path, monkeypatch, restore_determinism):
    """A real run's milestones in the store → export → the command, run as a user would, gives the same score;
    save_model reruns it and writes the model with its card."""
    from engine.run import run_unlearning

    monkeypatch.setenv("UNLEARN_HOME", str(tmp_path / "home"))
    store = Store(f"sqlite:///{tmp_path}/u.db")
    f = forget_set_files
    fs = create_forget_set(store, "people", [f["forget"]], [f["retain"]], [f["unseen"]], [f["general"]], seq_len=128)
    spec = StudySpec(model=str(tiny_model_dir), forget_set="people", forget_set_hash=fs.hash, methods=["ga_gd"],
                     steps=[2, 4], lrs=[3e-3], run=RunSettings(seq_len=128, batch_size=4, retain_weight=2.0, warmup_steps=3),
                     has_general=True).validate()
    with store.write() as s:
        study = Study(name="e2e", model=spec.model, forgetset_id=fs.id, spec=spec.to_dict(), state="done")
        s.add(study)
        s.flush()
        run = Run(study_id=study.id, method="ga_gd", lr=3e-3, state="running", attempts=1)
        s.add(run)
        s.flush()
    result = run_unlearning(spec.model, forget_set_texts(store, fs), spec.run_config("ga_gd", 3e-3), device="cpu",
                            cache_dir=tmp_path / "cache")
    with store.write() as s:
        for c in result["milestones"]:
            s.add(CellRow(run_id=run.id, step=c["step"], metrics=c, score=c[SCORE], success=c["success"],
                            diverged=c["diverged"]))
        r = s.get(Run, run.id)
        r.state, r.step = "done", 4
        s.add(r)
    scores = {c["step"]: c[SCORE] for c in result["milestones"]}
    assert None not in scores.values()

    [entry] = export_best(store, "e2e")
    assert entry[SCORE] == min(scores.values())
    _, v, _ = flags(entry["command"])
    assert (v["--retain-weight"], v["--warmup"]) == (["2.0"], ["3"])  # the study's settings travel with it
    commands = {entry["steps"]: entry["command"]}
    other = 4 if entry["steps"] == 2 else 2  # reproduce both cells: the one before the last milestone is the prefix case
    commands[other] = reproduce_command(spec.model, fs, spec, "ga_gd", 3e-3, other)
    env = {**os.environ, "UNLEARN_HOME": str(tmp_path / "home")}  # the user's own thread count: still bitwise here
    # The `unlearn` console script of this interpreter's environment, or its exact equivalent.
    # (Not `python -m tui.cli`: running cli.py as __main__ imports it twice, and tui.demo_cmd's
    # `from tui.cli import ...` then hits a half-initialized module.)
    script = Path(sys.executable).parent / "unlearn"
    unlearn = [str(script)] if script.is_file() else [sys.executable, "-c", "from tui.cli import main; main()"]
    for steps, command in commands.items():
        proc = subprocess.run(unlearn + shlex.split(command)[1:], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert [c["step"] for c in out["milestones"]] == [steps]
        assert out["forget_set"]["hash"] == fs.hash
        assert out["milestones"][0][SCORE] == pytest.approx(scores[steps], rel=1e-6)

    saved = save_model(store, entry, tmp_path / "models", device="cpu")
    folder = tmp_path / "models" / "ga_gd"
    assert saved["path"] == str(folder) and saved["matches"]
    assert saved[SCORE] == pytest.approx(entry[SCORE], rel=1e-6)
    card = (folder / "README.md").read_text()
    assert spec.model in card and "ga_gd" in card and fs.hash in card and entry["command"] in card
    assert f"| {SCORE} |" in card and "eval_score = forget_gap + max(0, retain_eval_drift)" in card
    assert (folder / "config.json").is_file() and not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    from engine.models import load_model

    load_model(str(folder), "cpu")


def test_one_best_cell_for_status_export_and_the_demo_table(lab):
    """A diverged cell keeps the metrics it was measured with, even a low score: it never wins. The
    status, the export and the demo's table all take the best cell from studies.reading.grid.best_cell."""
    from studies.lifecycle.demo import best_runs

    store = lab["store"]
    spec = StudySpec(model="/models/tiny llama", forget_set="people", forget_set_hash=lab["fs"].hash,
                     methods=["ga", "ga_gd"], steps=[5, 10, 20], lrs=[1e-4, 3e-4], has_general=True).validate()
    with store.write() as s:
        study = Study(name="b1", model=spec.model, forgetset_id=lab["fs"].id, spec=spec.to_dict(), state="done")
        s.add(study)
        s.flush()
        runs = {}
        for method, lr, state in (("ga", 1e-4, "diverged"), ("ga", 3e-4, "done"), ("ga_gd", 1e-4, "done"),
                                  ("ga_gd", 3e-4, "done")):
            runs[method, lr] = Run(study_id=study.id, method=method, lr=lr, state=state, attempts=1)
            s.add(runs[method, lr])
        s.flush()
        crossed = milestone(runs["ga", 1e-4], 10, 0.01, 0.0)  # lowest score of all, measured as it crossed the bound
        crossed.diverged = crossed.metrics["diverged"] = True
        s.add_all([milestone(runs["ga", 1e-4], 5, 0.30, 0.0), crossed, milestone(runs["ga", 1e-4], 20, diverged=True),
                   milestone(runs["ga", 3e-4], 5, 0.20, 0.0), milestone(runs["ga", 3e-4], 10, 0.25, 0.0),
                   milestone(runs["ga", 3e-4], 20, 0.20, 0.0),  # ties with steps 5: fewer steps win
                   milestone(runs["ga_gd", 1e-4], 5, 0.10, 0.0), milestone(runs["ga_gd", 3e-4], 5, 0.10, 0.0)])
    cells = load_cells(store, "b1")
    status = study_status(store, "b1")["best"]
    exported = {e["method"]: e for e in export_best(store, "b1")}
    table = {r["method"]: r for r in best_runs(store, "b1", cells)}
    for method, (lr, steps) in {"ga": (3e-4, 5), "ga_gd": (1e-4, 5)}.items():  # ties: fewer steps, then lower lr
        assert (status[method]["lr"], status[method]["steps"]) == (lr, steps)
        assert (exported[method]["lr"], exported[method]["steps"]) == (lr, steps)
        assert (table[method]["lr"], table[method]["best_step"]) == (lr, steps)
