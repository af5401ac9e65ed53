"""The running runs of a study: one row per run (method, lr, attempt, step k/N with a bar, heartbeat
age, device, node) and, on `l`, the tail of the highlighted run's log below the table. A `slurm`
column (the array task that claimed the run, ARRAYJOB_INDEX) shows while any running run has one.

The owner (a screen polling `studies.reading.status.study_status`) hands the rows down with
`update_runs`; the table changes in place, so the cursor and the scroll position survive every
refresh. The only thing this widget reads itself is a log tail, in a thread worker.
"""
from __future__ import annotations

from typing import Optional

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widget import Widget
from textual.widgets import DataTable, Log, Static
from textual.worker import get_current_worker

from studies.store.db import Store
from tui.app.widgets.table import MeasuredTable
from tui.heatmap import fmt_lr

# (key, label); narrow labels where the values are narrow: a SLURM run's row fits 80 columns
COLUMNS = (("method", "method"), ("lr", "lr"), ("attempt", "try"), ("progress", "step"),
           ("heartbeat", "beat"), ("device", "device"), ("node", "node"))
SLURM_COLUMN = ("slurm", "slurm")  # added while a running run has a SLURM task, removed when none has
NODE_WIDTH = 12
BAR_WIDTH = 8
TAIL_LINES = 40

RunKey = tuple[str, float]


def run_key(method: str, lr: float) -> str:
    """A table row key of a run (exact: repr keeps every digit of the lr)."""
    return f"{method}|{float(lr)!r}"


def progress_text(step: int, total: int) -> Text:
    """`█████░░░ 12/20`: a text bar, so a row stays one line of the table."""
    total = max(0, int(total or 0))
    step = max(0, int(step or 0))
    filled = BAR_WIDTH * min(step, total) // total if total else 0  # full only when done
    bar = Text("█" * filled, style="green") + Text("░" * (BAR_WIDTH - filled), style="dim")
    return bar + Text(f" {step}/{total}" if total else f" {step}")


def node_text(node: Optional[str]) -> str:
    """A node's short name (`gpu017.cluster.example.org` → `gpu017`), at most NODE_WIDTH long: a
    longer one keeps its start and its end (`gpu…a100-017`), where a cluster's nodes differ."""
    if not node:
        return "—"
    short = node if node.replace(".", "").isdigit() else node.split(".")[0]  # an IP address stays whole
    return short if len(short) <= NODE_WIDTH else short[:3] + "…" + short[-(NODE_WIDTH - 4):]


def age_text(seconds: Optional[float], timeout_s: float) -> Text:
    """A heartbeat's age, yellow past half the timeout, red past it (the run is about to be reaped)."""
    if seconds is None:
        return Text("never", style="red")
    if seconds < 1:
        label = "<1 s"
    elif seconds < 120:
        label = f"{seconds:.0f} s"
    elif seconds < 7200:
        label = f"{seconds / 60:.0f} min"
    else:
        label = f"{seconds / 3600:.0f} h"
    style = "red" if seconds > timeout_s else "yellow" if seconds > timeout_s / 2 else ""
    return Text(label, style=style)


class RunningRuns(Widget):
    """The study's running runs. `update_runs(study, runs, steps_total)` with
    `study_status(...)["running"]` entries; key `l` shows or hides the highlighted run's log tail."""

    DEFAULT_CSS = """
    RunningRuns {
        height: auto;
        layout: vertical;
    }
    RunningRuns > #running-empty {
        color: $text-muted;
        padding: 0 1;
    }
    RunningRuns > DataTable {
        height: auto;
        max-height: 12;
    }
    RunningRuns > #running-tail-title {
        background: $boost;
        padding: 0 1;
    }
    RunningRuns > Log {
        height: 12;
        border: none;
    }
    """

    BINDINGS = [Binding("l", "toggle_log", "log tail")]

    class TailRead(Message):
        """A log tail read in the worker (posted to this widget itself)."""

        def __init__(self, key: str, lines: list[str], error: str | None = None) -> None:
            super().__init__()
            self.key, self.lines, self.error = key, lines, error

    def __init__(self, store: Store, *, heartbeat_timeout_s: float | None = None, tail_lines: int = TAIL_LINES,
                 name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.store = store
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.tail_lines = tail_lines
        self.study: str | None = None
        self._runs: dict[str, dict] = {}  # row key -> the run's last entry
        self._steps_total = 0
        self._tail_key: str | None = None  # the run whose log tail shows, if any
        self._tail_run: dict | None = None  # its last entry (kept when it stops running)

    def compose(self) -> ComposeResult:
        yield Static("no run is running", id="running-empty")
        table = MeasuredTable(id="running-table", cursor_type="row", zebra_stripes=True)
        table.display = False
        yield table
        title = Static("", id="running-tail-title", markup=False)
        title.display = False
        yield title
        log = Log(id="running-tail", max_lines=2000)
        log.display = False
        yield log

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, label in COLUMNS:
            table.add_column(label, key=key)

    # ------------------------------------------------------------------ rows
    @property
    def run_keys(self) -> list[str]:
        """Row keys in the table's order (for the owner and tests)."""
        return [row.key.value for row in self.query_one(DataTable).ordered_rows]

    @property
    def slurm_shown(self) -> bool:
        """Whether the table has its `slurm` column now."""
        return SLURM_COLUMN[0] in self.query_one(DataTable).columns

    def _cells(self, run: dict, slurm: bool) -> dict[str, object]:
        """A row's cells in the columns' order (`slurm`: with the slurm column's)."""
        cells = {"method": run["method"], "lr": fmt_lr(float(run["lr"])), "attempt": str(run.get("attempts") or 1),
                 "progress": progress_text(run.get("step") or 0, self._steps_total),
                 "heartbeat": age_text(run.get("heartbeat_age_s"), self._heartbeat_timeout_s()),
                 "device": run.get("device") or "—", "node": node_text(run.get("node") or run.get("host"))}
        if slurm:
            cells[SLURM_COLUMN[0]] = run.get("slurm_job") or "—"
        return cells

    def _heartbeat_timeout_s(self) -> float:
        """The one given, else the app's, else the lab's setting (an app learns it with the store)."""
        given = self.heartbeat_timeout_s or getattr(self.app, "heartbeat_timeout_s", None)
        if given:
            return given
        from studies.settings import lab_settings

        return lab_settings().heartbeat_timeout

    def update_runs(self, study: str, runs: list[dict], steps_total: int) -> None:
        """Show these runs: rows that changed are updated in place, new ones added, gone ones removed."""
        table = self.query_one(DataTable)
        if study != self.study:
            self.study = study
            self._close_tail()
        self._steps_total = int(steps_total or 0)
        wanted = {run_key(r["method"], r["lr"]): r for r in runs}
        for key in [k for k in self._runs if k not in wanted]:
            table.remove_row(key)
            del self._runs[key]
        slurm = any(r.get("slurm_job") for r in runs)
        if slurm and not self.slurm_shown:  # the column joins the rows already there, each given its value
            table.add_column(SLURM_COLUMN[1], key=SLURM_COLUMN[0], default="—")
            for key, run in self._runs.items():
                table.update_cell(key, SLURM_COLUMN[0], self._cells(run, True)[SLURM_COLUMN[0]])
        elif not slurm and self.slurm_shown:
            table.remove_column(SLURM_COLUMN[0])
        added = False
        for key, run in wanted.items():
            cells = self._cells(run, slurm)
            if key not in self._runs:
                table.add_row(*cells.values(), key=key)
                added = True
            else:
                old = self._cells(self._runs[key], slurm)
                for column, value in cells.items():
                    if value != old[column]:
                        table.update_cell(key, column, value)
            self._runs[key] = dict(run)
        if added:  # keep the owner's order (method, then lr), which new rows would break
            order = {(r["method"], fmt_lr(float(r["lr"]))): i for i, r in enumerate(runs)}
            table.sort("method", "lr", key=lambda method_lr: order.get(method_lr, len(order)))
        table.display = bool(wanted)
        self.query_one("#running-empty").display = not wanted
        if self._tail_key is not None:
            self._refresh_tail()

    def highlighted(self) -> Optional[dict]:
        """The run under the table's cursor."""
        table = self.query_one(DataTable)
        if not self._runs or not table.is_valid_row_index(table.cursor_row):
            return None
        return self._runs.get(table.ordered_rows[table.cursor_row].key.value)

    # ------------------------------------------------------------------ log tail
    def action_toggle_log(self) -> None:
        run = self.highlighted()
        key = run_key(run["method"], run["lr"]) if run is not None else None
        if self._tail_key is not None and key in (None, self._tail_key):
            self._close_tail()
            return
        if run is None:
            self.notify("no run to show the log of", severity="warning")
            return
        self._tail_key = key
        self._tail_run = run
        log = self.query_one(Log)
        log.clear()
        log.write_line("reading…")
        for selector in ("#running-tail-title", "#running-tail"):
            self.query_one(selector).display = True
        self._refresh_tail()

    def _close_tail(self) -> None:
        self._tail_key = self._tail_run = None
        self.workers.cancel_group(self, "running-tail")
        for selector in ("#running-tail-title", "#running-tail"):
            self.query_one(selector).display = False

    @property
    def tail_key(self) -> str | None:
        """The row key of the run whose log shows (None when hidden)."""
        return self._tail_key

    def _refresh_tail(self) -> None:
        """Read the tail again; a run that stopped running keeps its last log (it tells why it ended)."""
        if self._tail_key is None or self.study is None:
            return
        run = self._runs.get(self._tail_key)
        gone = run is None
        run = run or self._tail_run
        self._tail_run = run
        label = f"log of {run['method']} lr={fmt_lr(float(run['lr']))}, attempt {run.get('attempts') or 1}"
        self.query_one("#running-tail-title", Static).update(
            label + (" (not running any more)" if gone else "") + "  ·  l hides it")
        self._read_tail(self.study, self._tail_key, run["method"], float(run["lr"]))

    @work(thread=True, exclusive=True, group="running-tail", name="running-log-tail")
    def _read_tail(self, study: str, key: str, method: str, lr: float) -> None:
        from engine.errors import UnlearnError
        from studies.running.logs import tail

        try:
            lines = tail(self.store, study, method, lr, self.tail_lines)
            error = None
        except (UnlearnError, OSError) as exc:
            lines, error = [], str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not get_current_worker().is_cancelled:
            self.post_message(self.TailRead(key, lines, error))

    def on_running_runs_tail_read(self, message: TailRead) -> None:
        message.stop()
        if message.key != self._tail_key:
            return  # an answer for a tail closed or switched meanwhile
        log = self.query_one(Log)
        log.clear()
        if message.error:
            log.write_line(f"cannot read the log: {message.error}")
        elif not message.lines:
            log.write_line("no log yet")
        else:
            log.write_lines(message.lines)
