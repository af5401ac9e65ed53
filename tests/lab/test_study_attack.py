"""`unlearn study attack NAME --attacks ...`: each method's best cell rerun with the attacks (on
CPU bitwise the stored cell) and what they found written into that cell."""
from __future__ import annotations

import json

import pytest

from studies.reading.grid import best_cell, load_cells
from studies.store.db import Store
from tests.studies_helpers import assert_one_line_error, cli, cli_in_process, cli_main, make_forget_set


@pytest.mark.slow  # a whole study through its scheduler and run subprocesses
def test_attacks_at_the_best_cells_land_in_those_cells(tmp_path, forget_set_files, tiny_model_dir, capsys):
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    make_forget_set(Store(url), "fs", forget_set_files)
    assert cli_main("study", "create", "A", "--model", tiny_model_dir, "--forget-set", "fs", "--methods", "ga,ga_gd",
                    "--lr", "3e-3", "--steps", "2,4", "--storage", url) == 0
    r = cli("study", "run", "A", "--workers", "1", "--storage", url, home=tmp_path / "home")
    assert r.returncode == 0, r.stderr

    p = cli_in_process(capsys, "study", "attack", "A", "--attacks", "quant8,relearn", "--json", "--storage", url)
    assert p.returncode == 0, p.stderr
    rows = {r["method"]: r for r in json.loads(p.stdout)}
    assert set(rows) == {"ga", "ga_gd"}
    store = Store(url)
    cells = load_cells(store, "A")
    for method, row in rows.items():
        best = best_cell(cells, method)
        assert (row["lr"], row["steps"], row["score"]) == (best.lr, best.steps, best.score)
        assert row["reproduced"] and row["rerun_score"] == best.score  # CPU: the same cell, bitwise
        assert best.metrics["relearn_recovery"] == row["relearn_recovery"]
        assert set(best.metrics["attacks"]) == {"relearn", "quant8"}
        others = [c for c in cells if c.method == method and c.steps != best.steps]
        assert all("attacks" not in (c.metrics or {}) for c in others)  # only the best cell was attacked
    heat = json.loads(cli_in_process(capsys, "study", "heatmap", "A", "--metric", "quant8_recovery", "--json",
                                     "--storage", url).stdout)
    assert sum(v is not None for row in heat["ga"]["values"] for v in row) == 1
    robust = json.loads(cli_in_process(capsys, "study", "heatmap", "A", "--metric", "attack_robustness", "--json",
                                       "--storage", url).stdout)  # relearn and a quantization attack ran: one figure
    for method, row in rows.items():
        values = [v for line in robust[method]["values"] for v in line if v is not None]
        assert values == ([row["attack_robustness"]] if row["attack_robustness"] is not None else [])
        assert 0 <= (row["attack_robustness"] or 0) <= 1

    for args, needle in ((["--attacks", ""], "name at least one"), (["--attacks", "relearn", "--method", "npo"],
                                                                      "has no method 'npo'")):
        assert_one_line_error(cli_in_process(capsys, "study", "attack", "A", *args, "--storage", url), needle)
