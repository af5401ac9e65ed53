"""The benchmarks' own checks can fail: bench/prefix_sharing.py matches cells by step (any order of
--steps) and never counts two cells without a score as identical; bench/app_first_paint.py reports
what it measured in the agreed JSON."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell(step, score, diverged=False):
    return {"step": step, "score": score, "diverged": diverged}


def test_prefix_sharing_matches_cells_by_step():
    compare = load("prefix_sharing").compare_cells
    shared = [cell(5, 0.5), cell(10, 0.4), cell(20, 0.3)]
    naive = {20: cell(20, 0.3), 5: cell(5, 0.5), 10: cell(10, 0.4)}
    assert compare([20, 5, 10], shared, naive) == []
    assert compare([20, 5, 10], shared, {**naive, 10: cell(10, 0.41)}) == [
        "step 10: scores differ, shared 0.4 vs naive 0.41"]


def test_prefix_sharing_never_calls_diverged_cells_identical():
    compare = load("prefix_sharing").compare_cells
    shared = [cell(5, 0.5), cell(10, None, True)]
    problems = compare([5, 10], shared, {5: cell(5, 0.5), 10: cell(10, None, True)})
    assert len(problems) == 1 and problems[0].startswith("step 10: no score to compare")
    assert compare([5, 10], shared[:1], {5: cell(5, 0.5), 10: cell(10, 0.2)}) == ["step 10: missing from the shared run"]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")
def test_app_first_paint_reports_every_command_and_the_target():
    """bench/app_first_paint.py on the 10,250-trial test store: the JSON names the three commands
    measured side by side and the 1 s target; whether it passes is the benchmark's call, not this
    test's (timings belong in benchmarks)."""
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
