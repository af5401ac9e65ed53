"""Cells side by side: a table (rows = metrics, columns = cells, A, B, C, ...) and the Pareto
scatter of forget_gap against retain_eval_drift (utility on held-out retain_eval), with the front over the compared cells highlighted.

Read in a thread worker (studies.reading.trials.compare_cells), which refuses cells on different forget sets.
"""
from __future__ import annotations

import string
from typing import Optional

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static
from textual.worker import get_current_worker

from engine.errors import UnlearnError
from engine.metric_registry import FORGET_GAP, UTILITY_DRIFT  # the front's axes (utility: held out)
from studies.reading.trials import compare_cells
from studies.store.db import Store
from tui.app.messages import CellRef
from tui.app.widgets.curves import Curves
from tui.app.widgets.table import MeasuredTable
from tui.heatmap import SUCCESS, badness, diverging, fmt_lr, fmt_value


def letter(i: int) -> str:
    """A, B, ..., Z, AA, AB, ...: the short name of the i-th compared cell (table and plot)."""
    letters = string.ascii_uppercase
    return letters[i] if i < len(letters) else letter(i // len(letters) - 1) + letters[i % len(letters)]


def column_label(i: int, cell: dict) -> str:
    return f"{letter(i)} {cell['method']} {fmt_lr(cell['lr'])}×{cell['steps']}"


def best_index(metric: str, values: list[Optional[float]]) -> Optional[int]:
    """The column with the best value of a metric that has a better direction (tui.heatmap's scale)."""
    if not diverging(metric):
        return None
    scored = [(b, i) for i, v in enumerate(values) if v is not None and (b := badness(metric, v)) is not None]
    return min(scored)[1] if len(scored) > 1 else None


class CompareScreen(Screen):
    """`CompareScreen(store, cells)`: two or more cells side by side."""

    DEFAULT_CSS = """
    CompareScreen #compare-body {
        height: 1fr;
        padding: 0 1;
    }
    CompareScreen #compare-body > Static {
        height: auto;
        margin-bottom: 1;
    }
    CompareScreen #compare-body > #compare-title {
        text-style: bold;
        background: $boost;
        margin-bottom: 0;
    }
    CompareScreen #compare-error {
        color: $error;
        display: none;
    }
    CompareScreen #compare-error.-shown {
        display: block;
    }
    CompareScreen #compare-table {
        height: auto;
        margin-bottom: 1;
    }
    CompareScreen #compare-pareto {
        height: 16;
    }
    CompareScreen.-tall #compare-pareto {
        height: 24;
    }
    """

    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]

    BINDINGS = [Binding("escape", "back", "Back")]

    class Loaded(Message):
        def __init__(self, comparison: dict) -> None:
            super().__init__()
            self.comparison = comparison

    class LoadFailed(Message):
        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    def __init__(self, store: Store, cells: list[CellRef], name: str | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.store = store
        self.cells = list(cells)
        self.comparison: Optional[dict] = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="compare-body"):
            yield Static(f"compare {len(self.cells)} cells", id="compare-title")
            yield Static("", id="compare-error")
            yield Static("loading…", id="compare-cells")
            yield MeasuredTable(id="compare-table", cursor_type="row", zebra_stripes=True)
            yield Curves("Pareto front", f"{FORGET_GAP} (lower is better)", UTILITY_DRIFT, id="compare-pareto")
            yield Static("", id="compare-front")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "compare"
        self.query_one("#compare-body").focus()
        self.load()

    @work(thread=True, exclusive=True, name="compare-cells", group="compare-cells")
    def load(self) -> None:
        worker = get_current_worker()
        try:
            message = self.Loaded(compare_cells(self.store, self.cells))
        except UnlearnError as exc:
            message = self.LoadFailed(str(exc))
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read is shown as one line, never a traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = self.LoadFailed(f"cannot read the store: {first}")
        if not worker.is_cancelled:
            self.post_message(message)

    def on_compare_screen_loaded(self, event: Loaded) -> None:
        self.comparison = comp = event.comparison
        cells = comp["cells"]
        fs = comp["forget_set"]
        self.query_one("#compare-title", Static).update(
            Text(f"compare {len(cells)} cells · forget set {fs['name']} ({fs['hash'][:12]})"))
        legend = Text()
        for i, c in enumerate(cells):
            trial = f" trial #{c['trial_number']}" if c["trial_number"] is not None else ""
            front = "  ★ front" if c["pareto"] else ""
            legend.append(("\n" if i else "") + letter(i), style="bold").append(
                f"  {c['study']} · {c['method']} lr {fmt_lr(c['lr'])} × {c['steps']} steps{trial} · {c['status']}")
            legend.append(front, style="bold")
        self.query_one("#compare-cells", Static).update(legend)
        self._show_table(comp)
        self._show_pareto(comp)

    def on_compare_screen_load_failed(self, event: LoadFailed) -> None:
        error = self.query_one("#compare-error", Static)
        error.update(Text(event.error))
        error.add_class("-shown")
        self.query_one("#compare-cells", Static).update("")
        self.notify(event.error, severity="error")

    def _show_table(self, comp: dict) -> None:
        table = self.query_one("#compare-table", DataTable)
        table.clear(columns=True)
        cells = comp["cells"]
        table.add_column("metric", key="metric")
        for i, c in enumerate(cells):
            table.add_column(column_label(i, c), key=letter(i))
        table.add_row("status", *[c["status"] for c in cells], key="status")
        table.add_row("success", *[SUCCESS if c["success"] else "·" for c in cells], key="success")
        for metric in comp["metrics"]:
            values = [c["values"].get(metric) for c in cells]
            best = best_index(metric, values)
            table.add_row(metric, *[Text(fmt_value(v), style="bold reverse" if i == best else "")
                                    for i, v in enumerate(values)], key=metric)
        table.add_row("Pareto front", *["★" if c["pareto"] else "" for c in cells], key="pareto")

    def _show_pareto(self, comp: dict) -> None:
        cells = comp["cells"]
        points = [(i, c["values"][FORGET_GAP], c["values"][UTILITY_DRIFT]) for i, c in enumerate(cells)]
        points = [p for p in points if p[1] is not None and p[2] is not None]
        front = [i for i in comp["front"]]
        others = [p for p in points if p[0] not in front]
        by_index = {p[0]: p for p in points}
        self.query_one("#compare-pareto", Curves).set_scatter(
            {"cells": ([p[1] for p in others], [p[2] for p in others])},
            front=([by_index[i][1] for i in front], [by_index[i][2] for i in front]),
            labels=[(f" {letter(i)}", x, y) for i, x, y in points])
        missing = [letter(i) for i in range(len(cells)) if i not in by_index]
        text = Text("Pareto front ", style="bold").append(f"({FORGET_GAP} ↓, {UTILITY_DRIFT} ↓): ", style="dim")
        text.append(", ".join(letter(i) for i in front) or "none (no cell computed)")
        if missing:
            text.append(f"\nnot plotted (not computed or diverged): {', '.join(missing)}", style="dim")
        self.query_one("#compare-front", Static).update(text)

    def action_back(self) -> None:
        self.app.pop_screen()
