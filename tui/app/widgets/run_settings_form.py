"""The new-study form's advanced section: one field per `study create` option the main form does
not show, generated from `engine.config.RunSettings` (as the CLI's flags are) plus the study's own
options, so whatever a CLI user can set, the app can too. A field is labelled with its flag, says
its default in its placeholder, and converts what is typed as the flag does
(studies.lifecycle.inputs.setting_value); blank means "not given", as a left-out flag."""
from __future__ import annotations

from textual.containers import Horizontal
from textual.widgets import Checkbox, Collapsible, Input, Label, Select

from engine.config import settings_fields
from engine.errors import UnlearnError
from studies.lifecycle.inputs import STUDY_OPTIONS, StudyOption, parse_count, setting_default_text, setting_value

MAIN_FORM_FLAGS = ("--attacks",)  # RunSettings flags the main form shows (attacks sit with their where-to)


def widget_id(flag: str) -> str:
    """A field's widget id is its flag without the dashes (`--batch-size` → `batch-size`), so an
    error that names a flag finds the field it belongs beside."""
    return flag.removeprefix("--")


def setting_flags() -> tuple[str, ...]:
    """Every flag the advanced section (or, for MAIN_FORM_FLAGS, the main form) has a field for."""
    return tuple(f.metadata["flag"] for f in settings_fields()) + tuple(o.flag for o in STUDY_OPTIONS)


def _row(flag: str, field) -> tuple:
    """A field's row (its flag, the field) and the line beside it where its error goes."""
    return Horizontal(Label(flag), field, classes="row"), Label("", id=f"{widget_id(flag)}-error", classes="error -empty")


def _option_field(o: StudyOption):
    wid = widget_id(o.flag)
    if isinstance(o.default, bool):
        return Checkbox("on", o.default, id=wid, tooltip=o.help)
    if o.choices:
        return Select([(c, c) for c in o.choices], value=o.default, allow_blank=False, id=wid, tooltip=o.help)
    return Input(placeholder=f"{o.default_text or o.default} · {o.help}", id=wid, tooltip=o.help)


def _setting_field(f):
    flag, help_text = f.metadata["flag"], f.metadata["help"]
    if isinstance(f.default, bool):
        return Checkbox("on", False, id=widget_id(flag), tooltip=help_text)
    default = "the forget set's" if f.name == "seq_len" else setting_default_text(f)  # as study create has it
    return Input(placeholder=f"{default} · {help_text}", id=widget_id(flag), tooltip=help_text)


class AdvancedSettings(Collapsible):
    """Collapsed at first: the defaults suit most studies, and the main form stays one screen."""

    DEFAULT_CSS = """
    AdvancedSettings .row > Label { width: 28; }
    AdvancedSettings .error { margin-left: 28; }
    AdvancedSettings Checkbox { width: auto; }
    AdvancedSettings #eval-tasks-at { width: 20; }
    """

    def __init__(self, **kwargs) -> None:
        rows = [w for o in STUDY_OPTIONS for w in _row(o.flag, _option_field(o))]
        rows += [w for f in settings_fields() if f.metadata["flag"] not in MAIN_FORM_FLAGS
                 for w in _row(f.metadata["flag"], _setting_field(f))]
        super().__init__(*rows, title="advanced: every other `study create` option", collapsed=True, **kwargs)

    def read(self, main_form: dict[str, str]) -> tuple[dict, dict, list[tuple[str, str]]]:
        """(the RunSettings given, create_study's study options given, [(widget id, one-line error)]).
        `main_form`: what is typed in the main form's fields of MAIN_FORM_FLAGS, by flag."""
        settings, options, problems = {}, {}, []
        for f in settings_fields():
            flag = f.metadata["flag"]
            typed = main_form[flag] if flag in MAIN_FORM_FLAGS else self._typed(widget_id(flag))
            try:
                value = setting_value(f, typed)
            except UnlearnError as e:
                problems.append((widget_id(flag), str(e)))
                continue
            if value is not None:
                settings[f.name] = value
        for o in STUDY_OPTIONS:
            typed = self._typed(widget_id(o.flag))
            try:
                if isinstance(o.default, bool):
                    value = True if typed else None
                elif o.choices:
                    value = typed
                elif o.parse is not None:
                    value = o.parse(typed, o.flag)
                else:
                    value = parse_count(typed, o.flag)
            except UnlearnError as e:
                problems.append((widget_id(o.flag), str(e)))
                continue
            if value is not None:
                options[o.name] = value
        return settings, options, problems

    def _typed(self, wid: str) -> str | bool:
        widget = self.query_one(f"#{wid}")
        return widget.value if isinstance(widget, (Input, Checkbox)) else str(widget.value)
