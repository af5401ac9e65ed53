"""Line and scatter plots on textual-plotext: metric curves against steps with horizontal reference
lines (the retraining target, the original model), and the compare screen's Pareto scatter.

The data is kept on the widget and the plot is rebuilt from it, so a resize or a theme change
redraws the same thing. Points that are missing (None, not finite, or ≤ 0 on a log axis) are
left out rather than drawn at a made-up place.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

from textual_plotext import PlotextPlot

SERIES_COLOURS = ("blue+", "green+", "magenta+", "cyan+", "orange+", "red+")
REFERENCE_COLOURS = ("red", "gray", "orange", "cyan")
FRONT_COLOUR = "red+"
MAX_TICKS = 8


def _usable(x, y, log_y: bool) -> bool:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (x, y))
    return ok and (not log_y or y > 0)


def _points(xs: Sequence, ys: Sequence, log_y: bool) -> tuple[list[float], list[float]]:
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if _usable(x, y, log_y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


class Curves(PlotextPlot):
    """`Curves(title, xlabel, ylabel)`, then `set_series(...)` (lines) or `set_scatter(...)` (points)."""

    DEFAULT_CSS = """
    Curves {
        width: 1fr;
        height: 14;
        min-height: 10;
        min-width: 30;
    }
    """

    def __init__(self, title: str = "", xlabel: str = "", ylabel: str = "", *, log_y: bool = False,
                 name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.plot_title = title
        self.x_label = xlabel
        self.y_label = ylabel
        self.log_y = log_y
        self.kind = "lines"
        self.series: dict[str, tuple[list[float], list[float]]] = {}
        self.hlines: dict[str, float] = {}
        self.front: Optional[tuple[list[float], list[float]]] = None
        self.labels: list[tuple[str, float, float]] = []
        self.xticks: Optional[list[float]] = None
        self._draw()

    # ------------------------------------------------------------------ data
    def set_series(self, x: Sequence, series: Mapping[str, Sequence], hlines: Optional[Mapping[str, Optional[float]]] = None,
                   log_y: Optional[bool] = None) -> None:
        """Lines: each label's ys against the shared x; hlines are horizontal reference lines
        (label -> y; None is skipped)."""
        if log_y is not None:
            self.log_y = log_y
        self.kind = "lines"
        self.series = {label: _points(x, ys, self.log_y) for label, ys in series.items()}
        self.hlines = {label: float(y) for label, y in (hlines or {}).items() if _usable(0, y, self.log_y)}
        self.front, self.labels = None, []
        ticks = sorted({float(v) for v in x if _usable(v, 1, False)})
        self.xticks = ticks if 0 < len(ticks) <= MAX_TICKS else None  # milestones: tick exactly at each
        self._draw()

    def set_scatter(self, points: Mapping[str, tuple[Sequence, Sequence]], front: Optional[tuple[Sequence, Sequence]] = None,
                    labels: Iterable[tuple[str, float, float]] = ()) -> None:
        """Points: label -> (xs, ys); `front` (xs, ys) is drawn as a highlighted line through its
        points (the Pareto front); `labels` are (text, x, y) annotations beside points."""
        self.kind = "scatter"
        self.series = {label: _points(xs, ys, self.log_y) for label, (xs, ys) in points.items()}
        self.front = _points(*front, self.log_y) if front is not None else None
        self.labels = [(t, float(x), float(y)) for t, x, y in labels if _usable(x, y, self.log_y)]
        self.hlines = {}
        self.xticks = None
        self._draw()

    @property
    def has_data(self) -> bool:
        return any(xs for xs, _ in self.series.values()) or bool(self.front and self.front[0])

    # ------------------------------------------------------------------ drawing
    def render(self):
        """plotext's legend fails (IndexError) on some canvas sizes when a labelled series has no
        point drawn on the canvas; the plot is then drawn again without the legend rather than
        taking the app down."""
        try:
            return super().render()
        except IndexError:
            self._build(legend=False)
            try:
                return super().render()
            finally:
                self._build()  # the next size may fit the legend again (no refresh: no render loop)

    def _draw(self) -> None:
        self._build()
        self.refresh()

    def _build(self, legend: bool = True) -> None:
        plt = self.plt
        plt.clear_figure()
        plt.title(self.plot_title if self.has_data else f"{self.plot_title} (no data yet)")
        plt.xlabel(self.x_label)
        plt.ylabel(self.y_label)
        if self.log_y and self.has_data:  # (plotext fails on a log axis with nothing on it)
            plt.yscale("log")
        if self.xticks and self.has_data:
            plt.xticks(self.xticks, [f"{t:g}" for t in self.xticks])
        xs_all = [x for xs, _ in self.series.values() for x in xs]
        for i, (label, (xs, ys)) in enumerate(self.series.items()):
            if not xs:
                continue
            colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
            if self.kind == "scatter":
                plt.scatter(xs, ys, label=label if legend else None, color=colour, marker="dot")
            else:
                plt.plot(xs, ys, label=label if legend else None, color=colour, marker="braille")
                if len(xs) <= MAX_TICKS:  # milestones: each point drawn, so one alone still shows
                    plt.scatter(xs, ys, color=colour, marker="dot")
        if self.kind == "lines" and xs_all:
            lo, hi = min(xs_all), max(xs_all)
            if lo == hi:  # one point: give the reference lines some length
                lo, hi = lo - 0.5, hi + 0.5
            for i, (label, y) in enumerate(self.hlines.items()):
                # a two-point line rather than plotext's hline, which takes no legend label
                plt.plot([lo, hi], [y, y], label=label if legend else None, color=REFERENCE_COLOURS[i % len(REFERENCE_COLOURS)],
                         marker="─")
        if self.front is not None and self.front[0]:
            plt.plot(*self.front, label="Pareto front" if legend else None, color=FRONT_COLOUR, marker="braille")
            plt.scatter(*self.front, color=FRONT_COLOUR, marker="sd")
        for text, x, y in self.labels:
            plt.text(text, x, y, alignment="left")
