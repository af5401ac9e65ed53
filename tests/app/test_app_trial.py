"""The walkable heatmap, the trial screen and the compare screen, driven with Pilot over a real store
(tests/app/app_stores.py)."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from textual.app import App, ComposeResult
from textual.widgets import DataTable, Static

from studies.reading.grid import Cell, Grid, grids, load_cells
from studies.store.states import CellStatus
from tui.app.messages import CellRef, ExportRequested
from tui.app.screens.compare import CompareScreen
from tui.app.screens.trial import TrialScreen
from tui.app.widgets.curves import Curves
from tui.app.widgets.heatmap import CELL_WIDTH, COMPARE_MARK, HEADER_LINES, LR_WIDTH, HeatmapGrid


@pytest.fixture(scope="module")
def done_grids(store) -> dict[str, Grid]:
    return grids(load_cells(store, "sweep-done"))


class GridHarness(App):
    """One heatmap, focused; every message it posts is kept."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.grid = grid
        self.posted: list = []

    def compose(self) -> ComposeResult:
        yield HeatmapGrid(self.grid, study="sweep-done", id="heatmap")

    def on_mount(self) -> None:
        self.query_one(HeatmapGrid).focus()

    def on_heatmap_grid_cell_highlighted(self, message: HeatmapGrid.CellHighlighted) -> None:
        self.posted.append(message)

    def on_heatmap_grid_cell_chosen(self, message: HeatmapGrid.CellChosen) -> None:
        self.posted.append(message)

    def on_heatmap_grid_mark_toggled(self, message: HeatmapGrid.MarkToggled) -> None:
        self.posted.append(message)


class ScreenHarness(App):
    """Pushes one screen; keeps the ExportRequested messages that reach the app."""

    def __init__(self, screen) -> None:
        super().__init__()
        self.first = screen
        self.exports: list[ExportRequested] = []

    def on_mount(self) -> None:
        self.push_screen(self.first)

    def on_export_requested(self, message: ExportRequested) -> None:
        self.exports.append(message)


def run(coro):
    return asyncio.run(coro)


async def settle(app, pilot) -> None:
    """Let the screen's thread workers finish and their messages be handled."""
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def plain(widget: HeatmapGrid) -> str:
    return widget.render().plain


# ---------------------------------------------------------------- heatmap

def test_heatmap_shows_values_states_and_title(done_grids):
    async def go():
        app = GridHarness(done_grids["ga_gd"])
        async with app.run_test(size=(80, 24)):
            text = plain(app.query_one(HeatmapGrid))
            lines = text.splitlines()
            assert lines[0].startswith("ga_gd") and "robust 11%" in lines[0] and "best 1e-04×20" in lines[0]
            assert ["5", "10", "20"] == lines[1].split()[1:]
            assert [ln.split()[0].strip("[") for ln in lines[2:]] == ["1e-05", "1e-04", "1e-03"]
            assert lines[3].count("✓") == 1 and "div" in lines[4]
            assert app.query_one(HeatmapGrid).region.width <= 80
            assert app.query_one(HeatmapGrid).region.height == HEADER_LINES + 3
    run(go())


def test_heatmap_cursor_walks_with_arrows_and_enter_chooses(done_grids):
    async def go():
        app = GridHarness(done_grids["ga"])
        async with app.run_test(size=(80, 24)) as pilot:
            heatmap = app.query_one(HeatmapGrid)
            await pilot.press("down", "right", "right")
            await pilot.pause()
            assert heatmap.cursor == (1, 2)
            highlighted = [m.cell for m in app.posted if isinstance(m, HeatmapGrid.CellHighlighted)]
            assert highlighted[-1] == CellRef("sweep-done", "ga", 1e-4, 20) and len(highlighted) == 3
            await pilot.press("right", "down", "down", "down")  # clamped at the edges
            await pilot.pause()
            assert heatmap.cursor == (2, 2)
            await pilot.press("up", "left", "enter")
            await pilot.pause()
            chosen = [m for m in app.posted if isinstance(m, HeatmapGrid.CellChosen)]
            assert [m.cell for m in chosen] == [CellRef("sweep-done", "ga", 1e-4, 10)]
            assert chosen[0].control is heatmap
    run(go())


def test_heatmap_click_moves_the_cursor(done_grids):
    async def go():
        app = GridHarness(done_grids["ga"])
        async with app.run_test(size=(80, 24)) as pilot:
            heatmap = app.query_one(HeatmapGrid)
            x = heatmap.styles.padding.left + LR_WIDTH + 2 * CELL_WIDTH + 4
            await pilot.click(HeatmapGrid, offset=(x, HEADER_LINES + 2))
            await pilot.pause()
            assert heatmap.cursor == (2, 2)
            assert app.posted[-1].cell == CellRef("sweep-done", "ga", 1e-3, 20)
            await pilot.click(HeatmapGrid, offset=(x, 0))  # the title: no cell
            await pilot.pause()
            assert heatmap.cursor == (2, 2)
    run(go())


def test_heatmap_double_click_chooses(done_grids):
    async def go():
        app = GridHarness(done_grids["ga"])
        async with app.run_test(size=(80, 24)) as pilot:
            x = app.query_one(HeatmapGrid).styles.padding.left + LR_WIDTH + CELL_WIDTH + 4
            await pilot.double_click(HeatmapGrid, offset=(x, HEADER_LINES + 1))
            await pilot.pause()
            chosen = [m.cell for m in app.posted if isinstance(m, HeatmapGrid.CellChosen)]
            assert chosen == [CellRef("sweep-done", "ga", 1e-4, 10)]
    run(go())


def test_heatmap_of_six_steps_fits_80_columns():
    steps = [5, 10, 20, 40, 80, 160]
    lrs = [1e-5, 2.5e-4, 1e-3]
    cells = {(lr, s): Cell("ga", lr, s, CellStatus.DONE, metrics={"score": -12345.6 * (i + 1)}, score=-12345.6 * (i + 1))
             for i, (lr, s) in enumerate((lr, s) for lr in lrs for s in steps)}

    async def go():
        app = GridHarness(Grid("ga", lrs, steps, cells))
        async with app.run_test(size=(80, 24)):
            heatmap = app.query_one(HeatmapGrid)
            assert heatmap.region.right <= 80
            lines = plain(heatmap).splitlines()
            assert lines[1].split()[1:] == [str(s) for s in steps]
            assert all(len(ln) <= 78 for ln in lines) and lines[3].split()[0] == "2.5e-04"
    run(go())


def test_heatmap_marks_cells_for_compare(done_grids):
    async def go():
        app = GridHarness(done_grids["ga"])
        async with app.run_test(size=(80, 24)) as pilot:
            heatmap = app.query_one(HeatmapGrid)
            await pilot.press("space", "right", "space")
            await pilot.pause()
            toggles = [(m.cell.steps, m.marked) for m in app.posted if isinstance(m, HeatmapGrid.MarkToggled)]
            assert toggles == [(5, True), (10, True)]
            assert [c.steps for c in heatmap.marked] == [5, 10]
            assert plain(heatmap).count(COMPARE_MARK) == 2
            await pilot.press("space")
            await pilot.pause()
            assert [c.steps for c in heatmap.marked] == [5] and app.posted[-1].marked is False
    run(go())


def test_update_grid_keeps_the_cursor_in_place(done_grids):
    grid = done_grids["ga"]
    cells = dict(grid.cells)
    for s in grid.steps:  # a new, lower lr shifts every row down by one
        cells[(1e-6, s)] = Cell("ga", 1e-6, s, CellStatus.PENDING)
    grown = Grid("ga", [1e-6, *grid.lrs], list(grid.steps), cells)
    better = replace(grid.cells[(1e-4, 10)], score=0.001, success=True)
    grown.cells[(1e-4, 10)] = better

    async def go():
        app = GridHarness(grid)
        async with app.run_test(size=(80, 24)) as pilot:
            heatmap = app.query_one(HeatmapGrid)
            await pilot.press("down", "right", "space")
            await pilot.pause()
            heatmap.update_grid(grown)
            await pilot.pause()
            assert app.query_one(HeatmapGrid) is heatmap  # updated in place, not remounted
            assert heatmap.cursor == (2, 1) and heatmap.cursor_cell == CellRef("sweep-done", "ga", 1e-4, 10)
            assert [c.lr for c in heatmap.marked] == [1e-4]
            assert heatmap.region.height == HEADER_LINES + 4
            assert "best 1e-04×10 score 0.001✓" in plain(heatmap).splitlines()[0]
            await pilot.press("enter")
            await pilot.pause()
            assert app.posted[-1].cell == CellRef("sweep-done", "ga", 1e-4, 10)
    run(go())


def test_heatmap_metric_is_reactive(done_grids):
    async def go():
        app = GridHarness(done_grids["ga"])
        async with app.run_test(size=(80, 24)) as pilot:
            heatmap = app.query_one(HeatmapGrid)
            before = plain(heatmap)
            heatmap.metric = "mia_auc.loss"
            await pilot.pause()
            after = plain(heatmap)
            assert after != before and "[mia_auc.loss]" in after.splitlines()[0]
            assert "0.86" in after  # ga, lr 1e-04, 10 steps: the synthetic AUC
    run(go())


# ---------------------------------------------------------------- trial screen

def test_trial_screen_shows_milestones_curves_and_command(store):
    async def go():
        cell = CellRef("sweep-done", "ga_gd", 1e-4, 10)
        app = ScreenHarness(TrialScreen(store, cell))
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(app, pilot)
            screen = app.screen
            assert isinstance(screen, TrialScreen)
            table = screen.query_one("#trial-milestones", DataTable)
            assert table.row_count == 3 and table.cursor_row == 1  # on the cell's own milestone (10 steps)
            assert [str(table.get_row_at(i)[0]).strip() for i in range(3)] == ["5", "▶ 10", "20"]
            assert [str(table.get_row_at(i)[1]) for i in range(3)] == ["·", "·", "✓"]  # success, beside the step
            params = str(screen.query_one("#trial-params", Static).content)
            assert "tol_forget auto" in params and "tol_retain auto" in params  # unset: the automatic bands
            assert "eval_score 0.966" in params and "retain_eval_drift 0.0065" in params  # the objective, held out
            assert "success no (forget✗ mia✗ utility✓)" in params
            command = str(screen.query_one("#trial-command", Static).content)
            assert command.startswith("unlearn run") and "--method ga_gd" in command and "--steps 10" in command
            ppl = screen.query_one("#curve-ppl", Curves)
            assert list(ppl.series) == ["forget", "retain", "retain_eval", "unseen"] and ppl.series["forget"][0] == [5.0, 10.0, 20.0]
            assert ppl.hlines["target (θ0 unseen)"] == 20.0
            assert screen.query_one("#curve-mia", Curves).hlines["target 0.5"] == 0.5
            assert len(screen.query_one("#curve-loss", Curves).series["train loss"][0]) == 20
            assert "train tokens 20,000" in str(screen.query_one("#trial-cost", Static).content)
            body = screen.query_one("#trial-body")
            assert body.max_scroll_y > 0  # 80×24: the rest is below, reachable by scrolling
            assert all(w.region.right <= 80 for w in body.children)

            await pilot.press("y")
            await pilot.pause()
            assert app.clipboard == screen.detail["command"]
            await pilot.press("e")
            await pilot.pause()
            assert [(m.study, m.cell) for m in app.exports] == [("sweep-done", cell)]
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, TrialScreen)
    run(go())


def test_an_at_target_milestone_is_marked_with_its_step():
    from tests.app.app_stores import synthetic_cell
    from tui.app.screens.trial import milestone_columns, milestone_row

    columns = milestone_columns()
    at_target = {**synthetic_cell(1, 1, 14), "at_target": True}
    row = milestone_row(at_target, False, columns)
    assert str(row[0]).strip() == "@14" and len(row) == len(columns) + 2
    assert str(milestone_row(synthetic_cell(1, 1, 20), True, columns)[1]) == "✓"
    headers = [h for h, _ in columns]
    assert headers[:3] == ["eval_score", "forget_gap", "retain_eval_drift"]
    assert "score (retain)" in headers and "drift (retain)" in headers  # the trained-on figures say so


def test_trial_screen_of_a_running_trial(store):
    async def go():
        app = ScreenHarness(TrialScreen(store, CellRef("sweep-live", "ga_kl", 1e-4, 20)))
        async with app.run_test(size=(160, 48)) as pilot:
            await settle(app, pilot)
            screen = app.screen
            assert screen.detail["state"] == "running"
            assert screen.query_one("#trial-milestones", DataTable).row_count == 1
            assert "not known until the run finishes" in str(screen.query_one("#trial-cost", Static).content)
            assert not screen.query_one("#curve-loss", Curves).has_data
            assert screen.has_class("-wide")
            ppl, mia = screen.query_one("#curve-ppl"), screen.query_one("#curve-mia")
            assert ppl.region.y == mia.region.y and ppl.region.x < mia.region.x  # side by side when wide
    run(go())


def test_trial_screen_unknown_cell_is_one_line(store):
    async def go():
        app = ScreenHarness(TrialScreen(store, CellRef("sweep-done", "ga", 3e-4, 10)))
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(app, pilot)
            error = app.screen.query_one("#trial-error", Static)
            assert error.display and "no run at lr 0.0003" in str(error.content)
            await pilot.press("y")  # nothing to copy: a warning, no traceback
            await pilot.pause()
            assert app.clipboard == ""
    run(go())


# ---------------------------------------------------------------- compare screen

def test_compare_screen_shows_cells_and_front(store):
    cells = [CellRef("sweep-done", "ga", 1e-4, 10), CellRef("sweep-done", "ga_gd", 1e-4, 10),
             CellRef("sweep-done", "ga_gd", 1e-3, 20)]

    async def go():
        app = ScreenHarness(CompareScreen(store, cells))
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(app, pilot)
            screen = app.screen
            table = screen.query_one("#compare-table", DataTable)
            labels = [str(c.label) for c in table.columns.values()]
            assert labels == ["metric", "A ga 1e-04×10", "B ga_gd 1e-04×10", "C ga_gd 1e-03×20"]
            assert [str(v) for v in table.get_row("status")] == ["status", "done", "done", "diverged"]
            # ga_gd at 1e-04 × 10 beats ga there on both axes (a lower gap, no drift): the front is B alone
            assert screen.comparison["front"] == [1]
            assert [str(v) for v in table.get_row("pareto")] == ["Pareto front", "", "★", ""]
            plot = screen.query_one("#compare-pareto", Curves)
            assert plot.front is not None and len(plot.front[0]) == 1
            assert sorted(t.strip() for t, _, _ in plot.labels) == ["A", "B"]  # C diverged: not plotted
            front = str(screen.query_one("#compare-front", Static).content)
            assert "B" in front and "not plotted" in front and "C" in front
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, CompareScreen)
    run(go())


def test_compare_screen_refusal_is_one_line(store):
    async def go():
        app = ScreenHarness(CompareScreen(store, [CellRef("sweep-done", "ga", 1e-4, 10)]))
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(app, pilot)
            error = app.screen.query_one("#compare-error", Static)
            assert error.display and "at least two" in str(error.content)
    run(go())
