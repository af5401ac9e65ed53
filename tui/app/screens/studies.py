"""The first screen: every study of the store, live.

A timer starts one exclusive thread worker per tick (never two at once, never on the UI thread);
the worker reads `list_studies` (SQL aggregates, no cell metrics) and posts the rows back; only the
cells that changed are updated (`update_cell`), rows are added or removed one by one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.cells import cell_len
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static
from textual.widgets.data_table import ColumnKey

from tui.app.format import age, robustness_bars, score
from tui.app.messages import ExportRequested, OpenStudy, StudyAction
from tui.app.widgets.table import MeasuredTable

COLUMNS = (("name", "study"), ("state", "state"), ("cells", "cells"), ("best", "best"),
           ("robustness", "robust"), ("heartbeat", "beat"), ("model", "model"), ("forget_set", "forget set"),
           ("methods", "methods"))
RUNNING_STATES = ("running", "paused")


def row_cells(r: dict) -> dict[str, str]:
    """The text of each column for one `list_studies` row."""
    return {
        "name": r["name"],
        "state": str(r["state"]),
        "cells": f"{r['cells']['done'] + r['cells']['diverged']}/{r['cells']['total']}",
        "best": score(r.get("best_score")),
        "robustness": robustness_bars(r.get("robustness") or {}, r.get("methods") or []),
        "heartbeat": age(r.get("scheduler_alive_s_ago")) if str(r["state"]) in RUNNING_STATES else "—",
        "model": Path(r["model"]).name or r["model"],
        "forget_set": r["forget_set"]["name"],
        "methods": ",".join(r.get("methods") or []),
    }


class StudiesScreen(Screen):
    BINDINGS = [
        Binding("enter", "open", "open", show=False),
        Binding("n", "new_study", "new"),
        Binding("f", "forget_sets", "forget sets"),
        Binding("e", "export", "export"),
        Binding("p", "pause_resume", "pause/resume"),
        Binding("c", "cancel", "cancel"),
        Binding("d", "delete", "delete"),
        Binding("slash", "filter", "filter"),
        Binding("escape", "clear_filter", "clear filter", show=False),
    ]

    class StudiesLoaded(Message):
        """A fresh read of every study (also tells the app which names its palette offers)."""

        def __init__(self, rows: list[dict]) -> None:
            super().__init__()
            self.rows = rows

    class LoadFailed(Message):
        def __init__(self, reason: str) -> None:
            super().__init__()
            self.reason = reason

    def __init__(self, store) -> None:
        super().__init__()
        self.store = store
        self.rows: dict[str, dict] = {}  # name -> list_studies row, as last read
        self.shown: dict[str, dict[str, str]] = {}  # name -> the cell texts on screen
        self.filter_text = ""

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="studies-body"):
            yield Input(placeholder="filter: part of a name, model, forget set or state", id="filter", classes="hidden")
            yield MeasuredTable(id="studies", cursor_type="row", zebra_stripes=True)
            yield Static("", id="studies-empty")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#studies", DataTable)
        for key, label in COLUMNS:
            table.add_column(label, key=key, width=cell_len(label))
        table.focus()
        self.poll()
        self.set_interval(self.app.refresh_s, self.poll)

    # ------------------------------------------------------------ live refresh

    def poll(self) -> None:
        self.load_studies()

    @work(thread=True, exclusive=True, group="studies-poll", name="read studies")
    def load_studies(self) -> None:
        from engine.errors import UnlearnError
        from studies.reading.status import list_studies

        try:
            rows = list_studies(self.store)
        except (UnlearnError, OSError) as exc:
            self.post_message(self.LoadFailed(str(exc)))
            return
        except Exception as exc:  # the database went away: one line, the next tick tries again
            self.post_message(self.LoadFailed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            return
        self.post_message(self.StudiesLoaded(rows))

    def on_studies_screen_load_failed(self, message: LoadFailed) -> None:
        self.query_one("#studies-empty", Static).update(f"cannot read the store: {message.reason}")

    def on_studies_screen_studies_loaded(self, message: StudiesLoaded) -> None:
        before = {name: str(r["state"]) for name, r in self.rows.items()}
        self.rows = {r["name"]: r for r in message.rows}
        for name, r in self.rows.items():
            if before.get(name) in ("running", "paused") and str(r["state"]) == "done":
                self.notify(f"study {name} finished", title="done", timeout=10)
        self.apply_rows()

    def _matches(self, name: str) -> bool:
        if not self.filter_text:
            return True
        cells = row_cells(self.rows[name])
        hay = " ".join((cells["name"], cells["state"], cells["model"], cells["forget_set"], cells["methods"])).lower()
        return self.filter_text.lower() in hay

    def apply_rows(self) -> None:
        """Update the table in place: changed cells, new rows, removed rows; never clear and refill."""
        table = self.query_one("#studies", DataTable)
        wanted = [n for n in self.rows if self._matches(n)]
        for name in [n for n in self.shown if n not in wanted]:
            table.remove_row(name)
            del self.shown[name]
        for name in wanted:
            cells = row_cells(self.rows[name])
            if name not in self.shown:
                table.add_row(*(cells[k] for k, _ in COLUMNS), key=name)
            else:
                for key, _ in COLUMNS:
                    if self.shown[name][key] != cells[key]:
                        table.update_cell(name, key, cells[key])
            self.shown[name] = cells
        self._fit_columns(table)
        empty = self.query_one("#studies-empty", Static)
        if not self.rows:
            empty.update("No study yet. Press n to create one (f to build a forget set first), "
                         "or from a shell: unlearn demo; unlearn study create …")
        elif not wanted:
            empty.update(f"no study matches {self.filter_text!r} (escape clears the filter)")
        else:
            empty.update("")

    def _fit_columns(self, table: DataTable) -> None:
        """Each column as wide as its widest text, set here rather than measured by the table when
        it is next idle: a busy app, or a dialog opened at once, would otherwise show the columns
        as narrow as their labels."""
        changed = False
        for key, label in COLUMNS:
            width = max([cell_len(label), *(cell_len(cells[key]) for cells in self.shown.values())])
            column = table.columns[ColumnKey(key)]
            if column.width != width:
                column.width, changed = width, True
        if changed:
            table.refresh(layout=True)

    # ------------------------------------------------------------ keys

    def selected(self) -> Optional[str]:
        table = self.query_one("#studies", DataTable)
        if table.row_count == 0:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return row_key.value

    def _need_selection(self) -> Optional[str]:
        name = self.selected()
        if name is None:
            self.notify("no study selected", severity="warning")
        return name

    @on(DataTable.RowSelected, "#studies")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.post_message(OpenStudy(event.row_key.value))

    def action_open(self) -> None:
        if name := self._need_selection():
            self.post_message(OpenStudy(name))

    def action_new_study(self) -> None:
        self.app.action_new_study()

    def action_forget_sets(self) -> None:
        self.app.action_forget_sets()

    def action_export(self) -> None:
        if name := self._need_selection():
            self.post_message(ExportRequested(name))

    def action_pause_resume(self) -> None:
        if name := self._need_selection():
            state = str(self.rows[name]["state"])
            self.post_message(StudyAction("resume" if state in ("paused", "created") else "pause", name))
            self.poll()

    def action_cancel(self) -> None:
        if name := self._need_selection():
            self.post_message(StudyAction("cancel", name))

    def action_delete(self) -> None:
        if name := self._need_selection():
            if str(self.rows[name]["state"]) == "running":
                self.notify(f"study {name} is running: cancel it first (c)", severity="error")
                return
            self.post_message(StudyAction("delete", name))

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("hidden")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.add_class("hidden")
        self.query_one("#studies", DataTable).focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self.apply_rows()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.query_one("#studies", DataTable).focus()
