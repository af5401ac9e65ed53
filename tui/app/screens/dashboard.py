"""A study's dashboard: a walkable heatmap per method, the metric picker, the trial table, the
running runs and the devices, all live.

Every tick starts one exclusive thread worker that polls a StudyWatch (the study row, its runs,
and only the milestones newer than the last seen). What comes back updates only what changed:
the heatmaps of the methods with changed cells (each redraws the rows that changed), the running
runs, and — when a cell was written — one page of the trial table, re-read in SQL and applied row
by row. The poll hands out its grids too, a method's the very same object while its cells do not
change, so what is read from a grid (its value range, its written cells) is read again only for
the methods that changed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Checkbox, DataTable, Footer, Header, Select, Static

from engine.metric_registry import HEADLINE, LISTED, SCORE, every_run_paths
from tui.app.format import age, fmt_lr, fmt_value
from tui.app.messages import CellRef, CompareCells, ExportRequested, OpenTrial, StudyAction
from tui.app.widgets.devices import DevicesPanel
from tui.app.widgets.heatmap import HeatmapGrid
from tui.app.widgets.running import RunningRuns
from tui.app.widgets.table import MeasuredTable
from tui.heatmap import badness

PAGE = 200  # rows of the trial table read at once: the rest stay in the database
WIDE = 140  # from this many columns, heatmaps and panels sit side by side


def trial_columns() -> tuple[str, ...]:
    """The trial table's columns: the cell's keys and the registry's headline and listed metrics."""
    return ("method", "lr", "steps", *every_run_paths(max_tier=LISTED), "success", "trial")


def sortable() -> tuple[str, ...]:
    """What `s` cycles the trial table's order through: the headline metrics, then the cell's keys."""
    return (*every_run_paths(max_tier=HEADLINE), "steps", "lr", "method", "trial")


def grid_range(grid, metric: str) -> tuple[float, float] | None:
    """The (lo, hi) of tui.heatmap.badness over one grid's values; None when it has none."""
    vals = [b for row in grid.value(metric) for v in row
            if v is not None and (b := badness(metric, v)) is not None and math.isfinite(b)]
    return (min(vals), max(vals)) if vals else None


def per_grid(cache: Optional[dict], method: str, grid, what: str, fn):
    """fn(grid), kept in `cache` ((method, what) -> (grid, value)) while the method's Grid is the very
    same object: a StudyWatch hands the unchanged methods' grids out again, never changed."""
    if cache is None:
        return fn(grid)
    hit = cache.get((method, what))
    if hit is not None and hit[0] is grid:
        return hit[1]
    value = fn(grid)
    cache[(method, what)] = (grid, value)
    return value


def shared_scale(by_method: dict, metric: str, cache: Optional[dict] = None) -> tuple[float, float] | None:
    """One colour scale over every method's values, as `unlearn study heatmap` draws them: methods
    compare at a glance. With a `cache` (see per_grid), only the grids that are new are read."""
    ranges = [r for method, g in by_method.items()
              if (r := per_grid(cache, method, g, "range " + metric, lambda g: grid_range(g, metric))) is not None]
    return (min(lo for lo, _ in ranges), max(hi for _, hi in ranges)) if ranges else None


def _written(grid) -> int:
    """Cells of a grid that were computed (done or diverged)."""
    return sum(1 for c in grid.cells.values() if str(c.status) in ("done", "diverged"))


def trial_cells(row: dict, columns: tuple[str, ...]) -> dict[str, str]:
    out = {"method": row["method"], "lr": fmt_lr(row["lr"]), "steps": str(row["steps"]),
           "success": "✓" if row["success"] else ("div" if row["diverged"] else ""),
           "trial": "" if row["trial"] is None else str(row["trial"])}
    for name in columns:
        if name not in out:
            out[name] = fmt_value(row.get(name))
    return out


class DashboardScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("m", "metric(1)", "metric"),
        Binding("M", "metric(-1)", "prev metric", show=False),
        Binding("C", "compare", "compare"),
        Binding("s", "sort", "sort"),
        Binding("r", "reverse", "reverse", show=False),
        Binding("o", "only_successes", "only ✓", show=False),
        Binding("e", "export", "export"),
        Binding("p", "pause_resume", "pause/resume"),
        Binding("c", "cancel", "cancel"),
    ]

    class Polled(Message):
        def __init__(self, poll) -> None:
            super().__init__()
            self.poll = poll

    class TrialsLoaded(Message):
        def __init__(self, page) -> None:
            super().__init__()
            self.page = page

    class Failed(Message):
        def __init__(self, reason: str) -> None:
            super().__init__()
            self.reason = reason

    def __init__(self, store, study: str, read_devices: bool = True, marked: frozenset = frozenset()) -> None:
        super().__init__()
        self.read_devices = read_devices
        self.marked_before = marked  # cells marked for compare earlier (in any study): shown again
        self.store = store
        self.study = study
        self.metric = SCORE
        # What the picker offers (the poll adds recoveries, bench.* and downstream.* where a study has them).
        self.metrics = every_run_paths()
        self.columns = trial_columns()  # of the trial table
        self.sort, self.descending, self.success_only, self.method_filter = SCORE, False, False, None
        self.steps_total = 0
        self.state: Optional[str] = None
        self._trial_rows: dict[str, dict] = {}  # row key (milestone id) -> trial_page row
        self._trial_text: dict[str, dict[str, str]] = {}
        self._ticks = 0
        self._methods: list[str] = []
        self._grids: dict = {}
        self._per_grid: dict = {}  # what was drawn from each method's grid (per_grid)

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        from studies.reading.views import StudyWatch

        self.watch_ = StudyWatch(self.store, self.study)
        yield Header()
        with VerticalScroll(id="dash-scroll"):
            yield Static(f"study {self.study}: reading…", id="dash-head")
            with Horizontal(id="dash-controls"):
                yield Select([(m, m) for m in self.metrics], value=SCORE, allow_blank=False, id="metric")
                yield Static("", id="dash-robustness")
            with Vertical(id="dash-main"):
                yield Vertical(id="heatmaps")
                with Vertical(id="dash-side"):
                    yield Static("Running runs", classes="section")
                    yield RunningRuns(self.store, id="running")
                    yield Static("Trials", classes="section", id="trials-title")
                    with Horizontal(id="trial-filters"):
                        yield Select([], prompt="every method", id="method-filter")
                        yield Checkbox("only ✓", id="only-success")
                    yield MeasuredTable(id="trials", cursor_type="row", zebra_stripes=True)
                    yield Static("Devices", classes="section")
                    yield DevicesPanel(id="devices")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#trials", DataTable)
        for name in self.columns:
            table.add_column(name, key=name)
        self.tick()
        self.set_interval(self.app.refresh_s, self.tick)
        if self.read_devices:
            self.query_one(DevicesPanel).refresh_devices()

    def on_resize(self) -> None:
        self.query_one("#dash-main").set_class(self.size.width >= WIDE, "wide")

    # ------------------------------------------------------------ live refresh

    def tick(self) -> None:
        self._ticks += 1
        self.poll_store()
        if self.read_devices and self._ticks % 5 == 0:
            self.query_one(DevicesPanel).refresh_devices()

    @work(thread=True, exclusive=True, group="dashboard-poll", name="poll study")
    def poll_store(self) -> None:
        try:
            self.post_message(self.Polled(self.watch_.poll()))
        except Exception as exc:  # a deleted study or a lost server: one line, the next tick tries again
            self.post_message(self.Failed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__))

    def on_dashboard_screen_failed(self, message: Failed) -> None:
        self.query_one("#dash-head", Static).update(f"study {self.study}: {message.reason}")

    def on_dashboard_screen_polled(self, message: Polled) -> None:
        poll = message.poll
        st = poll.study
        self.state = str(st.state)
        by_method = poll.grids
        self.steps_total = max((max(g.steps) for g in by_method.values() if g.steps), default=0)
        done = sum(per_grid(self._per_grid, m, g, "written", _written) for m, g in by_method.items())
        beat = age(poll.scheduler_alive_s_ago) if self.state in ("running", "paused") else "—"
        self.query_one("#dash-head", Static).update(
            f"[b]{st.name}[/b] · {self.state} · model {Path(st.model).name or st.model} · "
            f"forget set {st.spec.get('forget_set', '?')} · cells {done}/{len(poll.cells)} · scheduler beat {beat}")
        self._offer_metrics(poll.metrics)
        self._update_heatmaps(by_method, poll.changed, poll.at_target)
        self.query_one(RunningRuns).update_runs(self.study, poll.running, self.steps_total)
        if poll.new_milestones or poll.state_changed or not self._trial_rows:
            self.load_trials()
        if poll.finished:
            self.notify(f"study {self.study} finished", title="done", timeout=10)

    def _offer_metrics(self, metrics: tuple[str, ...]) -> None:
        """The picker offers what the poll's study_metrics found: an attack's recovery only in a study
        that runs that attack, a benchmark metric only where its cells have it (a TOFU/MUSE preset)
        and downstream.TASK for its tasks."""
        if metrics != self.metrics:
            self.metrics = metrics
            select = self.query_one("#metric", Select)
            select.set_options([(m, m) for m in metrics])
            select.value = self.metric if self.metric in metrics else SCORE

    def _update_heatmaps(self, by_method: dict, changed: set, at_target: dict | None = None) -> None:
        box = self.query_one("#heatmaps", Vertical)
        existing = {w.grid.method: w for w in box.query(HeatmapGrid)}
        self._grids = by_method
        scale = shared_scale(by_method, self.metric, self._per_grid)
        rescaled = any(w.scale != scale for w in existing.values())
        parts = []
        for method, grid in by_method.items():
            widget = existing.get(method)
            if widget is None:
                # (no id from the method's name: a swept variant's brackets are not valid in one)
                widget = HeatmapGrid(grid, metric=self.metric, study=self.study, scale=scale,
                                     at_target=(at_target or {}).get(method))
                box.mount(widget)
                widget.mark(self.marked_before)
                if not existing and not parts:
                    widget.focus()
            elif rescaled or any(k[0] == method for k in changed) or at_target is not None:
                widget.scale = scale
                widget.update_grid(grid, (at_target or {}).get(method, {}))
            parts.append(f"{escape(method)} {grid.robustness:.0%}")  # a variant's [knobs] are not markup
        self.query_one("#dash-robustness", Static).update("robustness: " + " · ".join(parts))
        if list(by_method) != self._methods:  # the first poll, or new methods (a TPE study)
            self._methods = list(by_method)
            self.query_one("#method-filter", Select).set_options([(m, m) for m in self._methods])

    # ------------------------------------------------------------ the trial table (SQL sorted, one page)

    @work(thread=True, exclusive=True, group="dashboard-trials", name="read trials")
    def load_trials(self) -> None:
        from studies.reading.views import trial_page

        try:
            page = trial_page(self.store, self.study, sort=self.sort, descending=self.descending,
                              method=self.method_filter, success_only=self.success_only, limit=PAGE)
        except Exception as exc:
            self.post_message(self.Failed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            return
        self.post_message(self.TrialsLoaded(page))

    def on_dashboard_screen_trials_loaded(self, message: TrialsLoaded) -> None:
        """Apply one page in place: remove rows that left it, add new ones, update changed cells,
        then order the rows as the database did."""
        page = message.page
        table = self.query_one("#trials", DataTable)
        wanted = {str(r["id"]): r for r in page.rows}
        for key in [k for k in self._trial_rows if k not in wanted]:
            table.remove_row(key)
            del self._trial_rows[key], self._trial_text[key]
        for key, row in wanted.items():
            cells = trial_cells(row, self.columns)
            if key not in self._trial_rows:
                table.add_row(*(cells[c] for c in self.columns), key=key)
            else:
                for c in self.columns:
                    if self._trial_text[key][c] != cells[c]:
                        table.update_cell(key, c, cells[c])
            self._trial_rows[key], self._trial_text[key] = row, cells
        rank = {(t["method"], t["lr"], t["steps"]): i
                for i, t in enumerate(self._trial_text[str(r["id"])] for r in page.rows)}
        table.sort("method", "lr", "steps", key=lambda k: rank.get(tuple(k), len(rank)))
        arrow = "↓" if self.descending else "↑"
        shown = f"{len(page.rows)} of {page.total}" if page.total > len(page.rows) else f"{page.total}"
        self.query_one("#trials-title", Static).update(
            f"Trials: {shown}, sorted by {self.sort} {arrow}" + (" · only ✓" if self.success_only else "")
            + (f" · {self.method_filter}" if self.method_filter else ""))

    @on(DataTable.RowSelected, "#trials")
    def _trial_selected(self, event: DataTable.RowSelected) -> None:
        row = self._trial_rows.get(event.row_key.value)
        if row:
            self.post_message(OpenTrial(CellRef(self.study, row["method"], row["lr"], row["steps"])))

    def action_sort(self) -> None:
        keys = sortable()
        self.sort = keys[(keys.index(self.sort) + 1) % len(keys)] if self.sort in keys else SCORE
        self.load_trials()

    def action_reverse(self) -> None:
        self.descending = not self.descending
        self.load_trials()

    def action_only_successes(self) -> None:
        box = self.query_one("#only-success", Checkbox)
        box.value = not box.value

    @on(Checkbox.Changed, "#only-success")
    def _success_filter(self, event: Checkbox.Changed) -> None:
        self.success_only = event.value
        self.load_trials()

    @on(Select.Changed, "#method-filter")
    def _method_filter(self, event: Select.Changed) -> None:
        self.method_filter = None if event.value is Select.BLANK else str(event.value)
        self.load_trials()

    @on(DataTable.HeaderSelected, "#trials")
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        column = str(event.column_key.value)
        if column == "success":
            return self.action_only_successes()
        self.descending = (not self.descending) if column == self.sort else False
        self.sort = column
        self.load_trials()

    # ------------------------------------------------------------ heatmaps and metric

    @on(Select.Changed, "#metric")
    def _metric_changed(self, event: Select.Changed) -> None:
        self.metric = str(event.value)
        scale = shared_scale(self._grids, self.metric, self._per_grid)
        for widget in self.query(HeatmapGrid):
            widget.scale = scale
            widget.metric = self.metric

    def action_metric(self, delta: int) -> None:
        select = self.query_one("#metric", Select)
        select.value = self.metrics[(self.metrics.index(self.metric) + delta) % len(self.metrics)]

    def on_heatmap_grid_cell_chosen(self, message: HeatmapGrid.CellChosen) -> None:
        self.post_message(OpenTrial(message.cell))

    def action_compare(self) -> None:
        """The cells marked here; the app adds those marked in other studies' dashboards."""
        self.post_message(CompareCells([c for w in self.query(HeatmapGrid) for c in w.marked]))

    # ------------------------------------------------------------ study actions

    def action_export(self) -> None:
        self.post_message(ExportRequested(self.study))

    def action_pause_resume(self) -> None:
        self.post_message(StudyAction("resume" if self.state in ("paused", "created") else "pause", self.study))

    def action_cancel(self) -> None:
        self.post_message(StudyAction("cancel", self.study))
