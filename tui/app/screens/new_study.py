"""The new-study form: name, model, forget set, methods, learning rates, milestones, sampler, the
methods' knobs to sweep, attacks and devices, and an advanced section with every other option of
`unlearn study create` (tui/app/widgets/run_settings_form.py); Launch creates the study
(studies.lifecycle.study.create_study) and starts its detached worker pool through
studies.running.launch.launch_detached, the function `unlearn study run --detach` calls. What is
typed is parsed by studies.lifecycle.inputs, as the CLI's flags are: both take the same forms.

Where the study runs is a choice: the local devices (the default), or a SLURM job array, whose
fields are SLURM_FIELDS (studies.running.slurm_options: the flags of `unlearn study run --slurm`),
parsed by the same `slurm_options`; Launch then submits the array through launch_on_slurm, what
`unlearn study run --slurm` calls.

The model is checked in a subprocess (studies.running.probe: config and tokenizer load), never here.
Every problem is one line beside its field, and nothing is created until the whole form is good.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Input, Label, Select, SelectionList
from textual.widgets.selection_list import Selection
from textual.worker import get_current_worker

from engine.config import RunSettings
from engine.errors import UnlearnError
from engine.methods import list_methods
from studies.lifecycle import inputs
from studies.lifecycle.spec import parse_knob_options
from studies.running.launch import launch_detached
from studies.running.probe import probe_model
from studies.running.slurm import check_shared_store, launch_on_slurm
from studies.running.slurm_options import SLURM_FIELDS, SlurmField, SlurmOptions, slurm_options
from studies.store.db import Store
from studies.store.forgetsets import check_name
from tui.app.widgets.devices import DevicesPanel
from tui.app.widgets.run_settings_form import AdvancedSettings, setting_flags, widget_id

MODEL_DEBOUNCE_S = 0.8
DEVICES_EVERY_S = 3.0
DEFAULT_STEPS = "5,10,20,40"
RUNS_ON = (("local devices", "local"), ("SLURM job array", "slurm"))  # the first is the default


def form_slurm_fields() -> tuple[SlurmField, ...]:
    """The SLURM options the form offers: SLURM_FIELDS' own choice (form=True), in their order."""
    return tuple(f for f in SLURM_FIELDS if f.form)


def slurm_id(f: SlurmField) -> str:
    """A SLURM field's widget id (`gpus_per_job` → `slurm-gpus-per-job`); its error line is id + `-error`."""
    return "slurm-" + f.name.replace("_", "-")


def slurm_label(f: SlurmField) -> str:
    """A SLURM field's label in the form, and what its errors call it: the flag without its dashes."""
    return f.flag.removeprefix("--")


def slurm_placeholder(f: SlurmField) -> str:
    if f.kind is list:
        return "KEY=VALUE pairs separated by spaces: sbatch's options, e.g. constraint=a100"
    return f"{'none' if f.default is None else f.default} · {f.help}"


def slurm_field_of(error: str) -> str:
    """Which line of the SLURM section an error belongs on: the field it is about (slurm_options'
    errors begin with the field's label, or name its flag), else the section's own line."""
    for f in form_slurm_fields():
        if error.startswith(slurm_label(f) + " ") or re.search(rf"{re.escape(f.flag)}\b(?!-)", error):
            return slurm_id(f)
    return "slurm"


def method_formula(method) -> str:
    """`-CE(θ; U) + λ·CE(θ; R)`: what the method minimises, from its terms' own formulas."""
    d = method.describe()
    return d["forget_term"] + (f" + λ·{d['retain_term']}" if d["retain_term"] else "")


@dataclass(frozen=True)
class StudyForm:
    """What the user asked for, read from the widgets once (workers never touch widgets)."""

    name: str
    model: str
    forget_set: str
    methods: list[str]
    lrs: list[float] | None
    lr_range: tuple[float, float] | None
    steps: list[int]
    sampler: str
    trials: int | None
    slots: list[str]
    knobs: dict | None = None  # --param: {name: [values]} or, with tpe, {name: {"low", "high", "log"}}
    attacks_at: str = "every"  # --attacks-at
    settings: dict = field(default_factory=dict)  # the RunSettings given (--attacks among them), as the CLI's flags give them
    options: dict = field(default_factory=dict)  # --max-attempts, --gpus-per-run, --eval-tasks-at, --trust-remote-code
    slurm: SlurmOptions | None = None  # a SLURM job array serves it (slots then empty), else the local slots

    def create(self, store: Store):
        """The study, created as `unlearn study create` creates it from the same values."""
        from studies.lifecycle.study import create_study

        return create_study(store, self.name, self.model, self.forget_set, methods=self.methods, steps=self.steps,
                            lrs=self.lrs, lr_range=self.lr_range, sampler=self.sampler, trials=self.trials,
                            knobs=self.knobs, attacks_at=self.attacks_at, **self.options, **self.settings)


class ForgetSetsLoaded(Message):
    def __init__(self, options: list[tuple[str, str]], error: str | None = None) -> None:
        super().__init__()
        self.options, self.error = options, error


class ModelChecked(Message):
    def __init__(self, model: str, answer: dict) -> None:
        super().__init__()
        self.model, self.answer = model, answer


class LaunchFinished(Message):
    """`field` names where an error belongs; on success `line`, `pid` and `log` say what started."""

    def __init__(self, name: str, error: str | None = None, field: str = "launch", line: str = "",
                 pid: int | None = None, log=None) -> None:
        super().__init__()
        self.name, self.error, self.field, self.line, self.pid, self.log = name, error, field, line, pid, log


# The flags whose field in this form has another name; every other flag's field is its widget_id.
FLAG_FIELDS = {"--param": "knobs", "--lr": "lrs", "--lr-range": "lrs", "--steps": "steps", "--trials": "sampler",
               "--sampler": "sampler", "--attacks-at": "attacks", "--gpus": "devices", "--workers": "devices"}


def field_of(error: str) -> str:
    """Which field an error of create_study (or its spec's validation) is about: the first flag it
    names that the form has a field for, else the first thing it names in words."""
    for flag in re.findall(r"--[a-z0-9][a-z0-9-]*", error):
        if flag in FLAG_FIELDS:
            return FLAG_FIELDS[flag]
        if flag in setting_flags():
            return widget_id(flag)
    low = error.lower()
    for needle, field_id in (("study name", "name"), ("study named", "name"), ("method", "methods"),
                             ("forget set", "forget-set"), ("model", "model")):
        if needle in low:
            return field_id
    return "launch"


class NewStudyScreen(Screen[str | None]):
    """Create and launch a study; dismisses with its name (the app then opens its dashboard), or None.

    Keys: escape goes back; ctrl+l launches; enter in the model field checks it at once."""

    BINDINGS = [Binding("escape", "back", "Back"), Binding("ctrl+l", "launch", "Launch")]

    DEFAULT_CSS = """
    NewStudyScreen #study-body { padding: 0 1; }
    NewStudyScreen .title { text-style: bold; margin-bottom: 1; }
    NewStudyScreen .row { height: auto; }
    NewStudyScreen .row > Label { width: 16; padding: 1 1 0 0; }
    NewStudyScreen .row > Input, NewStudyScreen .row > Select { width: 1fr; }
    NewStudyScreen #sampler { width: 16; }
    NewStudyScreen #attacks-at { width: 20; }
    NewStudyScreen #trials, NewStudyScreen #workers { width: 12; }
    NewStudyScreen .section { margin-top: 1; text-style: bold; }
    NewStudyScreen #methods { height: auto; max-height: 10; }
    NewStudyScreen #gpus { height: auto; max-height: 8; }
    NewStudyScreen .error { width: 1fr; margin-left: 16; padding: 0 1; }
    NewStudyScreen .error.-empty { display: none; }
    NewStudyScreen .error.-busy { background: transparent; color: $text-muted; }
    NewStudyScreen .hint { color: $text-muted; height: auto; width: 1fr; padding-left: 16; }
    NewStudyScreen #model-status.ok { color: $success; }
    NewStudyScreen #model-status.bad { color: $error; }
    NewStudyScreen #buttons { height: auto; margin-top: 1; }
    NewStudyScreen #runs-on { width: 24; }
    NewStudyScreen #local-devices, NewStudyScreen #slurm-fields { height: auto; }
    NewStudyScreen #slurm-fields Checkbox { width: auto; }
    """

    def __init__(self, store: Store, read_devices: bool = True) -> None:
        super().__init__()
        self.store = store
        self.read_devices = read_devices  # False: no device readings (for deterministic snapshots)
        self.model_checks: dict[str, dict] = {}  # model -> probe answer
        self.gpu_indices: list[int] = []
        self.forget_sets: list[str] | None = None  # names offered, once read
        self.launched: LaunchFinished | None = None
        self._model_timer = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="study-body"):
            yield Label("New study", classes="title")
            with Horizontal(classes="row"):
                yield Label("name")
                yield Input(placeholder="letters, digits, _ . -", id="name")
            yield Label("", id="name-error", classes="error -empty")
            with Horizontal(classes="row"):
                yield Label("model")
                yield Input(placeholder="local folder or Hugging Face id", id="model")
            yield Label("", id="model-status", classes="hint")
            with Horizontal(classes="row"):
                yield Label("forget set")
                yield Select([], prompt="loading forget sets…", id="forget-set")
            yield Label("", id="forget-set-error", classes="error -empty")
            yield Label("methods", classes="section")
            methods = list_methods()
            width = max(len(m.id) for m in methods) + 2
            yield SelectionList[str](*[Selection(Text.assemble((m.id.ljust(width), "bold"), (method_formula(m), "dim")),
                                                 m.id, id=m.id) for m in methods], id="methods")
            yield Label("", id="methods-error", classes="error -empty")
            with Horizontal(classes="row"):
                yield Label("learning rates")
                yield Input(placeholder="1e-5,3e-5 or 1e-5..1e-3 x4 (grid); 1e-5:1e-3 (tpe)", id="lrs")
            yield Label("", id="lrs-error", classes="error -empty")
            with Horizontal(classes="row"):
                yield Label("steps")
                yield Input(DEFAULT_STEPS, placeholder="milestones, e.g. 5,10,20,40", id="steps")
            yield Label("", id="steps-error", classes="error -empty")
            with Horizontal(classes="row"):
                yield Label("sampler")
                yield Select([(name, name) for name in inputs.SAMPLERS], value="grid", allow_blank=False, id="sampler")
                yield Label("trials", id="trials-label")
                yield Input(placeholder="runs", id="trials", type="integer", disabled=True)
            yield Label("", id="sampler-error", classes="error -empty")
            with Horizontal(classes="row"):
                yield Label("knobs")
                yield Input(placeholder="optional: beta=0.05,0.1 retain_weight=0.5,1 (tpe: beta=0.01:1:log)", id="knobs")
            yield Label("", id="knobs-error", classes="error -empty")
            with Horizontal(classes="row"):
                yield Label("attacks")
                yield Input(placeholder="optional: relearn,quant4,quant8", id="attacks")
                yield Select([("at every cell", "every"), ("at best cells", "best")], value="every",
                             allow_blank=False, id="attacks-at")
            yield Label("", id="attacks-error", classes="error -empty")
            yield Label("devices", classes="section")
            with Horizontal(classes="row"):
                yield Label("runs on")
                yield Select(RUNS_ON, value=RUNS_ON[0][1], allow_blank=False, id="runs-on")
            with Vertical(id="local-devices"):
                yield DevicesPanel(id="devices")
                yield SelectionList[int](id="gpus")
                with Horizontal(classes="row"):
                    yield Label("CPU workers")
                    yield Input("1", id="workers", type="integer")
                yield Label("used when no GPU is ticked", classes="hint", id="workers-hint")
                yield Label("", id="devices-error", classes="error -empty")
            with Vertical(id="slurm-fields"):
                for f in form_slurm_fields():  # one field per SLURM option the form offers, in SLURM_FIELDS' order
                    with Horizontal(classes="row"):
                        yield Label(slurm_label(f))
                        if f.kind is bool:
                            yield Checkbox("on", bool(f.default), id=slurm_id(f), tooltip=f.help)
                        else:
                            yield Input(placeholder=slurm_placeholder(f), id=slurm_id(f), tooltip=f.help)
                    yield Label("", id=f"{slurm_id(f)}-error", classes="error -empty")
                yield Label("", id="slurm-error", classes="error -empty")
            yield AdvancedSettings(id="advanced")
            with Horizontal(id="buttons"):
                yield Button("Launch", id="launch", variant="success")
                yield Button("Back", id="back")
            yield Label("", id="launch-error", classes="error -empty")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#gpus").display = False
        self.query_one("#workers-hint").display = False
        self.query_one("#slurm-fields").display = False
        self.load_forget_sets()
        if self.read_devices:
            panel = self.query_one(DevicesPanel)
            panel.refresh_devices()
            self.set_interval(DEVICES_EVERY_S, self._refresh_devices)
        self.query_one("#name", Input).focus()

    # ------------------------------------------------------------------ helpers
    def _error(self, field: str, text: str = "", busy: bool = False) -> None:
        """One line beside the field (busy: a note that work is under way, not an error)."""
        label = self.query_one(f"#{field}-error", Label)
        label.update(Text(text))
        label.set_class(not text, "-empty")
        label.set_class(busy, "-busy")
        advanced = self.query_one(AdvancedSettings)
        if text and advanced in label.ancestors:
            advanced.collapsed = False  # a line beside a folded-away field would not be seen

    def _value(self, selector: str) -> str:
        return self.query_one(selector, Input).value.strip()

    # ------------------------------------------------------------------ forget sets
    @work(thread=True, exclusive=True, name="list forget sets", group="new-study-forgetsets")
    def load_forget_sets(self) -> None:
        from studies.store.forgetsets import list_forget_sets

        try:
            sets = list_forget_sets(self.store)
        except Exception as e:
            self.post_message(ForgetSetsLoaded([], str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
            return
        options = [(f"{fs.name} · " + "/".join(str(fs.counts.get(r, 0)) for r in ("forget", "retain", "unseen", "general"))
                    + f" docs · {fs.hash[:8]}", fs.name) for fs in sets]
        self.post_message(ForgetSetsLoaded(options))

    @on(ForgetSetsLoaded)
    def _forget_sets_loaded(self, event: ForgetSetsLoaded) -> None:
        select = self.query_one("#forget-set", Select)
        select.set_options(event.options)
        self.forget_sets = [value for _, value in event.options]
        select.prompt = "choose a forget set" if event.options else "no forget sets yet: build one first"
        if len(event.options) == 1:
            select.value = event.options[0][1]
        self._error("forget-set", event.error or "")

    # ------------------------------------------------------------------ the model check
    @on(Input.Changed, "#model")
    def _model_edited(self) -> None:
        if self._model_timer is not None:
            self._model_timer.stop()
        self._model_timer = self.set_timer(MODEL_DEBOUNCE_S, self._check_model_now)
        self._show_model_status(None)

    @on(Input.Submitted, "#model")
    def _check_model_now(self) -> None:
        self._model_timer = None
        model = self._value("#model")
        if not model:
            self._show_model_status(None)
        elif model in self.model_checks:
            self._show_model_status(self.model_checks[model])
        else:
            self.query_one("#model-status", Label).update(Text("checking config and tokenizer…"))
            self.check_model(model)

    @work(thread=True, exclusive=True, name="check model", group="new-study-model")
    def check_model(self, model: str) -> None:
        worker = get_current_worker()
        answer = probe_model(model, should_stop=lambda: worker.is_cancelled)
        if not answer.get("stopped"):
            self.post_message(ModelChecked(model, answer))

    @on(ModelChecked)
    def _model_checked(self, event: ModelChecked) -> None:
        self.model_checks[event.model] = event.answer
        if event.model == self._value("#model"):
            self._show_model_status(event.answer)

    def _show_model_status(self, answer: dict | None) -> None:
        status = self.query_one("#model-status", Label)
        status.set_class(bool(answer and answer.get("ok")), "ok")
        status.set_class(bool(answer and not answer.get("ok")), "bad")
        if answer is None:
            status.update("")
        elif answer.get("ok"):
            params = answer.get("parameters")
            size = f", {params / 1e6:,.1f} M parameters" if params else ""
            status.update(f"✓ config and tokenizer load ({answer.get('model_type')}, vocab {answer.get('vocab_size')}{size})")
        else:
            status.update(Text(f"✗ {answer.get('error')}"))

    # ------------------------------------------------------------------ sampler and devices
    @on(Input.Changed, "#lrs")
    def _lrs_edited(self) -> None:
        """The sampler follows what is typed (the rule study_sampler applies at launch: a range
        means tpe, a list grid), so the trials field opens when it is needed."""
        try:
            sampler = inputs.study_sampler(inputs.parse_learning_rates(self._value("#lrs")), None)
        except UnlearnError:
            return  # half typed: the sampler stays; Launch says what is wrong
        self.query_one("#sampler", Select).value = sampler

    @on(Select.Changed, "#sampler")
    def _sampler_changed(self, event: Select.Changed) -> None:
        self.query_one("#trials", Input).disabled = event.value != "tpe"
        self._error("sampler")

    @property
    def on_slurm(self) -> bool:
        """SLURM job array chosen (else the local devices)."""
        return self.query_one("#runs-on", Select).value == "slurm"

    @on(Select.Changed, "#runs-on")
    def _runs_on_changed(self) -> None:
        """Show the chosen place's fields only: the devices here, or the job array's options."""
        self.query_one("#local-devices").display = not self.on_slurm
        self.query_one("#slurm-fields").display = self.on_slurm

    def _refresh_devices(self) -> None:
        if not self.on_slurm:  # the local devices are read while they are the choice
            self.query_one(DevicesPanel).refresh_devices()

    @on(DevicesPanel.Refreshed)
    def _devices_read(self, event: DevicesPanel.Refreshed) -> None:
        indices = [g["index"] for g in event.report.gpus]
        if indices == self.gpu_indices:
            return
        self.gpu_indices = indices
        gpus = self.query_one("#gpus", SelectionList)
        gpus.clear_options()
        gpus.add_options([Selection(f"GPU {g['index']} · {g['name']} · {g['memory_free_mib'] / 1024:.1f} GiB free",
                                    g["index"], True) for g in event.report.gpus])
        gpus.display = self.query_one("#workers-hint").display = bool(indices)

    # ------------------------------------------------------------------ launching
    @on(Button.Pressed, "#launch")
    def action_launch(self) -> None:
        form = self.read_form()
        if form is not None:
            self._error("launch", "creating the study…", busy=True)
            self.query_one("#launch", Button).disabled = True
            self.launch(form, self.model_checks.get(form.model))

    def read_form(self) -> StudyForm | None:
        """The form, or None with each problem shown beside its field (all of them at once)."""
        for error in self.query(".error"):  # every field's line, the advanced section's too
            self._error(error.id.removesuffix("-error"))
        problems = 0

        def bad(field_id: str, text: str) -> None:
            nonlocal problems
            problems += 1
            self._error(field_id, text)

        name, model = self._value("#name"), self._value("#model")
        try:
            check_name(name, "study")
        except UnlearnError as e:
            bad("name", str(e))
        if not model:
            self.query_one("#model-status", Label).update(Text("✗ give a local folder or Hugging Face id"))
            problems += 1
        elif (checked := self.model_checks.get(model)) is not None and not checked.get("ok"):
            problems += 1  # its status line already says why
        forget_set = self.query_one("#forget-set", Select).value
        if not isinstance(forget_set, str):
            bad("forget-set", "choose a forget set")
        methods = list(self.query_one("#methods", SelectionList).selected)
        if not methods:
            bad("methods", "tick at least one method")
        sampler = str(self.query_one("#sampler", Select).value)
        lrs = lr_range = trials = None
        try:  # the sampler's rule is study_sampler's, the CLI's: a range means tpe, a list grid
            space = inputs.search_space(self._value("#lrs"), sampler=sampler, lr_label="learning rate", required=True)
            sampler, lrs, lr_range = space.sampler, space.lrs, space.lr_range
        except UnlearnError as e:
            bad("lrs", str(e))
        steps: list[int] = []
        try:
            steps = inputs.parse_milestones(self._value("#steps"), "steps")
        except UnlearnError as e:
            bad("steps", str(e))
        if sampler == "tpe":
            try:
                trials = inputs.parse_count(self._value("#trials"), "trials")
            except UnlearnError:
                pass
            if trials is None:
                bad("sampler", "the tpe sampler needs a number of trials (1 or more)")
        knobs = None
        try:
            knobs = parse_knob_options(self._value("#knobs").split())
        except UnlearnError as e:
            bad("knobs", str(e))
        typed_here = {"--attacks": self.query_one("#attacks", Input).value}  # the main form's RunSettings fields
        settings, options, wrong = self.query_one(AdvancedSettings).read(typed_here)
        for field_id, text in wrong:
            bad(field_id, text)
        if not wrong:
            try:  # each setting alone and together, as create_study will check them (the first problem)
                RunSettings(**settings).validate()
            except UnlearnError as e:
                bad(field_of(str(e)), str(e))
        slots: list[str] = []
        slurm = None
        if self.on_slurm:
            slurm, wrong = self.read_slurm()
            for field_id, text in wrong:
                bad(field_id, text)
            width = options.get("gpus_per_run", 1)
            if slurm is not None and width > (slurm.gpus_per_job or 1):  # a task's devices: its GPUs, else one CPU
                cpu = " (a CPU task has one worker)" if not slurm.gpus_per_job else ""
                bad(slurm_field_of("--gpus-per-job"), f"--gpus-per-run {width} needs that many GPUs in each task; "
                                                      f"gpus-per-job gives {slurm.gpus_per_job}{cpu}")
        else:
            gpus = sorted(self.query_one("#gpus", SelectionList).selected) if self.gpu_indices else []
            try:
                slots = inputs.device_slots(gpus, None if gpus else self._value("#workers"), workers_label="CPU workers")
                if options.get("gpus_per_run", 1) > len(slots):
                    raise UnlearnError(f"--gpus-per-run {options['gpus_per_run']} needs that many devices; "
                                       f"{len(slots)} chosen")
            except UnlearnError as e:
                bad("devices", str(e))
        if problems:
            return None
        return StudyForm(name, model, str(forget_set), methods, lrs, lr_range, steps, sampler, trials, slots,
                         knobs, str(self.query_one("#attacks-at", Select).value), settings, options, slurm)

    def read_slurm(self) -> tuple[SlurmOptions | None, list[tuple[str, str]]]:
        """(the job array's options, [(widget id, one-line error)]): each field parsed alone by
        slurm_options (so every wrong one says so at once), then all together (None where they do
        not parse), then the store checked as the submission will check it: an SQLite file is
        refused here, before anything is created."""
        given = {}
        for f in form_slurm_fields():
            widget = self.query_one(f"#{slurm_id(f)}")
            given[f.name] = widget.value if isinstance(widget, Checkbox) else widget.value.strip()
        wrong = []
        for f in form_slurm_fields():
            try:
                slurm_options({f.name: given[f.name]}, label_of=slurm_label)
            except UnlearnError as e:
                wrong.append((slurm_id(f), str(e)))
        if wrong:
            return None, wrong
        try:
            opts = slurm_options(given, label_of=slurm_label)
        except UnlearnError as e:
            return None, [(slurm_field_of(str(e)), str(e))]
        try:
            check_shared_store(self.store, opts)
        except UnlearnError as e:
            return opts, [("slurm", str(e))]
        return opts, []

    @work(thread=True, exclusive=True, name="launch study", group="new-study-launch")
    def launch(self, form: StudyForm, checked: dict | None) -> None:
        """Check the model (unless checked already), create the study, start its scheduler (or
        submit its SLURM job array). A launch that fails once the study exists says so on the
        launch line; the study stays, as after a failed `unlearn study run`."""
        worker = get_current_worker()
        if checked is None:
            checked = probe_model(form.model, should_stop=lambda: worker.is_cancelled)
            if checked.get("stopped"):
                return
            self.post_message(ModelChecked(form.model, checked))
        if not checked.get("ok"):
            self.post_message(LaunchFinished(form.name, checked.get("error"), "model"))
            return
        try:
            form.create(self.store)
        except UnlearnError as e:
            self.post_message(LaunchFinished(form.name, str(e), field_of(str(e))))
            return
        except Exception as e:  # the store or Optuna: one line, never a traceback
            self.post_message(LaunchFinished(form.name, _one_line(e)))
            return
        if form.slurm is not None:
            try:
                line, _array = launch_on_slurm(self.store, form.name, form.slurm)
            except Exception as e:  # refused, or sbatch failed: as a scheduler that did not start
                said = (f"study {form.name} was created; {_first_line(e)}" if isinstance(e, UnlearnError) else
                        f"study {form.name} was created, but its job array was not submitted: "
                        f"{_one_line(e, prefer='fatal:')}")  # launch_on_slurm's own line says what happened
                self.post_message(LaunchFinished(form.name, said))
                return
            self.post_message(LaunchFinished(form.name, None, line=line))
            return
        try:
            line, pid, log = launch_detached(self.store, form.name, form.slots)
        except Exception as e:
            self.post_message(LaunchFinished(form.name, f"study {form.name} was created, but its scheduler did not "
                                                        f"start: {_one_line(e)}"))
            return
        self.post_message(LaunchFinished(form.name, None, line=line, pid=pid, log=log))

    @on(LaunchFinished)
    def _launch_finished(self, event: LaunchFinished) -> None:
        self.query_one("#launch", Button).disabled = False
        if event.error:
            self._error("launch")
            if event.field == "model":
                self._show_model_status({"ok": False, "error": event.error})
            else:
                self._error(event.field, event.error)
            return
        self.launched = event
        self._error("launch")
        self.notify(event.line, title=f"study {event.name}")
        self.dismiss(event.name)

    @on(Button.Pressed, "#back")
    def action_back(self) -> None:
        self.dismiss(None)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _one_line(e: BaseException, prefer: str | None = None) -> str:
    """`Type: its first line` (or its first line holding `prefer`: sbatch's `fatal:` says more
    than the lines before it)."""
    lines = str(e).strip().splitlines()
    line = next((ln for ln in lines if prefer and prefer in ln), lines[0] if lines else "")
    return f"{type(e).__name__}: {line.strip()}".rstrip(": ")
