"""The bench scripts' own checks can fail: bench/prefix_sharing.py matches cells by step (any order of
--steps) and never counts two cells without a score as identical; bench/app_first_paint.py reports
what it measured in the agreed JSON; each newer bench's verdict (ratios, targets, loss and figure
agreement) is tested on hand-built figures; store_scale's bulk writer leaves the rows record_cell
leaves; the evaluation's grouped statistics keep the per-row loop's figures; gpu.py skips without
CUDA and runs its code on a tiny CPU model. The benches' --quick --json runs are here too (the
heavier ones marked slow); no test asserts a time."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.metric_registry import SCORE, TRAINED_ON_SCORE

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell(step, score, diverged=False, at_target=False, trained_on=None):
    """A cell as the bench reads it: the objective (eval_score), and the old figure on the retain
    documents (score), which the check does not compare."""
    return {"step": step, SCORE: score, TRAINED_ON_SCORE: score if trained_on is None else trained_on,
            "diverged": diverged, "at_target": at_target}


def test_prefix_sharing_matches_cells_by_step():
    compare = load("prefix_sharing").compare_cells
    shared = [cell(5, 0.5), cell(10, 0.4), cell(20, 0.3)]
    naive = {20: cell(20, 0.3), 5: cell(5, 0.5), 10: cell(10, 0.4)}
    assert compare([20, 5, 10], shared, naive) == []
    assert compare([20, 5, 10], shared, {**naive, 10: cell(10, 0.41)}) == [
        "step 10: scores differ, shared 0.4 vs naive 0.41"]
    # the objective is what is compared: eval_score, not the old score on the trained-on retain documents
    assert compare([5], [cell(5, 0.5, trained_on=0.7)], {5: cell(5, 0.5, trained_on=0.6)}) == []


def test_prefix_sharing_does_not_count_the_at_target_cell_as_a_milestone():
    """A run evaluates an extra cell where its forget perplexity first reaches the target; between
    milestones it is no milestone, and the naive runs (one per milestone) need not have it."""
    compare = load("prefix_sharing").compare_cells
    shared = [cell(5, 0.5), cell(7, 0.45, at_target=True), cell(10, 0.4)]
    naive = {5: cell(5, 0.5), 10: cell(10, 0.4)}
    assert compare([5, 10], shared, naive) == []
    assert compare([5, 10], shared, {**naive, 10: cell(10, 0.41)}) == ["step 10: scores differ, shared 0.4 vs naive 0.41"]
    # at a milestone the at-target cell is that milestone's cell, compared as any other
    assert compare([5, 10], [cell(5, 0.5), cell(10, 0.4, at_target=True)], naive) == []
    assert compare([5, 10], [cell(5, 0.5), cell(10, 0.3, at_target=True)], naive) == [
        "step 10: scores differ, shared 0.3 vs naive 0.4"]


def test_prefix_sharing_never_calls_diverged_cells_identical():
    compare = load("prefix_sharing").compare_cells
    shared = [cell(5, 0.5), cell(10, None, True)]
    problems = compare([5, 10], shared, {5: cell(5, 0.5), 10: cell(10, None, True)})
    assert len(problems) == 1 and problems[0].startswith("step 10: no score to compare")
    assert compare([5, 10], shared[:1], {5: cell(5, 0.5), 10: cell(10, 0.2)}) == ["step 10: missing from the shared run"]


def test_prefix_sharing_finds_the_at_target_cell_the_same_way_in_every_run():
    at = load("prefix_sharing").compare_at_target
    shared = cell(7, 0.45, at_target=True)
    naive = {5: None, 10: cell(7, 0.45, at_target=True), 20: cell(7, 0.45, at_target=True)}
    assert at(shared, naive) == []
    assert at(None, {5: None, 10: None}) == []
    assert at(shared, {**naive, 20: None}) == ["run to 20: no at-target cell, the shared run has it at step 7"]
    assert at(shared, {**naive, 5: cell(4, 0.5, at_target=True)}) == [
        "run to 5: an at-target cell at step 4, the shared run has it at step 7"]
    assert at(shared, {**naive, 10: cell(8, 0.45, at_target=True)}) == [
        "run to 10: at-target cell at step 8 score 0.45, shared at step 7 score 0.45"]
    assert at(shared, {**naive, 10: cell(7, 0.46, at_target=True)}) == [
        "run to 10: at-target cell at step 7 score 0.46, shared at step 7 score 0.45"]
    assert len(at(cell(7, None, True, True), {10: cell(7, None, True, True)})) == 1  # no score is never identical


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")
def test_app_first_paint_reports_every_command_and_the_target():
    """bench/app_first_paint.py on the 10,250-trial test store: the JSON names the three commands
    measured side by side and the 1 s target; whether it passes is the bench script's call, not
    this test's (timings belong in bench/)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "app_first_paint.py"), "--repeat", "1", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stderr
    print("\n" + proc.stdout)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["name"] == "app_first_paint" and report["target"] == 1.0
    assert set(report["median_s"]) == {"python -c pass", "unlearn study ls", "unlearn tui (first paint)",
                                       "unlearn tui (first study row)"}
    assert report["median_s"]["unlearn tui (first paint)"] <= report["median_s"]["unlearn tui (first study row)"]
    assert all(v > 0 for v in report["median_s"].values())
    assert report["pass"] == (report["median_s"]["unlearn tui (first paint)"] <= 1.0) == (proc.returncode == 0)


# ---------------------------------------------------------------- store_scale: the bulk writer

TIMESTAMPS = {"created_at", "updated_at", "at", "datetime_start", "datetime_complete"}


def table_rows(path) -> dict[str, list[tuple]]:
    """Every table's rows in id order, timestamps left out."""
    import sqlite3

    con = sqlite3.connect(path)
    out = {}
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
        cur = con.execute(f'SELECT * FROM "{table}" ORDER BY 1')
        keep = [i for i, d in enumerate(cur.description) if d[0] not in TIMESTAMPS]
        out[table] = [tuple(row[i] for i in keep) for row in cur.fetchall()]
    con.close()
    return out


def test_store_scale_bulk_writer_writes_what_record_cell_writes(tmp_path):
    """The stores bench/store_scale.py times are written in bulk; the bulk writer must leave the very
    rows record_cell leaves, every table, every column but timestamps (diverged cells, a run
    written part way and at-target cells, between milestones and at one, included)."""
    import sqlite3

    scale = load("store_scale")
    trials = 5 * len(scale.STEPS) + 7  # five runs (the fifth diverges) and part of a sixth
    inputs = tmp_path / "inputs"
    bulk, one_by_one = tmp_path / "bulk.db", tmp_path / "record_cell.db"
    made = scale.make_store(bulk, trials, inputs, bulk=True)
    assert made["trials"] == trials and made["at_target_rows"] > 0
    assert scale.make_store(one_by_one, trials, inputs, bulk=False)["trials"] == trials
    a, b = table_rows(bulk), table_rows(one_by_one)
    assert a.keys() == b.keys()
    assert len(a["trials"]) == trials and len(a["ul_milestone"]) == trials + made["at_target_rows"]
    assert any(r[3] == "FAIL" for r in a["trials"]), "the plan has diverged cells"
    with sqlite3.connect(bulk) as con:
        rows = [(step, number, json.loads(metrics)) for step, number, metrics in
                con.execute("SELECT step, trial_number, metrics FROM ul_milestone ORDER BY id")]
    con.close()
    between = [(step, number) for step, number, m in rows if m.get("at_target") and step not in scale.STEPS]
    assert len(between) == made["at_target_rows"] and all(number is None for _, number in between)
    assert any(m.get("at_target") and step in scale.STEPS and number is not None for step, number, m in rows), \
        "the plan has an at-target cell at a milestone: a trial like any milestone's"
    assert all(m[SCORE] is not None for _, _, m in rows if not m["diverged"]), "every computed cell has the objective"
    for table in a:
        assert a[table] == b[table], table


def test_store_scale_growth_is_judged_against_the_trials():
    growth = load("store_scale").growth_problems
    assert growth({1000: {"ls": 0.4}, 10000: {"ls": 0.9}, 100000: {"ls": 8.0}}) == []
    assert growth({1000: {"ls": 0.1}, 10000: {"ls": 1.5}}) == ["ls: 15.0x from 1,000 to 10,000 trials (> 10x)"]
    assert len(growth({1000: {"a": 0.1, "b": 1.0}, 10000: {"a": 0.5, "b": 1.0}, 100000: {"a": 20.0, "b": 1.0}})) == 2


# ---------------------------------------------------------------- the verdicts, on hand-built figures

def test_common_verdict_and_exit_status():
    common = load("_common")
    assert common.ratio_pass(1.05, 1.05) and not common.ratio_pass(1.06, 1.05)
    assert common.ratio_pass(3.0, 3.0, at_most=False) and not common.ratio_pass(2.9, 3.0, at_most=False)
    assert not common.ratio_pass(None, 1.0) and not common.ratio_pass(float("nan"), 1.0)
    assert common.finish({"name": "x", "ratio": 1, "target": 1, "pass": True}, False) == 0
    assert common.finish({"name": "x", "ratio": 1, "target": 1, "pass": False}, False) == 1
    assert common.finish({"name": "x", "ratio": None, "target": 1, "pass": None}, False) == 0  # skipped
    with pytest.raises(KeyError):
        common.finish({"name": "x", "ratio": 1, "pass": True}, False)


def test_lockstep_takes_turns_step_by_step_rotating_the_order():
    lockstep = load("_lockstep")
    import torch

    seen: list[tuple[str, int]] = []
    before = torch.are_deterministic_algorithms_enabled()

    def side(name, steps, deterministic=None):
        def go(tick):
            if deterministic is not None:  # set once, as the engine does for its whole run
                torch.use_deterministic_algorithms(deterministic)
            for i in range(1, steps + 1):
                # each side runs under its own switches, whatever the side before it set
                assert torch.are_deterministic_algorithms_enabled() is (deterministic or before)
                seen.append((name, i))
                tick()
            return name * steps
        return go

    lock = lockstep.Lockstep(["a", "b", "c"])
    out = lock.run({"a": side("a", 3, deterministic=True), "b": side("b", 3), "c": side("c", 2)})
    assert out == {"a": "aaa", "b": "bbb", "c": "cc"}
    # round 1 a b c, round 2 rotated: b c a, round 3: c (which ends) a b
    assert seen == [("a", 1), ("b", 1), ("c", 1), ("b", 2), ("c", 2), ("a", 2), ("a", 3), ("b", 3)]
    assert [len(lock.times[n]) for n in "abc"] == [3, 3, 2] and all(t >= 0 for v in lock.times.values() for t in v)
    assert lockstep.paired_ratios({"x": [9.0, 2.0, 3.0], "y": [1.0, 1.0, 2.0]}, "x", "y") == [2.0, 1.5]
    torch.use_deterministic_algorithms(before)


def test_lockstep_hands_a_side_error_back_without_hanging_the_others():
    lockstep = load("_lockstep")

    def ok(tick):
        for _ in range(5):
            tick()

    def broken(tick):
        tick()
        raise ValueError("boom")

    with pytest.raises(RuntimeError, match="side b failed in lockstep: boom"):
        lockstep.Lockstep(["a", "b"]).run({"a": ok, "b": broken})


def test_step_overhead_needs_the_same_losses_and_both_targets():
    so = load("step_overhead")
    assert so.losses_agree([1.0, 2.0, 3.0], [1.0, 2.0, 3.5], 2) == (True, 0.0)
    assert so.losses_agree([1.0, 2.0, 3.0], [1.0, 2.0, 3.5], 3)[0] is False
    assert so.losses_agree([1.0], [1.0, 2.0], 2)[0] is False  # too few losses never agree
    assert so.per_step([10.0, 10.5, 11.0, 11.5]) == 0.5
    assert so.ratios_of_medians({"engine": 1.0, "plain": 0.8, "trainer": 2.0}) == {"plain": 1.25, "trainer": 0.5}
    fast = {"ga_gd": {"plain": 1.0, "trainer": 1 / 1.2}, "ga_kl": {"plain": 1 / 0.99, "trainer": 1 / 1.1}}
    assert so.verdict(fast, True)["pass"] is True
    assert so.verdict(fast, False)["pass"] is False
    slow = {**fast, "ga_kl": {"plain": 1.1, "trainer": 1.1 / 1.2}}  # 1.10 over the plain loop
    v = so.verdict(slow, True)
    assert v["pass"] is False and v["ratio"] == pytest.approx(1.1)
    assert so.verdict({"ga_gd": {"plain": 1.0, "trainer": 1 / 0.9}}, True)["pass"] is False


def test_eval_pass_compares_every_figure():
    ep = load("eval_pass")
    m = {"ppl_forget": 10.0, "ppl_retain": 5.0, "ppl_retain_eval": 6.0, "ppl_unseen": 20.0, "ppl_general": None,
         "mia_auc": {"loss": 0.9, "zlib": 0.8, "min_k": 0.7, "min_k_pp": 0.6}, "mia_auc_lo": 0.8, "mia_auc_hi": 0.95}
    assert ep.differences(m, m) == ([], 0.0)
    assert ep.differences(m, {**m, "mia_auc_hi": 0.96})[0] == ["mia_auc_hi: 0.95 vs 0.96"]
    assert ep.differences(m, {k: v for k, v in m.items() if k != "ppl_retain_eval"})[0] == [
        "ppl_retain_eval: 6.0 vs None"]
    off = {**m, "mia_auc": {**m["mia_auc"], "zlib": 0.81}}
    assert ep.differences(m, off)[0] == ["mia_auc.zlib: 0.8 vs 0.81"]
    assert ep.differences(m, {**m, "ppl_general": 3.0})[0] == ["ppl_general: None vs 3.0"]
    assert ep.passes(3.2, []) and not ep.passes(2.9, []) and not ep.passes(5.0, ["x"])


def test_grid_cost_pairs_each_lr_and_alternates_which_side_goes_first():
    gc = load("grid_cost")
    order: list[tuple[str, float]] = []
    ticks = iter(range(1000))
    clock = {"wall": lambda: float(next(ticks)), "cpu": lambda: float(next(ticks))}

    def shared(lr):
        order.append(("shared", lr))

    def independent(lr):
        order.append(("independent", lr))

    pairs = gc.measure_pairs([1.0, 2.0], shared, independent, 2, clock)
    assert order[:2] == [("shared", 1.0), ("independent", 1.0)]  # the uncounted warm-up pair
    assert order[2:] == [("shared", 1.0), ("independent", 1.0), ("independent", 2.0), ("shared", 2.0),
                         ("shared", 1.0), ("independent", 1.0), ("independent", 2.0), ("shared", 2.0)]
    assert [p["lr"] for p in pairs] == [1.0, 2.0, 1.0, 2.0]
    assert all(p["wall"] == p["shared_s"] / p["independent_s"] for p in pairs)


def test_grid_cost_theory_and_tolerance():
    gc = load("grid_cost")
    assert gc.theoretical_ratio([5, 10, 20, 40, 80]) == pytest.approx(80 / 155)
    theory = gc.theoretical_ratio([5, 10, 20, 40, 80])
    assert gc.within(theory * 1.099, theory) and not gc.within(theory * 1.11, theory)
    assert not gc.within(theory * 0.85, theory)


def test_tui_scale_judges_at_ten_thousand_trials():
    ts = load("tui_scale")
    good = {"first paint": 0.5, "dashboard open": 3.0, "refresh (100 new cells)": 0.05}
    assert ts.verdict({10_000: good, 100_000: {**good, "first paint": 9.0}}) == (True, [])
    assert ts.verdict({10_000: {**good, "refresh (100 new cells)": 0.2}})[0] is False
    assert ts.verdict({100_000: good})[0] is False  # never measured where the target is


def test_gpu_bench_skips_without_cuda_and_computes_mfu():
    gpu = load("gpu")
    assert gpu.mfu(1_000_000_000, 1000.0, 6e12 / 0.5) == pytest.approx(0.5)
    assert gpu.verdict(0.45, 2.0, 1.0) and not gpu.verdict(0.39, 2.0, 1.0) and not gpu.verdict(0.5, 1.0, 1.0)
    import torch

    if not torch.cuda.is_available():
        assert gpu.skip_reason("cuda").startswith("no CUDA device")
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--json"], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["pass"] is None and report["skipped"] and report["name"] == "gpu"
    assert gpu.skip_reason("cpu") is None


def run_quick(name: str, *extra: str, timeout: int = 600) -> dict:
    """A bench's --quick --json run: its last line, with the exit status checked against its verdict."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--json", *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    print("\n" + proc.stdout[-3000:])
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["name"] == name and {"ratio", "target", "pass"} <= set(report)
    assert (proc.returncode == 0) == (report["pass"] is not False)
    return report


def test_gpu_bench_runs_its_code_on_a_tiny_cpu_model():
    """The GPU path's logic, forced onto the CPU with a tiny config (its figures mean nothing)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tiny"] and report["parameters"] > 0 and report["peak_flops"] > 0
    assert set(report["tokens_per_s"]) == {"engine", "trainer"} and all(v > 0 for v in report["tokens_per_s"].values())
    assert report["pass"] == (report["mfu"]["engine"] >= 0.4
                              and report["tokens_per_s"]["engine"] > report["tokens_per_s"]["trainer"])


def test_startup_quick_json():
    report = run_quick("startup")
    assert report["target"] == 0.5 and report["trials"] == 100


@pytest.mark.slow
def test_step_overhead_quick_json():
    report = run_quick("step_overhead")
    assert report["losses_agree"] is True  # the three loops compute the same losses
    assert set(report["seconds_per_step"]) == {"ga_gd", "ga_kl"}


@pytest.mark.slow
def test_eval_pass_quick_json():
    report = run_quick("eval_pass")
    assert report["figures_agree"] is True and 0 < report["eval_share_of_run"] < 1


@pytest.mark.slow
def test_grid_cost_quick_json():
    report = run_quick("grid_cost")
    assert report["optimizer_steps"] == {"shared": 3 * 10, "independent": 3 * 30} and report["problems"] == []


@pytest.fixture(scope="session")
def scale_workdir(tmp_path_factory):
    """One --workdir for store_scale and tui_scale, as the two benches share theirs by default: the
    10,000-trial store is built once (keyed by the code that writes it) and timed by both."""
    return tmp_path_factory.mktemp("store_scale")


@pytest.mark.slow
@pytest.mark.xdist_group("store_scale")  # the shared workdir: one worker, one bench at a time
def test_store_scale_quick_json(scale_workdir):
    report = run_quick("store_scale", "--workdir", str(scale_workdir))
    assert report["sizes"] == [1000, 10000] and set(report["growth"]) == {"study status", "study heatmap", "study ls", "export"}


@pytest.mark.slow
@pytest.mark.xdist_group("store_scale")
def test_tui_scale_quick_json(scale_workdir):
    report = run_quick("tui_scale", "--workdir", str(scale_workdir))
    assert report["sizes"] == [10000] and report["refresh_s"] > 0


# ---------------------------------------------------------------- eval_pass: the evaluation made cheaper

def per_row_scores(model, chunks, batch_size=8, min_k=0.2):
    """engine.evaluate.score_chunks as it was before bench/eval_pass.py measured it: a log-softmax
    per row over its valid positions (bench/eval_pass.py's `_rows` yields those logits), the
    figures the batched statistics must keep."""
    import zlib

    import numpy as np
    import torch

    from engine.evaluate import ATTACKS, min_k_mean

    model.eval()
    nll_sum, n_tok, mia = [], [], {a: [] for a in ATTACKS}
    for i, logits, target in load("eval_pass")._rows(model, chunks, batch_size):
        logp_all = torch.log_softmax(logits, dim=-1)
        tok_logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        p = logp_all.exp()
        mu = (p * logp_all).sum(-1)
        sigma = ((p * logp_all.square()).sum(-1) - mu.square()).clamp(min=1e-12).sqrt()
        tok = tok_logp.double().numpy()
        z = ((tok_logp - mu) / sigma).double().numpy()
        nll, n = -tok.sum(), len(tok)
        nll_sum.append(nll)
        n_tok.append(n)
        mia["loss"].append(-nll / n)
        mia["zlib"].append(-(nll / n) / max(1, len(zlib.compress(chunks.texts[i].encode("utf-8")))))
        mia["min_k"].append(min_k_mean(tok, min_k))
        mia["min_k_pp"].append(min_k_mean(z, min_k))
    return np.array(nll_sum), np.array(n_tok), {a: np.array(v) for a, v in mia.items()}


@pytest.mark.parametrize("elements", [None, 1])  # the default groups, and one row at a time
def test_batched_evaluation_keeps_every_figure(tiny_model, tiny_sets, monkeypatch, elements):
    """score_chunks computes its statistics for a group of rows at once; on the tiny fixture model
    every per-chunk figure, perplexity and AUC stays within 1e-6 of the per-row loop's."""
    import numpy as np

    import engine.evaluate as ev

    if elements is not None:
        monkeypatch.setattr(ev, "STATS_ELEMENTS", elements)
    scores = {}
    for role, chunks in tiny_sets.items():
        nll, n, mia = per_row_scores(tiny_model, chunks)
        got = ev.score_chunks(tiny_model, chunks)
        assert (got.n_tokens == n).all()
        np.testing.assert_allclose(got.nll_sum, nll, rtol=1e-6, atol=0)
        for a in ev.ATTACKS:
            np.testing.assert_allclose(got.mia[a], mia[a], rtol=1e-6, atol=1e-9)
        scores[role] = ev.SetScores(nll, n, mia)
    metrics, _ = ev.evaluate(tiny_model, tiny_sets)
    for role, s in scores.items():
        assert metrics[f"ppl_{role}"] == pytest.approx(s.ppl, rel=1e-6)
    assert metrics["mia_auc"] == pytest.approx(ev.mia_auc(scores["forget"], scores["unseen"]), abs=1e-6)
