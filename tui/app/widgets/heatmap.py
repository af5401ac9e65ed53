"""One method's lr × steps grid as a walkable heatmap: a cursor cell (arrows, mouse), Enter opens it,
space marks it for compare.

Colours and state marks come from tui/heatmap.py, so the app and `unlearn study heatmap` agree.
Every cell also carries a glyph (✓ success, div, …, ·, ✗, –), so the grid reads without colour.
The layout is fixed-width text (no table), so a click maps to a cell by arithmetic.

Drawn line by line (Textual's line API): each line (the title, the steps, one per lr) is kept,
as text and as the strip drawn from it, until something on it changes. A live study's new values
(`update_grid`) redraw only the rows whose cells changed, and only the rows on screen are drawn at
all: a 100-lr grid costs what its visible rows cost. Every line is drawn through the same Textual
path as a whole-widget render() would be, so what shows is the same.
"""
from __future__ import annotations

import math
from typing import Optional

from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.events import Click
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip
from textual.visual import Visual, visualize
from textual.widget import Widget

from engine.metric_registry import SCORE
from studies.reading.grid import Cell, Grid, best_cell, check_metric
from studies.store.states import CellStatus
from tui.app.messages import CellRef
from tui.heatmap import MARKS, SUCCESS, badness, colour, diverging, fmt_lr, fmt_value

LR_WIDTH = 9  # "lr\steps " and the widest fmt_lr ("2.5e-04") plus a space
VALUE_WIDTH = 7  # fmt_value's longest
# A cell: cursor bracket, value, success mark, compare mark, cursor bracket.
CELL_WIDTH = 1 + VALUE_WIDTH + 1 + 1 + 1
HEADER_LINES = 2  # the title line and the steps line
# The "at target" column: a value, its success mark and "@step" (where the run's forget perplexity
# first reached the target, grid.load_at_target); shown once a row of the method reached it.
AT_TARGET_WIDTH = 1 + VALUE_WIDTH + 1 + 6
COMPARE_MARK = "◆"
_JOIN = Text("\n", no_wrap=True)  # what render() joins the lines with (their wrap and overflow)


class CellMessage(Message):
    """A message about one cell of a heatmap (`control` is the heatmap)."""

    def __init__(self, heatmap: "HeatmapGrid", cell: CellRef) -> None:
        super().__init__()
        self.heatmap = heatmap
        self.cell = cell

    @property
    def control(self) -> "HeatmapGrid":
        return self.heatmap


class HeatmapGrid(Widget, can_focus=True):
    """The grid of one method: rows are lrs, columns are steps, one metric in every cell."""

    DEFAULT_CSS = """
    HeatmapGrid {
        width: auto;
        height: auto;
        padding: 0 1;
    }
    HeatmapGrid:focus {
        background: $boost;
    }
    """

    BINDINGS = [
        Binding("up", "move(-1, 0)", "Up", show=False),
        Binding("down", "move(1, 0)", "Down", show=False),
        Binding("left", "move(0, -1)", "Left", show=False),
        Binding("right", "move(0, 1)", "Right", show=False),
        Binding("enter", "choose", "Open trial"),
        Binding("space", "toggle_mark", "Mark for compare"),  # m is the dashboard's next metric
    ]

    metric: reactive[str] = reactive(SCORE, layout=True)

    class CellHighlighted(CellMessage):
        """The cursor moved onto a cell."""

    class CellChosen(CellMessage):
        """Enter (or a click on the cell already under the cursor) on a cell: open it."""

    class MarkToggled(CellMessage):
        """A cell was marked for compare (marked=True) or unmarked."""

        def __init__(self, heatmap: "HeatmapGrid", cell: CellRef, marked: bool) -> None:
            super().__init__(heatmap, cell)
            self.marked = marked

    def __init__(self, grid: Grid, metric: str = SCORE, study: str = "", id: str | None = None,
                 classes: str | None = None, *, scale: Optional[tuple[float, float]] = None,
                 at_target: Optional[dict[float, Cell]] = None) -> None:
        """`scale` (lo, hi of tui.heatmap.badness) shares one colour scale between several grids;
        by default the grid's own values set it. `at_target`: lr -> the row's at-target cell."""
        super().__init__(id=id, classes=classes)
        self.grid = grid
        self.at_target: dict[float, Cell] = dict(at_target or {})
        self.study = study
        self._scale = scale
        self.cursor: tuple[int, int] = (0, 0)  # (row: lr index, column: steps index)
        self._marked: set[tuple[float, int]] = set()  # owners restore marks with mark()
        self._texts: dict[int, Text] = {}  # content line -> its text, until something on it changes
        self._strips: dict[int, Strip] = {}  # content line -> the strip drawn from its text
        self._strips_key: tuple = ()  # (width, style) the strips were drawn at
        self._range: Optional[tuple[float, float]] = None  # the grid's own value range (no shared scale)
        self.set_reactive(HeatmapGrid.metric, check_metric(metric))

    @property
    def scale(self) -> Optional[tuple[float, float]]:
        return self._scale

    @scale.setter
    def scale(self, scale: Optional[tuple[float, float]]) -> None:
        if scale != self._scale:
            self._scale = scale
            self._redraw()

    # ------------------------------------------------------------------ public API
    def update_grid(self, grid: Grid, at_target: Optional[dict[float, Cell]] = None) -> None:
        """New values for the same method (a live study): the cursor stays on the same (lr, steps)
        when it still exists, marks on cells that still exist stay. `at_target` (None: as it was)
        replaces the at-target cells."""
        if at_target is not None and _signatures(at_target) != _signatures(self.at_target):
            widened = bool(at_target) != bool(self.at_target)
            self.at_target = dict(at_target)
            self.grid = grid
            self.cursor = self._clamp(*self.cursor)
            self._redraw(layout=widened)
            return
        old, before = self.grid, self.cursor
        current = self._key(*self.cursor)
        resized = (len(grid.lrs), len(grid.steps)) != (len(old.lrs), len(old.steps))
        self.grid = grid
        if current is not None and current[0] in grid.lrs and current[1] in grid.steps:
            self.cursor = (grid.lrs.index(current[0]), grid.steps.index(current[1]))
        else:
            self.cursor = self._clamp(*self.cursor)
        marked = {k for k in self._marked if k in grid.cells}
        unmarked, self._marked = self._marked - marked, marked
        if grid.lrs != old.lrs or grid.steps != old.steps:
            self._redraw(layout=resized)
            return
        rows = {r for r, lr in enumerate(grid.lrs)
                if any((a := grid.cells.get((lr, s))) is not (b := old.cells.get((lr, s))) and a != b for s in grid.steps)}
        if not rows and before == self.cursor and not unmarked:
            return  # the same cells: nothing to draw
        if self._scale is None and rows and self._range is not None:
            drawn, self._range = self._range, self._value_range()
            if self._range != drawn:  # the grid's own colour scale moved: every cell's colour
                self._redraw()
                return
        rows |= {self.grid.lrs.index(lr) for lr, _ in unmarked if lr in self.grid.lrs}
        if before != self.cursor:
            rows |= {before[0], self.cursor[0]}
        self._redraw(0, *(HEADER_LINES + r for r in rows))  # the title: robustness and best move too

    @property
    def cursor_cell(self) -> Optional[CellRef]:
        key = self._key(*self.cursor)
        return self._ref(key) if key is not None else None

    def mark(self, cells) -> None:
        """Show these cells (of this grid's study and method) as marked, e.g. when a dashboard
        reopens on cells marked earlier. Posts nothing."""
        new = {(c.lr, c.steps) for c in cells if c.study == self.study and c.method == self.grid.method
               and (c.lr, c.steps) in self.grid.cells} - self._marked
        self._marked |= new
        if new:
            self._redraw(*{HEADER_LINES + self.grid.lrs.index(lr) for lr, _ in new})

    @property
    def marked(self) -> list[CellRef]:
        """The cells marked for compare, in grid order."""
        return [self._ref((lr, s)) for lr in self.grid.lrs for s in self.grid.steps if (lr, s) in self._marked]

    def move_cursor(self, row: int, column: int) -> None:
        """Put the cursor on (row, column), clamped to the grid; posts CellHighlighted when it moves."""
        target = self._clamp(row, column)
        if target == self.cursor or not self.grid.size:
            return
        rows = {HEADER_LINES + self.cursor[0], HEADER_LINES + target[0]}
        self.cursor = target
        self._redraw(*rows)
        self.post_message(self.CellHighlighted(self, self.cursor_cell))

    # ------------------------------------------------------------------ actions
    def action_move(self, rows: int, columns: int) -> None:
        self.move_cursor(self.cursor[0] + rows, self.cursor[1] + columns)

    def action_choose(self) -> None:
        if self.cursor_cell is not None:
            self.post_message(self.CellChosen(self, self.cursor_cell))

    def action_toggle_mark(self) -> None:
        key = self._key(*self.cursor)
        if key is None:
            return
        marked = key not in self._marked
        (self._marked.add if marked else self._marked.discard)(key)
        self._redraw(HEADER_LINES + self.cursor[0])
        self.post_message(self.MarkToggled(self, self._ref(key), marked))

    def on_click(self, event: Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < HEADER_LINES or offset.x < LR_WIDTH:
            return
        row, column = offset.y - HEADER_LINES, (offset.x - LR_WIDTH) // CELL_WIDTH
        if row >= len(self.grid.lrs) or column >= len(self.grid.steps):
            return
        event.stop()
        if (row, column) == self.cursor and event.chain >= 2:
            self.action_choose()  # a double click opens the cell
        self.move_cursor(row, column)

    def on_focus(self) -> None:
        self._redraw()  # the widget's own style (its background) and the cursor's change

    def on_blur(self) -> None:
        self._redraw()

    def watch_metric(self) -> None:
        self._forget_lines()  # the reactive repaints

    # ------------------------------------------------------------------ rendering
    def get_content_width(self, container: Size, viewport: Size) -> int:
        at = AT_TARGET_WIDTH if self.at_target else 0
        return max(LR_WIDTH + CELL_WIDTH * max(1, len(self.grid.steps)) + at, min(self._line(0).cell_len, 78))

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return HEADER_LINES + max(1, len(self.grid.lrs))

    def title_line(self) -> Text:
        g = self.grid
        best = best_cell(list(g.cells.values()), g.method)
        text = Text.assemble((g.method, "bold"), f"  robust {g.robustness:.0%} ", (f"{g.successes}/{g.size}", "dim"),
                             no_wrap=True, overflow="ellipsis")
        if best is not None:
            text.append(f"  best {fmt_lr(best.lr)}×{best.steps} score {fmt_value(best.value(SCORE))}")
            if best.success:
                text.append(SUCCESS)
        if self.metric != SCORE:
            text.append(f"  [{self.metric}]", style="italic")
        return text

    def render(self) -> Text:
        """The whole grid as one text (what render_line draws, line by line)."""
        return _JOIN.join([self._line(y) for y in range(HEADER_LINES + max(1, len(self.grid.lrs)))])

    def render_line(self, y: int) -> Strip:
        """One line, drawn as Textual draws that line of render(): only lines on screen are asked for."""
        if self.text_selection is not None:  # a selection spans lines: Textual's whole-widget path
            return super().render_line(y)
        width, style = self.size.width, self.visual_style
        if self._strips_key != (width, style):
            self._strips.clear()
            self._strips_key = (width, style)
        strip = self._strips.get(y)
        if strip is None:
            if not 0 <= y < HEADER_LINES + max(1, len(self.grid.lrs)):
                return Strip.blank(width, style.rich_style)
            visual = visualize(self, _JOIN.join([self._line(y)]), markup=self._render_markup)
            strips = Visual.to_strips(self, visual, width, 1, style)
            strip = self._strips[y] = strips[0] if strips else Strip.blank(width, style.rich_style)
        return strip

    def _line(self, y: int) -> Text:
        """Content line y: the title, the steps, then one per lr (or the no-cells line)."""
        text = self._texts.get(y)
        if text is None:
            text = self._texts[y] = self._make_line(y)
        return text

    def _make_line(self, y: int) -> Text:
        g = self.grid
        if y == 0:
            return self.title_line()
        if y == 1:
            header = Text("lr\\steps".rjust(LR_WIDTH - 1) + " ", style="dim", no_wrap=True)
            for s in g.steps:
                header.append(str(s).rjust(1 + VALUE_WIDTH).ljust(CELL_WIDTH), style="bold")
            if self.at_target:
                header.append("at target".rjust(1 + VALUE_WIDTH + 1).ljust(AT_TARGET_WIDTH), style="bold")
            return header
        if not g.lrs:
            return Text("no cells yet", style="dim")
        r = y - HEADER_LINES
        lr = g.lrs[r]
        lo, hi = self._drawn_range
        line = Text(fmt_lr(lr).rjust(LR_WIDTH - 1) + " ", style="bold", no_wrap=True)
        for c, s in enumerate(g.steps):
            line.append_text(self._cell_text(g.cell(lr, s), (r, c) == self.cursor, (lr, s) in self._marked, lo, hi))
        if self.at_target:
            at = self.at_target.get(lr)
            if at is None:
                line.append("never".rjust(1 + VALUE_WIDTH).ljust(AT_TARGET_WIDTH), style="dim")
            else:
                line.append_text(self._cell_text(at, False, False, lo, hi)[:-1])
                line.append(f"@{at.steps}".ljust(AT_TARGET_WIDTH - CELL_WIDTH + 1), style="dim")
        return line

    @property
    def _drawn_range(self) -> tuple[float, float]:
        """The colour scale's (lo, hi): the shared one, or the grid's own."""
        if self._scale is not None:
            return self._scale
        if self._range is None:
            self._range = self._value_range()
        return self._range

    def _forget_lines(self) -> None:
        """Drop every kept line (and the grid's own range): each is made again when drawn."""
        self._range = None
        self._texts.clear()
        self._strips.clear()

    def _redraw(self, *lines: int, layout: bool = False) -> None:
        """Draw these content lines again (every line when none is named)."""
        if not lines:
            self._forget_lines()
            self.refresh(layout=layout)
            return
        for y in lines:
            self._texts.pop(y, None)
            self._strips.pop(y, None)
        width = self.size.width
        self.refresh(*(Region(0, y, width, 1) for y in sorted(lines)), layout=layout)

    def _cell_text(self, cell: Optional[Cell], cursor: bool, marked: bool, lo: float, hi: float) -> Text:
        status = cell.status if cell is not None else CellStatus.PENDING
        mark = COMPARE_MARK if marked else " "
        if status != CellStatus.DONE:
            glyph, style = MARKS.get(status, ("?", ""))
            body = Text.assemble((glyph.center(VALUE_WIDTH) + " ", style), (mark, "bold"))
        else:
            value = cell.value(self.metric)
            label = fmt_value(value).rjust(VALUE_WIDTH) + (SUCCESS if cell.success else " ") + mark
            body = Text(label, style=self._value_style(value, cell.success, lo, hi))
        if cursor:
            body.stylize("reverse" if self.has_focus else "underline")
        return Text.assemble(("[" if cursor else " ", "bold"), body, ("]" if cursor else " ", "bold"))

    def _value_style(self, value: Optional[float], success: bool, lo: float, hi: float) -> Style | str:
        if value is None:
            return "dim"
        b = badness(self.metric, value)
        t = (b - lo) / (hi - lo) if b is not None and hi > lo else 0.0
        bg = colour(t, diverging(self.metric))
        red, green, blue = bg.get_truecolor()
        fg = "black" if (0.299 * red + 0.587 * green + 0.114 * blue) > 110 else "white"
        return Style(color=fg, bgcolor=bg, bold=success)

    def _value_range(self) -> tuple[float, float]:
        vals = [badness(self.metric, v) for row in self.grid.value(self.metric) for v in row if v is not None]
        vals += [badness(self.metric, v) for c in self.at_target.values() if c.computed
                 and (v := c.value(self.metric)) is not None]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        return (min(vals), max(vals)) if vals else (0.0, 0.0)

    # ------------------------------------------------------------------ helpers
    def validate_metric(self, metric: str) -> str:
        return check_metric(metric)

    def _clamp(self, row: int, column: int) -> tuple[int, int]:
        return (min(max(0, row), max(0, len(self.grid.lrs) - 1)), min(max(0, column), max(0, len(self.grid.steps) - 1)))

    def _key(self, row: int, column: int) -> Optional[tuple[float, int]]:
        if 0 <= row < len(self.grid.lrs) and 0 <= column < len(self.grid.steps):
            return self.grid.lrs[row], self.grid.steps[column]
        return None

    def _ref(self, key: tuple[float, int]) -> CellRef:
        return CellRef(self.study, self.grid.method, float(key[0]), int(key[1]))


def _signatures(at_target: dict[float, Cell]) -> dict:
    """What the at-target column shows of each row's cell: when this changes, the column is redrawn."""
    return {lr: (c.steps, str(c.status), c.score, c.success) for lr, c in at_target.items()}
