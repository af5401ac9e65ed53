"""The app and SLURM, driven with Pilot over real stores: the new-study form's "SLURM job array"
choice (one field per SLURM_FIELDS entry the form offers, parsed by slurm_options as `unlearn study
run --slurm` parses its flags, submitted by launch_on_slurm) and the running-runs panel's node and
slurm columns. SQLite here; PostgreSQL (.ci/postgres) and the CI's single-node cluster (.ci/slurm)
where they run.

What a failure leaves: a bad SLURM value or a store the nodes cannot share (an SQLite file) is
refused by the form before anything is created; a submission that fails once the study exists
(sbatch missing, the cluster refusing) says so on the launch line and leaves the study created,
as a local launch whose scheduler did not start does."""
from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from sqlmodel import select
from textual.app import App
from textual.widgets import Button, Checkbox, DataTable, Input, Label, Select, SelectionList

from studies.reading.status import list_studies, study_status
from studies.running.slurm_options import SLURM_FIELDS
from studies.store.db import Run, Store
from tests.app.app_stores import make_study
from tests.app.pilot_helpers import wait_until
from tests.studies_helpers import HUB_MODEL, assert_one_line_error, cli_in_process, make_forget_set, wait_for
from tui.app.screens.new_study import NewStudyScreen, slurm_id, slurm_label
from tui.app.widgets.running import COLUMNS, RunningRuns, run_key

pytestmark = pytest.mark.timeout(300)
UNSET = object()


class Harness(App):
    """The new-study form alone; keeps what it was dismissed with."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.result = UNSET

    def on_mount(self) -> None:
        self.push_screen(NewStudyScreen(self.store, read_devices=False), callback=self._done)

    def _done(self, value) -> None:
        self.result = value


@pytest.fixture
def lab(tmp_path, forget_set_files) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    make_forget_set(store, "fs", forget_set_files, general=False)
    return store


async def fill(pilot, screen, name: str, slurm: dict | None = None, model: str = HUB_MODEL, steps: str = "2") -> None:
    """A good study form, run on SLURM with these fields (SlurmField name → text or tick) unless
    `slurm` is None."""
    await wait_until(pilot, lambda: screen.forget_sets, what="the forget sets")
    screen.model_checks[model] = {"ok": True}  # as if the model had checked out: nothing here loads it
    screen.query_one("#name", Input).value = name
    screen.query_one("#model", Input).value = model
    screen.query_one("#forget-set", Select).value = "fs"
    screen.query_one("#methods", SelectionList).select("ga")
    screen.query_one("#lrs", Input).value = "1e-4"
    screen.query_one("#steps", Input).value = steps
    if slurm is not None:
        screen.query_one("#runs-on", Select).value = "slurm"
        await pilot.pause()
        by_name = {f.name: f for f in SLURM_FIELDS}
        for name_, value in slurm.items():
            screen.query_one(f"#{slurm_id(by_name[name_])}").value = value
    await pilot.pause()


def errors_of(screen) -> dict[str, str]:
    return {label.id: str(label.content) for label in screen.query(".error") if str(label.content)}


# ---------------------------------------------------------------- the form's SLURM fields

def test_the_slurm_choice_shows_one_field_per_slurm_field_the_form_offers(lab):
    offered = [f for f in SLURM_FIELDS if f.form]
    cli_only = [f for f in SLURM_FIELDS if not f.form]
    assert offered and cli_only  # --slurm-allow-sqlite is the CLI's alone

    async def go():
        async with Harness(lab).run_test(size=(120, 50)) as pilot:
            await pilot.pause()
            screen = pilot.app.screen
            section, local = screen.query_one("#slurm-fields"), screen.query_one("#local-devices")
            assert screen.query_one("#runs-on", Select).value == "local"  # the default: today's devices
            assert local.display and not section.display
            screen.query_one("#runs-on", Select).value = "slurm"
            await pilot.pause()
            assert section.display and not local.display  # the devices are not asked for
            widgets = list(section.query("Input, Checkbox"))
            assert [w.id for w in widgets] == [slurm_id(f) for f in offered]
            for f, widget in zip(offered, widgets):
                assert str(widget.parent.query_one(Label).content) == slurm_label(f) == f.flag.removeprefix("--")
                assert screen.query_one(f"#{slurm_id(f)}-error", Label).has_class("error")
                if f.kind is bool:
                    assert isinstance(widget, Checkbox) and widget.value is bool(f.default)
                elif f.kind is list:
                    assert isinstance(widget, Input) and "KEY=VALUE pairs separated by spaces" in widget.placeholder
                else:
                    default = "none" if f.default is None else str(f.default)
                    assert isinstance(widget, Input) and widget.placeholder.startswith(f"{default} · "), f.name
            present = {w.id for w in screen.query("*") if w.id}
            assert not {slurm_id(f) for f in cli_only} & present
            screen.query_one("#runs-on", Select).value = "local"
            await pilot.pause()
            assert local.display and not section.display

    asyncio.run(go())


# A wrong value per SLURM field (SlurmField name → what is typed) and the words of the one-line
# error both faces give, the CLI naming the flag and the form the field's label.
WRONG = [("jobs", "0", "{} must be at least 1, not 0"),
         ("jobs", "two", "{} takes a whole number, not 'two'"),
         ("gpus_per_job", "-1", "{} must be 0 or more, not -1"),
         ("cpus_per_gpu", "0", "{} must be at least 1, not 0"),
         ("extra", "constraint", "{} takes KEY=VALUE (an sbatch option, e.g. constraint=a100), not 'constraint'")]


def test_a_bad_slurm_value_is_one_line_at_its_field_and_creates_nothing(capsys, lab):
    by_name = {f.name: f for f in SLURM_FIELDS}

    async def go():
        async with Harness(lab).run_test(size=(80, 24)) as pilot:
            screen = pilot.app.screen
            await fill(pilot, screen, "S", slurm={"time": "9 o'clock"})
            await pilot.press("ctrl+l")
            await pilot.pause(0.3)
            first = errors_of(screen)
            # every wrong field at once, each beside itself
            await fill(pilot, screen, "S", slurm={"time": "9 o'clock", "jobs": "0", "extra": "constraint"})
            await pilot.press("ctrl+l")
            await pilot.pause(0.3)
            assert isinstance(pilot.app.screen, NewStudyScreen) and not screen.query_one("#launch", Button).disabled
            every = errors_of(screen)
            one_by_one = []
            for name, typed, _ in WRONG:
                await fill(pilot, screen, "S", slurm={**{f.name: "" for f in SLURM_FIELDS if f.kind is not bool and f.form},
                                                      name: typed})
                assert screen.read_form() is None
                one_by_one.append(errors_of(screen))
            return first, every, one_by_one

    first, every, one_by_one = asyncio.run(go())
    said = "time must be HH:MM:SS (or MM:SS, or minutes) above zero, not \"9 o'clock\""
    assert first == {"slurm-time-error": said}
    assert every == {"slurm-time-error": said, "slurm-jobs-error": "jobs must be at least 1, not 0",
                     "slurm-extra-error": "slurm-opt takes KEY=VALUE (an sbatch option, e.g. constraint=a100), "
                                          "not 'constraint'"}
    assert list_studies(lab) == []
    # the CLI says the same of its flag (both faces parse with slurm_options), and refuses before the store
    r = cli_in_process(capsys, "study", "run", "S", "--slurm", "--time", "9 o'clock", "--storage", lab.url)
    assert_one_line_error(r, "--" + said)
    for (name, typed, words), shown in zip(WRONG, one_by_one):
        f = by_name[name]
        assert shown == {f"{slurm_id(f)}-error": words.format(slurm_label(f))}, (name, typed)
        if typed == "two":  # the CLI's typed int flags refuse 'two' themselves (typer's usage error)
            continue
        r = cli_in_process(capsys, "study", "run", "S", "--slurm", f.flag, typed, "--storage", lab.url)
        assert_one_line_error(r, words.format(f.flag))
    assert list_studies(lab) == []


def test_an_sqlite_store_is_refused_before_the_study_is_created(lab):
    async def go():
        async with Harness(lab).run_test(size=(80, 24)) as pilot:
            screen = pilot.app.screen
            await fill(pilot, screen, "S", slurm={"jobs": "2", "requeue": True})
            await pilot.press("ctrl+l")
            await pilot.pause(0.3)
            refused = errors_of(screen)
            # a run wider than a task's devices is refused beside gpus-per-job (a CPU task has one worker)
            screen.query_one("#gpus-per-run", Input).value = "2"
            await pilot.pause()
            wide = errors_of(screen) if screen.read_form() is None else None
            # the same form on the local devices is good: the SLURM fields are not read
            screen.query_one("#gpus-per-run", Input).value = ""
            screen.query_one("#runs-on", Select).value = "local"
            await pilot.pause()
            form = screen.read_form()
            assert pilot.app.result is UNSET and not screen.query_one("#launch", Button).disabled
            return refused, wide, form

    refused, wide, form = asyncio.run(go())
    assert list(refused) == ["slurm-error"]
    line = refused["slurm-error"]
    assert "\n" not in line and "PostgreSQL" in line and "--slurm-allow-sqlite" in line, line
    assert list_studies(lab) == []  # refused before anything was created
    assert wide is not None and wide["slurm-gpus-per-job-error"] == (
        "--gpus-per-run 2 needs that many GPUs in each task; gpus-per-job gives 0 (a CPU task has one worker)")
    assert form is not None and form.slurm is None and form.slots == ["cpu"]


def test_the_form_with_slurm_chosen_fits_80_by_24(lab):
    async def go():
        async with Harness(lab).run_test(size=(80, 24)) as pilot:
            screen = pilot.app.screen
            screen.query_one("#runs-on", Select).value = "slurm"
            await pilot.pause()
            body = screen.query_one("#study-body")
            assert body.size.width <= 80 and body.max_scroll_y > 0  # what does not fit scrolls
            for widget in screen.query("#slurm-fields Input, #slurm-fields Checkbox, #slurm-fields .row > Label"):
                body.scroll_to_widget(widget, animate=False)
                await pilot.pause()
                region = widget.region
                assert region.width > 0 and region.right <= 80, (widget.id, region)  # shown, never clipped

    asyncio.run(go())


# ---------------------------------------------------------------- the running-runs panel

def running_app(store):
    class PanelHarness(App):
        def compose(self):
            yield RunningRuns(store, id="running")

    return PanelHarness()


def test_the_running_panel_shows_the_node_and_a_slurm_column_while_a_run_has_a_task(lab):
    st = make_study(lab, "S", HUB_MODEL, "fs", methods=("ga",), lrs=(1e-5, 1e-4), steps=(2, 4), fill=0.0, running=2)

    def show(app) -> None:
        status = study_status(lab, "S")
        app.query_one(RunningRuns).update_runs("S", status["running"], max(status["steps"]))

    def set_runs(**values) -> None:  # the first run (lr 1e-5), through the store's sessions as a worker writes it
        with lab.write() as s:
            run = s.exec(select(Run).where(Run.study_id == st.id, Run.lr == 1e-5)).one()
            for k, v in values.items():
                setattr(run, k, v)
            s.add(run)

    def text(table, key, column) -> str:
        value = table.get_cell(key, column)
        return getattr(value, "plain", str(value))

    async def go():
        app = running_app(lab)
        async with app.run_test(size=(80, 24)) as pilot:
            panel = app.query_one(RunningRuns)
            table = panel.query_one(DataTable)
            show(app)
            await pilot.pause()
            first, second = run_key("ga", 1e-5), run_key("ga", 1e-4)
            assert panel.run_keys == [first, second]
            assert [k.value for k in table.columns] == [key for key, _ in COLUMNS]  # no slurm column
            assert "slurm" not in table.columns and not panel.slurm_shown
            assert text(table, first, "node") == "testhost"
            rows = {key: table.rows[key] for key in panel.run_keys}

            set_runs(slurm_job="123_1", host="gpu017.cluster.example.org")
            show(app)
            await pilot.pause()
            assert panel.slurm_shown and [k.value for k in table.columns][-1] == "slurm"
            assert text(table, first, "slurm") == "123_1" and text(table, second, "slurm") == "—"
            assert text(table, first, "node") == "gpu017"  # the node's short name
            assert {key: table.rows[key] for key in panel.run_keys} == rows  # the same rows, changed in place
            await pilot.pause(0.3)  # measured when idle: the row fits 80 columns
            assert sum(c.get_render_width(table) for c in table.ordered_columns) <= 78
            assert table.max_scroll_x == 0

            set_runs(slurm_job="123_2")  # requeued onto another task: the cell changes in place
            show(app)
            await pilot.pause()
            assert text(table, first, "slurm") == "123_2"

            set_runs(slurm_job=None)  # no running run has a task any more: the column goes, the rows stay
            show(app)
            await pilot.pause()
            assert not panel.slurm_shown and "slurm" not in table.columns
            assert {key: table.rows[key] for key in panel.run_keys} == rows

    asyncio.run(go())


# ---------------------------------------------------------------- PostgreSQL, and the CI's cluster

@pytest.mark.xdist_group("postgresql")
def test_a_submission_that_fails_after_the_study_is_created_says_so_on_the_launch_line(
        pg_database, forget_set_files, tmp_path, monkeypatch):
    url, _ = pg_database
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files, general=False)
    (tmp_path / "no-slurm").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))  # no sbatch: the submission fails
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.setenv("UNLEARN_STORAGE_URL", url)  # the submission sets it for its tasks: put back after

    async def go():
        async with Harness(store).run_test(size=(80, 24)) as pilot:
            screen = pilot.app.screen
            await fill(pilot, screen, "S", slurm={"jobs": "2", "time": "10"})
            await pilot.press("ctrl+l")
            launch = screen.query_one("#launch", Button)
            await wait_until(pilot, lambda: not launch.disabled, timeout=60, what="the launch to fail")
            assert isinstance(pilot.app.screen, NewStudyScreen) and pilot.app.result is UNSET  # the form stays
            return errors_of(screen)

    errors = asyncio.run(go())
    assert list(errors) == ["launch-error"], errors
    line = errors["launch-error"]
    assert line.startswith("study S was created; the job array was not submitted (") and "\n" not in line, line
    assert "study S is paused" in line, line
    assert [s["name"] for s in list_studies(store)] == ["S"]  # created, as a local launch that did not start leaves it
    assert store.study("S").state == "paused"  # nothing serves it: not left "running"
    with store.read() as s:
        assert {r.slurm_job for r in s.exec(select(Run)).all()} == {None}  # no task ever claimed a run
    store.engine.dispose()


@pytest.mark.slow
@pytest.mark.xdist_group("postgresql")
@pytest.mark.timeout(400)
@pytest.mark.skipif(not os.environ.get("SLURM_CONF"), reason="SLURM_CONF is not set (.ci/slurm sets it where a "
                                                             "cluster can run)")
def test_the_app_launches_a_study_on_slurm_and_shows_its_task(pg_database, forget_set_files, tiny_model_dir,
                                                               monkeypatch):
    """The whole way on the CI's cluster: the form submits the array, the app opens the dashboard,
    whose running panel shows the run's node and its array task; cancelling scancels the array."""
    from studies.lifecycle.actions import study_action
    from tui.app.app import create_app
    from tui.app.screens.dashboard import DashboardScreen
    from tui.app.screens.studies import StudiesScreen

    url, _ = pg_database
    store = Store(url)
    make_forget_set(store, "fs", forget_set_files, general=False)
    monkeypatch.setenv("UNLEARN_STORAGE_URL", url)  # the submission sets it for its tasks: put back after
    model = str(tiny_model_dir)
    array = None

    async def go():
        nonlocal array
        app = create_app(url, refresh_s=0.3, read_devices=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, StudiesScreen), timeout=30, what="the studies")
            for _ in range(12):  # a key pressed before the screen takes keys (a busy CI machine) is pressed again
                await pilot.press("n")
                try:
                    await wait_until(pilot, lambda: isinstance(app.screen, NewStudyScreen), timeout=5,
                                     what="the new-study form")
                    break
                except AssertionError:
                    continue
            assert isinstance(app.screen, NewStudyScreen), app.screen
            form = app.screen
            # one long run (its lr alone): it is still running when the panel is read; the other task finds no work
            await fill(pilot, form, "S", slurm={"jobs": "2", "time": "00:10:00", "partition": "ci"}, model=model,
                       steps="2,100000")
            await pilot.press("ctrl+l")
            await wait_until(pilot, lambda: isinstance(app.screen, DashboardScreen), timeout=120, what="the dashboard")
            assert "SLURM job array" in form.launched.line and form.launched.pid is None, form.launched.line
            array = form.launched.line.split("SLURM job array ", 1)[1].split()[0]
            panel = app.screen.query_one(RunningRuns)
            table = panel.query_one(DataTable)
            await wait_until(pilot, lambda: panel.slurm_shown and panel.run_keys, timeout=180,
                             what="the run claimed by the array's task", interval=0.2)
            key = panel.run_keys[0]
            slurm_cell = table.get_cell(key, "slurm")
            node_cell = table.get_cell(key, "node")
            return str(slurm_cell), str(node_cell)

    try:
        slurm_cell, node_cell = asyncio.run(go())
        with store.read() as s:
            claimed = s.exec(select(Run).where(Run.slurm_job.is_not(None))).first()
        assert slurm_cell == claimed.slurm_job and slurm_cell in (f"{array}_0", f"{array}_1")  # a task of the array
        assert node_cell not in ("", "—") and claimed.host.startswith(node_cell.rstrip("…"))
    finally:
        study_action(store, "cancel", "S")
        if array:
            wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True,
                                                timeout=30).stdout.strip(), 60, "the array to leave the queue",
                     interval=0.5)
        store.engine.dispose()
