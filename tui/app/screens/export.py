"""The export dialog: a study's best configuration per method (or its Pareto fronts) to a YAML or
JSON file, optionally with the unlearned models saved beside it.

Writing the file is torch-free (studies.reading.export + engine.files) and runs in a thread worker.
Saving a model reruns the cell, which needs torch: that is `unlearn export ... --save-model DIR`
in a subprocess, its store URL in the environment (UNLEARN_STORAGE_URL), never on its command
line. Nothing is ever overwritten without asking first: the file, or a model folder it would replace.
"""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, RadioButton, RadioSet, Static
from textual.worker import get_current_worker

from engine.metric_registry import FORGET_GAP, UTILITY_DRIFT
from studies.store.db import Store
from tui.app.messages import CellRef

FORMATS = ("yaml", "json")
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>]")
STOP_GRACE_S = 5


def default_path(study: str, fmt: str) -> str:
    return f"./{study}-best.{fmt}"


def with_format(path: str, fmt: str) -> str:
    """The path with its .yaml/.yml/.json suffix switched to the format's (other suffixes are the user's)."""
    suffix = Path(path).suffix
    return path[: -len(suffix)] + f".{fmt}" if suffix.lower() in (".yaml", ".yml", ".json") else path


def last_line(chunk: str) -> str:
    """The last visible line of a terminal stream (progress bars redraw with \\r and escape codes)."""
    for piece in reversed(re.split(r"[\r\n]", chunk)):
        text = " ".join(_ANSI.sub("", piece).split())
        if text:
            return text
    return ""


@dataclass(frozen=True)
class ExportForm:
    """What the user asked for, read from the widgets once (workers never touch widgets)."""

    study: str
    pareto: bool
    fmt: str
    path: Path
    method: Optional[str]
    models_dir: Optional[Path]


class ExportDialog(ModalScreen[Optional[str]]):
    """Export a study. Dismisses with the written file's path, or None when cancelled.
    Keys: escape cancels; enter in a field exports; y / n answer the overwrite question."""

    DEFAULT_CSS = """
    ExportDialog {
        align: center middle;
    }
    ExportDialog > #export-box {
        width: 90;
        max-width: 100%;
        height: auto;
        max-height: 100%;
        border: round $primary;
        background: $surface;
        padding: 0 1;
    }
    ExportDialog #export-title {
        text-style: bold;
    }
    ExportDialog #export-form {
        height: auto;
        max-height: 80vh;
    }
    ExportDialog .export-label {
        margin-top: 1;
        color: $text-muted;
    }
    ExportDialog RadioSet {
        width: 100%;
    }
    ExportDialog #export-format {
        layout: horizontal;
    }
    ExportDialog #export-format > RadioButton {
        width: 12;
    }
    ExportDialog Input {
        margin: 0 1 0 0;
    }
    ExportDialog #export-save-models {
        margin-top: 1;
    }
    ExportDialog #export-status {
        height: auto;
        margin-top: 1;
    }
    ExportDialog #export-status.error {
        color: $error;
    }
    ExportDialog #export-confirm, ExportDialog #export-buttons {
        height: auto;
        margin-top: 1;
        align-horizontal: right;
    }
    ExportDialog #export-confirm-text {
        width: 1fr;
        color: $warning;
    }
    ExportDialog Button {
        margin-left: 2;
    }
    """

    BINDINGS = [
        Binding("escape", "cancel", "cancel"),
        Binding("y", "overwrite", "overwrite", show=False),
        Binding("n", "keep", "keep", show=False),
    ]

    # ------------------------------------------------------------------ worker messages
    class Prepared(Message):
        """The export is computed; `collisions` are the files and folders it would replace."""

        def __init__(self, form: ExportForm, text: str, count: int, collisions: list[Path]) -> None:
            super().__init__()
            self.form, self.text, self.count, self.collisions = form, text, count, collisions

    class Failed(Message):
        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    class Progress(Message):
        def __init__(self, line: str) -> None:
            super().__init__()
            self.line = line

    class Written(Message):
        def __init__(self, path: Path, note: str) -> None:
            super().__init__()
            self.path, self.note = path, note

    def __init__(self, store: Store, study: str, cell: CellRef | None = None,
                 name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.store = store
        self.study = study
        self.cell = cell
        self._pending: ExportDialog.Prepared | None = None  # an export waiting for the overwrite answer
        self._busy = False

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        with Vertical(id="export-box"):
            yield Static(f"Export study {self.study}", id="export-title", markup=False)
            with VerticalScroll(id="export-form"):
                yield Label("What", classes="export-label")
                with RadioSet(id="export-what", compact=True):
                    yield RadioButton("best configuration per method", value=True, id="export-best", compact=True)
                    yield RadioButton(f"Pareto front per method ({FORGET_GAP} × {UTILITY_DRIFT})", id="export-pareto",
                                      compact=True)
                if self.cell is not None:
                    yield Checkbox(f"only method {self.cell.method}", value=True, id="export-only-method", compact=True)
                yield Label("Format", classes="export-label")
                with RadioSet(id="export-format", compact=True):
                    yield RadioButton("YAML", value=True, id="export-yaml", compact=True)
                    yield RadioButton("JSON", id="export-json", compact=True)
                yield Label("Write to", classes="export-label")
                yield Input(default_path(self.study, "yaml"), id="export-path", compact=True)
                yield Checkbox("also save the model(s) (reruns each exported cell: slow)",
                               id="export-save-models", compact=True)
                yield Input(f"./{self.study}-models", id="export-models-dir", disabled=True, compact=True,
                            placeholder="folder for the models (one subfolder per configuration)")
            yield Static("", id="export-status", markup=False)
            with Horizontal(id="export-confirm"):
                yield Static("", id="export-confirm-text", markup=False)
                yield Button("Overwrite (y)", id="export-overwrite", variant="warning", compact=True)
                yield Button("Keep (n)", id="export-keep", compact=True)
            with Horizontal(id="export-buttons"):
                yield Button("Export", id="export-go", variant="primary", compact=True)
                yield Button("Cancel (esc)", id="export-cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#export-confirm").display = False
        self.query_one("#export-what", RadioSet).focus()

    # ------------------------------------------------------------------ form
    def _fmt(self) -> str:
        return "json" if self.query_one("#export-json", RadioButton).value else "yaml"

    @on(RadioSet.Changed, "#export-format")
    def _format_changed(self) -> None:
        path = self.query_one("#export-path", Input)
        path.value = with_format(path.value, self._fmt())

    @on(Checkbox.Changed, "#export-save-models")
    def _save_models_changed(self, event: Checkbox.Changed) -> None:
        self.query_one("#export-models-dir", Input).disabled = not event.value

    def _form(self) -> ExportForm | str:
        """The form's values, or a one-line reason they cannot be used."""
        text = self.query_one("#export-path", Input).value.strip()
        if not text:
            return "give the file to write to"
        models_dir = None
        if self.query_one("#export-save-models", Checkbox).value:
            folder = self.query_one("#export-models-dir", Input).value.strip()
            if not folder:
                return "give the folder to save the models in"
            models_dir = Path(folder).expanduser().absolute()
        only = self.query("#export-only-method")
        method = self.cell.method if self.cell is not None and only and only.first(Checkbox).value else None
        return ExportForm(self.study, self.query_one("#export-pareto", RadioButton).value, self._fmt(),
                          Path(text).expanduser().absolute(), method, models_dir)

    def _status(self, text: str, error: bool = False) -> None:
        status = self.query_one("#export-status", Static)
        status.update(text)
        status.set_class(error, "error")

    def _set_busy(self, busy: bool) -> None:
        self._busy = busy
        self.query_one("#export-go", Button).disabled = busy
        self.query_one("#export-form").disabled = busy

    # ------------------------------------------------------------------ actions
    @on(Button.Pressed, "#export-go")
    @on(Input.Submitted)
    def action_export(self) -> None:
        if self._busy or self._pending is not None:
            return
        form = self._form()
        if isinstance(form, str):
            self._status(form, error=True)
            return
        self._set_busy(True)
        self._status("computing the export…")
        self._prepare(form)

    @on(Button.Pressed, "#export-cancel")
    def action_cancel(self) -> None:
        self.workers.cancel_group(self, "export")  # a model-saving subprocess is stopped by its worker
        self.dismiss(None)

    @on(Button.Pressed, "#export-overwrite")
    def action_overwrite(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._show_confirm(None)
        self._write(pending)

    @on(Button.Pressed, "#export-keep")
    def action_keep(self) -> None:
        if self._pending is None:
            return
        self._pending = None
        self._show_confirm(None)
        self._set_busy(False)
        self._status("nothing written: choose another file or folder")
        self.query_one("#export-path", Input).focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("overwrite", "keep"):
            return self._pending is not None
        return True

    def _show_confirm(self, collisions: list[Path] | None) -> None:
        box = self.query_one("#export-confirm")
        if collisions:
            names = ", ".join(str(p) for p in collisions[:3]) + (f" and {len(collisions) - 3} more" if len(collisions) > 3 else "")
            verb = "exists" if len(collisions) == 1 else "exist"
            self.query_one("#export-confirm-text", Static).update(f"{names} already {verb}: overwrite?")
            box.display = True
            self.query_one("#export-keep", Button).focus()
        else:
            box.display = False
        self.query_one("#export-buttons").display = not box.display  # one question at a time

    # ------------------------------------------------------------------ worker results
    def on_export_dialog_prepared(self, message: Prepared) -> None:
        message.stop()
        if message.collisions:
            self._pending = message
            self._status(f"{message.count} configuration(s) to export")
            self._show_confirm(message.collisions)
        else:
            self._write(message)

    def on_export_dialog_failed(self, message: Failed) -> None:
        message.stop()
        self._set_busy(False)
        self._status(message.error, error=True)
        self.query_one("#export-path", Input).focus()

    def on_export_dialog_progress(self, message: Progress) -> None:
        message.stop()
        self._status(message.line)

    def on_export_dialog_written(self, message: Written) -> None:
        message.stop()
        self._status(message.note)
        self.app.notify(message.note, title="export")
        self.dismiss(str(message.path))

    def _write(self, prepared: Prepared) -> None:
        self._status("saving the model(s)…" if prepared.form.models_dir else "writing…")
        if prepared.form.models_dir is not None:
            self._save_models(prepared.form, prepared.count)
        else:
            self._write_file(prepared.form, prepared.text, prepared.count)

    # ------------------------------------------------------------------ workers
    @work(thread=True, exclusive=True, group="export", name="export-prepare")
    def _prepare(self, form: ExportForm) -> None:
        from engine.errors import UnlearnError
        from studies.reading.export import export_best, model_dir_name, to_json, to_yaml

        try:
            if form.path.is_dir():
                raise UnlearnError(f"{form.path} is a folder: give a file name")
            if form.path.parent.exists() and not form.path.parent.is_dir():
                raise UnlearnError(f"{form.path.parent} is not a folder")
            if form.models_dir is not None and form.models_dir.exists() and not form.models_dir.is_dir():
                raise UnlearnError(f"{form.models_dir} is a file, not a folder for the models")
            entries = export_best(self.store, form.study, method=form.method, pareto=form.pareto)
            text = to_json(entries) if form.fmt == "json" else to_yaml(entries)
            collisions = [form.path] if form.path.exists() else []
            if form.models_dir is not None:
                collisions += [d for e in entries if (d := form.models_dir / model_dir_name(e)).exists()]
        except (UnlearnError, OSError, ValueError) as exc:
            self.post_message(self.Failed(_one_line(exc)))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(self.Prepared(form, text, len(entries), collisions))

    @work(thread=True, exclusive=True, group="export", name="export-write")
    def _write_file(self, form: ExportForm, text: str, count: int) -> None:
        from engine.files import write_text_atomic

        try:
            write_text_atomic(form.path, text)
        except OSError as exc:
            self.post_message(self.Failed(f"cannot write {form.path}: {_one_line(exc)}"))
            return
        self.post_message(self.Written(form.path, f"wrote {count} configuration(s) to {form.path}"))

    @work(thread=True, exclusive=True, group="export", name="export-save-models")
    def _save_models(self, form: ExportForm, count: int) -> None:
        """`unlearn export` in a subprocess (it needs torch); its last line of output is the progress."""
        from studies.running.pool import child_env

        cmd = [sys.executable, "-m", "tui.cli", "export", form.study, "--out", str(form.path), "--format", form.fmt,
               "--save-model", str(form.models_dir)]
        if form.pareto:
            cmd.append("--pareto")
        if form.method:
            cmd += ["--method", form.method]
        # The CLI draws its progress bar only for a terminal: say stderr is one, and read its last line.
        env = {**child_env(self.store), "PYTHONUNBUFFERED": "1", "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1",
               "NO_COLOR": "1", "COLUMNS": "100", "TOKENIZERS_PARALLELISM": "false"}
        worker = get_current_worker()
        try:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        except OSError as exc:
            self.post_message(self.Failed(f"cannot start the export: {_one_line(exc)}"))
            return
        started, last, tail = time.monotonic(), "", ""
        fd = proc.stderr.fileno()
        while True:
            if worker.is_cancelled:
                _stop(proc)
                return
            ready, _, _ = select.select([fd], [], [], 0.25)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            tail = (tail + chunk.decode("utf-8", errors="replace"))[-4096:]
            line = last_line(tail)
            if line and line != last:
                last = line
                self.post_message(self.Progress(f"{line}  ({time.monotonic() - started:.0f} s)"))
        rc = proc.wait()
        proc.stderr.close()
        if worker.is_cancelled:
            return
        if rc != 0:
            self.post_message(self.Failed(last.removeprefix("error: ") if last else f"the export exited with code {rc}"))
            return
        self.post_message(self.Written(form.path, f"wrote {count} configuration(s) to {form.path}; "
                                                  f"models in {form.models_dir}"))


def _stop(proc: subprocess.Popen) -> None:
    """Cancelled: the export subprocess gets SIGTERM, then SIGKILL (its folders appear whole or not at all)."""
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
