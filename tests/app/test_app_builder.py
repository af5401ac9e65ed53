"""The forget-set builder and the new-study form, driven with Pilot over real SQLite stores: what they
save is what `unlearn forgetset create` saves, bad input is one line beside its field and saves
nothing, and Launch starts the same detached scheduler as `unlearn study run --detach`."""
from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import pytest
from textual.app import App
from textual.widgets import DirectoryTree, Input, Label, Select, SelectionList

from engine.errors import UnlearnError
from studies.lifecycle.inputs import device_slots, parse_learning_rates, parse_milestones
from studies.reading.status import list_studies
from studies.store.db import Store
from studies.store.forgetsets import list_forget_sets
from tests.studies_helpers import make_forget_set
from tui.app.screens.forgetset_builder import ForgetSetBuilderScreen, SourceTable
from tui.app.screens.new_study import NewStudyScreen, method_formula
from tui.app.widgets.devices import DevicesPanel

pytestmark = pytest.mark.timeout(300)
UNSET = object()


def sync(test):
    """An async Pilot test as a plain pytest test (fixtures by the same names)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))
    return run


class Harness(App):
    """Pushes one screen and keeps what it was dismissed with."""

    def __init__(self, make_screen) -> None:
        super().__init__()
        self.make_screen = make_screen
        self.result = UNSET

    def on_mount(self) -> None:
        self.push_screen(self.make_screen(), callback=self._done)

    def _done(self, value) -> None:
        self.result = value


async def until(pilot, predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await pilot.pause(0.05)
    return value


def text(screen, selector: str) -> str:
    return str(screen.query_one(selector, Label).content)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'lab.db'}")


# ------------------------------------------------------------------ the forget-set builder

async def add(pilot, screen, spec: str, role: str) -> None:
    """Type a source into the path field, choose its role, press enter."""
    screen.query_one("#role", Select).value = role
    field = screen.query_one("#source-input", Input)
    field.value = spec
    field.focus()
    await pilot.press("enter")
    await pilot.pause()


@sync
async def test_builder_saves_what_forgetset_create_saves(store, forget_set_files, forget_set_texts):
    folder = Path(forget_set_files["forget"]).parent
    app = Harness(lambda: ForgetSetBuilderScreen(store, root=folder))
    async with app.run_test(size=(160, 48)) as pilot:
        screen = app.screen
        tree = screen.query_one(DirectoryTree)
        await until(pilot, lambda: tree.root.children, "the tree to list the folder")
        tree.focus()
        await pilot.press("down", "enter")  # the first file of the folder: forget.jsonl
        assert screen.query_one("#source-input", Input).value == forget_set_files["forget"]
        screen.query_one("#role", Select).value = "forget"
        await pilot.click("#add")
        for role in ("retain", "unseen", "general"):
            await add(pilot, screen, forget_set_files[role], role)
        assert screen.query_one(SourceTable).row_count == 4
        counts = await until(pilot, lambda: all(v is not None for v in screen.doc_counts().values())
                             and screen.doc_counts(), "the documents to be counted")
        assert counts == {"forget": 16, "retain": 32, "retain_eval": 0, "unseen": 16, "general": 12}
        assert "general.jsonl: 12 documents" in str(screen.query_one("#preview").content)  # the last added
        # no retain_eval source: saving holds out a seeded 20 % of retain, and the builder says so
        assert "6 of the 32 retain documents" in screen.held_out_note().plain
        screen.query_one("#name", Input).value = "people"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.result is not UNSET, "the builder to save and close", timeout=60)
    assert app.result == "people"
    fs = store.forget_set("people")
    assert fs.counts == {**counts, "retain": 26, "retain_eval": 6}
    assert fs.hash == forget_set_texts.hash  # the same texts as load_forget_set reads, the same hash
    assert fs.sources["forget"] == [forget_set_files["forget"]]
    assert "general.jsonl" in fs.sources["general"][0]


@sync
async def test_builder_roles_can_change_and_sources_go(store, forget_set_files):
    app = Harness(lambda: ForgetSetBuilderScreen(store))
    async with app.run_test(size=(100, 40)) as pilot:
        screen = app.screen
        await add(pilot, screen, forget_set_files["forget"], "retain")
        await add(pilot, screen, forget_set_files["unseen"], "unseen")
        table = screen.query_one(SourceTable)
        table.focus()
        table.move_cursor(row=0)
        await pilot.press("r")  # retain → retain_eval
        assert [s.role for s in screen.sources] == ["retain_eval", "unseen"]
        assert str(table.get_cell(forget_set_files["forget"], "role")) == "retain_eval"  # the whole name shows
        await pilot.press("r", "r", "r")  # → unseen → general → forget
        assert [s.role for s in screen.sources] == ["forget", "unseen"]
        table.move_cursor(row=1)
        await pilot.press("x")
        assert [s.spec for s in screen.sources] == [forget_set_files["forget"]]
        assert table.row_count == 1
        await until(pilot, lambda: screen.doc_counts()["forget"] == 16, "the forget documents")


@sync
async def test_a_one_document_retain_set_needs_a_retain_eval_source(store, forget_set_files, tmp_path):
    """Without a retain_eval source a seeded share of retain is held out, which one document cannot
    give: the builder says so under the counts, saving refuses it in one line, and a retain_eval
    source (saved in this process, as create_forget_set's retain_eval) makes the set."""
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "the only document the retain terms train on"}\n')
    app = Harness(lambda: ForgetSetBuilderScreen(store))
    async with app.run_test(size=(100, 40)) as pilot:
        screen = app.screen
        await add(pilot, screen, forget_set_files["forget"], "forget")
        await add(pilot, screen, str(one), "retain")
        await add(pilot, screen, forget_set_files["unseen"], "unseen")
        await until(pilot, lambda: screen.doc_counts()["retain"] == 1, "the retain document")
        assert "needs at least 2" in screen.held_out_note().plain
        screen.query_one("#name", Input).value = "small"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: text(screen, "#save-error") not in ("", "saving…"), "the refusal")
        assert "needs at least 2" in text(screen, "#save-error") and "\n" not in text(screen, "#save-error")
        assert app.result is UNSET

        await add(pilot, screen, forget_set_files["general"], "retain_eval")
        await until(pilot, lambda: screen.doc_counts()["retain_eval"] == 12, "the retain_eval documents")
        assert screen.held_out_note() is None
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.result is not UNSET, "the builder to save and close", timeout=60)
    fs = store.forget_set("small")
    assert fs.counts == {"forget": 16, "retain": 1, "retain_eval": 12, "unseen": 16, "general": 0}
    assert fs.sources["retain_eval"] == [forget_set_files["general"]]


@sync
async def test_builder_errors_stand_beside_their_field_and_save_nothing(store, forget_set_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine first document"}\n{"text": broken\n')
    app = Harness(lambda: ForgetSetBuilderScreen(store))
    async with app.run_test(size=(100, 40)) as pilot:
        screen = app.screen
        await add(pilot, screen, str(tmp_path / "missing.jsonl"), "forget")
        assert text(screen, "#source-error") == f"no such file or folder: {tmp_path / 'missing.jsonl'}"
        assert screen.query_one(SourceTable).row_count == 0
        assert screen.query_one("#source-error", Label).has_class("error")

        screen.query_one("#name", Input).value = "fs"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert text(screen, "#save-error") == "the forget set is empty: add at least one forget source"

        await add(pilot, screen, forget_set_files["retain"], "retain")
        await add(pilot, screen, forget_set_files["unseen"], "unseen")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert text(screen, "#save-error") == "the forget set is empty: add at least one forget source"

        await add(pilot, screen, str(bad), "forget")
        await until(pilot, lambda: str(bad) in screen.readings, "the bad file to be read")
        assert screen.readings[str(bad)]["error"] == f"{bad}:2: not JSON (Expecting value)"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert text(screen, "#save-error") == f"forget: {bad}:2: not JSON (Expecting value)"

        screen.query_one("#name", Input).value = "bad name!"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert text(screen, "#name-error").startswith("forget set name 'bad name!': use letters")
        await pilot.pause(0.3)
        assert app.result is UNSET
    assert list_forget_sets(store) == []


@sync
async def test_builder_refuses_a_name_already_taken(store, forget_set_files):
    make_forget_set(store, "taken", forget_set_files, general=False)
    app = Harness(lambda: ForgetSetBuilderScreen(store))
    async with app.run_test(size=(100, 40)) as pilot:
        screen = app.screen
        for role in ("forget", "retain", "unseen"):
            await add(pilot, screen, forget_set_files[role], role)
        screen.query_one("#name", Input).value = "taken"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: text(screen, "#name-error"), "the name error")
        assert text(screen, "#name-error") == "a forget set named 'taken' already exists (forget sets are immutable; pick a new name)"
        assert text(screen, "#save-error") == ""
        assert app.result is UNSET
    assert [fs.name for fs in list_forget_sets(store)] == ["taken"]


@sync
async def test_builder_reads_and_saves_hf_sources_through_subprocesses(store, forget_set_files, tmp_path):
    """An hf: source would import `datasets`: its documents are read by studies.running.probe, and the set is
    saved by `unlearn forgetset create` in a child, with the store URL in its environment (a retain_eval
    source given here goes there as --retain-eval, and nothing is held out of retain)."""
    import datasets

    texts = ["the first record to forget", "the second record to forget", "and a third one"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "ds"))
    spec = f"hf:{tmp_path / 'ds'}/train"
    app = Harness(lambda: ForgetSetBuilderScreen(store))
    async with app.run_test(size=(160, 48)) as pilot:
        screen = app.screen
        await add(pilot, screen, spec, "forget")
        await add(pilot, screen, forget_set_files["retain"], "retain")
        await add(pilot, screen, forget_set_files["unseen"], "unseen")
        await add(pilot, screen, forget_set_files["general"], "retain_eval")
        counts = await until(pilot, lambda: None not in (c := screen.doc_counts()).values() and c, "the counts", 120)
        assert counts == {"forget": 3, "retain": 32, "retain_eval": 12, "unseen": 16, "general": 0}
        assert screen.held_out_note() is None
        screen.query_one(SourceTable).move_cursor(row=0)
        await pilot.pause()
        assert "and a third one" in str(screen.query_one("#preview").content)
        screen.query_one("#name", Input).value = "from-hf"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.result is not UNSET, "the save", timeout=120)
    fs = store.forget_set("from-hf")
    assert fs.sources["forget"] == [spec] and fs.counts == counts
    assert fs.sources["retain_eval"] == [forget_set_files["general"]]


@pytest.mark.slow
@sync
async def test_builder_counts_tokens_and_saves_with_a_tokenizer_in_a_subprocess(store, forget_set_files, tiny_model_dir,
                                                                                 tiny_sets):
    app = Harness(lambda: ForgetSetBuilderScreen(store))
    async with app.run_test(size=(160, 48)) as pilot:
        screen = app.screen
        for role in ("forget", "retain", "unseen"):
            await add(pilot, screen, forget_set_files[role], role)
        screen.query_one("#tokenizer", Input).value = str(tiny_model_dir)
        screen.query_one("#seq-len", Input).value = "128"
        screen.query_one("#seq-len", Input).focus()
        await pilot.press("enter")
        answer = await until(pilot, lambda: screen.token_answer, "the token count", timeout=120)
        assert answer["ok"], answer
        assert answer["roles"]["forget"]["chunks"] == len(tiny_sets.forget)
        screen.query_one("#name", Input).value = "chunked"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.result is not UNSET, "the save", timeout=120)
    fs = store.forget_set("chunked")
    assert fs.tokenizer == str(tiny_model_dir) and fs.seq_len == 128
    # retain_eval held out of retain as forget_set_texts holds it out (the same seeded split)
    assert fs.chunks == {"forget": len(tiny_sets.forget), "retain": len(tiny_sets.retain),
                         "retain_eval": len(tiny_sets.retain_eval), "unseen": len(tiny_sets.unseen)}


# ------------------------------------------------------------------ parsing the study form

def test_learning_rates_and_milestones_parse():
    assert parse_learning_rates("1e-5, 3e-5").values == (1e-5, 3e-5)
    assert parse_learning_rates("1e-5..1e-3 x3").values == (1e-5, 1e-4, 1e-3)
    assert parse_learning_rates("1e-5..1e-3x4").values == (1e-5, 4.64e-5, 2.15e-4, 1e-3)
    tpe = parse_learning_rates("1e-5 .. 1e-3")
    assert tpe.values is None and tpe.range == (1e-5, 1e-3)
    for bad, says in (("abc", "'abc' is not a number"), ("1e-3..1e-5 x3", "low end"), ("-1e-3", "positive"),
                      ("1e-5..1e-3 x1", "2 to 100"), ("", "give learning rates")):
        with pytest.raises(UnlearnError, match=says):
            parse_learning_rates(bad)
    assert parse_milestones("20,5, 10,5") == [5, 10, 20]
    with pytest.raises(UnlearnError, match="positive integers"):
        parse_milestones("5,0")
    assert device_slots([0, 1], None) == ["cuda:0", "cuda:1"] and device_slots([], 2) == ["cpu", "cpu"]
    with pytest.raises(UnlearnError, match="--workers must be at least 1"):
        device_slots([], 0)
    with pytest.raises(UnlearnError, match="choose a GPU or give CPU workers"):
        device_slots([], "", workers_label="CPU workers")


# ------------------------------------------------------------------ the new-study form

async def fill_study_form(pilot, screen, name: str, model: str, lrs: str, steps: str = "2") -> None:
    select = screen.query_one("#forget-set", Select)
    await until(pilot, lambda: screen.forget_sets, "the forget sets to load")
    screen.query_one("#name", Input).value = name
    screen.query_one("#model", Input).value = model
    select.value = "fs"
    screen.query_one("#methods", SelectionList).select("ga")
    screen.query_one("#lrs", Input).value = lrs
    screen.query_one("#steps", Input).value = steps
    screen.query_one("#workers", Input).value = "1"
    await pilot.pause()


@sync
async def test_new_study_bad_input_is_one_line_beside_each_field(store, forget_set_files, tmp_path):
    make_forget_set(store, "fs", forget_set_files, general=False)
    app = Harness(lambda: NewStudyScreen(store))
    async with app.run_test(size=(100, 40)) as pilot:
        screen = app.screen
        panel = screen.query_one(DevicesPanel)
        report = await until(pilot, lambda: panel.report, "the devices to be read")
        if not report.gpus:  # this machine has none: the form says why and offers CPU workers
            assert str(panel.query_one("#devices-gpus").content).startswith(f"no GPU: {report.gpu_note}")
            assert not screen.query_one("#gpus").display
        methods = screen.query_one("#methods", SelectionList)
        ga = methods.get_option("ga")
        assert "-CE(θ; U)" in str(ga.prompt)
        await fill_study_form(pilot, screen, "S1", str(tmp_path / "no-model"), "abc")
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert text(screen, "#lrs-error") == "learning rate 'abc' is not a number"
        assert screen.query_one("#lrs-error", Label).has_class("error")

        screen.query_one("#lrs", Input).value = "1e-5..1e-3"  # a range without xN is TPE's: the sampler follows
        screen.query_one("#steps", Input).value = "0"
        screen.query_one("#workers", Input).value = "0"
        await pilot.pause()
        assert screen.query_one("#sampler", Select).value == "tpe" and not screen.query_one("#trials", Input).disabled
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert text(screen, "#lrs-error") == ""
        assert text(screen, "#sampler-error") == "the tpe sampler needs a number of trials (1 or more)"
        assert text(screen, "#steps-error") == "steps must be comma-separated positive integers, not '0'"
        assert text(screen, "#devices-error") == "CPU workers must be at least 1"
        screen.query_one("#sampler", Select).value = "tpe"
        screen.query_one("#lrs", Input).value = "1e-4,1e-3"  # a list: the grid's, whatever was chosen before
        await pilot.pause()
        assert screen.query_one("#sampler", Select).value == "grid"

        screen.query_one("#lrs", Input).value = "1e-4"
        screen.query_one("#steps", Input).value = "2"
        screen.query_one("#workers", Input).value = "1"
        screen.query_one("#knobs", Input).value = "retain_weight=x"
        screen.query_one("#attacks", Input).value = "relearn,bogus"
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert text(screen, "#knobs-error").startswith("--param retain_weight=x: give NAME=V1,V2,... with numbers")
        assert text(screen, "#attacks-error").startswith("--attacks: unknown attack 'bogus'")
        screen.query_one("#knobs", Input).value = "retain_weight=0.5,1  beta=0.01:1:log"
        screen.query_one("#attacks", Input).value = "quant4, relearn"
        screen.query_one("#attacks-at", Select).value = "best"
        await pilot.pause()
        model = screen.query_one("#model", Input).value
        earlier = screen.model_checks.pop(model, None)
        screen.model_checks[model] = {"ok": True}  # as if the model had checked out: the form is read whole
        form = screen.read_form()  # what Launch hands to create_study
        screen.model_checks.pop(model)
        if earlier is not None:
            screen.model_checks[model] = earlier
        assert form.knobs == {"retain_weight": [0.5, 1.0], "beta": {"low": 0.01, "high": 1.0, "log": True}}
        assert (form.settings["attacks"], form.attacks_at) == ("quant4, relearn", "best")  # as --attacks takes it
        screen.query_one("#knobs", Input).value = ""
        screen.query_one("#attacks", Input).value = ""
        await pilot.press("ctrl+l")  # the form is good; the model is not: the check says why
        await until(pilot, lambda: "✗" in str(screen.query_one("#model-status", Label).content), "the model check")
        assert str(screen.query_one("#model-status", Label).content) == f"✗ no such model folder: {tmp_path / 'no-model'}"
        assert app.result is UNSET
    assert list_studies(store) == []


def test_the_devices_panel_draws_gpus_as_bars_and_says_why_there_are_none():
    from studies.running.devices import DeviceReport
    from tui.app.widgets.devices import cpu_line, gpu_lines

    gpu = {"index": 0, "name": "NVIDIA H200", "memory_used_mib": 0.75 * 143771, "memory_total_mib": 143771.0,
           "memory_free_mib": 0.25 * 143771, "utilization_pct": 50.0}
    drawn = gpu_lines(DeviceReport([gpu, {**gpu, "index": 1, "utilization_pct": None}], None, {})).plain.splitlines()
    assert drawn[0] == "GPU 0 NVIDIA H200"
    assert drawn[1] == "  mem  " + "█" * 12 + "░" * 4 + " 105.3/140.4 GiB, 35.1 free"
    assert drawn[2] == "  util " + "█" * 8 + "░" * 8 + " 50 %"
    assert drawn[5] == "  util " + "─" * 16 + " —"  # a board that does not report it
    assert gpu_lines(DeviceReport([], "nvidia-ml-py is not installed", {})).plain == "no GPU: nvidia-ml-py is not installed"
    cpu = {"logical_cores": 2, "load_1": 0.5, "load_5": 0.25, "load_15": 0.125, "percent": 25.0}
    assert cpu_line(DeviceReport([], "x", cpu)).plain == "CPU 2 cores  load 0.50 0.25 0.12\n  use  " + "█" * 4 + "░" * 12 + " 25 %"


def test_every_method_shows_its_formula():
    from engine.methods import get_method

    assert method_formula(get_method("ga")) == "-CE(θ; U)"
    assert method_formula(get_method("ga_gd")) == "-CE(θ; U) + λ·CE(θ; R)"
    assert method_formula(get_method("ga_kl_general")) == "-CE(θ; U) + λ·KL(p_θ0 ‖ p_θ; G)"


# Launching from the form (a detached scheduler serving the new study) is driven end to end by
# tests/app/test_app_flows.py, on the quick demo's store.


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
@sync
async def test_both_screens_fit_small_and_large_terminals(store, size):
    for make in (lambda: ForgetSetBuilderScreen(store), lambda: NewStudyScreen(store)):
        app = Harness(make)
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            body = app.screen.query_one("#builder-body, #study-body")
            assert body.size.width <= size[0]
            if size == (80, 24):
                assert body.max_scroll_y > 0  # what does not fit scrolls, never clips
            await pilot.press("escape")
            await until(pilot, lambda app=app: app.result is not UNSET, "escape to go back")
        assert app.result is None


HYGIENE_PROBE = r"""
import json, sys
from studies.store.db import Store
from studies.lifecycle.study import create_study
from tui.app.screens.forgetset_builder import ForgetSetBuilderScreen, SaveForm, save_here
from tui.app.screens.new_study import NewStudyScreen
from tui.app.widgets.devices import DevicesPanel
from studies.running.devices import probe_devices
from studies.running.probe import source_summary

files = json.loads(sys.argv[1])
store = Store(sys.argv[2])
answer, error = save_here(store, SaveForm("fs", {"forget": [files["forget"]], "retain": [files["retain"]],
                                                  "retain_eval": [], "unseen": [files["unseen"]], "general": []},
                                          "text", None, 128, None))
assert error is None, error
assert source_summary(files["general"])["documents"] == 12
probe_devices()
create_study(store, "S", sys.argv[3], "fs", methods=["ga", "ga_gd"], lrs=[1e-4], steps=[2])
print(json.dumps(sorted(sys.modules)))
"""


def test_what_the_screens_do_here_imports_no_training_library(tmp_path, forget_set_files, tiny_model_dir):
    """Saving without a tokenizer, reading sources, reading devices and creating a study stay in
    the app's process: none of them may import torch, transformers, accelerate, datasets or sklearn."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", HYGIENE_PROBE, json.dumps(forget_set_files),
                           f"sqlite:///{tmp_path / 'lab.db'}", str(tiny_model_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    heavy = ("torch", "transformers", "accelerate", "datasets", "sklearn")
    assert [m for m in modules if m.split(".")[0] in heavy] == []
    assert "textual" in modules and "optuna" in modules  # the probe did run the app's code
