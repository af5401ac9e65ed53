"""The export dialog and the running-runs panel on a store made through the studies API
(tests/app/app_stores.py), driven with Textual's Pilot; and studies.running.logs, the tails they show."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from sqlmodel import select

from studies.reading.export import OWNER_FILE, remove_abandoned
from studies.store.db import hostname
from tests.app.app_stores import make_study
from tests.app.pilot_helpers import wait_until
from tests.studies_helpers import cli_env, dead_pid, stop

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def store(store, tiny_model_dir):
    """The app's store (tests/app/conftest.py: app_store's two studies) plus "sweep-empty": a
    running study with no cell computed yet."""
    make_study(store, "sweep-empty", str(tiny_model_dir), "people", methods=("ga",), lrs=(1e-4,), steps=(5,), fill=0.0)
    return store


def dialog_app(store, study: str, cell=None):
    from textual.app import App

    from tui.app.screens.export import ExportDialog

    class Harness(App):
        result = "not dismissed"

        def on_mount(self) -> None:
            self.push_screen(ExportDialog(store, study, cell), self._done)

        def _done(self, result) -> None:
            self.result = result

    return Harness()


def status_of(app) -> str:
    from textual.widgets import Static

    return str(app.screen.query_one("#export-status", Static).render())


async def fill_path(pilot, app, path) -> None:
    from textual.widgets import Input

    app.screen.query_one("#export-path", Input).value = str(path)
    await pilot.pause()


# ---------------------------------------------------------------- export dialog

def test_export_writes_yaml_with_one_best_entry_per_method(store, tmp_path):
    out = tmp_path / "best.yaml"

    async def go():
        app = dialog_app(store, "sweep-done")
        async with app.run_test(size=(80, 24)) as pilot:
            from textual.widgets import Input

            assert app.screen.query_one("#export-path", Input).value == "./sweep-done-best.yaml"
            await fill_path(pilot, app, out)
            await pilot.click("#export-go")
            await wait_until(pilot, lambda: app.result != "not dismissed", what="the dialog to close")
        return app.result

    assert asyncio.run(go()) == str(out)
    entries = yaml.safe_load(out.read_text())
    assert [e["method"] for e in entries] == ["ga", "ga_gd"]
    from studies.reading.export import export_best

    assert [(e["lr"], e["steps"]) for e in entries] == [(e["lr"], e["steps"]) for e in export_best(store, "sweep-done")]
    assert all(e["command"].startswith("unlearn run ") for e in entries)


def test_export_json_pareto_switches_the_path_suffix_and_writes_the_front(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    async def go():
        app = dialog_app(store, "sweep-done")
        async with app.run_test(size=(80, 24)) as pilot:
            from textual.widgets import Input

            await pilot.click("#export-json")
            assert app.screen.query_one("#export-path", Input).value == "./sweep-done-best.json"
            await pilot.click("#export-pareto")
            await pilot.click("#export-go")
            await wait_until(pilot, lambda: app.result != "not dismissed", what="the dialog to close")
        return app.result

    result = asyncio.run(go())
    assert result == str(tmp_path / "sweep-done-best.json")
    entries = json.loads((tmp_path / "sweep-done-best.json").read_text())
    from studies.reading.export import export_best

    front = export_best(store, "sweep-done", pareto=True)
    assert len(entries) == len(front) > 2 and all(e["pareto"] for e in entries)
    assert {e["method"] for e in entries} == {"ga", "ga_gd"}


def test_export_from_a_cell_keeps_to_its_method(store, tmp_path):
    from tui.app.messages import CellRef

    out = tmp_path / "ga.yaml"

    async def go():
        app = dialog_app(store, "sweep-done", CellRef("sweep-done", "ga_gd", 1e-4, 10))
        async with app.run_test(size=(80, 24)) as pilot:
            await fill_path(pilot, app, out)
            await pilot.click("#export-go")
            await wait_until(pilot, lambda: app.result != "not dismissed", what="the dialog to close")

    asyncio.run(go())
    assert [e["method"] for e in yaml.safe_load(out.read_text())] == ["ga_gd"]


def test_an_existing_file_is_kept_when_refused_and_replaced_when_confirmed(store, tmp_path):
    out = tmp_path / "best.yaml"
    out.write_text("old content\n")

    async def go():
        app = dialog_app(store, "sweep-done")
        async with app.run_test(size=(80, 24)) as pilot:
            from textual.widgets import Static

            confirm = app.screen.query_one("#export-confirm")
            await fill_path(pilot, app, out)
            await pilot.click("#export-go")
            await wait_until(pilot, lambda: confirm.display, what="the overwrite question")
            assert str(out) in str(app.screen.query_one("#export-confirm-text", Static).render())
            await pilot.press("n")
            await pilot.pause(0.2)
            assert not confirm.display and app.result == "not dismissed"
            assert out.read_text() == "old content\n"
            assert "nothing written" in status_of(app)

            await pilot.click("#export-go")
            await wait_until(pilot, lambda: confirm.display, what="the question again")
            await pilot.press("y")
            await wait_until(pilot, lambda: app.result != "not dismissed", what="the dialog to close")
        return app.result

    assert asyncio.run(go()) == str(out)
    assert [e["method"] for e in yaml.safe_load(out.read_text())] == ["ga", "ga_gd"]


def test_errors_are_one_line_in_the_dialog_and_nothing_is_written(store, tmp_path):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")

    async def go(study: str, path):
        app = dialog_app(store, study)
        async with app.run_test(size=(80, 24)) as pilot:
            await fill_path(pilot, app, path)
            await pilot.click("#export-go")
            await wait_until(pilot, lambda: app.screen.query_one("#export-status").has_class("error"), what="an error")
            await pilot.pause(0.1)
            assert app.result == "not dismissed"
            assert not app.screen.query_one("#export-go").disabled  # the form is usable again
            return status_of(app)

    error = asyncio.run(go("sweep-empty", tmp_path / "x.yaml"))
    assert "no computed cells" in error and "\n" not in error
    assert not (tmp_path / "x.yaml").exists()
    error = asyncio.run(go("sweep-done", a_file / "x.yaml"))
    assert "not a folder" in error and "\n" not in error
    error = asyncio.run(go("sweep-done", tmp_path))
    assert "is a folder" in error


def test_the_dialog_imports_no_torch():
    import subprocess
    import sys

    probe = ("import sys; import tui.app.screens.export, tui.app.widgets.running, studies.running.logs, studies.reading.export, "
             "engine.files; print([m for m in ('torch', 'transformers', 'accelerate', 'datasets', 'sklearn') "
             "if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_saving_the_models_runs_the_cli_in_a_subprocess(store, tmp_path):
    out, models = tmp_path / "best.yaml", tmp_path / "models"

    async def go():
        from textual.widgets import Checkbox, Input

        from tui.app.messages import CellRef

        app = dialog_app(store, "sweep-done", CellRef("sweep-done", "ga", 1e-5, 5))
        async with app.run_test(size=(80, 24)) as pilot:
            await fill_path(pilot, app, out)
            app.screen.query_one("#export-save-models", Checkbox).value = True
            await pilot.pause()
            app.screen.query_one("#export-models-dir", Input).value = str(models)
            await pilot.click("#export-go")
            await wait_until(pilot, lambda: app.result != "not dismissed", timeout=300, what="the models")
        return app.result

    assert asyncio.run(go()) == str(out)
    assert [e["method"] for e in yaml.safe_load(out.read_text())] == ["ga"]
    assert (models / "ga" / "README.md").is_file()


def test_format_switches_only_a_known_suffix_and_progress_keeps_the_last_visible_line():
    from tui.app.screens.export import last_line, with_format

    assert with_format("./a-best.yaml", "json") == "./a-best.json"
    assert with_format("out/A.YML", "yaml") == "out/A.yaml"
    assert with_format("notes.txt", "json") == "notes.txt"
    assert last_line("ga lr=1e-4  \x1b[2K  2/20\r\x1b[2Kga lr=1e-4   7/20   loss 2.1\r\x1b[1A\n") == "ga lr=1e-4 7/20 loss 2.1"
    assert last_line("\n\r") == ""


# ---------------------------------------------------------------- studies.running.logs

def test_log_folder_is_where_the_scheduler_writes(store):
    from studies.running.logs import log_folder, scheduler_log_path
    from studies.running.pool import log_dir_for

    assert log_folder(store, "sweep-live") == log_dir_for(store, "sweep-live")
    assert scheduler_log_path(store, "sweep-live").parent == log_dir_for(store, "sweep-live").parent


def test_tail_reads_only_the_end_of_a_huge_file(tmp_path):
    from studies.running.logs import tail_file

    log = tmp_path / "huge.log"
    with open(log, "wb") as f:
        f.truncate(8 * 1024**3)  # 8 GiB of holes: reading it whole would take seconds and the memory
        f.seek(0, os.SEEK_END)
        f.write(b"".join(b"line %d\n" % i for i in range(100)))
    t = time.perf_counter()
    lines = tail_file(log, 5)
    assert time.perf_counter() - t < 0.5
    assert lines == [f"line {i}" for i in range(95, 100)]


def test_tail_keeps_a_progress_bar_last_state_and_handles_short_and_missing_files(tmp_path):
    from studies.running.logs import tail_file

    log = tmp_path / "run.log"
    log.write_bytes(b"start\n\x1b[32mstep 1/3\rstep 2/3\rstep 3/3\x1b[0m\nno newline at the end")
    assert tail_file(log, 40) == ["start", "step 3/3", "no newline at the end"]
    assert tail_file(log, 1) == ["no newline at the end"]
    assert tail_file(tmp_path / "missing.log", 10) == []
    assert tail_file(tmp_path, 10) == []
    log.write_bytes(b"")
    assert tail_file(log, 10) == []


def test_tail_of_a_run_is_its_current_attempts_log(store):
    from studies.running.logs import log_folder, scheduler_log_tail, tail
    from studies.store.db import Run

    st = store.study("sweep-live")
    with store.read() as s:
        run = s.exec(select(Run).where(Run.study_id == st.id, Run.state == "running")).one()
    assert tail(store, "sweep-live", run.method, run.lr) == []  # no log yet: no error
    assert scheduler_log_tail(store, "sweep-live", 5) == []
    folder = log_folder(store, "sweep-live")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"run{run.id}-{run.method}-attempt{run.attempts}.log").write_text("".join(f"a{i}\n" for i in range(50)))
    assert tail(store, "sweep-live", run.method, run.lr, lines=3) == ["a47", "a48", "a49"]
    (folder.parent / "sweep-live-scheduler.log").write_text("scheduler pid 1 serving\n")
    assert scheduler_log_tail(store, "sweep-live", 5) == ["scheduler pid 1 serving"]
    assert tail(store, "sweep-live", run.method, 0.5) == []  # no such run


# ---------------------------------------------------------------- running runs

def running_app(store):
    from textual.app import App, ComposeResult

    from tui.app.widgets.running import RunningRuns

    class Harness(App):
        def compose(self) -> ComposeResult:
            yield RunningRuns(store, id="running")

    return Harness()


def show(app, store, study: str) -> dict:
    """What the owner of the panel does on each refresh."""
    from studies.reading.status import study_status
    from tui.app.widgets.running import RunningRuns

    status = study_status(store, study)
    app.query_one(RunningRuns).update_runs(study, status["running"], max(status["steps"]))
    return status


def cell_text(table, row_key: str, column: str) -> str:
    value = table.get_cell(row_key, column)
    return getattr(value, "plain", str(value))


def test_running_runs_show_step_of_total_and_update_in_place(store):
    from textual.widgets import DataTable, Log

    from studies.running.logs import log_folder
    from studies.store.db import Run
    from tui.app.widgets.running import RunningRuns, run_key

    st = store.study("sweep-live")

    async def go():
        app = running_app(store)
        async with app.run_test(size=(80, 24)) as pilot:
            panel = app.query_one(RunningRuns)
            table = panel.query_one(DataTable)
            assert panel.query_one("#running-empty").display  # nothing handed down yet
            status = show(app, store, "sweep-live")
            await pilot.pause()
            (run,) = status["running"]
            key = run_key(run["method"], run["lr"])
            assert panel.run_keys == [key] and not panel.query_one("#running-empty").display
            assert cell_text(table, key, "method") == "ga_kl"
            assert cell_text(table, key, "progress").endswith(f" {run['step']}/20")
            assert cell_text(table, key, "device") == "cpu"
            row = table.rows[key]

            with store.write() as s:
                r = s.exec(select(Run).where(Run.study_id == st.id, Run.state == "running")).one()
                r.step, r.heartbeat = 17, dt.datetime.now(dt.timezone.utc)
                s.add(r)
            show(app, store, "sweep-live")
            await pilot.pause()
            assert cell_text(table, key, "progress").endswith(" 17/20")
            assert table.rows[key] is row and table.row_count == 1  # the same row, changed in place

            # l: the highlighted run's log tail below the table, read in a worker
            folder = log_folder(store, "sweep-live")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"run{r.id}-{r.method}-attempt{r.attempts}.log").write_text("loading\nstep 17 loss 2.5\n")
            table.focus()
            await pilot.press("l")
            log = panel.query_one(Log)
            await wait_until(pilot, lambda: "step 17 loss 2.5" in "\n".join(log.lines), what="the log tail")
            assert panel.tail_key == key and log.display

            # the run ends: its row goes, its log stays until l hides it
            panel.update_runs("sweep-live", [], 20)
            await pilot.pause(0.3)
            assert panel.run_keys == [] and panel.query_one("#running-empty").display
            assert "not running any more" in str(panel.query_one("#running-tail-title").render())
            assert log.display and "step 17 loss 2.5" in "\n".join(log.lines)
            await pilot.press("l")
            await pilot.pause()
            assert panel.tail_key is None and not log.display

            show(app, store, "sweep-done")  # a study with no running run
            await pilot.pause()
            assert panel.run_keys == [] and panel.query_one("#running-empty").display
            assert "no run is running" in str(panel.query_one("#running-empty").render())

    asyncio.run(go())


def test_running_runs_add_and_remove_only_what_changed(store):
    from textual.widgets import DataTable

    from tui.app.widgets.running import RunningRuns, run_key

    def entry(method, lr, step):
        return {"method": method, "lr": lr, "step": step, "device": "cuda:0", "pid": 1, "host": "h",
                "heartbeat_age_s": 3.0, "attempts": 2}

    async def go():
        app = running_app(store)
        async with app.run_test(size=(80, 24)) as pilot:
            panel = app.query_one(RunningRuns)
            table = panel.query_one(DataTable)
            panel.update_runs("s", [entry("ga", 1e-4, 1), entry("ga", 1e-3, 2)], 10)
            await pilot.pause()
            kept = table.rows[run_key("ga", 1e-3)]
            panel.update_runs("s", [entry("ga", 1e-5, 0), entry("ga", 1e-3, 3)], 10)
            await pilot.pause()
            assert panel.run_keys == [run_key("ga", 1e-5), run_key("ga", 1e-3)]  # the owner's order
            assert table.rows[run_key("ga", 1e-3)] is kept
            assert cell_text(table, run_key("ga", 1e-3), "attempt") == "2"
            assert cell_text(table, run_key("ga", 1e-3), "heartbeat") == "3 s"

    asyncio.run(go())


def test_a_cancelled_model_export_leaves_no_half_written_folder(store, tmp_path):
    """The dialog's Cancel sends the export subprocess SIGTERM (_stop): before, the process died at
    once and its `.tmp` model folder (gigabytes for an LLM) stayed; now it removes it and exits 143."""
    models = tmp_path / "models"
    proc = subprocess.Popen([sys.executable, "-m", "tui.cli", "export", "sweep-done", "--method", "ga",
                             "--save-model", str(models), "--device", "cpu", "--storage", store.url],
                            env=cli_env(tmp_path / "home"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(models.glob(".*.tmp")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no model folder was begun"
            time.sleep(0.01)
        proc.terminate()
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        stop(proc)
    assert list(models.iterdir()) == []


def test_a_killed_exports_folder_is_removed_by_the_next_export_on_its_node(tmp_path):
    mine_dead, mine_alive, other_node, unknown = (tmp_path / f".ga.{i}.tmp" for i in "abcd")
    for folder, owner in ((mine_dead, f"{hostname()} {dead_pid()}"), (mine_alive, f"{hostname()} {os.getpid()}"),
                          (other_node, f"node-elsewhere {dead_pid()}"), (unknown, None)):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if owner:
            (folder / OWNER_FILE).write_text(owner)
    assert remove_abandoned(tmp_path) == [mine_dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine_alive, other_node, unknown))
