"""The CLI and the app's new-study form take the same inputs: one table of learning rates and
milestones goes through `unlearn study create` and through the form, and both create the same
spec or both refuse with one line (exit 2 on the CLI, beside the field in the app). Every option of
`study create` has a field in the form, and a value typed there lands in the spec as its flag puts it."""
from __future__ import annotations

import asyncio
import inspect
import json

import pytest
from textual.app import App
from textual.widgets import Input, Label, Select, SelectionList

from engine.config import RunSettings, settings_fields
from studies.lifecycle.inputs import STUDY_OPTIONS
from studies.store.db import Store
from tests.studies_helpers import HUB_MODEL, assert_one_line_error, cli_in_process, make_forget_set
from tui.app.screens.new_study import NewStudyScreen
from tui.app.widgets.run_settings_form import widget_id

pytestmark = pytest.mark.timeout(300)

# (what is typed: --lr / the learning-rates field, --steps / the steps field), then what both make
# of it: (sampler, lrs, lr_range, steps), or (the form's field, the words of the one-line error both give).
TABLE = [
    (("1e-4,3e-4", "2,4"), ("grid", [1e-4, 3e-4], None, [2, 4])),
    (("3e-4, 1e-4,1e-4", " 4,2, 2"), ("grid", [1e-4, 3e-4], None, [2, 4])),
    (("1e-5..1e-3 x3", "5"), ("grid", [1e-5, 1e-4, 1e-3], None, [5])),
    (("1e-5..1e-3x4", "5"), ("grid", [1e-5, 4.64e-5, 2.15e-4, 1e-3], None, [5])),
    (("1e-5:1e-3 x3", "5"), ("grid", [1e-5, 1e-4, 1e-3], None, [5])),
    (("1e-6:1e-3", "5,10"), ("tpe", None, [1e-6, 1e-3], [5, 10])),  # the CLI's --lr-range form, in --lr too
    (("1e-6 .. 1e-3", "5,10"), ("tpe", None, [1e-6, 1e-3], [5, 10])),  # the app's range form, on the CLI too
    (("abc", "5"), ("lrs", "'abc' is not a number")),
    (("-1e-3", "5"), ("lrs", "'-1e-3' must be a positive number")),
    (("1e-3..1e-5 x3", "5"), ("lrs", "the low end must be below the high end")),
    (("1e-5..1e-3 x1", "5"), ("lrs", "xN takes 2 to 100 values")),
    (("1e-4", "0"), ("steps", "must be comma-separated positive integers, not '0'")),
    (("1e-4", "2,x"), ("steps", "must be comma-separated positive integers, not '2,x'")),
]
TRIALS = "3"  # given with every row: a range means tpe, which needs it; a grid study ignores it


class Harness(App):
    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store

    def on_mount(self) -> None:
        self.push_screen(NewStudyScreen(self.store, read_devices=False))


@pytest.fixture
def store(tmp_path, forget_set_files) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'lab.db'}")
    make_forget_set(store, "fs", forget_set_files, general=False)
    return store


def cli_create(capsys, store: Store, name: str, *args: str):
    return cli_in_process(capsys, "study", "create", name, "--model", HUB_MODEL, "--forget-set", "fs",
                          "--methods", "ga_gd", "--storage", store.url, "--json", *args)


def app_create(store: Store, forms: list[tuple[str, dict[str, str | bool]]]) -> list[tuple[dict | None, dict]]:
    """Fill the form once per (study name, fields: widget id → text, or a tick), in one app session,
    read it as Launch does and create the study as Launch does (without starting its scheduler).
    Returns, per form, (the spec or None, the errors shown: error label id → line)."""
    async def fill_all():
        app = Harness(store)
        out = []
        async with app.run_test(size=(120, 50)) as pilot:
            screen = app.screen
            while not screen.forget_sets:
                await pilot.pause(0.05)
            screen.model_checks[HUB_MODEL] = {"ok": True}  # as if the model had checked out: nothing here loads it
            screen.query_one("#model", Input).value = HUB_MODEL
            screen.query_one("#forget-set", Select).value = "fs"
            screen.query_one("#methods", SelectionList).select("ga_gd")
            blank: dict = {}  # each field's value before a form filled it, to empty it for the next
            for name, fields in forms:
                screen.query_one("#name", Input).value = name
                for wid, value in {**blank, "workers": "1", "trials": TRIALS, **fields}.items():
                    widget = screen.query_one(f"#{wid}")
                    blank.setdefault(wid, widget.value)
                    widget.value = value
                    if wid == "lrs":  # the sampler follows the field (a range means tpe)
                        await pilot.pause()
                await pilot.pause()
                form = screen.read_form()
                errors = {label.id: str(label.content) for label in screen.query(".error") if str(label.content)}
                if any(label.id in errors for label in screen.query("#advanced .error")):
                    assert not screen.query_one("#advanced").collapsed  # its errors are never folded away
                out.append(((form.create(store).spec if form else None), errors))
        return out

    return asyncio.run(fill_all())


def spec_of(r) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["spec"]


def test_the_cli_and_the_form_take_the_same_learning_rates_and_milestones(capsys, store):
    in_app = app_create(store, [(f"a{i}", {"lrs": lr, "steps": steps}) for i, ((lr, steps), _) in enumerate(TABLE)])
    for i, (((lr, steps), want), (spec, errors)) in enumerate(zip(TABLE, in_app)):
        cli = cli_create(capsys, store, f"c{i}", "--lr", lr, "--steps", steps, "--trials", TRIALS)
        if len(want) == 2:  # refused
            field, words = want
            assert_one_line_error(cli, words)
            assert spec is None and list(errors) == [f"{field}-error"] and words in errors[f"{field}-error"], errors
            continue
        sampler, lrs, lr_range, milestones = want
        assert spec_of(cli) == spec, (lr, steps)
        assert (spec["sampler"], spec["lrs"], spec["lr_range"], spec["steps"]) == (sampler, lrs, lr_range, milestones)


def test_lr_range_and_sampler_flags_mean_what_the_field_and_the_sampler_choice_mean(capsys, store):
    [(spec, _)] = app_create(store, [("a", {"lrs": "1e-6:1e-3", "steps": "5"})])
    assert spec_of(cli_create(capsys, store, "c", "--lr-range", "1e-6:1e-3", "--trials", TRIALS, "--steps", "5")) == spec
    assert spec_of(cli_create(capsys, store, "c2", "--lr-range", "1e-6..1e-3", "--trials", TRIALS, "--steps", "5")) == spec
    # a list with tpe asked for: the same refusal from both faces
    assert_one_line_error(cli_create(capsys, store, "c3", "--lr", "1e-4", "--sampler", "tpe", "--trials", "3",
                                     "--steps", "5"), "the tpe sampler draws learning rates from a range")

    async def tpe_with_a_list():  # the sampler follows the field; choosing tpe after typing a list is refused
        app = Harness(store)
        async with app.run_test(size=(120, 50)) as pilot:
            screen = app.screen
            screen.query_one("#lrs", Input).value = "1e-4"
            await pilot.pause()
            screen.query_one("#sampler", Select).value = "tpe"
            await pilot.pause()
            screen.read_form()
            return str(screen.query_one("#lrs-error", Label).content)

    assert asyncio.run(tpe_with_a_list()).startswith("the tpe sampler draws learning rates from a range")
    for args, says in ((("--lr", "1e-4", "--lr-range", "1e-6:1e-3"), "not both"),
                       (("--lr-range", "1e-5..1e-3 x4"), "--lr-range takes LOW:HIGH")):
        assert_one_line_error(cli_create(capsys, store, "c4", *args, "--steps", "5"), says)


# Values for every RunSettings field and study option, other than their defaults, in groups that
# may go together (--lora excludes --params; --fsdp excludes --attacks and 8-bit optimizers).
def setting_groups(tmp_path) -> list[dict[str, str | bool]]:
    ratios, tasks = tmp_path / "ratios.json", tmp_path / "tasks"
    ratios.write_text("[]")
    tasks.mkdir()
    return [
        {"--batch-size": "8", "--seq-len": "64", "--seed": "3", "--warmup": "2", "--retain-weight": "0.5",
         "--eval-batch-size": "4", "--min-k": "0.3", "--tol-forget": "0.2", "--tol-retain": "0.1",
         "--divergence-factor": "100", "--attacks": "quant4, relearn", "--params": "saliency:5", "--dtype": "bf16",
         "--gradient-checkpointing": True, "--optim": "adamw8bit", "--bench-samples": "10",
         "--tofu-retain-truth-ratios": str(ratios), "--muse-retrained-auc": "0.6", "--retrained-auc": "0.55",
         "--privleak-attack": "loss", "--reference-model": "EleutherAI/pythia-14m", "--eval-tasks": "arc_easy, piqa",
         "--eval-tasks-dir": str(tasks), "--eval-tasks-limit": "5",
         "--max-attempts": "3", "--eval-tasks-at": "every", "--trust-remote-code": True, "--target-spread": "0.05",
         "--watch-every": "2", "--stop-at-target": True, "--mia-gradnorm": True, "--relearn-recipe": "openunlearning",
         "--relearn-from": "retain", "--quant-backend": "rtn"},
        {"--lora": "4", "--lora-alpha": "8", "--lora-targets": "q_proj,v_proj", "--fsdp": True, "--gpus-per-run": "2",
         "--attacks": "", "--seeds": "0,1"},
    ]


def test_every_study_create_option_has_a_field_in_the_form(store):
    """Every flag of `study create` is in the form: in its main part (under another name where it
    has one), else in the advanced section, under the flag's own name."""
    from tui.cli.study import create_cmd

    main_part = {"--lr": "lrs", "--lr-range": "lrs", "--sampler": "sampler", "--trials": "trials", "--steps": "steps",
                 "--param": "knobs", "--model": "model", "--forget-set": "forget-set", "--methods": "methods",
                 "--attacks-at": "attacks-at"}
    not_in_a_form = {"--storage", "--json"}  # the app's store is the one it opened; JSON is the CLI's output
    flags = [p.default.param_decls[0] for p in inspect.signature(create_cmd).parameters.values()
             if getattr(p.default, "param_decls", None)]
    assert {f.metadata["flag"] for f in settings_fields()} <= set(flags)
    assert {o.flag for o in STUDY_OPTIONS} <= set(flags)

    async def ids():
        app = Harness(store)
        async with app.run_test(size=(120, 50)):
            return {w.id for w in app.screen.query("*") if w.id}

    present = asyncio.run(ids())
    missing = [f for f in flags if f not in not_in_a_form and main_part.get(f, widget_id(f)) not in present]
    assert missing == []


def test_a_setting_typed_in_the_form_lands_in_the_spec_as_its_flag_puts_it(capsys, store, tmp_path):
    groups = setting_groups(tmp_path)
    covered = {flag for g in groups for flag, v in g.items() if v not in ("", False)}
    assert covered == {f.metadata["flag"] for f in settings_fields()} | {o.flag for o in STUDY_OPTIONS}
    defaults = RunSettings().to_dict()
    forms = []
    for i, group in enumerate(groups):
        fields = {"lrs": "1e-4", "steps": "2", **{widget_id(flag): v for flag, v in group.items()}}
        if group.get("--gpus-per-run"):
            fields["workers"] = group["--gpus-per-run"]  # the form wants as many devices as a run takes
        forms.append((f"a{i}", fields))
    in_app = app_create(store, forms)
    for i, (group, (app_spec, errors)) in enumerate(zip(groups, in_app)):
        flags = [a for flag, v in group.items() if v != "" for a in ((flag,) if v is True else (flag, v))]
        cli_spec = spec_of(cli_create(capsys, store, f"c{i}", "--lr", "1e-4", "--steps", "2", *flags))
        assert errors == {} and app_spec == cli_spec, errors
        changed = {k for k, v in app_spec["run"].items() if v != defaults[k]}
        assert {f.name for f in settings_fields() if f.metadata["flag"] in group and group[f.metadata["flag"]]} <= changed
    # --tol-forget / --tol-retain: a number where typed (the first group), "auto" (None) where left blank
    assert [(spec["run"]["tol_forget"], spec["run"]["tol_retain"]) for spec, _ in in_app] == [(0.2, 0.1), (None, None)]


def test_an_auto_setting_says_so_in_its_field(store):
    """An Optional setting whose unset value has a name (--tol-forget: auto) shows that name as its
    field's default, as `study create --help` does."""
    async def placeholders():
        app = Harness(store)
        async with app.run_test(size=(120, 50)):
            return {wid: app.screen.query_one(f"#{wid}", Input).placeholder for wid in ("tol-forget", "tol-retain")}

    assert all(p.startswith("auto · success needs") for p in asyncio.run(placeholders()).values())


def test_a_bad_setting_is_one_line_beside_its_field(store):
    (spec, errors), (spec2, errors2) = app_create(store, [
        ("a", {"lrs": "1e-4", "steps": "2", "batch-size": "x", "min-k": "2", "max-attempts": "0"}),
        ("a", {"lrs": "1e-4", "steps": "2", "min-k": "2", "lora-alpha": "4"})])
    assert spec is None
    assert errors == {"batch-size-error": "--batch-size must be an integer, not 'x'",
                      "max-attempts-error": "--max-attempts must be at least 1"}
    assert spec2 is None and errors2 == {"min-k-error": "--min-k must be in (0, 1]"}  # validate's first problem
