"""The whole app flow, driven with Pilot on the quick demo's store: build a forget set from the
demo's data → create a study → launch it with one CPU worker (a detached scheduler, real runs)
→ heatmap cells appear while it runs → walk to a cell and open its trial → compare two cells →
export writes its file. Slow: real runs of the demo's tiny model."""
from __future__ import annotations

import asyncio
import functools
import json
import time

import pytest
import yaml

from tests.app.pilot_helpers import wait_until
from tests.studies_helpers import pid_alive, wait_for

QA_PER_PERSON = 7  # engine.demo_corpus.Person.qa: seven question–answer pairs a person, in order

# func_only: the test's own 600 s; the quick demo it may build first has its own limit (conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600, func_only=True)]
until = functools.partial(wait_until, timeout=30.0, interval=0.1)  # real runs: conditions take longer here


def test_build_create_launch_watch_walk_compare_export(quick_demo, tmp_path, monkeypatch):
    from textual.widgets import Input, Select, SelectionList

    from studies.lifecycle.study import set_state
    from studies.store.db import Store
    from studies.store.forgetsets import list_forget_sets
    from studies.store.states import CellStatus, StudyState
    from tui.app.app import create_app
    from tui.app.screens.compare import CompareScreen
    from tui.app.screens.dashboard import DashboardScreen
    from tui.app.screens.export import ExportDialog
    from tui.app.screens.forgetset_builder import ForgetSetBuilderScreen
    from tui.app.screens.new_study import NewStudyScreen
    from tui.app.screens.studies import StudiesScreen
    from tui.app.screens.trial import TrialScreen
    from tui.app.widgets.heatmap import HeatmapGrid

    ws, _, _ = quick_demo
    url = f"sqlite:///{ws / 'unlearn.db'}"
    monkeypatch.setenv("UNLEARN_STORAGE_URL", url)  # the scheduler the form starts reads it
    monkeypatch.chdir(tmp_path)
    store = Store(url, create=False)
    study = f"flow-{int(time.time())}"
    # The builder reads plain text (the CLI also reads question–answer rows): one document per demo person,
    # its question–answer rows joined, as a user would type in a folder of plain records.
    people, n_people = {}, {}
    for role in ("forget", "retain", "unseen"):
        rows = [json.loads(line) for line in (ws / "data" / f"{role}.jsonl").read_text().splitlines() if line.strip()]
        per = QA_PER_PERSON
        docs = [" ".join(f"{r['question']} {r['answer']}" for r in rows[i:i + per]) for i in range(0, len(rows), per)]
        people[role] = tmp_path / f"{role}.jsonl"
        people[role].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        n_people[role] = len(docs)

    async def go():
        app = create_app(url, refresh_s=0.3)
        async with app.run_test(size=(100, 40)) as pilot:
            # listed, not only pushed: a key pressed while the screen still mounts can be lost under load
            await until(pilot, lambda: isinstance(app.screen, StudiesScreen) and bool(app.screen.rows),
                        what="the studies screen with the demo's study")
            # 1. a forget set from the demo's files, typed in with their roles
            await pilot.press("f")
            await until(pilot, lambda: isinstance(app.screen, ForgetSetBuilderScreen), what="the builder")
            builder = app.screen
            for role in ("forget", "retain", "unseen"):
                builder.query_one("#role", Select).value = role
                field = builder.query_one("#source-input", Input)
                field.value = str(people[role])
                field.focus()
                await pilot.press("enter")
                await until(pilot, lambda role=role: builder.doc_counts().get(role), what=f"the {role} count")
            builder.query_one("#name", Input).value = f"{study}-set"
            await pilot.press("ctrl+s")
            await until(pilot, lambda: isinstance(app.screen, StudiesScreen), what="the builder to save and close")
            fs = {f.name: f for f in list_forget_sets(store)}[f"{study}-set"]
            assert fs.counts["forget"] == n_people["forget"]
            assert fs.counts["retain"] + fs.counts["retain_eval"] == n_people["retain"] and fs.counts["retain_eval"]
            # 2. a study on it, launched with one CPU worker
            await pilot.press("n")
            await until(pilot, lambda: isinstance(app.screen, NewStudyScreen), what="the new-study form")
            form = app.screen
            form.query_one("#name", Input).value = study
            form.query_one("#model", Input).value = str(ws / "model")
            await until(pilot, lambda: f"{study}-set" in [v for _, v in form.query_one("#forget-set", Select)._options],
                        what="the forget sets in the form")
            form.query_one("#forget-set", Select).value = f"{study}-set"
            methods = form.query_one("#methods", SelectionList)
            methods.select("ga_gd")
            methods.select("ga")
            form.query_one("#lrs", Input).value = "2e-4,5e-4"
            form.query_one("#steps", Input).value = "2,4"
            form.query_one("#workers", Input).value = "1"
            await pilot.press("ctrl+l")
            await until(pilot, lambda: isinstance(app.screen, DashboardScreen), timeout=60, what="the dashboard")
            dash = app.screen
            assert dash.study == study
            # 3. cells appear while it runs
            await until(pilot, lambda: any(c.status == CellStatus.DONE for w in dash.query(HeatmapGrid)
                                           for c in w.grid.cells.values()), timeout=240, what="a computed cell")
            assert store.study(study).state == StudyState.RUNNING
            # 4. walk to a computed cell and open its trial
            heat = next(w for w in dash.query(HeatmapGrid) if any(c.status == CellStatus.DONE for c in w.grid.cells.values()))
            heat.focus()
            row, col = next((r, c) for r, lr in enumerate(heat.grid.lrs) for c, s in enumerate(heat.grid.steps)
                            if heat.grid.cell(lr, s).status == CellStatus.DONE)
            for _ in range(row):
                await pilot.press("down")
            for _ in range(col):
                await pilot.press("right")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, TrialScreen) and app.screen.detail is not None,
                        what="the trial detail")
            assert app.screen.detail["milestones"]
            await pilot.press("escape")
            # 5. compare two cells once both are computed
            await until(pilot, lambda: sum(c.status == CellStatus.DONE for c in heat.grid.cells.values()) >= 2,
                        timeout=240, what="two computed cells")
            done = [(r, c) for r, lr in enumerate(heat.grid.lrs) for c, s in enumerate(heat.grid.steps)
                    if heat.grid.cell(lr, s).status == CellStatus.DONE][:2]
            heat.focus()
            for r, c in done:
                heat.move_cursor(r, c)
                await pilot.press("space")
            await pilot.press("C")
            await until(pilot, lambda: isinstance(app.screen, CompareScreen), what="the compare screen")
            await pilot.pause(1.0)
            await pilot.press("escape")
            # 6. export the best cells
            await pilot.press("e")
            await until(pilot, lambda: isinstance(app.screen, ExportDialog), what="the export dialog")
            out = tmp_path / "best.yaml"
            app.screen.query_one("#export-path", Input).value = str(out)
            await pilot.click("#export-go")
            await until(pilot, lambda: out.exists(), what="the export file")
            entries = yaml.safe_load(out.read_text())
            assert entries and {e["method"] for e in entries} <= {"ga", "ga_gd"}

    try:
        asyncio.run(go())
    finally:
        try:
            set_state(store, study, StudyState.CANCELLED)
            pid = store.study(study).scheduler_pid
            wait_for(lambda: pid is None or not pid_alive(pid), 60, "the scheduler to exit")
        except Exception:
            pass
