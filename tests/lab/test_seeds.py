"""`study create --seeds`: every cell run under several seeds and read as their mean with a 95 %
interval; success judged on the interval (studies/reading/seeds.py). And the v5 store that holds
a run per seed."""
from __future__ import annotations

import json
import math
import shlex
import sqlite3
import statistics

import optuna
import pytest

from engine.errors import UnlearnError
from engine.metric_registry import FORGET_GAP, SCORE, UTILITY_DRIFT
from studies.lifecycle.spec import StudySpec
from studies.lifecycle.study import create_study
from studies.reading.export import export_best
from studies.reading.grid import Cell, load_cells
from studies.reading.seeds import half_width, mean_cell
from studies.reading.trials import trial_detail
from studies.store.db import SCHEMA_VERSION, Run, Store
from studies.store.states import CellStatus
from tests.studies_helpers import cli, cli_in_process, make_forget_set, milestones_of, runs_of

T_975 = {1: 12.7062047, 2: 4.30265273}  # Student's t, 97.5 % quantile, by degrees of freedom


def _cell(seed_gap: float, drift: float, mia: bool = True, bands=(0.1, 0.05)) -> Cell:
    metrics = {FORGET_GAP: seed_gap, UTILITY_DRIFT: drift, SCORE: seed_gap + max(0.0, drift),
               "mia_auc": {"loss": 0.5}, "verdict": {"forget": seed_gap <= bands[0], "mia": mia, "utility": drift <= bands[1]},
               "bands": {"forget": bands[0], "utility": bands[1]}}
    return Cell("ga", 1e-3, 10, CellStatus.DONE, metrics=metrics, score=metrics[SCORE],
                success=all(metrics["verdict"].values()))


def test_a_mean_over_seeds_is_judged_on_its_interval():
    assert half_width([1.0, 2.0, 4.0]) == pytest.approx(T_975[2] * statistics.stdev([1, 2, 4]) / math.sqrt(3))
    assert half_width([1.0]) is None
    # every seed succeeds, and the mean is inside the band, but the interval is not: no success
    wide = mean_cell([_cell(0.01, 0.0), _cell(0.09, 0.0)], [0, 1])
    assert wide.value(FORGET_GAP) == pytest.approx(0.05)
    hw = T_975[1] * statistics.stdev([0.01, 0.09]) / math.sqrt(2)
    assert wide.metrics["seeds"]["spread"][FORGET_GAP] == pytest.approx(hw)
    assert wide.metrics["verdict"] == {"forget": False, "mia": True, "utility": True} and not wide.success
    tight = mean_cell([_cell(0.040, 0.01), _cell(0.041, 0.011), _cell(0.042, 0.009)], [0, 1, 2])
    assert tight.success and tight.score == pytest.approx(statistics.fmean([0.05, 0.052, 0.051]))
    assert tight.summary()["seeds"] == [0, 1, 2] and set(tight.summary()["spread"]) >= {FORGET_GAP, UTILITY_DRIFT, SCORE}
    # the membership part must hold at every seed; a diverged seed makes the cell diverged
    assert not mean_cell([_cell(0.04, 0.0), _cell(0.04, 0.0, mia=False)], [0, 1]).metrics["verdict"]["mia"]
    diverged = Cell("ga", 1e-3, 10, CellStatus.DIVERGED, diverged=True)
    assert mean_cell([_cell(0.04, 0.0), diverged], [0, 1]).status == CellStatus.DIVERGED
    running = Cell("ga", 1e-3, 10, CellStatus.RUNNING)
    assert mean_cell([_cell(0.04, 0.0), running], [0, 1]).status == CellStatus.RUNNING


def test_seeds_are_checked():
    spec = StudySpec(model="m", forget_set="fs", forget_set_hash="h", methods=("ga",), steps=(2,), lrs=(1e-3,),
                     seeds=(2, 0, 1)).validate()
    assert spec.seeds == (0, 1, 2) and spec.grid_seeded_runs == [("ga", 1e-3, 0), ("ga", 1e-3, 1), ("ga", 1e-3, 2)]
    assert StudySpec.from_dict(spec.to_dict()) == spec and "seed" in spec.optuna_distributions()
    one = StudySpec(model="m", forget_set="fs", forget_set_hash="h", methods=("ga",), steps=(2,), lrs=(1e-3,),
                    seeds=(5,)).validate()
    assert one.seeds is None and one.run.seed == 5  # one seed is --seed
    for seeds, msg in (((0, 0), "twice"), ((-1, 2), "0 or more"), ((), "0 or more")):
        with pytest.raises(UnlearnError, match=msg):
            StudySpec(model="m", forget_set="fs", forget_set_hash="h", methods=("ga",), steps=(2,), lrs=(1e-3,),
                      seeds=seeds).validate()
    with pytest.raises(UnlearnError, match="tpe sampler runs one seed"):
        StudySpec(model="m", forget_set="fs", forget_set_hash="h", methods=("ga",), steps=(2,), lr_range=(1e-4, 1e-2),
                  sampler="tpe", trials=2, seeds=(0, 1)).validate()


def test_a_v4_store_gets_a_seed_per_run_and_keeps_every_cell(tmp_path, tiny_model_dir, forget_set_files):
    path = tmp_path / "lab.db"
    store = Store(f"sqlite:///{path}")
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "S", str(tiny_model_dir), "fs", methods=["ga", "ga_gd"], lrs=[1e-3], steps=[2], seed=7)
    with sqlite3.connect(path) as c:  # ul_run as v4 made it: no seed, unique on (study, method, lr)
        c.execute("PRAGMA foreign_keys=OFF")
        c.execute("CREATE TABLE old_run AS SELECT * FROM ul_run")
        c.execute("DROP TABLE ul_run")
        cols = [r[1] for r in c.execute("PRAGMA table_info(old_run)") if r[1] != "seed"]
        c.execute(f"CREATE TABLE ul_run ({', '.join(cols)}, UNIQUE (study_id, method, lr))")
        c.execute(f"INSERT INTO ul_run SELECT {', '.join(cols)} FROM old_run")
        c.execute("DROP TABLE old_run")
        run_id = c.execute("SELECT id FROM ul_run ORDER BY id").fetchone()[0]
        c.execute("INSERT INTO ul_milestone (run_id, step, metrics, success, diverged, created_at) "
                  "VALUES (?, 2, '{}', 0, 0, '2026-01-01')", (run_id,))
        c.execute("UPDATE ul_meta SET value = '4' WHERE key = 'schema_version'")
    store = Store(f"sqlite:///{path}", create=False)
    assert sorted((r.method, r.seed) for r in runs_of(store, "S")) == [("ga", 7), ("ga_gd", 7)]  # the study's seed
    assert len(milestones_of(store, "S")) == 1
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM ul_meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert c.execute("PRAGMA foreign_key_check").fetchall() == []
        assert {r[2] for r in c.execute("PRAGMA index_list(ul_run)")} == {0, 1}  # its index and its unique constraint
    with store.write() as s:  # another seed of the same (method, lr) is a run of its own now
        s.add(Run(study_id=runs_of(store, "S")[0].study_id, method="ga", lr=1e-3, seed=8))
    with pytest.raises(Exception, match="UNIQUE"), store.write() as s:
        s.add(Run(study_id=runs_of(store, "S")[0].study_id, method="ga", lr=1e-3, seed=8))
    Store(f"sqlite:///{path}", create=False)  # opening it again changes nothing


@pytest.mark.slow  # a whole study through its scheduler and run subprocesses
def test_a_study_with_seeds_runs_each_cell_per_seed_and_reads_their_mean(tmp_path, forget_set_files, tiny_model_dir,
                                                                          capsys):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    made = json.loads(cli_in_process(capsys, "study", "create", "S", "--model", str(tiny_model_dir), "--forget-set", "fs",
                                     "--methods", "ga", "--lr", "3e-3", "--steps", "2,4", "--seeds", "0,1",
                                     "--batch-size", "2", "--json", "--storage", url).stdout)
    assert (made["runs"], made["cells"], made["seeds"]) == (2, 2, [0, 1])
    assert sorted((r.method, r.seed) for r in runs_of(store, "S")) == [("ga", 0), ("ga", 1)]
    r = cli("study", "run", "S", "--workers", "2", "--storage", url, home=tmp_path / "home")
    assert r.returncode == 0, r.stderr

    trials = optuna.load_study(study_name="S", storage=url).trials  # stock Optuna: one trial per seed and cell
    assert sorted((t.params["seed"], t.params["steps"]) for t in trials) == [(0, 2), (0, 4), (1, 2), (1, 4)]
    seed_of = {r.id: r.seed for r in runs_of(store, "S")}
    own = {(seed_of[m.run_id], m.step): m.metrics for m in milestones_of(store, "S")}
    assert own[(0, 4)]["ppl_forget"] != own[(1, 4)]["ppl_forget"]  # the seed reached the batches
    cells = {c.steps: c for c in load_cells(store, "S")}
    assert set(cells) == {2, 4}
    for step, cell in cells.items():
        gaps = [own[(seed, step)][FORGET_GAP] for seed in (0, 1)]
        drifts = [own[(seed, step)][UTILITY_DRIFT] for seed in (0, 1)]
        assert cell.value(FORGET_GAP) == pytest.approx(statistics.fmean(gaps))
        hw = T_975[1] * statistics.stdev(gaps) / math.sqrt(2)
        assert cell.metrics["seeds"]["spread"][FORGET_GAP] == pytest.approx(hw)
        bands = own[(0, step)]["bands"]
        want = (statistics.fmean(gaps) + hw <= bands["forget"]
                and statistics.fmean(drifts) + T_975[1] * statistics.stdev(drifts) / math.sqrt(2) <= bands["utility"]
                and all(own[(seed, step)]["verdict"]["mia"] for seed in (0, 1)))
        assert cell.success == want

    status = json.loads(cli_in_process(capsys, "study", "status", "S", "--json", "--storage", url).stdout)
    assert status["cells"]["total"] == 2 and status["cells"]["done"] == 2 and status["runs"]["total"] == 2
    assert status["seeds"] == [0, 1] and status["target"]["band"] >= math.log1p(0.10) and "original_note" in status
    said = cli_in_process(capsys, "study", "status", "S", "--storage", url).stdout
    assert "seeds 0,1" in said and f"± {status['target']['band']:.3f}" in said
    listed = {s["name"]: s for s in json.loads(cli_in_process(capsys, "study", "ls", "--json", "--storage", url).stdout)}
    assert listed["S"]["cells"] == {"done": 2, "diverged": 0, "total": 2}

    (entry,) = export_best(store, "S")
    assert entry["seeds"] == [0, 1] and entry["seed"] == 0 and FORGET_GAP in entry["spread"]
    argv = shlex.split(entry["command"])
    assert argv[argv.index("--seed") + 1] == "0"
    rerun = json.loads(cli_in_process(capsys, *argv[1:]).stdout)  # the command reproduces the first seed's cell
    assert rerun["milestones"][-1][SCORE] == entry[f"seed_{SCORE}"] == own[(0, entry["steps"])][SCORE]
    detail = trial_detail(store, "S", "ga", 3e-3, 4, seed=1)
    assert [p["seed"] for p in detail["per_seed"]] == [0, 1] and detail["seed"] == 1
    assert detail["per_seed"][1][FORGET_GAP] == pytest.approx(own[(1, 4)][FORGET_GAP])
    heat = cli_in_process(capsys, "study", "heatmap", "S", "--storage", url).stdout
    assert "±" in heat  # the spread beside each mean


@pytest.mark.xdist_group("postgresql")
def test_a_v4_postgresql_store_swaps_its_unique_constraint(forget_set_files, tiny_model_dir, pg_database):
    """The same upgrade on PostgreSQL, in a database of its own on the CI's server."""
    import psycopg2

    url, _ = pg_database
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files)
    create_study(store, "S", str(tiny_model_dir), "fs", methods=["ga"], lrs=[1e-3], steps=[2], seed=7)
    store.engine.dispose()
    con = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"))
    with con, con.cursor() as c:  # ul_run as v4 made it
        c.execute("SELECT conname FROM pg_constraint WHERE conrelid = 'ul_run'::regclass AND contype = 'u'")
        for (constraint,) in c.fetchall():
            c.execute(f'ALTER TABLE ul_run DROP CONSTRAINT "{constraint}"')
        c.execute("ALTER TABLE ul_run DROP COLUMN seed")
        c.execute("ALTER TABLE ul_run ADD UNIQUE (study_id, method, lr)")
        c.execute("UPDATE ul_meta SET value = '4' WHERE key = 'schema_version'")
    con.close()
    store = Store(url, create=False)
    assert [(r.method, r.seed) for r in runs_of(store, "S")] == [("ga", 7)]
    with store.write() as s:
        s.add(Run(study_id=runs_of(store, "S")[0].study_id, method="ga", lr=1e-3, seed=8))
    with pytest.raises(Exception, match="unique|duplicate"), store.write() as s:
        s.add(Run(study_id=runs_of(store, "S")[0].study_id, method="ga", lr=1e-3, seed=8))
    Store(url, create=False).engine.dispose()  # opening it again changes nothing
    store.engine.dispose()
