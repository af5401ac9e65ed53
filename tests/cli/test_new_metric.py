"""A metric added in one place, the registry (engine/metric_registry.py), shows everywhere a metric
shows: `study heatmap --metric` accepts it, the app's metric picker and trial tables offer it, the
compare table and the export carry it. Nothing else is edited for it."""
from __future__ import annotations

import asyncio
import json

import pytest
from textual.app import App
from textual.widgets import DataTable, Select

from engine.metric_registry import LISTED, LOWER, Metric, registered
from tests.cli.metric_store import metric_store
from tests.studies_helpers import cli_in_process

NEW = Metric("edit_norm", "edit", "", LOWER, "weights", "‖θ − θ0‖: how far the weights moved", tier=LISTED)


@pytest.fixture
def url(tmp_path):
    with registered(NEW):
        yield metric_store(tmp_path / "lab.db", edit_norm=0.25)


def test_the_cli_accepts_it_and_exports_it(url, capsys):
    p = cli_in_process(capsys, "study", "heatmap", "s", "--metric", NEW.path, "--storage", url, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ga"]["values"] == [[0.25, 0.25]]
    p = cli_in_process(capsys, "study", "heatmap", "s", "--metric", NEW.path, "--storage", url)
    assert p.returncode == 0 and "lower = greener" in p.stdout, p.stderr
    p = cli_in_process(capsys, "export", "s", "--format", "json", "--storage", url)
    assert p.returncode == 0, p.stderr
    [entry] = json.loads(p.stdout)
    assert entry["metrics"][NEW.path] == 0.25

    from studies.reading.export import model_card

    assert f"| {NEW.path} | 0.25 |" in model_card(entry, entry["metrics"], {})


def test_the_lab_reads_it_into_the_compare_and_trial_tables(url):
    from studies.reading.trials import compare_cells
    from studies.reading.views import trial_page
    from studies.store.db import Store

    store = Store(url)
    compared = compare_cells(store, [("s", "ga", 1e-4, 5), ("s", "ga", 1e-4, 10)])
    assert NEW.path in compared["metrics"] and compared["cells"][0]["values"][NEW.path] == 0.25
    page = trial_page(store, "s", sort=NEW.path)
    assert [row[NEW.path] for row in page.rows] == [0.25, 0.25]


class Harness(App):
    refresh_s = 0.2  # what a DashboardScreen reads of its app

    def __init__(self, screen) -> None:
        super().__init__()
        self.first = screen

    def on_mount(self) -> None:
        self.push_screen(self.first)


def test_the_app_offers_it_in_the_picker_and_the_trial_tables(url):
    from studies.store.db import Store
    from tui.app.messages import CellRef
    from tui.app.screens.dashboard import DashboardScreen
    from tui.app.screens.trial import TrialScreen

    async def labels_of(screen, table_id: str, ready) -> list[str]:
        app = Harness(screen)
        async with app.run_test(size=(160, 48)) as pilot:
            for _ in range(100):
                await pilot.pause(0.05)
                if ready(app.screen):
                    break
            await app.workers.wait_for_complete()
            await pilot.pause()
            if isinstance(screen, DashboardScreen):
                picker = app.screen.query_one("#metric", Select)
                assert NEW.path in [str(value) for _, value in picker._options]  # Select has no public getter
            return [str(c.label) for c in app.screen.query_one(table_id, DataTable).columns.values()]

    store = Store(url)
    dashboard = DashboardScreen(store, "s", read_devices=False)
    assert NEW.path in asyncio.run(labels_of(dashboard, "#trials", lambda s: s.query_one("#trials").row_count))
    trial = TrialScreen(store, CellRef("s", "ga", 1e-4, 10))
    assert NEW.path in asyncio.run(labels_of(trial, "#trial-milestones", lambda s: s.detail is not None))
