"""The heatmap draws line by line and, on new values, redraws only the rows that changed: after every
step (new values, cursor, marks, focus, scale, metric) the screen must be the one a heatmap made
afresh in that state shows. Grids come from a real store (tests/app/app_stores.py)."""
from __future__ import annotations

import asyncio
import re
from dataclasses import replace

import pytest
from textual.app import App, ComposeResult
from textual.widgets import Static

from studies.reading.grid import Cell, Grid, grids, load_cells
from studies.store.db import Store
from studies.store.states import CellStatus
from tests.app.app_stores import make_study
from tests.studies_helpers import make_forget_set
from tui.app.messages import CellRef
from tui.app.widgets.heatmap import HEADER_LINES, HeatmapGrid

MODEL = "test-org/tiny-model"  # a hub-style id: nothing here loads a model
SIZE = (110, 16)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, forget_set_files) -> Grid:
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('heatmap') / 'lab.db'}")
    make_forget_set(store, "people", forget_set_files)
    make_study(store, "sweep", MODEL, "people", methods=("ga",), lrs=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
               steps=(5, 10, 20, 40), fill=0.6, running=1, diverge={("ga", 1e-4): 10})
    return grids(load_cells(store, "sweep"))["ga"]


class Counting(HeatmapGrid):
    """Counts the lines it builds (what a redraw costs)."""

    def __init__(self, *args, **kw) -> None:
        self.built: list[int] = []
        super().__init__(*args, **kw)

    def _make_line(self, y: int):
        self.built.append(y)
        return super()._make_line(y)


class Harness(App):
    def __init__(self, grid: Grid, **kw) -> None:
        super().__init__()
        self.grid, self.kw = grid, kw

    def compose(self) -> ComposeResult:
        yield Static("above", id="above")
        yield Counting(self.grid, study="sweep", id="heatmap", **self.kw)


def with_row(grid: Grid, lr: float, **values) -> Grid:
    """The grid with one row's cells given new values (a run's fresh milestones)."""
    cells = {k: (replace(c, **values) if k[0] == lr else c) for k, c in grid.cells.items()}
    return Grid(grid.method, list(grid.lrs), list(grid.steps), cells)


def screen_of(app: App) -> str:
    return re.sub(r"terminal-\d+", "terminal", app.export_screenshot())


async def fresh_screen(grid: Grid, metric: str, scale, cursor, marked, focused: bool) -> str:
    """What a heatmap made afresh in this state shows."""
    app = Harness(grid, metric=metric, scale=scale)
    async with app.run_test(size=SIZE) as pilot:
        heatmap = app.query_one(HeatmapGrid)
        heatmap.move_cursor(*cursor)
        heatmap.mark(marked)
        if focused:
            heatmap.focus()
        else:
            app.set_focus(None)
        await pilot.pause()
        return screen_of(app)


def test_updates_draw_what_a_fresh_heatmap_draws(grid):
    done = grid.lrs[0]
    values = {"status": CellStatus.DONE, "score": 0.01, "success": True}

    async def go():
        app = Harness(grid)
        async with app.run_test(size=SIZE) as pilot:
            heatmap = app.query_one(HeatmapGrid)
            app.set_focus(None)
            await pilot.pause()

            async def check(what: str) -> None:
                await pilot.pause()
                expected = await fresh_screen(heatmap.grid, heatmap.metric, heatmap.scale, heatmap.cursor,
                                              heatmap.marked, heatmap.has_focus)
                assert screen_of(app) == expected, what

            await check("first")
            heatmap.focus()
            await pilot.press("down", "right", "space")
            await check("cursor and mark")
            heatmap.built.clear()
            heatmap.update_grid(with_row(grid, done))  # new cell objects, equal values
            await pilot.pause()
            assert heatmap.built == []  # the same cells: nothing redrawn
            row = grid.lrs[-1]
            heatmap.scale = (0.0, 5.0)  # a shared scale: a row's new values leave the others as they are
            await pilot.pause()
            heatmap.built.clear()
            heatmap.update_grid(with_row(grid, row, **values))
            await check("one row new, shared scale")
            assert sorted(heatmap.built) == [0, HEADER_LINES + grid.lrs.index(row)]  # the title and that row
            heatmap.scale = None  # its own scale: the colours of every row follow the new range
            await check("own scale")
            heatmap.update_grid(with_row(with_row(grid, row, **values), grid.lrs[1], status=CellStatus.FAILED))
            await check("own scale, a row failed")
            heatmap.metric = "mia_auc.loss"
            await check("metric")
            cells = dict(heatmap.grid.cells)
            for s in grid.steps:  # a new, lower lr: every row moves down
                cells[(1e-6, s)] = Cell("ga", 1e-6, s, CellStatus.PENDING)
            heatmap.update_grid(Grid("ga", [1e-6, *grid.lrs], list(grid.steps), cells))
            await check("a new row")
            heatmap.mark([CellRef("sweep", "ga", 1e-6, grid.steps[-1])])
            app.set_focus(None)
            await check("marked, unfocused")

    asyncio.run(go())
