"""The app end to end on a store made through the studies API (tests/app/app_stores.py): the studies
list, the live dashboard and the navigation between screens, driven with Textual's Pilot."""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.app.app_stores import app_store
from tests.app.pilot_helpers import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, tiny_model_dir, forget_set_files):
    path = tmp_path_factory.mktemp("app") / "lab.db"
    app_store(path, tiny_model_dir, forget_set_files)
    return f"sqlite:///{path}"


def make_app(url: str, **kwargs):
    from tui.app.app import create_app

    kwargs.setdefault("refresh_s", 0.2)
    return create_app(url, **kwargs)


def test_studies_screen_lists_every_study_and_enter_opens_the_dashboard(store_url):
    from textual.widgets import DataTable

    from tui.app.screens.dashboard import DashboardScreen
    from tui.app.screens.studies import StudiesScreen
    from tui.app.widgets.heatmap import HeatmapGrid

    async def go():
        app = make_app(store_url)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, StudiesScreen)
                             and app.screen.query_one("#studies", DataTable).row_count == 2, what="two studies")
            table = app.screen.query_one("#studies", DataTable)
            assert [table.get_row_at(i)[0] for i in range(2)] == ["sweep-done", "sweep-live"]
            assert table.get_row_at(0)[1] == "done" and table.get_row_at(1)[1] == "running"
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen)
                             and len(app.screen.query(HeatmapGrid)) == 2, what="a heatmap per method")
            assert [w.grid.method for w in app.screen.query(HeatmapGrid)] == ["ga", "ga_gd"]
            await wait_until(pilot, lambda: app.screen.query_one("#trials", DataTable).row_count == 18, what="18 trials")
            await pilot.press("escape")
            assert isinstance(app.screen, StudiesScreen)

    asyncio.run(go())


@pytest.fixture
def fresh_store(tmp_path, tiny_model_dir, forget_set_files):
    """A store this test may change."""
    return app_store(tmp_path / "lab.db", tiny_model_dir, forget_set_files)


async def studies_ready(pilot, app, n: int = 2):
    from textual.widgets import DataTable

    from tui.app.screens.studies import StudiesScreen

    await wait_until(pilot, lambda: isinstance(app.screen, StudiesScreen)
                     and app.screen.query_one("#studies", DataTable).row_count == n, what=f"{n} studies")
    return app.screen.query_one("#studies", DataTable)


def cell_text(table, row: str, column: str) -> str:
    return str(table.get_cell(row, column))


def test_a_state_change_shows_within_two_seconds_and_rows_are_updated_in_place(fresh_store):
    from studies.lifecycle.study import set_state
    from studies.store.states import StudyState

    async def go():
        app = make_app(fresh_store.url, refresh_s=1.0)
        async with app.run_test(size=(80, 24)) as pilot:
            table = await studies_ready(pilot, app)
            rows_before = list(table.rows)
            set_state(fresh_store, "sweep-live", StudyState.PAUSED)
            t0 = time.monotonic()
            await wait_until(pilot, lambda: cell_text(table, "sweep-live", "state") == "paused", timeout=2.5,
                             what="the paused state")
            print(f"state change visible after {time.monotonic() - t0:.2f} s")
            assert list(table.rows) == rows_before  # the same rows, updated: never cleared and refilled

    asyncio.run(go())


def test_pause_resume_cancel_and_delete_from_the_studies_screen(fresh_store):
    from studies.store.states import StudyState
    from tui.app.screens.confirm import ConfirmDialog

    async def go():
        app = make_app(fresh_store.url)
        async with app.run_test(size=(80, 24)) as pilot:
            table = await studies_ready(pilot, app)
            await pilot.press("down")  # sweep-live (running)
            await pilot.press("d")  # a running study is never deleted
            await pilot.pause(0.3)
            assert not isinstance(app.screen, ConfirmDialog)
            assert fresh_store.study("sweep-live").state == StudyState.RUNNING
            await pilot.press("p")
            await wait_until(pilot, lambda: cell_text(table, "sweep-live", "state") == "paused", what="paused")
            await pilot.press("p")
            await wait_until(pilot, lambda: cell_text(table, "sweep-live", "state") == "running", what="resumed")
            await pilot.press("c")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="the cancel question")
            await pilot.press("n")  # refused: nothing changes
            await pilot.pause(0.3)
            assert fresh_store.study("sweep-live").state == StudyState.RUNNING
            await pilot.press("c")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="the cancel question")
            await pilot.press("y")
            await wait_until(pilot, lambda: cell_text(table, "sweep-live", "state") == "cancelled", what="cancelled")
            await pilot.press("up", "d")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="the delete question")
            await pilot.press("y")
            await wait_until(pilot, lambda: table.row_count == 1, what="the deleted row to go")
            assert cell_text(table, "sweep-live", "state") == "cancelled"

    asyncio.run(go())
    import optuna

    assert "sweep-done" not in optuna.get_all_study_names(fresh_store.optuna)


def test_the_filter_hides_rows_and_escape_brings_them_back(store_url):
    async def go():
        app = make_app(store_url)
        async with app.run_test(size=(80, 24)) as pilot:
            table = await studies_ready(pilot, app)
            await pilot.press("slash", *"live")
            await wait_until(pilot, lambda: table.row_count == 1, what="one row")
            assert table.get_row_at(0)[0] == "sweep-live"
            await pilot.press("enter", "escape")
            await wait_until(pilot, lambda: table.row_count == 2, what="both rows again")

    asyncio.run(go())


def test_the_dashboard_follows_new_cells_incrementally(fresh_store):
    """A milestone written while the dashboard is open: its heatmap cell and a new trial row show
    up; the rows already there stay (updated in place, never cleared)."""
    from sqlmodel import select
    from textual.widgets import DataTable

    from studies.lifecycle.spec import StudySpec
    from studies.running.recorder import record_cell
    from studies.store.db import Run
    from studies.store.states import CellStatus
    from tests.app.app_stores import synthetic_cell
    from tui.app.messages import OpenStudy
    from tui.app.screens.dashboard import DashboardScreen
    from tui.app.widgets.heatmap import HeatmapGrid

    async def go():
        app = make_app(fresh_store.url)
        async with app.run_test(size=(80, 24)) as pilot:
            await studies_ready(pilot, app)
            app.post_message(OpenStudy("sweep-live"))
            await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen)
                             and app.screen.query_one("#trials", DataTable).row_count == 4, what="4 trials")
            table = app.screen.query_one("#trials", DataTable)
            heat = app.screen.query_one(HeatmapGrid)
            keys_before = list(table.rows)
            study = fresh_store.study("sweep-live")
            with fresh_store.read() as s:
                run = s.exec(select(Run).where(Run.study_id == study.id, Run.state == "running")).one()
            assert heat.grid.cell(run.lr, 10).status == CellStatus.RUNNING
            record_cell(fresh_store, "sweep-live", StudySpec.from_dict(study.spec), run, synthetic_cell(0, 1, 10))
            await wait_until(pilot, lambda: table.row_count == 5, what="the new trial row")
            await wait_until(pilot, lambda: heat.grid.cell(run.lr, 10).status == CellStatus.DONE, what="the new cell")
            assert list(table.rows)[:4] == keys_before or set(keys_before) < set(table.rows)
            assert app.screen.watch_._last_id > 0

    asyncio.run(go())


def test_the_metric_picker_changes_every_heatmap(store_url):
    from engine.metric_registry import SCORE, every_run_paths
    from tui.app.messages import OpenStudy
    from tui.app.screens.dashboard import DashboardScreen
    from tui.app.widgets.heatmap import HeatmapGrid

    async def go():
        app = make_app(store_url)
        async with app.run_test(size=(80, 24)) as pilot:
            await studies_ready(pilot, app)
            app.post_message(OpenStudy("sweep-done"))
            await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen)
                             and len(app.screen.query(HeatmapGrid)) == 2, what="the heatmaps")
            assert {w.metric for w in app.screen.query(HeatmapGrid)} == {SCORE}
            await pilot.press("m")
            await pilot.pause(0.2)
            assert {w.metric for w in app.screen.query(HeatmapGrid)} == {"forget_gap"}
            await pilot.press("M", "M")  # back past the objective (eval_score) to the last metric
            await pilot.pause(0.2)
            assert {w.metric for w in app.screen.query(HeatmapGrid)} == {every_run_paths()[-1]}

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["not a database", "newer schema", "missing"])
def test_a_store_that_cannot_be_opened_shows_the_reason_and_another_can_be_picked(kind, tmp_path, store_url):
    from textual.widgets import Input, Label

    from tui.app.screens.store_error import StoreErrorScreen
    from tui.app.screens.studies import StudiesScreen

    bad = tmp_path / "bad.db"
    if kind == "not a database":
        bad.write_text("these are not the bytes of an SQLite file\n" * 10)
    elif kind == "newer schema":
        import sqlite3

        from studies.store.db import SCHEMA_VERSION

        con = sqlite3.connect(bad)
        con.execute("CREATE TABLE ul_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute("INSERT INTO ul_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION + 1),))
        con.commit()
        con.close()

    async def go():
        app = make_app(f"sqlite:///{bad}")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, StoreErrorScreen), what="the error screen")
            reason = str(app.screen.query_one("#reason", Label).render())
            assert "\n" not in reason.strip() and "Traceback" not in reason
            assert str(bad) in reason or "bad.db" in reason
            app.screen.query_one("#url", Input).value = store_url
            await pilot.press("enter")
            await studies_ready(pilot, app)
            assert isinstance(app.screen, StudiesScreen)

    asyncio.run(go())


def test_help_palette_and_themes(store_url, monkeypatch):
    from tui.app.screens.help import HelpScreen

    async def go():
        app = make_app(store_url, theme="textual-dark")
        async with app.run_test(size=(80, 24)) as pilot:
            await studies_ready(pilot, app)
            await wait_until(pilot, lambda: len(app.known_studies) == 2, what="the palette's studies")
            titles = [c.title for c in app.get_system_commands(app.screen)]
            for expected in ("New study", "Forget sets", "Settings", "Open sweep-done", "Export sweep-live",
                             "Pause sweep-live", "Cancel sweep-done"):
                assert expected in titles
            await pilot.press("question_mark")
            await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
            await pilot.press("escape")
            for theme in ("textual-light", "ansi-dark", "ansi-light", "textual-dark"):
                await pilot.press("ctrl+t")
                assert app.theme == theme

    asyncio.run(go())
    from tui.app import prefs

    assert prefs.load()["theme"] == "textual-dark"


def test_cells_marked_in_two_studies_are_compared_together(store_url):
    """Compare takes cells of any studies on the same forget set: marks live in the app, so they
    survive leaving a dashboard and show again when it reopens."""
    from tui.app.messages import OpenStudy
    from tui.app.screens.compare import CompareScreen
    from tui.app.screens.dashboard import DashboardScreen
    from tui.app.widgets.heatmap import HeatmapGrid

    async def open_dashboard(pilot, app, name):
        app.post_message(OpenStudy(name))
        await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.study == name
                         and len(app.screen.query(HeatmapGrid)) > 0, what=f"the {name} dashboard")
        app.screen.query(HeatmapGrid).first().focus()
        await pilot.pause(0.1)

    async def go():
        app = make_app(store_url)
        async with app.run_test(size=(80, 24)) as pilot:
            await studies_ready(pilot, app)
            await open_dashboard(pilot, app, "sweep-done")
            await pilot.press("space")
            await pilot.press("escape")
            await open_dashboard(pilot, app, "sweep-live")
            await pilot.press("space", "C")
            await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), what="the compare screen")
            assert sorted(c.study for c in app.screen.cells) == ["sweep-done", "sweep-live"]
            await pilot.press("escape", "escape")
            await open_dashboard(pilot, app, "sweep-done")
            assert [c.steps for c in app.screen.query(HeatmapGrid).first().marked] == [5]

    asyncio.run(go())
