"""Snapshots (SVG, pytest-textual-snapshot) of the main screens at 80×24 and 160×48.

The store is made through the studies API with fixed metrics (tests/app/app_stores.py) at a fixed
path, with a hub-style model id and the forget set's files in a fixed folder, so nothing on
screen depends on the machine, the clock or pytest's temporary paths. Device readings are off
(they would differ on every run). Update after a deliberate change with `--snapshot-update`
and look at the SVGs (tests/app/__snapshots__/) before committing them."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.app.app_stores import app_store

SNAP = Path(tempfile.gettempdir()) / "unlearn-lab-snapshots"
SIZES = {"80x24": (80, 24), "160x48": (160, 48)}
# one pytest-xdist worker: the store lives at the fixed path SNAP
pytestmark = [pytest.mark.timeout(180), pytest.mark.xdist_group("app_snapshots")]


@pytest.fixture(scope="module")
def snapshot_store(tiny_model_dir, forget_set_files):
    shutil.rmtree(SNAP, ignore_errors=True)
    (SNAP / "data").mkdir(parents=True)
    (SNAP / "store").mkdir()
    files = {}
    for role, path in forget_set_files.items():
        files[role] = str(SNAP / "data" / Path(path).name)
        shutil.copy(path, files[role])
    app_store(SNAP / "store" / "lab.db", tiny_model_dir, files, model="example-org/tiny-llama")
    return f"sqlite:///{SNAP / 'store' / 'lab.db'}"


@pytest.fixture
def make_app(snapshot_store, monkeypatch):
    monkeypatch.chdir(SNAP / "data")  # the builder's directory tree and the export's default path

    def make():
        from tui.app.app import create_app

        return create_app(snapshot_store, refresh_s=0.5, theme="textual-dark", read_devices=False)

    return make


async def settle(pilot, predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.1)
        if predicate(pilot.app):
            await pilot.pause(0.5)  # the last posted messages land
            from textual.widgets import Input

            for box in pilot.app.screen.query(Input):  # a blinking cursor would make the picture a coin toss
                box.cursor_blink = False
            await pilot.pause(0.1)
            return
    raise AssertionError("the screen never finished loading")


def _measured(table) -> bool:
    """True once the table has measured its rows (it does so when next idle): every column at least
    as wide as its widest cell. A picture taken before that shows columns as wide as their labels."""
    from rich.text import Text

    for key, column in table.columns.items():
        cells = table.get_column(key)
        widest = max((c.cell_len if isinstance(c, Text) else Text.from_markup(str(c)).cell_len for c in cells),
                     default=0)
        if column.content_width < widest:
            return False
    return True


def _studies_ready(app) -> bool:
    from textual.widgets import DataTable

    from tui.app.screens.studies import StudiesScreen

    if not (isinstance(app.screen, StudiesScreen) and app.screen.query_one("#studies", DataTable).row_count == 2):
        return False
    # The table measures its new rows when it is next idle; a dialog opened before that would
    # cover a table whose columns are still as wide as their labels.
    widths = {str(k.value): c.content_width for k, c in app.screen.query_one("#studies", DataTable).columns.items()}
    return widths["name"] >= len("sweep-done") and widths["model"] >= len("tiny-llama")


def _dashboard_ready(app) -> bool:
    from textual.widgets import DataTable

    from tui.app.screens.dashboard import DashboardScreen
    from tui.app.widgets.heatmap import HeatmapGrid

    if not (isinstance(app.screen, DashboardScreen) and len(app.screen.query(HeatmapGrid)) == 2):
        return False
    trials = app.screen.query_one("#trials", DataTable)
    return trials.row_count == 18 and _measured(trials)


async def studies_drawn(pilot):
    """The studies table filled, measured (on idle) and drawn again with its final widths."""
    from textual.widgets import DataTable

    await settle(pilot, _studies_ready)
    table = pilot.app.screen.query_one("#studies", DataTable)
    table.refresh()
    await pilot.pause(0.5)


async def open_studies(pilot):
    await studies_drawn(pilot)


async def open_dashboard(pilot):
    await studies_drawn(pilot)
    await pilot.press("enter")
    await settle(pilot, _dashboard_ready)


async def open_trial(pilot):
    from tui.app.screens.trial import TrialScreen

    await open_dashboard(pilot)
    await pilot.press("down", "right", "enter")  # ga, lr 1e-4 × 10 steps
    await settle(pilot, lambda app: isinstance(app.screen, TrialScreen) and app.screen.detail is not None)


async def open_builder(pilot):
    from tui.app.screens.forgetset_builder import ForgetSetBuilderScreen

    await studies_drawn(pilot)
    await pilot.press("f")
    await settle(pilot, lambda app: isinstance(app.screen, ForgetSetBuilderScreen))


async def open_export(pilot):
    from tui.app.screens.export import ExportDialog

    await studies_drawn(pilot)
    await pilot.press("e")
    await settle(pilot, lambda app: isinstance(app.screen, ExportDialog))


SCREENS = {"studies": open_studies, "dashboard": open_dashboard, "trial": open_trial, "builder": open_builder,
           "export": open_export}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("screen", list(SCREENS))
def test_snapshot(screen, size, make_app, snap_compare):
    assert snap_compare(make_app(), terminal_size=SIZES[size], run_before=SCREENS[screen])
