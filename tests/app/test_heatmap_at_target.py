"""The app's heatmap has the "at target" column `study heatmap` has: each lr row's at-target cell
(value and step) from the live watch, "never" for a row whose run did not reach the target, and no
column for a method none of whose runs did."""
from __future__ import annotations

import asyncio

from textual.app import App, ComposeResult

from studies.lifecycle.spec import study_spec
from studies.reading.grid import grids, load_at_target, load_cells
from studies.reading.views import StudyWatch
from studies.running.recorder import record_cell
from studies.store.db import Store
from tests.app.app_stores import make_study, synthetic_cell
from tests.studies_helpers import make_forget_set, runs_of
from tui.app.widgets.heatmap import HeatmapGrid

MODEL = "test-org/tiny-model"  # a hub-style id: nothing here loads a model


def test_the_live_watch_and_the_heatmap_show_each_rows_at_target_cell(tmp_path, forget_set_files):
    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    make_forget_set(store, "people", forget_set_files)
    make_study(store, "S", MODEL, "people", methods=("ga", "ga_gd"), lrs=(1e-4, 1e-3), steps=(5, 10, 20))
    watch = StudyWatch(store, "S")
    assert watch.poll().at_target == {}
    study = store.study("S")
    run = next(r for r in runs_of(store, "S") if (r.method, r.lr) == ("ga", 1e-3))
    record_cell(store, "S", study_spec(study), run, {**synthetic_cell(0, 1, 7), "at_target": True})
    poll = watch.poll()
    (want,) = load_at_target(store, "S")
    assert list(poll.at_target) == ["ga"] and poll.at_target["ga"][1e-3].steps == want.steps == 7
    assert poll.at_target["ga"][1e-3].score == want.score

    g = grids(load_cells(store, "S"))

    class Two(App):
        def compose(self) -> ComposeResult:
            yield HeatmapGrid(g["ga"], study="S", id="ga", at_target=poll.at_target["ga"])
            yield HeatmapGrid(g["ga_gd"], study="S", id="ga_gd", at_target=poll.at_target.get("ga_gd"))

    async def lines():
        app = Two()
        async with app.run_test(size=(100, 12)) as pilot:
            await pilot.pause()
            return {w: [app.query_one(f"#{w}", HeatmapGrid).render_line(y).text for y in range(4)]
                    for w in ("ga", "ga_gd")}

    seen = asyncio.run(lines())
    assert "at target" in seen["ga"][1] and "never" in seen["ga"][2] and "@7" in seen["ga"][3]
    assert not any("at target" in line or "never" in line for line in seen["ga_gd"])
