"""The robustness heatmap: one lr × steps table per method, as a Rich renderable.

Shared by the CLI (`unlearn heatmap`) and the Textual app (a Static can hold it). Colours are
scaled over the finite values of every method shown, so methods compare at a glance:
each metric's better direction, log scale and legend come from engine/metric_registry.py (e.g. the
score lower = greener, MIA AUCs closer to 0.5, the forget perplexity on a neutral blue log scale,
since neither a lower nor a higher forget perplexity is better in itself).
Fits 80 columns with up to 6 steps columns.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from rich import box
from rich.color import Color
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.style import Style
from rich.table import Table
from rich.text import Text

from engine.errors import UnlearnError
from engine.metric_registry import SCORE
from engine.metric_registry import get as get_metric
from studies.reading.grid import Cell, Grid, check_metric, grids
from studies.store.states import CellStatus
from tui.numbers import fmt_lr, fmt_value  # noqa: F401  (re-exported: the CLI and app import them here)

MARKS = {CellStatus.PENDING: ("·", "dim"), CellStatus.RUNNING: ("…", "bold yellow"),
         CellStatus.FAILED: ("✗", "bold magenta"), CellStatus.CANCELLED: ("–", "dim"),
         CellStatus.DIVERGED: ("div", "bold red")}
SUCCESS = "✓"


def badness(metric: str, x: float) -> Optional[float]:
    """The quantity the colour scale runs over (lower = better / greener)."""
    return get_metric(metric).badness(x)


def diverging(metric: str) -> bool:
    """True where one direction is better (green → red); False for a neutral sequential scale."""
    return get_metric(metric).good_bad


def _lerp(a: tuple, b: tuple, t: float) -> tuple:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def colour(t: float, good_bad: bool) -> Color:
    """t in [0, 1]; green → yellow → red, or light → dark blue."""
    t = min(1.0, max(0.0, t))
    if good_bad:
        green, yellow, red = (46, 160, 67), (214, 180, 40), (200, 60, 50)
        rgb = _lerp(green, yellow, t * 2) if t < 0.5 else _lerp(yellow, red, (t - 0.5) * 2)
    else:
        rgb = _lerp((170, 200, 235), (40, 80, 160), t)
    return Color.from_rgb(*rgb)


class Heatmap:
    """lr × steps tables, one per method, of one metric, with success marks and cell states."""

    def __init__(self, cells: list[Cell], metric: str = SCORE, method: Optional[str] = None,
                 title: Optional[str] = None, legend: bool = True, at_target: Iterable[Cell] = (),
                 note: Optional[str] = None):
        self.metric = check_metric(metric)
        # The "at target" column: per method and lr, the cell where the run's forget perplexity first
        # reached the target (its step shown beside the value), read with studies.reading.grid.load_at_target.
        self.at_target: dict[str, dict[float, Cell]] = {}
        for c in at_target:
            self.at_target.setdefault(c.method, {})[c.lr] = c
        self.note = note  # one line under the title: e.g. which part of the verdict θ0 itself passes
        all_grids = grids(cells)
        if method is not None and method not in all_grids:
            known = ", ".join(all_grids) or "none"
            raise UnlearnError(f"no method {method!r} in this study; methods: {known}")
        self.grids: dict[str, Grid] = {method: all_grids[method]} if method else all_grids
        self.title = title
        self.legend = legend
        vals = [badness(metric, v) for g in self.grids.values() for row in g.value(metric) for v in row if v is not None]
        vals += [badness(metric, v) for m in self.grids for c in self.at_target.get(m, {}).values()
                 if c.computed and (v := c.value(metric)) is not None]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        self.lo, self.hi = (min(vals), max(vals)) if vals else (0.0, 0.0)

    def _t(self, x: float) -> float:
        b = badness(self.metric, x)
        if b is None or self.hi <= self.lo:
            return 0.0
        return (b - self.lo) / (self.hi - self.lo)

    def _cell_text(self, c: Optional[Cell]) -> Text:
        if c is None:
            mark, style = MARKS[CellStatus.PENDING]
            return Text(mark, style=style, justify="center")
        if c.status != CellStatus.DONE:
            mark, style = MARKS.get(c.status, ("?", ""))
            return Text(mark, style=style, justify="center")
        v = c.value(self.metric)
        spread = (((c.metrics or {}).get("seeds") or {}).get("spread") or {}).get(self.metric)
        # a mean over seeds (study create --seeds) shows its 95 % half width
        label = fmt_value(v) + (f"±{fmt_value(spread)}" if spread is not None else "") + (SUCCESS if c.success else " ")
        if v is None:
            return Text(label, style="dim", justify="right")
        bg = colour(self._t(v), diverging(self.metric))
        r, g, b = bg.get_truecolor()
        fg = "black" if (0.299 * r + 0.587 * g + 0.114 * b) > 110 else "white"
        return Text(label, style=Style(color=fg, bgcolor=bg, bold=c.success), justify="right")

    def title_line(self, grid: Grid) -> Text:
        return Text.assemble((grid.method, "bold"), f"  robustness {grid.robustness:.0%} ",
                             (f"({grid.successes}/{grid.size} cells)", "dim"), f"  {self.metric}",
                             no_wrap=True, overflow="ellipsis")

    def table(self, grid: Grid) -> Table:
        t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False, collapse_padding=True)
        t.add_column("lr \\ steps", justify="right", no_wrap=True, style="bold")
        seeded = any((c.metrics or {}).get("seeds") for c in grid.cells.values())
        for s in grid.steps:
            t.add_column(str(s), justify="right", no_wrap=True, min_width=6, max_width=14 if seeded else 8)
        at = self.at_target.get(grid.method)
        if at is not None:
            t.add_column("at target", justify="right", no_wrap=True, min_width=9, max_width=12)
        for lr in grid.lrs:
            row = [self._cell_text(grid.cell(lr, s)) for s in grid.steps]
            if at is not None:
                c = at.get(lr)
                row.append(self._cell_text(c) + Text(f"@{c.steps}", style="dim") if c is not None
                           else Text("never", style="dim", justify="right"))
            t.add_row(fmt_lr(lr), *row)
        return t

    def legend_text(self) -> Text:
        scale = get_metric(self.metric).scale
        at = "  @N: at target, step N" if self.at_target else ""
        if any((c.metrics or {}).get("seeds") for g in self.grids.values() for c in g.cells.values()):
            at += "  ±: 95 % interval over the seeds"
        return Text.assemble(f"{SUCCESS} success{at}  ", ("div", MARKS[CellStatus.DIVERGED][1]), " diverged  ",
                             ("…", MARKS[CellStatus.RUNNING][1]), " running  ", ("·", "dim"), " pending  ",
                             ("✗", MARKS[CellStatus.FAILED][1]), f" failed  {scale}")

    def renderables(self) -> list:
        parts: list = []
        if self.title:
            parts.append(Text(self.title, style="bold"))
        if self.note:
            parts.append(Text(self.note, style="yellow"))
        if not self.grids:
            parts.append(Text("no cells", style="dim"))
        for i, g in enumerate(self.grids.values()):
            if i:
                parts.append(Text(""))
            parts.append(self.title_line(g))
            parts.append(self.table(g))
        if self.legend and self.grids:
            parts.append(self.legend_text())
        return parts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Group(*self.renderables())


def render_heatmaps(cells: Iterable[Cell], metric: str = SCORE, method: Optional[str] = None,
                    title: Optional[str] = None, at_target: Iterable[Cell] = (),
                    note: Optional[str] = None) -> Heatmap:
    """The heatmap of `metric` for every method of the cells (or only `method`), with an "at target"
    column where `at_target` cells are given."""
    return Heatmap(list(cells), metric, method, title, at_target=at_target, note=note)
