"""One trial (a cell: method, lr, steps) seen whole: its params, every milestone of its run, the
curves against the retraining target and the original model, losses, cost, attempts and failures,
and the command that reproduces it (`y` copies it, `e` asks the app for the export dialog).

Read in a thread worker (studies.reading.trials.trial_detail); while the run is still going the screen
reads it again every few seconds.
"""
from __future__ import annotations

from typing import Optional

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, VerticalScroll
from textual.markup import escape
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Static
from textual.worker import get_current_worker

from engine.config import settings_fields
from engine.errors import UnlearnError
from engine.metric_registry import (
    MIA,
    MIA_ATTACKS,
    MIA_AUC,
    MIA_LOSS,
    PPL_FORGET,
    PPL_RETAIN,
    PPL_RETAIN_EVAL,
    PPL_UNSEEN,
    TRAINED_ON,
    every_run,
    objective,
    read,
)
from engine.metric_registry import get as get_metric
from studies.reading.trials import trial_detail
from studies.store.db import Store
from tui.app.messages import CellRef, ExportRequested
from tui.app.widgets.curves import Curves
from tui.app.widgets.table import MeasuredTable
from tui.heatmap import SUCCESS, fmt_lr, fmt_value

RELOAD_S = 3.0  # a running trial is read again this often
LIVE_STATES = ("running", "pending")


def _num(x) -> str:
    return fmt_value(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else "—"


def _count(x) -> str:
    if x is None:
        return "—"
    return f"{x:,}" if isinstance(x, int) else fmt_value(float(x))


def milestone_columns() -> list[tuple[str, str]]:
    """(header, metric path) of the milestones table's figures: every metric every cell has, by its
    path, but the MIA AUCs by their short labels (mia.loss, ...) so that four of them fit, and the
    figures on the trained-on retain set (score, retain_drift) by theirs, which say so."""
    return [(m.label if m.group in (MIA, TRAINED_ON) else m.path, m.path) for m in every_run()]


def verdict_text(cell: dict) -> str:
    """The verdict's parts (engine.verdict) in one line: "forget✓ mia✗ utility✓"; "" for a cell without one."""
    verdict = cell.get("verdict") or {}
    return " ".join(f"{part}{SUCCESS if ok else '✗'}" for part, ok in verdict.items())  # a line wraps between parts


def milestone_row(m: dict, chosen: bool, columns: list[tuple[str, str]]) -> list:
    if m.get("diverged"):
        success = Text("div", style="bold red")
    else:
        success = Text(SUCCESS, style="bold green") if m.get("success") else Text("·", style="dim")
    # An at-target cell (where the forget perplexity first reached the target) is marked @step, as
    # the heatmap's "at target" column marks it.
    step = ("@" if m.get("at_target") else "") + str(m.get("step"))
    step = Text(("▶ " if chosen else "  ") + step, style="bold" if chosen else "")
    return [step, success, *(_num(read(m, path)) for _, path in columns)]  # success first: always in view


class TrialScreen(Screen):
    """`TrialScreen(store, cell)`: the detail of one cell."""

    DEFAULT_CSS = """
    TrialScreen #trial-body {
        height: 1fr;
        padding: 0 1;
    }
    TrialScreen #trial-body > Static {
        height: auto;
        margin-bottom: 1;
    }
    TrialScreen #trial-body > #trial-title {
        text-style: bold;
        background: $boost;
        margin-bottom: 0;
    }
    TrialScreen #trial-error {
        color: $error;
        display: none;
    }
    TrialScreen #trial-error.-shown {
        display: block;
    }
    TrialScreen #trial-milestones {
        height: auto;
        max-height: 14;
        margin-bottom: 1;
    }
    TrialScreen #trial-curves {
        layout: vertical;
        height: auto;
    }
    TrialScreen.-wide #trial-curves {
        layout: horizontal;
    }
    TrialScreen #trial-curves Curves {
        height: 14;
        margin-bottom: 1;
    }
    TrialScreen #trial-command {
        border: round $primary;
        padding: 0 1;
    }
    """

    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("y", "copy_command", "Copy command"),
        Binding("e", "export", "Export"),
        Binding("r", "reload", "Reload"),
    ]

    class Loaded(Message):
        def __init__(self, detail: dict) -> None:
            super().__init__()
            self.detail = detail

    class LoadFailed(Message):
        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    def __init__(self, store: Store, cell: CellRef, name: str | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.store = store
        self.cell = cell
        self.detail: Optional[dict] = None
        self._reload: Optional[Timer] = None
        self.columns = milestone_columns()

    def compose(self) -> ComposeResult:
        c = self.cell
        with VerticalScroll(id="trial-body"):
            yield Static(escape(f"{c.study} · {c.method}  lr {fmt_lr(c.lr)} × {c.steps} steps"), id="trial-title")
            yield Static("", id="trial-error")
            yield Static("loading…", id="trial-params")
            table = MeasuredTable(id="trial-milestones", cursor_type="row", zebra_stripes=True)
            table.border_title = "milestones"
            yield table
            with Container(id="trial-curves"):
                yield Curves("perplexity", "steps", "ppl (log)", log_y=True, id="curve-ppl")
                yield Curves("MIA AUC", "steps", "AUC", id="curve-mia")
                yield Curves("train loss", "step", "loss", id="curve-loss")
            yield Static("", id="trial-cost")
            yield Static("", id="trial-attempts")
            yield Static("", id="trial-command")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"trial · {self.cell.study}"
        table = self.query_one("#trial-milestones", DataTable)
        table.add_columns("step", "success", *(header for header, _ in self.columns))
        self.query_one("#trial-body").focus()
        self.load()

    # ------------------------------------------------------------------ loading
    @work(thread=True, exclusive=True, name="trial-detail", group="trial-detail")
    def load(self) -> None:
        worker = get_current_worker()
        c = self.cell
        try:
            detail = trial_detail(self.store, c.study, c.method, c.lr, c.steps)
        except UnlearnError as exc:
            message = self.LoadFailed(str(exc))
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read is shown as one line, never a traceback
            message = self.LoadFailed(f"cannot read the store: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        else:
            message = self.Loaded(detail)
        if not worker.is_cancelled:
            self.post_message(message)

    def on_trial_screen_loaded(self, event: Loaded) -> None:
        self.detail = d = event.detail
        self.query_one("#trial-error", Static).remove_class("-shown")
        self._show_title(d)
        self._show_params(d)
        self._show_milestones(d)
        self._show_curves(d)
        self._show_cost(d)
        self._show_attempts(d)
        self.query_one("#trial-command", Static).update(Text(d["command"]))
        self.query_one("#trial-command", Static).border_title = "reproduce  (y copy · e export)"
        if self._reload is not None:
            self._reload.stop()  # (a reload by hand meanwhile: one timer, never two chains of them)
        self._reload = self.set_timer(RELOAD_S, self.load) if d["state"] in LIVE_STATES else None

    def on_trial_screen_load_failed(self, event: LoadFailed) -> None:
        error = self.query_one("#trial-error", Static)
        error.update(Text(event.error))
        error.add_class("-shown")
        if self.detail is None:
            self.query_one("#trial-params", Static).update("")
        self.notify(event.error, severity="error")

    # ------------------------------------------------------------------ sections
    def _show_title(self, d: dict) -> None:
        status = d["status"]
        mark = f" {SUCCESS}" if d["cell"].get("success") else ""
        trial = f" · trial #{d['trial_number']}" if d["trial_number"] is not None else ""
        self.query_one("#trial-title", Static).update(Text(
            f"{d['study']} · {d['method']}  lr {fmt_lr(d['lr'])} × {d['steps']} steps{trial} · {status}{mark}"))

    def _show_params(self, d: dict) -> None:
        text = Text()
        text.append("model ", style="dim").append(str(d["model"]))
        text.append("   forget set ", style="dim").append(f"{d['forget_set']['name']} ({d['forget_set']['hash'][:12]})")
        text.append("\n")
        unset = {f.name: f.metadata.get("default_text") or "—" for f in settings_fields()}  # None: "auto" where it means that
        parts = [(k, fmt_lr(v) if k == "lr" else (unset.get(k, "—") if v is None else "—" if v == "" else str(v)))
                 for k, v in d["params"].items()]
        for i, (k, v) in enumerate(parts):
            text.append(("  " if i else "") + k + " ", style="dim").append(v)
        cell = d["cell"]
        for i, x in enumerate(objective()):
            text.append(("  " if i else "\n") + x.path + " ", style="dim").append(_num(cell.get(x.path)))
        text.append("  success ", style="dim").append("yes" if cell.get("success") else "no")
        own = next((m for m in d["milestones"] if m.get("step") == d["steps"]), {})  # the cell's stored metrics
        if verdict_text(own):
            text.append(f" ({verdict_text(own)})", style="dim")
        self.query_one("#trial-params", Static).update(text)

    def _show_milestones(self, d: dict) -> None:
        table = self.query_one("#trial-milestones", DataTable)
        reloading = table.row_count > 0 and d["milestones"]
        kept_row = table.cursor_row
        table.clear()
        chosen_row = 0
        for i, m in enumerate(d["milestones"]):
            chosen = m.get("step") == d["steps"]
            chosen_row = i if chosen else chosen_row
            table.add_row(*milestone_row(m, chosen, self.columns), key=str(m.get("step")))
        if not d["milestones"]:
            table.add_row("no milestone yet", *[""] * (len(self.columns) + 1))
        table.move_cursor(row=kept_row if reloading else chosen_row)  # a reload leaves the cursor where the user put it

    def _show_curves(self, d: dict) -> None:
        ms = [m for m in d["milestones"] if not m.get("diverged")]
        steps = [m["step"] for m in ms]
        base = d["baseline"] or {}
        target = d["target"]
        self.query_one("#curve-ppl", Curves).set_series(
            steps, {get_metric(p).label: [m.get(p) for m in ms] for p in (PPL_FORGET, PPL_RETAIN, PPL_RETAIN_EVAL, PPL_UNSEEN)},
            hlines={"target (θ0 unseen)": target.get(PPL_FORGET), "θ0 forget": base.get(PPL_FORGET)})
        base_auc = read(base, MIA_LOSS)
        self.query_one("#curve-mia", Curves).set_series(
            steps, {a: [(m.get(MIA_AUC) or {}).get(a) for m in ms] for a in MIA_ATTACKS},
            hlines={"target 0.5": target.get(MIA_AUC), "θ0 loss": base_auc})
        losses = d["losses"]
        self.query_one("#curve-loss", Curves).set_series(list(range(1, len(losses) + 1)), {"train loss": losses})

    def _show_cost(self, d: dict) -> None:
        cost = d["cost"]
        text = Text("cost  ", style="bold")
        if not cost:
            text.append("not known until the run finishes", style="dim")
        else:
            items = [("train tokens", _count(cost.get("train_tokens"))), ("eval tokens", _count(cost.get("eval_tokens"))),
                     ("seconds", _num(cost.get("wall_seconds"))), ("FLOPs", _num(cost.get("flops"))),
                     ("× retraining FLOPs", _num(cost.get("retraining_flops_ratio")))]
            for i, (k, v) in enumerate(items):
                text.append(("  " if i else "") + k + " ", style="dim").append(v)
        self.query_one("#trial-cost", Static).update(text)

    def _show_attempts(self, d: dict) -> None:
        text = Text("run  ", style="bold")
        text.append("state ", style="dim").append(d["state"])
        text.append("  attempts ", style="dim").append(f"{d['attempts']}/{d['max_attempts']}")
        text.append("  device ", style="dim").append(str(d["device"] or "—"))
        if d["host"]:
            text.append("  host ", style="dim").append(str(d["host"]))
        text.append("  at step ", style="dim").append(str(d["run_step"]))
        if d["reason"]:
            text.append("\nstopped: ", style="dim").append(str(d["reason"]))
        if d["last_error"]:
            text.append("\nlast error: ", style="bold red").append(str(d["last_error"]))
        for f in d["failures"]:
            text.append(f"\n{(f['at'] or '')[:19]}  ", style="dim").append(f"{f['kind']}: ", style="bold").append(f["message"])
        self.query_one("#trial-attempts", Static).update(text)

    # ------------------------------------------------------------------ actions
    def action_back(self) -> None:
        self.app.pop_screen()

    def action_reload(self) -> None:
        self.load()

    def action_copy_command(self) -> None:
        if self.detail is None:
            self.notify("the trial is still loading", severity="warning")
            return
        self.app.copy_to_clipboard(self.detail["command"])
        self.notify("copied")

    def action_export(self) -> None:
        self.post_message(ExportRequested(self.cell.study, self.cell))
