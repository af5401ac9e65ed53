"""Grid.value and Grid.status read every cell as Cell.value and Cell.status do (their fast paths
for the heatmap of a large study must not change a figure)."""
from __future__ import annotations

import math

from engine.metric_registry import paths
from studies.reading.grid import Cell, grids
from studies.store.states import CellStatus


def _cells() -> list[Cell]:
    out = []
    lrs, steps = (1e-4, 3e-4, 1e-3), (5, 10, 20, 40)
    odd = [None, math.nan, math.inf, True, "x", 2, {"loss": 0.5}]
    for i, lr in enumerate(lrs):
        for j, s in enumerate(steps):
            k = i * len(steps) + j
            status = CellStatus.DONE if k % 5 else list(CellStatus)[(k // 5) % len(CellStatus)]
            metrics = {"forget_gap": odd[k % len(odd)], "retain_drift": 0.1 * k,
                       "mia_auc": {"loss": odd[(k + 1) % len(odd)], "zlib": 0.6} if k % 3 else "broken",
                       "score": 1.5 * k}
            score = None if k % 4 == 0 else (math.nan if k % 4 == 1 else 0.25 * k)
            if k == 5:
                metrics = None
            # a status given as its plain string, as a caller may build a Cell
            out.append(Cell("ga", lr, s, str(status) if k % 2 else status, metrics=metrics, score=score))
    out.pop(7)  # a missing cell reads as pending
    return out


def test_grid_values_equal_each_cells_own_value():
    cells = _cells()
    g = grids(cells)["ga"]
    for metric in paths() + ("downstream.arc_easy",):
        want = [[(c.value(metric) if (c := g.cell(lr, s)) is not None and c.computed else None) for s in g.steps]
                for lr in g.lrs]
        assert g.value(metric) == want, metric
    assert g.status() == [[str(c.status) if (c := g.cell(lr, s)) is not None else "pending" for s in g.steps]
                          for lr in g.lrs]
    assert any(v is not None for row in g.value("score") for v in row)
